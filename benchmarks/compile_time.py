"""Part e: compile time of the ES noise and update programs against depth.

The model is the SmolLM2-135M shape (vocab 49,152, hidden 576, 9 query / 3
key-value heads of 64, MLP 1,536, tied embedding) at 2, 8 and 30 layers; the
params are abstract (``jax.eval_shape``), so no weights are materialised and
only compiling is timed. The ES set-up is the one a user starts with:
``chain(es_step(None, population=16, rank=1, freeze=("embed",)), sgd)``.
Programs, each ``jax.jit(fn).lower(...)`` then ``.compile()``, timed apart:

* ``noise``: ``jax.vmap(member_noise)`` over the 16 members (what a
  population decode is given);
* ``update``: ``tx.update(None, state, params, fitness=f)`` (the ES reduction
  and the sgd step).

Both param layouts are measured: ``unrolled`` (``layers_{i}/...``, one leaf
per layer and weight) and ``scanned`` (``ModelConfig(scan_layers=True)``: one
leaf per weight kind with a layer axis, ``es_step(scanned=config.scanned)``).

Each depth and layout is compiled in a fresh process, so no in-memory jit
cache is shared between rows, and the persistent compilation cache is off.

Run alone (prints JSON rows)::

  python -m benchmarks.compile_time --layers 2,8,30 --layouts unrolled,scanned
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import es_jax
from es_jax.models.config import ModelConfig
from es_jax.models.transformer import Transformer, init_params

POPULATION = 16
LAYERS = (2, 8, 30)
LAYOUTS = ("unrolled", "scanned")


def smollm2_config(num_layers: int, scan_layers: bool = False) -> ModelConfig:
  """HuggingFaceTB/SmolLM2-135M's shapes (from its config.json) at ``num_layers`` layers."""
  return ModelConfig(
      family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_layers=num_layers, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
      rms_norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=False, dtype=jnp.float32,
      scan_layers=scan_layers)


def measure(num_layers: int, layout: str = "unrolled") -> dict[str, Any]:
  """Lower and compile seconds of the noise and update programs at one depth and layout."""
  config = smollm2_config(num_layers, scan_layers=layout == "scanned")
  model = Transformer(config)
  params = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  tx = optax.chain(
      es_jax.es_step(None, population=POPULATION, sigma=1e-3, rank=1, freeze=("embed",),
                     scanned=config.scanned, key=jax.random.key(0)),
      optax.sgd(1e-3))
  state = jax.eval_shape(tx.init, params)
  fitness = jax.ShapeDtypeStruct((POPULATION,), jnp.float32)

  def noise(state, params):
    members = jnp.arange(POPULATION)
    return jax.vmap(lambda i: es_jax.member_noise(state, params, i))(members)

  def update(state, params, fitness):
    return tx.update(None, state, params, fitness=fitness)

  row: dict[str, Any] = dict(section="compile", method="noise and update programs", status="ok",
                             model="SmolLM2-135M shape", layers=num_layers, layout=layout,
                             leaves=len(jax.tree.leaves(params)),
                             params=sum(x.size for x in jax.tree.leaves(params)),
                             population=POPULATION)
  for name, fn, args in (("noise", noise, (state, params)),
                         ("update", update, (state, params, fitness))):
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered_at, cpu_at = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    row[f"{name}_lower_s"] = lowered_at - start
    row[f"{name}_compile_s"] = time.perf_counter() - lowered_at
    # CPU seconds of this process: less sensitive than wall time to other processes' load.
    row[f"{name}_compile_cpu_s"] = time.process_time() - cpu_at
    # XLA:CPU compiles one kernel per fusion; their number is what grows with depth.
    row[f"{name}_fusions"] = compiled.as_text().count(" fusion(")
  return row


def sweep(layers=LAYERS, layouts=LAYOUTS, python: str = sys.executable, env: dict | None = None,
          log=lambda message: None) -> list[dict[str, Any]]:
  """:func:`measure` at each depth and layout, each in a fresh process (no shared jit caches)."""
  rows = []
  for layout in layouts:
    for num_layers in layers:
      log(f"[compile] {num_layers} layers, {layout} ...")
      out = subprocess.run(
          [python, "-m", "benchmarks.compile_time", "--layers", str(num_layers),
           "--layouts", layout], check=True, capture_output=True, text=True, env=env)
      rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", default=",".join(map(str, LAYERS)))
  parser.add_argument("--layouts", default=",".join(LAYOUTS),
                      help="param layouts: unrolled (layers_{i}) and/or scanned (nn.scan)")
  args = parser.parse_args(argv)
  layouts = args.layouts.split(",")
  if set(layouts) - set(LAYOUTS):
    parser.error(f"--layouts takes {', '.join(LAYOUTS)}, got {args.layouts!r}")
  for layout in layouts:
    for num_layers in (int(x) for x in args.layers.split(",")):
      print(json.dumps(measure(num_layers, layout)), flush=True)


if __name__ == "__main__":
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  main()

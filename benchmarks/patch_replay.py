"""ES patch size and replay time for a model shape (random weights, no download).

Run from the repository root::

  python -m benchmarks.patch_replay                       # SmolLM2-135M shape, N=30, rank 1
  python -m benchmarks.patch_replay --rank full --timed 2 # Qiu et al.'s full-rank noise
  python -m benchmarks.patch_replay --preset qwen2.5-1.5b-instruct --replay-layers 2

Prints one JSON object: parameter count, the float32 / bfloat16 checkpoint
sizes, the size of a real ``.espatch`` (header with every tensor's path and
shape, then ``--generations`` x N float32), and the replay time per
generation: ``replay(1 + timed generations) - replay(1 generation)``, divided
by ``timed``, both after a first replay that compiled the step into the
persistent cache, so loading it cancels out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import es_jax
from es_jax import models
from es_jax.recipe import AwdRecipe, EsRecipe, EsStepRecipe, OptimizerRecipe

SMOLLM2_135M = models.ModelConfig(  # HuggingFaceTB/SmolLM2-135M's config.json
    family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
    tie_word_embeddings=True, qkv_bias=False, dtype=jnp.float32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="smollm2-135m",
                      help="smollm2-135m or a name in es_jax.models.PRESETS")
  parser.add_argument("--population", type=int, default=30)
  parser.add_argument("--rank", default="1", help="EGGROLL rank, or 'full' (rank=None)")
  parser.add_argument("--generations", type=int, default=500, help="history length for the size")
  parser.add_argument("--timed", type=int, default=10, help="generations timed for the replay")
  parser.add_argument("--replay-layers", type=int, default=None,
                      help="time the replay on the model cut to this many layers (the sizes are "
                           "still the full model's): compiling the full model's ES step on a "
                           "small CPU takes minutes")
  args = parser.parse_args(argv)
  # The two replays compile the same step: the second loads it from this cache.
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="patch_replay_cache_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  config = (SMOLLM2_135M if args.preset == "smollm2-135m"
            else models.ModelConfig.preset(args.preset, dtype=jnp.float32))
  full_shapes = jax.eval_shape(lambda k: models.init_params(models.Transformer(config), k),
                               jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(full_shapes))
  if args.replay_layers is not None:
    config = dataclasses.replace(config, num_layers=args.replay_layers)
  theta0 = models.init_params(models.Transformer(config), jax.random.key(0))
  replay_params = sum(x.size for x in jax.tree.leaves(theta0))
  rank = None if args.rank == "full" else int(args.rank)
  # countdown_es's chain (Qiu et al.) with AWD: what a patch of a paper run holds.
  recipe = EsRecipe(EsStepRecipe(population=args.population, sigma=1e-3, seed=0, rank=rank,
                                 antithetic=False, estimator="qiu", freeze=("embed",)),
                    OptimizerRecipe("sgd", 5e-4), (AwdRecipe(10.0),))
  rng = np.random.default_rng(0)
  history = rng.normal(size=(args.generations, args.population)).astype(np.float32)

  start = time.perf_counter()
  es_jax.make_patch(recipe, theta0, history)
  checksum_s = time.perf_counter() - start
  # The full model's patch: its header lists every tensor; the checksum is 64 hex digits.
  patch = es_jax.Patch(recipe=recipe, fitness_history=history, base_sha256="0" * 64,
                       base_tensors=es_jax.tensor_manifest(full_shapes))
  with tempfile.TemporaryDirectory() as tmp:
    patch_bytes = os.path.getsize(es_jax.save_patch(os.path.join(tmp, "run.espatch"), patch))
  header_bytes = len(json.dumps(patch.header(), sort_keys=True, separators=(",", ":")))

  def timed_replay(generations):
    start = time.perf_counter()
    jax.block_until_ready(es_jax.replay(recipe, theta0, history[:generations])[0])
    return time.perf_counter() - start

  first = timed_replay(1)  # compiles, and puts the step in the cache
  cached = timed_replay(1)
  total = timed_replay(1 + args.timed)
  per_generation = (total - cached) / args.timed
  print(json.dumps({
      "model": args.preset, "params": int(num_params), "population": args.population,
      "rank": args.rank, "device": jax.devices()[0].device_kind,
      "checkpoint_bytes_float32": int(num_params * 4), "checkpoint_bytes_bfloat16": int(num_params * 2),
      "patch_generations": args.generations, "patch_bytes": patch_bytes,
      "patch_header_bytes": header_bytes, "patch_history_bytes": history.nbytes,
      "replay_model_params": int(replay_params),
      "theta0_sha256_s_on_replay_model": round(checksum_s, 2),
      "replay_first_generation_with_compile_s": round(first, 2),
      "replay_s_per_generation": round(per_generation, 3),
      "replay_s_estimated_for_history": round(first + per_generation * (args.generations - 1), 1),
      "load_average": os.getloadavg(),
  }, indent=2))


if __name__ == "__main__":
  main()

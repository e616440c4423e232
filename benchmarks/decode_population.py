"""Tokens/s of population decoding vs plain batched decoding at the same total batch.

A population of N members decodes the same B prompts, each member with its
own EGGROLL perturbation (rank 1, embedding frozen) applied inside the
forward; the baseline decodes N x B rows of the unperturbed model. Both
generate ``max_new_tokens`` for every row (no EOS), so they do the same
number of weight GEMMs; the ratio is the price of the per-member low-rank
terms. The noise tree is drawn once per generation, outside the timed region,
as in training.

Run (a few minutes on 2 CPU cores)::

  python -m benchmarks.decode_population            # N = 32, 128, 256
  python -m benchmarks.decode_population --members 8 16 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import es_jax
from es_jax import noise as noise_lib
from es_jax.models.config import ModelConfig
from es_jax.models.generate import decode, decode_population
from es_jax.models.transformer import Transformer, init_params

# A small Qwen2 shape (GQA, q/k/v biases, tied embeddings), float32 on CPU.
CONFIG = ModelConfig(
    family="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, qkv_bias=True, eos_token_ids=(), dtype=jnp.float32)


def _median_seconds(fns: dict, repeats: int) -> dict:
  """Median wall time of each function; runs are interleaved so load drifts hit all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile and warm up
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def run(members: list[int], prompts: int, prompt_len: int, max_new_tokens: int, repeats: int,
        rank: int) -> list[dict]:
  model = Transformer(CONFIG)
  params = init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, CONFIG.vocab_size, (prompts, prompt_len)), jnp.int32)
  mask = jnp.ones_like(ids)
  rows = []
  for n in members:
    spec = es_jax.NoiseSpec(population=n, sigma=0.01, rank=rank, freeze=("embed",))
    draw = jax.jit(lambda p: jax.vmap(
        lambda i: noise_lib.member_noise(spec, jax.random.key(1), 0, p, i))(jnp.arange(n)))
    noise = jax.block_until_ready(draw(params))
    tiled_ids, tiled_mask = jnp.tile(ids, (n, 1)), jnp.tile(mask, (n, 1))
    kwargs = dict(max_new_tokens=max_new_tokens, eos_ids=())
    seconds = _median_seconds({
        "population": lambda: decode_population(model, params, noise, ids, mask, **kwargs).tokens,
        "plain": lambda: decode(model, params, tiled_ids, tiled_mask, **kwargs).tokens,
    }, repeats)
    pop_s, plain_s = seconds["population"], seconds["plain"]
    tokens = n * prompts * max_new_tokens
    rows.append(dict(members=n, rows=n * prompts, pop_tps=tokens / pop_s,
                     plain_tps=tokens / plain_s, ratio=plain_s / pop_s))
    print(f"N={n}: population {tokens / pop_s:,.0f} tok/s, plain {tokens / plain_s:,.0f} tok/s",
          flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--members", type=int, nargs="+", default=[32, 128, 256])
  parser.add_argument("--prompts", type=int, default=4)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--max-new-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rank", type=int, default=1)
  args = parser.parse_args()
  rows = run(args.members, args.prompts, args.prompt_len, args.max_new_tokens, args.repeats,
             args.rank)
  c = CONFIG
  print(f"\nQwen2-shaped model: D={c.hidden_size} F={c.intermediate_size} L={c.num_layers} "
        f"N={c.num_heads} K={c.num_kv_heads} H={c.head_dim} V={c.vocab_size}, float32; "
        f"{args.prompts} prompts x {args.prompt_len} tokens, {args.max_new_tokens} new tokens, "
        f"EGGROLL rank {args.rank}; median of {args.repeats} after warm-up; "
        f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}).\n")
  print("| members N | rows (N x prompts) | population tok/s | plain tok/s | ratio |")
  print("|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['members']} | {r['rows']} | {r['pop_tps']:,.0f} | {r['plain_tps']:,.0f} "
          f"| {r['ratio']:.2f}x |")


if __name__ == "__main__":
  main()

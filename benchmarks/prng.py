"""PRNG section of the population-forward microbenchmark: key implementations' speed and safety.

Time to generate one generation's noise (``member_noise`` for all N members
under jit + vmap) with threefry2x32 (default and with
``jax_threefry_partitionable=False``), rbg and unsafe_rbg keys; and whether
each gives a member the same noise alone, inside a vmap over members, and in
``lax.map`` chunks, whether antithetic partners stay exact negatives inside a
vmap, and whether ``es_jax.noise.weighted_sum`` (the update, which draws per
pair in its own batching) agrees with the forward's noise. The safety check
uses a small tree (one 64 x 48 kernel and a bias): the property does not
depend on sizes, and threefry programs are slow to compile.

Run through ``python -m benchmarks.population_forward``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from es_jax import noise as noise_lib
from es_jax.noise import NoiseSpec

SIGMA = 1e-2
PRNG_IMPLS = ("threefry2x32", "threefry2x32/non-partitionable", "rbg", "unsafe_rbg")
# The batching-safety check only needs one kernel and one vector leaf (cheap to compile).
SAFETY_SHAPES = {"dense_0": {"kernel": jax.ShapeDtypeStruct((64, 48), jnp.float32),
                             "bias": jax.ShapeDtypeStruct((48,), jnp.float32)}}


def spec_for(population: int, rank: int | None) -> NoiseSpec:
  """The microbenchmark's noise (its forwards use it too)."""
  return NoiseSpec(population=population, sigma=SIGMA, rank=rank)


def prng_key(impl: str) -> jax.Array:
  return jax.random.key(0, impl=impl.split("/")[0])


def in_prng_mode(impl: str):
  return jax.threefry_partitionable(not impl.endswith("non-partitionable"))


def noise_fn(spec: NoiseSpec, shapes):
  def fn(key, generation):
    return jax.vmap(lambda i: noise_lib.member_noise(spec, key, generation, shapes, i))(
        jnp.arange(spec.population))
  return fn


def measure_prng_speed(shapes, cases: list[tuple[int, int | None]], *, repeats: int,
                       probe: common.MemoryProbe) -> list[dict]:
  """One generation's noise for every (N, rank) in ``cases``, per key implementation."""
  results = []
  for population, rank in cases:
    spec = spec_for(population, rank)
    normals = population * noise_lib.normals_per_draw(spec, shapes)
    programs = {}
    for impl in PRNG_IMPLS:
      common.log(f"[prng] N={population} rank={rank} compiling {impl} ...")
      with in_prng_mode(impl):  # the mode acts at tracing: the compiled program keeps it
        programs[impl] = common.compile_program(noise_fn(spec, shapes), prng_key(impl),
                                                jnp.int32(0))
    measured = common.compare(programs, probe, max_repeats=repeats, budget_s=1e9,  # every round
                              label=f"[prng] N={population} rank={rank}")
    for impl, m in measured.items():
      results.append(dict(impl=impl, population=population, rank=rank, normals=normals,
                          compile_s=m.lower_s + m.compile_s, median_s=m.median_s, min_s=m.min_s,
                          times_s=m.times_s, normals_per_s=normals / m.median_s))
  return results


def _member(tree, i: int):
  return jax.tree.map(lambda leaf: leaf[i], tree)


def _dense(noise_tree, shapes) -> list[np.ndarray]:
  dense = jax.tree.map(lambda n, s: noise_lib.materialize(n, s.shape), noise_tree, shapes,
                       is_leaf=noise_lib.is_noise_leaf)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(dense)]


def _max_diff(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(xs, ys))


def check_prng_consistency(impl: str, shapes, population: int = 8, chunk: int = 4) -> dict:
  """Is a member's noise independent of how the members are batched?"""
  spec = spec_for(population, 1)
  key, generation = prng_key(impl), jnp.int32(3)
  ids = jnp.arange(population, dtype=jnp.int32)

  def one(k, g, i):
    return noise_lib.member_noise(spec, k, g, shapes, i)

  def batched(k, g, w):
    vmapped = jax.vmap(lambda i: one(k, g, i))(ids)
    chunked = jax.lax.map(lambda i: one(k, g, i), ids, batch_size=chunk)
    update = noise_lib.weighted_sum(spec, k, g, shapes, w, chunk_size=max(1, chunk // 2))
    return vmapped, chunked, update

  weights = jax.random.normal(jax.random.key(5), (spec.num_pairs,))
  with in_prng_mode(impl):
    single = jax.jit(one)
    alone = [_dense(single(key, generation, i), shapes) for i in ids]
    vmapped, chunked, update = jax.jit(batched)(key, generation, weights)
  in_vmap = [_dense(_member(vmapped, i), shapes) for i in range(population)]
  in_chunks = [_dense(_member(chunked, i), shapes) for i in range(population)]
  # The update's unit-noise sum, rebuilt from the forward's (vmapped) member noise.
  expected = [sum(float(w) * leaf / SIGMA for w, leaf in zip(weights, leaves))
              for leaves in zip(*in_vmap[::2])]
  got = [np.asarray(leaf) for leaf in jax.tree.leaves(update)]
  scale = max(float(np.max(np.abs(e))) for e in expected)
  return dict(
      impl=impl, population=population, chunk=chunk,
      members_same_alone_vs_vmap=sum(_max_diff(a, v) == 0 for a, v in zip(alone, in_vmap)),
      members_same_alone_vs_chunks=sum(_max_diff(a, c) == 0 for a, c in zip(alone, in_chunks)),
      max_diff_alone_vs_vmap_in_sigmas=max(_max_diff(a, v) for a, v in zip(alone, in_vmap)) / SIGMA,
      antithetic_pairs_exact_in_vmap=sum(
          _max_diff(in_vmap[2 * k], [-x for x in in_vmap[2 * k + 1]]) == 0
          for k in range(spec.num_pairs)),
      update_rel_error=_max_diff(expected, got) / scale)


def prng_tables(speed: list[dict], safety: list[dict]) -> str:
  speed_rows = [[s["population"], s["rank"], s["impl"], f"{s['compile_s']:.2f}",
                 f"{s['median_s'] * 1e3:.1f}", f"{s['normals_per_s'] / 1e6:.1f}"] for s in speed]
  safety_rows = [[s["impl"], f"{s['members_same_alone_vs_vmap']}/{s['population']}",
                  f"{s['members_same_alone_vs_chunks']}/{s['population']}",
                  f"{s['max_diff_alone_vs_vmap_in_sigmas']:.3g}",
                  f"{s['antithetic_pairs_exact_in_vmap']}/{s['population'] // 2}",
                  f"{s['update_rel_error']:.2g}"] for s in safety]
  return "\n\n".join([
      common.markdown_table(["N", "rank", "impl", "compile s", "median ms", "M normals/s"],
                            speed_rows),
      common.markdown_table(["impl", "same alone vs vmap", "same alone vs chunks",
                      "max abs diff alone vs vmap / sigma", "antithetic exact in vmap",
                      "update rel. error"], safety_rows)])

"""Shared ES test pieces: a perturbation-aware MLP problem (the sharding tests and their worker
process) and the weighted-sum check against the float64 sum over members (the noise tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import es_jax
from es_jax import noise as nl


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(es_jax.Dense(11, use_bias=True, name="hidden")(x))
    return es_jax.Dense(3, name="out")(x)


def problem():
  """(es transformation, params, batch) for a 32-member rank-2 fast-path ES step, 2 chunks."""
  x = jax.random.normal(jax.random.key(5), (9, 7))
  params = Mlp().init(jax.random.key(6), x)["params"]

  def reward(params, noise, batch):
    out = Mlp().apply({"params": params, "perturbation": noise}, batch)
    return -jnp.mean((out - 1.0) ** 2)

  es = es_jax.es_step(reward, population=32, sigma=0.05, key=jax.random.key(3), rank=2,
                      reward_input="noise", chunk_size=16)
  return es, params, x


def single_device_update():
  es, params, x = problem()
  updates, state = jax.jit(es.update)(None, es.init(params), params, batch=x)
  return updates, state.rewards


def assert_weighted_sum_matches_members(spec, params, dense_member, *, generation=2):
  """``noise.weighted_sum`` (whole and in chunks of 2 pairs) against the float64 sum of
  ``w_i * eps_i`` over members, from ``dense_member(i)``: member i's ``sigma * eps_i`` tree."""
  key = jax.random.key(1)
  member_weights = np.random.default_rng(0).normal(size=spec.population)
  expected = None
  for i in range(spec.population):
    # member noise is sigma * sign * eps; weighted_sum sums unit eps per pair.
    dense = jax.tree.map(lambda x: np.asarray(x, np.float64) / spec.sigma * member_weights[i],
                         dense_member(key, generation, i))
    expected = dense if expected is None else jax.tree.map(np.add, expected, dense)
  _, signs = nl.pair_of(spec, jnp.arange(spec.population))
  pair_w = (member_weights * np.asarray(signs)).reshape(spec.num_pairs, -1).sum(1)
  for chunk in (None, 2):
    got = nl.weighted_sum(spec, key, generation, params, jnp.asarray(pair_w, jnp.float32),
                          chunk_size=chunk)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)

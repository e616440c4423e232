"""A small perturbation-aware MLP problem shared by the sharding tests and their worker process."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import es_jax


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

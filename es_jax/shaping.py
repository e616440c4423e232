"""Fitness shaping: small pure functions from raw rewards to per-member weights.

Every function takes rewards of shape ``(N,)`` where a non-finite entry marks a
failed member: it is excluded from the statistics and its shaped value is 0,
so it pulls the update nowhere. (``es_step(on_failure="worst")`` instead
replaces failed rewards by the worst finite one before shaping.)

Example:
  >>> import jax.numpy as jnp
  >>> z_score(jnp.array([1.0, 2.0, 3.0, jnp.nan])).round(3)
  Array([-1.225,  0.   ,  1.225,  0.   ], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8


def _valid(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  valid = jnp.isfinite(rewards)
  return valid, jnp.where(valid, rewards, 0.0).astype(jnp.float32)


def _masked_mean_std(x, valid):
  count = jnp.maximum(valid.sum(), 1)
  mean = jnp.where(valid, x, 0.0).sum() / count
  var = jnp.where(valid, (x - mean) ** 2, 0.0).sum() / count
  return mean, jnp.sqrt(var)


def identity(rewards: jax.Array) -> jax.Array:
  """Raw rewards (failed members -> 0), for the textbook ``1/(N sigma) sum R eps`` estimator."""
  valid, r = _valid(rewards)
  return jnp.where(valid, r, 0.0)


def z_score(rewards: jax.Array) -> jax.Array:
  """``(R - mean) / (std + 1e-8)`` with the population std (Qiu et al.)."""
  valid, r = _valid(rewards)
  mean, std = _masked_mean_std(r, valid)
  return jnp.where(valid, (r - mean) / (std + EPS), 0.0)


def centered_rank(rewards: jax.Array) -> jax.Array:
  """Ranks mapped linearly to ``[-0.5, 0.5]`` (OpenAI-ES); ties share their mean rank."""
  valid, r = _valid(rewards)
  count = valid.sum()
  # Rank among valid members only: count valid members below, plus half the ties.
  below = (valid[None, :] & (r[None, :] < r[:, None])).sum(axis=1)
  ties = (valid[None, :] & (r[None, :] == r[:, None])).sum(axis=1) - 1
  rank = below + 0.5 * ties
  shaped = rank / jnp.maximum(count - 1, 1) - 0.5
  return jnp.where(valid, shaped, 0.0)


def group_z_score(rewards: jax.Array, group_size: int) -> jax.Array:
  """GRPO-style advantages: each group's own mean and own std.

  The EGGROLL reference divides every group by the global std; per-group std is
  what the GRPO advantage defines. ``N`` must be a multiple of ``group_size``.
  """
  if rewards.shape[0] % group_size:
    raise ValueError(f"population {rewards.shape[0]} is not a multiple of group_size={group_size}.")
  valid, r = _valid(rewards)
  valid_g = valid.reshape(-1, group_size)
  r_g = r.reshape(-1, group_size)
  mean, std = jax.vmap(_masked_mean_std)(r_g, valid_g)
  shaped = (r_g - mean[:, None]) / (std[:, None] + EPS)
  return jnp.where(valid_g, shaped, 0.0).reshape(-1)


def antithetic_difference(rewards: jax.Array) -> jax.Array:
  """Pairs (2k, 2k+1) weighted by ``±(R+ - R-) / (2 std(R+ - R-))``.

  The symmetric-difference estimator: each pair's shared component cancels, and
  the scale does not depend on the reward's offset. A pair with a failed
  member contributes 0.
  """
  valid, r = _valid(rewards)
  if r.shape[0] % 2:
    raise ValueError(f"antithetic_difference needs an even population, got {r.shape[0]}.")
  pair_valid = valid.reshape(-1, 2).all(axis=1)
  diff = jnp.where(pair_valid, r[0::2] - r[1::2], 0.0)
  _, std = _masked_mean_std(diff, pair_valid)
  half = diff / (2 * (std + EPS))
  return jnp.stack([half, -half], axis=1).reshape(-1)


def replace_failed_with_worst(rewards: jax.Array) -> jax.Array:
  """NaN/inf rewards -> the worst finite reward (all failed -> all NaN stays failed)."""
  valid = jnp.isfinite(rewards)
  worst = jnp.min(jnp.where(valid, rewards, jnp.inf))
  return jnp.where(valid, rewards, jnp.where(valid.any(), worst, jnp.nan))

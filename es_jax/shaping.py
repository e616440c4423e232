"""Fitness shaping: small pure functions from raw rewards to per-member weights.

Every function takes rewards of shape ``(N,)`` where a non-finite entry marks a
failed member: it is excluded from the statistics and its shaped value is 0,
so it pulls the update nowhere. (``es_step(on_failure="worst")`` instead
replaces failed rewards by the worst finite one before shaping.)

Statistics are computed scale-safely: rewards are divided by their largest
magnitude before any moment is taken, so rewards of 1e20 (whose float32
square overflows) or 1e-30 (whose square underflows) shape like any others.

Example:
  >>> import jax.numpy as jnp
  >>> z_score(jnp.array([1.0, 2.0, 3.0, jnp.nan])).round(3)
  Array([-1.225,  0.   ,  1.225,  0.   ], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from es_jax import _checks

EPS = 1e-8


def real_array(name: str, values) -> jax.Array:
  """``values`` as a JAX array, refused with a TypeError unless they are real numbers.

  Bool, integer and floating-point dtypes are real; a complex array is refused
  rather than cast (the cast to float32 would drop its imaginary part), and so
  is anything that is not numbers at all.

  Example:
    >>> real_array("fitness", [1, 2]).dtype
    dtype('int32')
    >>> real_array("fitness", jnp.array([1j]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: fitness must be real numbers, got dtype complex64; pass their real part ...
  """
  try:
    array = jnp.asarray(values)
  except TypeError as e:
    raise TypeError(f"{name} must be an array of real numbers, got {type(values).__name__} of "
                    f"dtype {getattr(values, 'dtype', None)}.") from e
  if not any(jnp.issubdtype(array.dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)):
    # The given dtype: jnp.asarray turns complex128 into complex64 unless x64 is on.
    dtype = getattr(values, "dtype", array.dtype)
    raise TypeError(f"{name} must be real numbers, got dtype {dtype}; pass their real part (or "
                    "abs) explicitly if that is what is meant.")
  return array


def _valid(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  rewards = real_array("rewards", rewards)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must have shape (N,), got shape {rewards.shape}.")
  # Cast first, so that a reward beyond float32's range counts as failed, as in es_step.
  rewards = rewards.astype(jnp.float32)
  valid = jnp.isfinite(rewards)
  return valid, jnp.where(valid, rewards, 0.0)


def _unit_scaled(r: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(r * 2**-e, e)`` with ``2**e`` just above the largest valid ``|r|``, so ``|r * 2**-e| < 1``.

  A power of two scales exactly, and ``ldexp`` never forms ``1 / max|r|``,
  which for rewards near float32's maximum is subnormal and flushed to 0.
  """
  _, e = jnp.frexp(jnp.max(jnp.where(valid, jnp.abs(r), 0.0)))  # e = 0 when every r is 0
  return jnp.ldexp(r, -e), e


def _masked_centered_std(x, valid):
  """Deviations ``x - mean`` and population std over ``valid`` (``|x| <= 1`` expected).

  Moments are taken about a valid element, so equal values give deviations of
  exactly 0 rather than rounding noise that the std would then blow up.
  """
  count = jnp.maximum(valid.sum(), 1)
  shifted = jnp.where(valid, x - x[jnp.argmax(valid)], 0.0)
  centered = shifted - shifted.sum() / count
  var = jnp.where(valid, centered ** 2, 0.0).sum() / count
  return centered, jnp.sqrt(var)


def _standardize(x, valid, e):
  """``(r - mean) / (std + EPS)`` in reward units, from ``x = r * 2**-e``: EPS scales alike."""
  centered, std = _masked_centered_std(x, valid)
  denominator = std + jnp.ldexp(jnp.float32(EPS), -e)
  # denominator is 0 only if all valid rewards are equal and huge (EPS / s underflows).
  return jnp.where(valid & (denominator > 0), centered / jnp.where(denominator > 0, denominator, 1.0),
                   0.0)


def identity(rewards: jax.Array) -> jax.Array:
  """Raw rewards (failed members -> 0), for the textbook ``1/(N sigma) sum R eps`` estimator.

  Unlike the other shapings, its weights keep the rewards' scale, and so does
  the update: it is finite while ``|R| / (N sigma)`` times the noise fits in
  float32, and inf/NaN beyond (e.g. for rewards near float32's maximum).
  Prefer a bounded shaping when rewards can be that large.
  """
  valid, r = _valid(rewards)
  return jnp.where(valid, r, 0.0)


def z_score(rewards: jax.Array) -> jax.Array:
  """``(R - mean) / (std + 1e-8)`` with the population std (Qiu et al.)."""
  valid, r = _valid(rewards)
  x, e = _unit_scaled(r, valid)
  return _standardize(x, valid, e)


def centered_rank(rewards: jax.Array) -> jax.Array:
  """Ranks mapped linearly to ``[-0.5, 0.5]`` (OpenAI-ES); ties share their mean rank."""
  valid, r = _valid(rewards)
  count = valid.sum()
  # Rank among valid members only (0-based, ties averaged): failed members go above
  # every finite reward, so they do not move a valid member's rank.
  rank = jax.scipy.stats.rankdata(jnp.where(valid, r, jnp.inf), method="average") - 1
  shaped = rank / jnp.maximum(count - 1, 1) - 0.5
  return jnp.where(valid, shaped, 0.0)


def group_z_score(rewards: jax.Array, group_size: int) -> jax.Array:
  """GRPO-style advantages: each group's own mean and own std.

  The EGGROLL reference divides every group by the global std; per-group std is
  what the GRPO advantage defines. ``N`` must be a multiple of ``group_size``
  (a positive integer of any integer type).
  """
  group_size = _checks.integer("group_size", group_size, minimum=1)
  valid, r = _valid(rewards)
  if r.shape[0] % group_size:
    raise ValueError(f"population {r.shape[0]} is not a multiple of group_size={group_size}.")
  x, e = _unit_scaled(r, valid)  # one scale for all groups: standardising is scale-free
  shaped = jax.vmap(lambda x_g, valid_g: _standardize(x_g, valid_g, e))(
      x.reshape(-1, group_size), valid.reshape(-1, group_size))
  return shaped.reshape(-1)


def antithetic_difference(rewards: jax.Array) -> jax.Array:
  """Pairs (2k, 2k+1) weighted by ``±(R+ - R-) / (2 rms(R+ - R-))``.

  The symmetric-difference estimator: each pair's shared component cancels, and
  the scale does not depend on the reward's offset. The differences are
  divided by their root mean square over the valid pairs (not their std: a
  common difference is the signal, not an offset), so the pair weights
  ``±d / rms(d)`` have unit scale even when every pair differs by the same
  amount, and are all 0 when no pair differs. A pair with a failed member
  contributes 0.

  Example:
    >>> import jax.numpy as jnp
    >>> antithetic_difference(jnp.array([1.0, 0.0, 1.0, 0.0]))
    Array([ 0.5, -0.5,  0.5, -0.5], dtype=float32)
  """
  valid, r = _valid(rewards)
  if r.shape[0] % 2:
    raise ValueError(f"antithetic_difference needs an even population, got {r.shape[0]}.")
  pair_valid = valid.reshape(-1, 2).all(axis=1)
  x, _ = _unit_scaled(r, valid)  # R+ - R- of rewards near float32's maximum would overflow
  diff = jnp.where(pair_valid, x[0::2] - x[1::2], 0.0)
  diff, _ = _unit_scaled(diff, pair_valid)  # so that tiny differences do not square to 0
  rms = jnp.sqrt(jnp.where(pair_valid, diff ** 2, 0.0).sum() / jnp.maximum(pair_valid.sum(), 1))
  half = jnp.where(rms > 0, diff / (2 * jnp.where(rms > 0, rms, 1.0)), 0.0)
  return jnp.stack([half, -half], axis=1).reshape(-1)


def replace_failed_with_worst(rewards: jax.Array) -> jax.Array:
  """NaN/inf rewards -> the worst finite reward (all failed -> all NaN stays failed)."""
  valid = jnp.isfinite(rewards)
  worst = jnp.min(jnp.where(valid, rewards, jnp.inf))
  return jnp.where(valid, rewards, jnp.where(valid.any(), worst, jnp.nan))


def per_prompt_centering(rewards_by_prompt: jax.Array, *, normalize: bool = False) -> jax.Array:
  """Per-member fitness from a ``(members, prompts)`` reward matrix, centred prompt by prompt.

  Each prompt's column is centred on its mean over the valid members, then each
  member's centred rewards are averaged over the prompts:
  ``f_i = mean_p (R_ip - mean_j R_jp)`` (eggroll-vllm's ``fitness_per_prompt``,
  HyperscaleES's group baseline). A prompt every member solves (or fails) then
  adds nothing, instead of an offset that only ``z_score`` would remove.

  With ``normalize=True`` each centred column is also divided by its
  population std over the valid members (+1e-8): every prompt weighs the same
  however spread its rewards are (a per-prompt z-score, the GRPO advantage
  with the members as the group), and a column where all valid members tie
  contributes exactly 0.

  A member is failed if any of its rewards is NaN/inf: it is excluded from the
  column statistics and its fitness is **NaN**, not 0, because the output is a
  fitness for :func:`es_jax.es_step` (which excludes and counts NaN members)
  rather than a weight. ``es_step`` shapes ``(N,)`` rewards, so apply this
  first and pass the result, with the shaping of your choice on top
  (``identity`` to use it as it is, ``z_score`` to rescale it across members)::

    tx = optax.chain(es_step(None, ..., fitness_shaping=shaping.identity), optax.sgd(alpha))
    updates, state = tx.update(None, state, params,
                               fitness=shaping.per_prompt_centering(rewards_by_prompt))

  Args:
    rewards_by_prompt: ``(N, P)`` rewards, member ``i``'s on prompt ``p`` at ``[i, p]``.
    normalize: ``True`` or ``False`` (a Python or NumPy bool): divide each centred
      column by its std (see above).

  Returns:
    ``(N,)`` float32 fitness; NaN for failed members (all NaN if every member failed).

  Example:
    >>> import jax.numpy as jnp
    >>> r = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.5], [jnp.nan, 0.0]])
    >>> per_prompt_centering(r)  # prompt 0 is solved by all: only prompt 1 separates
    Array([-0.25,  0.25,  0.  ,   nan], dtype=float32)
  """
  if not isinstance(normalize, (bool, np.bool_)):
    # A string such as "no" is truthy: it would normalize.
    raise TypeError(f"normalize must be True or False, got {normalize!r} of type "
                    f"{type(normalize).__name__}.")
  rewards_by_prompt = real_array("rewards_by_prompt", rewards_by_prompt)
  if rewards_by_prompt.ndim != 2 or 0 in rewards_by_prompt.shape:
    raise ValueError("per_prompt_centering needs a non-empty (members, prompts) matrix, got "
                     f"shape {rewards_by_prompt.shape}; for (N,) rewards use z_score or identity.")
  finite = jnp.isfinite(rewards_by_prompt)
  member_valid = finite.all(axis=1)
  r = jnp.where(member_valid[:, None], rewards_by_prompt, 0.0).astype(jnp.float32)
  # Scale-safe like the other shapings: one power-of-two scale for the whole matrix.
  x, e = _unit_scaled(r, jnp.broadcast_to(member_valid[:, None], r.shape))
  per_column = jax.vmap(in_axes=1, out_axes=1, fun=(
      (lambda col: _standardize(col, member_valid, e)) if normalize else
      (lambda col: _masked_centered_std(col, member_valid)[0])))
  centred = per_column(x)
  fitness = centred.mean(axis=1) if normalize else jnp.ldexp(centred.mean(axis=1), e)
  return jnp.where(member_valid, fitness, jnp.nan)

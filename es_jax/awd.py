"""Anchored weight decay: decay theta toward the initial weights theta_0."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class AnchoredWeightDecayState(NamedTuple):
  """``count`` of updates so far (for learning-rate schedules) and the anchor theta_0."""

  count: jax.Array
  anchor: PyTree


def anchored_weight_decay(
    strength: float,
    *,
    kind: Literal["l2", "l1"] = "l2",
    learning_rate: float | optax.Schedule | None = None,
    anchor: PyTree | None = None,
) -> optax.GradientTransformation:
  """Anchored weight decay (AWD, Schweighofer et al.): pulls theta back toward theta_0.

  With ``delta = theta - theta_0``, the published rule acts on the post-step
  weights, scaled by the learning rate ``alpha``:

    * L2: ``delta <- (1 - alpha * strength) * delta`` (needs ``alpha * strength < 1``)
    * L1: ``delta <- sign(delta) * max(|delta| - alpha * strength, 0)``

  Two placements:

    * **Exact, after any optimizer** (recommended): put it last and give the
      learning rate, ``optax.chain(es_step(...), optax.sgd(alpha),
      anchored_weight_decay(10.0, learning_rate=alpha))``. The incoming updates
      are the optimizer's step; the output step lands exactly on the decayed
      post-step weights. Works after sgd, adam, clipping, anything; L2 and L1.
    * **Before the final ``optax.sgd(alpha)``**, without ``learning_rate``, like
      ``optax.add_decayed_weights``: adds ``strength * delta`` to the descent
      direction, so sgd scales it by alpha. This decays the pre-step rather
      than the post-step weights (a difference of order ``alpha^2 * strength``
      per step). L2 only: soft-thresholding needs the step size.

  theta_0 is ``anchor`` if given, else the params seen by ``init``; it is kept
  in the state (so it is checkpointed with the optimizer).

  Args:
    strength: lambda >= 0.
    kind: ``"l2"`` or ``"l1"``.
    learning_rate: alpha (float or optax schedule) for the exact placement.
    anchor: theta_0; defaults to the params passed to ``init``.

  Returns:
    An optax ``GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, es_jax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(optax.sgd(0.1), es_jax.anchored_weight_decay(1.0, learning_rate=0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)  # sgd step: w -> 0.9
    >>> optax.apply_updates(params, updates)["w"]  # 1 + (1 - 0.1) * (0.9 - 1)
    Array([0.91, 0.91, 0.91], dtype=float32)
  """
  if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
    raise ValueError(f"strength must be a finite number >= 0, got {strength!r}.")
  if kind not in ("l2", "l1"):
    raise ValueError(f"kind must be 'l2' or 'l1', got {kind!r}.")
  if learning_rate is None and kind == "l1":
    raise ValueError("L1 anchored weight decay soft-thresholds by learning_rate * strength, so it "
                     "needs the step size: pass learning_rate= and chain it after the optimizer.")
  if isinstance(learning_rate, (int, float)):
    if not (math.isfinite(learning_rate) and learning_rate > 0):
      raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    if kind == "l2" and learning_rate * strength >= 1:
      raise ValueError(
          f"L2 anchored weight decay needs learning_rate * strength < 1, got "
          f"{learning_rate} * {strength} = {learning_rate * strength}: the decay would overshoot "
          "theta_0. Lower strength (the paper uses 10 with lr 5e-4).")

  def init_fn(params):
    source = params if anchor is None else anchor
    if jax.tree.structure(source) != jax.tree.structure(params):
      raise ValueError("anchor must have the same tree structure as params.")
    return AnchoredWeightDecayState(count=jnp.zeros([], jnp.int32),
                                    anchor=jax.tree.map(jnp.array, source))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("anchored_weight_decay needs params: call tx.update(updates, state, params).")
    delta = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32),
                         params, state.anchor)
    if learning_rate is None:
      new_updates = jax.tree.map(lambda u, d: (u + strength * d).astype(u.dtype), updates, delta)
    else:
      alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
      shrink = alpha * strength

      def decayed_step(u, d):
        post = d + u.astype(jnp.float32)
        if kind == "l2":
          new = (1.0 - shrink) * post
        else:
          new = jnp.sign(post) * jnp.maximum(jnp.abs(post) - shrink, 0.0)
        return (new - d).astype(u.dtype)

      new_updates = jax.tree.map(decayed_step, updates, delta)
    return new_updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)

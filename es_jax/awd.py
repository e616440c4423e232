"""Anchored weight decay: decay theta toward the initial weights theta_0."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_jax import _checks
from es_jax import noise

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
  in the state as those very arrays, not a copy (see :func:`checked_anchor`), so
  with :func:`es_jax.anchored_norm_cap` on the same params theta_0 is held once.
  A jitted step that donates the params or the state deletes theta_0 with them:
  copy those first. ``init`` refuses, naming the leaf, an anchor whose
  structure or leaf shapes differ from the params, and params or anchor leaves
  that are not floating-point arrays; ``update`` refuses updates or params not
  shaped like the params seen by ``init`` (rather than broadcasting them).

  Hyperparameters may be Python, NumPy or JAX numbers. Concrete ones are
  checked here (``strength >= 0``, ``learning_rate > 0``, both finite, and
  ``learning_rate * strength < 1`` for L2). Values only known at update time,
  a schedule's ``learning_rate(count)`` or traced values (e.g. under
  ``optax.inject_hyperparams``), cannot be refused, so they are made safe
  there: the L2 factor ``1 - alpha * strength`` is clipped into ``[0, 1]`` (a
  schedule reaching ``alpha * strength >= 1`` puts theta on theta_0 instead of
  flipping the deviation's sign; a negative product does not decay), the L1
  threshold ``alpha * strength`` is clipped at 0 from below, and a negative
  ``strength`` acts as 0. A NaN still propagates, so it is seen, not hidden.

  Args:
    strength: lambda >= 0.
    kind: ``"l2"`` or ``"l1"``.
    learning_rate: alpha (a number or an optax schedule) for the exact placement.
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
  if not _checks.is_traced(strength):
    strength = _checks.finite_real("strength", strength, positive=False)
  if kind not in ("l2", "l1"):
    raise ValueError(f"kind must be 'l2' or 'l1', got {kind!r}.")
  if learning_rate is None and kind == "l1":
    raise ValueError("L1 anchored weight decay soft-thresholds by learning_rate * strength, so it "
                     "needs the step size: pass learning_rate= and chain it after the optimizer.")
  if learning_rate is not None and not callable(learning_rate) and not _checks.is_traced(
      learning_rate):
    learning_rate = _checks.finite_real("learning_rate", learning_rate, positive=True)
    if kind == "l2" and not _checks.is_traced(strength) and learning_rate * strength >= 1:
      raise ValueError(
          f"L2 anchored weight decay needs learning_rate * strength < 1, got "
          f"{learning_rate:g} * {strength:g} = {learning_rate * strength:.6g}: the decay would "
          "overshoot theta_0. Lower strength (the paper uses 10 with lr 5e-4).")

  def init_fn(params):
    return AnchoredWeightDecayState(count=jnp.zeros([], jnp.int32),
                                    anchor=checked_anchor(params, anchor, "anchored weight decay"))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("anchored_weight_decay needs params: call tx.update(updates, state, params).")
    check_step_shapes(updates, params, state.anchor)
    delta = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32),
                         params, state.anchor)
    # No-ops for the concrete values checked above; they guard the values known
    # only now (schedules, traced hyperparameters): see the docstring.
    lam = jnp.maximum(strength, 0.0)
    if learning_rate is None:
      new_updates = jax.tree.map(lambda u, d: (u + lam * d).astype(u.dtype), updates, delta)
    else:
      alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
      shrink = jnp.asarray(alpha * lam, jnp.float32)
      factor = jnp.clip(1.0 - shrink, 0.0, 1.0)
      threshold = jnp.maximum(shrink, 0.0)

      def decayed_step(u, d):
        post = d + u.astype(jnp.float32)
        if kind == "l2":
          new = factor * post
        else:
          new = jnp.sign(post) * jnp.maximum(jnp.abs(post) - threshold, 0.0)
        return (new - d).astype(u.dtype)

      new_updates = jax.tree.map(decayed_step, updates, delta)
    return new_updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def checked_anchor(params: PyTree, anchor: PyTree | None, transform: str) -> PyTree:
  """theta_0 for ``params``: ``anchor``, or ``params`` if ``anchor`` is ``None``.

  JAX arrays are kept as they are, not copied: they are immutable, so every
  transform that anchors on the same params (AWD and the norm cap in one chain)
  holds the same buffers, and theta_0 costs its size once (28 GB at 7B in
  float32), not once more per transform. Host leaves (NumPy arrays, which the
  caller may still edit in place) are copied to the device. The one way to
  change a JAX array is to donate it to a jitted step, which deletes it: a
  caller that donates its params or state must copy them first (as
  :func:`es_jax.replay` does).

  Refuses, naming the leaf, params or anchor leaves that are not floating-point
  arrays and an anchor not shaped like params. Shared by the transforms that
  keep an anchor in their state (:func:`anchored_weight_decay`,
  :func:`es_jax.anchored_norm_cap`), so both accept the same anchors, with the
  same messages; ``transform`` names the caller in them.
  """
  _check_float_leaves(params, "params", transform)
  if anchor is not None:
    _check_float_leaves(anchor, "anchor", transform)
    _check_like(anchor, "anchor", params, "params")
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.array(x),
                      params if anchor is None else anchor)


def check_step_shapes(updates: PyTree, params: PyTree | None, stored: PyTree) -> None:
  """Refuses ``updates`` or ``params`` (unless ``None``) not shaped like ``stored``.

  ``stored`` is a tree that ``init`` made from the params (an anchor, a
  residual). Shared by the transforms that keep one (this module's and
  :mod:`es_jax.mitigations`'): elementwise arithmetic would broadcast a
  ``(1, n)`` leaf against an ``(m, n)`` one and give a step of the wrong shape
  rather than an error. The message names the leaf.
  """
  where = "the params seen by init"
  _check_like(updates, "updates", stored, where)
  if params is not None:
    _check_like(params, "params", stored, where)


def _check_float_leaves(tree: PyTree, what: str, transform: str) -> None:
  """Raises, naming the leaf, unless every leaf is a floating-point array (or shape struct)."""
  # None is an empty subtree here, as in optax: nothing to decay (an anchor's None
  # where params have an array is caught as a missing leaf).
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    where = f"{what} leaf '{noise.path_str(path)}'"
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"{where} is a {type(x).__name__}, not an array; wrap it with jnp.asarray.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{where} has dtype {x.dtype}; {transform} needs floating-point leaves "
                      "(its step would be rounded to the integer dtype).")


def _check_like(tree: PyTree, what: str, reference: PyTree, reference_what: str) -> None:
  """Raises, naming the leaf, unless ``tree`` has the structure and leaf shapes of ``reference``."""
  flat = {noise.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  flat_reference = {noise.path_str(p): x
                    for p, x in jax.tree_util.tree_flatten_with_path(reference)[0]}
  for name in flat_reference:
    if name not in flat:
      raise ValueError(f"{what} has no leaf '{name}' of {reference_what}; pass {what} shaped like "
                       f"{reference_what}.")
  for name in flat:
    if name not in flat_reference:
      raise ValueError(f"{what} leaf '{name}' is not in {reference_what}; pass {what} shaped like "
                       f"{reference_what}.")
  for name, x in flat_reference.items():
    if tuple(np.shape(flat[name])) != tuple(np.shape(x)):
      raise ValueError(f"{what} leaf '{name}' has shape {tuple(np.shape(flat[name]))} but shape "
                       f"{tuple(np.shape(x))} in {reference_what}.")
  if jax.tree.structure(tree) != jax.tree.structure(reference):
    raise ValueError(f"{what}'s tree structure {jax.tree.structure(tree)} differs from that of "
                     f"{reference_what}, {jax.tree.structure(reference)} (same leaf paths, "
                     "different containers).")

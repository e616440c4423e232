"""Forgetting mitigations as optax transforms: an anchored norm cap and sparsified updates.

Both are the open checks of the forgetting paper (arXiv 2601.20861): bound how
far theta may move from theta_0, or let each step touch only its largest
entries. Like :func:`es_jax.anchored_weight_decay` they are chained after the
optimizer, so they act on its step, whatever the optimizer is::

  optax.chain(es_step(...), optax.sgd(alpha), sparsified_updates(0.01),
              anchored_norm_cap(3.0))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_jax import _checks
from es_jax import awd

PyTree = Any


class AnchoredNormCapState(NamedTuple):
  """The anchor theta_0: the params' (or the given anchor's) own arrays, shared, not copied."""

  anchor: PyTree


def anchored_norm_cap(
    radius: float,
    *,
    scope: Literal["global", "per_tensor"] = "global",
    anchor: PyTree | None = None,
) -> optax.GradientTransformation:
  """Projects the post-step weights onto the ball of radius ``radius`` around theta_0.

  With ``delta = theta + step - theta_0`` (the weights this step would give,
  relative to the anchor), the output step lands on ``theta_0 + c * delta``
  with

    * ``scope="global"``: one Euclidean norm over the whole tree,
      ``c = min(1, R / ||delta||)``, so ``||theta - theta_0|| <= R`` for the
      model as a whole (the forgetting paper's update-norm cap);
    * ``scope="per_tensor"``: each leaf's own norm and its own ``c``, so every
      tensor satisfies ``||theta_l - theta_0,l|| <= R`` (the same ``R`` for all).

  ``c = 1`` (the step is untouched) when the norm is at most ``R``; inside the
  ball nothing changes, on the outside the projection is radial, i.e. the
  Euclidean projection onto the ball. Norms are computed in float32,
  scale-safely: the deltas are divided by a power of two near their largest
  magnitude before they are squared (as LAPACK's nrm2 rescales), so a step of
  4e20 (whose square overflows) or 1e-25 (whose square underflows) is
  projected like any other. The projected weights are exact up to float32
  rounding of ``theta + step`` (``||theta - theta_0||`` may exceed ``R`` by a
  few ulps). Put it last, after the optimizer (and after
  :func:`es_jax.anchored_weight_decay` or :func:`sparsified_updates`, which do
  not preserve the bound), so the bound holds after every step. Frozen leaves
  (zero step) count with their current distance, normally 0.

  theta_0 is ``anchor`` if given, else the params seen by ``init``, kept as those
  arrays (no copy: with AWD on the same params both hold one theta_0). As in
  :func:`es_jax.anchored_weight_decay` (the same checks and messages), ``init``
  refuses, naming the leaf, an anchor not shaped like the params and params or
  anchor leaves that are not floating-point arrays; ``update`` refuses updates
  or params not shaped like the params seen by ``init`` (rather than
  broadcasting them).

  Args:
    radius: R > 0.
    scope: ``"global"`` or ``"per_tensor"``.
    anchor: theta_0; defaults to the params passed to ``init``.

  Returns:
    An optax ``GradientTransformation``; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, es_jax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(optax.sgd(1.0), es_jax.anchored_norm_cap(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([-3.0, -4.0])}, state, params)
    >>> optax.apply_updates(params, updates)["w"]  # (3, 4) has norm 5: scaled by 1/5
    Array([0.6, 0.8], dtype=float32)
  """
  radius = _checks.real_in("radius", radius, low=0.0, low_open=True)
  _checks.choice("scope", scope, ("global", "per_tensor"))

  def init_fn(params):
    return AnchoredNormCapState(anchor=awd.checked_anchor(params, anchor, "anchored norm cap"))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("anchored_norm_cap needs params: call tx.update(updates, state, params).")
    awd.check_step_shapes(updates, params, state.anchor)
    current = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32),
                           params, state.anchor)
    post = jax.tree.map(lambda d, u: d + u.astype(jnp.float32), current, updates)
    if scope == "global":
      leaves, treedef = jax.tree.flatten(post)
      projected = treedef.unflatten(_project_onto_ball(leaves, radius))
    else:
      projected = jax.tree.map(lambda x: _project_onto_ball([x], radius)[0], post)
    new_updates = jax.tree.map(lambda x, d, u: (x - d).astype(u.dtype), projected, current, updates)
    return new_updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _project_onto_ball(leaves: list[jax.Array], radius: float) -> list[jax.Array]:
  """The float32 ``leaves``, one vector, projected onto the ball of radius ``radius`` around 0.

  The norm is taken of ``x * 2**-e``, with ``2**e`` just above the largest
  ``|x|``: entries in ``[-1, 1]`` whose squares neither overflow nor underflow,
  scaled exactly, and ``1 / max|x|`` (which overflows for tiny x) is never formed.
  """
  max_abs = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), initial=0.0) for x in leaves],
                             jnp.float32(0.0))
  _, e = jnp.frexp(max_abs)  # e = 0 when every x is 0
  units = [jnp.ldexp(x, -e) for x in leaves]
  unit_norm = jnp.sqrt(sum(jnp.sum(jnp.square(u)) for u in units))  # >= 1/2 unless all 0
  # ||x|| > R in the same units; R * 2**-e is inf (never outside) when R dwarfs every x.
  outside = unit_norm > jnp.ldexp(jnp.float32(radius), -e)
  # Inner where: no 0/0 (NaN) even in the branch the outer where discards.
  shrink = radius / jnp.where(outside, unit_norm, 1.0)
  return [jnp.where(outside, u * shrink, x) for u, x in zip(units, leaves)]


class SparsifiedUpdatesState(NamedTuple):
  """``residual``: the part of past steps not yet applied (``"carry"``), or ``None`` (``"drop"``)."""

  residual: PyTree


def _carried_dtype(dtype) -> jnp.dtype:
  """The dtype the step is selected and carried in: at least float32, so nothing rounds away."""
  return jnp.promote_types(dtype, jnp.float32)


def kept_count(fraction: float, size: int) -> int:
  """How many of ``size`` entries :func:`sparsified_updates` keeps: ``fraction * size``
  rounded to the nearest integer (halves up), at least 1 and at most ``size``.

  Rounding to nearest rather than up keeps a fraction's float error from adding
  an entry (``0.1 * 30`` is 3.0000000000000004 in float64, which keeps 3).

  Example:
    >>> kept_count(0.1, 30), kept_count(0.25, 10), kept_count(0.001, 10)
    (3, 3, 1)
  """
  return min(size, max(1, math.floor(fraction * size + 0.5)))


def _top_k_mask(magnitudes: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the ``k`` largest entries of a flat array; ties go to the lower index."""
  # lax.top_k puts the lower index first among equal values, so exactly k survive.
  _, idx = jax.lax.top_k(magnitudes, k)
  return jnp.zeros(magnitudes.shape, jnp.bool_).at[idx].set(True)


def sparsified_updates(
    fraction: float,
    *,
    scope: Literal["per_tensor", "global"] = "per_tensor",
    residual: Literal["drop", "carry"] = "drop",
) -> optax.GradientTransformation:
  """Keeps the top-``fraction`` of the step's entries by magnitude and zeroes the rest.

  Semantics, for the incoming step ``u`` (the optimizer's output when chained
  after it):

    * ``residual="drop"``: select on ``a = u``; the unselected entries are lost.
    * ``residual="carry"`` (error feedback): select on ``a = u + r``, where
      ``r`` (in the state, zeros at first) is what earlier steps left out; the
      output is ``a`` on the selected entries (rounded to the step's dtype),
      and ``r <- a - output``: ``a`` on the others and, on the selected, what
      the rounding left out (0 unless the step's dtype is narrower than
      ``r``'s, e.g. bfloat16). ``r`` is kept in float32 (the promotion of the
      params' dtype and float32), so every entry of every step is applied
      eventually and ``sum(outputs) + r = sum(steps)`` at all times, up to
      float32 rounding.
    * Selection: ``k = kept_count(fraction, n)`` entries with the largest
      ``|a|`` (nearest integer to ``fraction * n``, at least 1), with ``n`` the
      size of each leaf (``scope="per_tensor"``: every tensor keeps its share)
      or of the whole tree (``scope="global"``: the leaves are flattened
      row-major and concatenated in ``jax.tree.leaves`` order). Ties at the
      k-th magnitude are broken by that flat order, lower index first, so
      exactly ``k`` entries survive (zeros included when fewer than ``k`` are
      non-zero, which changes nothing).

  Selection costs a ``lax.top_k`` over each tensor, or over one vector of the
  whole tree's magnitudes for ``"global"`` (gathered onto every device when
  the params are sharded); ``"carry"`` keeps one float32 copy of the params,
  and refuses a step whose leaves are not shaped like the params seen by
  ``init`` (rather than broadcasting it against the residual). Chain it right
  after the optimizer; transforms after it (AWD, :func:`anchored_norm_cap`) may add dense
  corrections. ``fraction=1`` passes every step through unchanged.

  Args:
    fraction: share of entries kept, in (0, 1].
    scope: ``"per_tensor"`` or ``"global"``.
    residual: ``"drop"`` or ``"carry"``.

  Returns:
    An optax ``GradientTransformation`` with :class:`SparsifiedUpdatesState`.

  Example:
    >>> import jax.numpy as jnp, es_jax
    >>> tx = es_jax.sparsified_updates(0.5, residual="carry")
    >>> state = tx.init({"w": jnp.zeros(4)})
    >>> out, state = tx.update({"w": jnp.array([1.0, -4.0, 2.0, 3.0])}, state)
    >>> out["w"], state.residual["w"]
    (Array([ 0., -4.,  0.,  3.], dtype=float32), Array([1., 0., 2., 0.], dtype=float32))
    >>> out, state = tx.update({"w": jnp.array([1.0, 1.0, 1.0, 1.0])}, state)
    >>> out["w"]  # |2|, |1|, |3|, |1| accumulated: 3 and 2 are applied
    Array([2., 0., 3., 0.], dtype=float32)
  """
  fraction = _checks.real_in("fraction", fraction, low=0.0, high=1.0, low_open=True)
  _checks.choice("scope", scope, ("per_tensor", "global"))
  _checks.choice("residual", residual, ("drop", "carry"))

  def init_fn(params):
    if residual == "drop":
      return SparsifiedUpdatesState(residual=None)
    return SparsifiedUpdatesState(
        residual=jax.tree.map(lambda p: jnp.zeros(p.shape, _carried_dtype(p.dtype)), params))

  def update_fn(updates, state, params=None):
    del params
    if residual == "carry":
      awd.check_step_shapes(updates, None, state.residual)
      acc = jax.tree.map(lambda u, r: u.astype(r.dtype) + r, updates, state.residual)
    else:
      acc = jax.tree.map(lambda u: u.astype(_carried_dtype(u.dtype)), updates)
    if scope == "per_tensor":
      masks = jax.tree.map(
          lambda a: _top_k_mask(jnp.abs(a).reshape(-1), kept_count(fraction, a.size))
          .reshape(a.shape), acc)
    else:
      leaves, treedef = jax.tree.flatten(acc)
      flat = jnp.concatenate([jnp.abs(a).reshape(-1) for a in leaves])
      mask = _top_k_mask(flat, kept_count(fraction, flat.size))
      offsets = np.cumsum([0] + [a.size for a in leaves])
      masks = treedef.unflatten([mask[lo:hi].reshape(a.shape)
                                 for a, lo, hi in zip(leaves, offsets[:-1], offsets[1:])])
    new_updates = jax.tree.map(lambda a, m, u: jnp.where(m, a, 0.0).astype(u.dtype),
                               acc, masks, updates)
    if residual == "carry":
      # The applied entries' rounding to a narrow step dtype is carried too, not lost.
      state = SparsifiedUpdatesState(residual=jax.tree.map(lambda a, u: a - u.astype(a.dtype),
                                                           acc, new_updates))
    return new_updates, state

  return optax.GradientTransformation(init_fn, update_fn)

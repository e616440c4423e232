"""Tensor-parallel sharding of the decoder's params over a ``('pop', 'model')`` mesh.

Megatron-style rules along the ``'model'`` axis: q/k/v (by head) and
gate/up are column-sharded, o and down row-sharded, so each block needs one
all-reduce after attention and one after the MLP; the embedding is sharded
on the vocabulary and the untied head on its output (vocabulary) axis. Norm
scales stay replicated. The ES population lives on the ``'pop'`` axis
(:data:`es_jax.sharding.POP_AXIS`; placing and constraining it is
:mod:`es_jax.sharding`'s): noise trees and per-member activations are split
there, params are replicated on it. An axis that does not divide a dimension
is dropped for that leaf (the leaf is replicated along it), so any model runs
on any mesh.

Example::

  from es_jax.sharding import POP_AXIS, place_population
  mesh = jax.make_mesh((2, 4), (POP_AXIS, MODEL_AXIS))
  with jax.set_mesh(mesh):
    params = shard_params(params, mesh)
    noise = place_population(population_noise, mesh)  # stacked member noise trees
    out = decode_population(model, params, noise, ids, mask, max_new_tokens=32)
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
from jax.sharding import AxisType, NamedSharding

from es_jax import noise
from es_jax.models.config import SCANNED_LAYERS

P = jax.P
PyTree = Any

MODEL_AXIS = "model"

# (regex on the '/'-joined param path, spec with "model" standing for the model axis).
PARTITION_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/(q|k|v)/kernel$", (None, MODEL_AXIS)),         # (D, N*H): by head
    (r"attn/(q|k|v)/bias$", (MODEL_AXIS,)),                # (N*H,)
    (r"attn/o/kernel$", (MODEL_AXIS, None)),               # (N*H, D): by input row
    (r"mlp/(gate|up)/kernel$", (None, MODEL_AXIS)),        # (D, F)
    (r"mlp/(gate|up)/bias$", (MODEL_AXIS,)),               # (F,)
    (r"mlp/down/kernel$", (MODEL_AXIS, None)),             # (F, D)
    (r"embed/embedding$", (MODEL_AXIS, None)),             # (V, D): by vocabulary
    (r"lm_head/kernel$", (None, MODEL_AXIS)),              # (D, V)
)


def spec_for(path: str, shape: tuple[int, ...], *, model_axis: str = MODEL_AXIS,
             axis_size: int | None = None) -> jax.sharding.PartitionSpec:
  """The PartitionSpec of one param from :data:`PARTITION_RULES`.

  Args:
    path: '/'-joined param path, e.g. ``"layers_0/attn/q/kernel"``.
    shape: the param's shape.
    model_axis: mesh axis name used for tensor parallelism.
    axis_size: that axis's size; dimensions it does not divide stay unsharded.

  Example:
    >>> spec_for("layers_0/attn/q/kernel", (28, 48), axis_size=4)
    P(None, 'model')
    >>> spec_for("layers_0/attn/k/kernel", (28, 6), axis_size=4)
    P(None, None)
    >>> spec_for("layers/attn/q/kernel", (30, 28, 48), axis_size=4)  # scanned: (L, D, N*H)
    P(None, None, 'model')
  """
  for pattern, axes in PARTITION_RULES:
    layer_axis = any(re.search(r, path) for r in SCANNED_LAYERS)
    if re.search(pattern, path) and len(shape) == len(axes) + layer_axis:
      axes = (None,) * layer_axis + axes  # a scanned leaf's layer axis stays whole
      axes = tuple(model_axis if a == MODEL_AXIS else a for a in axes)
      if axis_size is not None:
        axes = tuple(a if a is None or dim % axis_size == 0 else None
                     for a, dim in zip(axes, shape))
      return P(*axes)
  return P()


def param_specs(params: PyTree, mesh: jax.sharding.Mesh | None = None, *,
                model_axis: str = MODEL_AXIS) -> PyTree:
  """A tree of PartitionSpecs shaped like ``params`` (arrays or ShapeDtypeStructs).

  With ``mesh``, axes that do not divide a dimension are dropped; without it
  the specs are the raw rules.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> specs = param_specs({"mlp": {"down": {"kernel": jnp.zeros((8, 4))}}})
    >>> specs["mlp"]["down"]["kernel"]
    P('model', None)
  """
  size = None
  if mesh is not None:
    size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(model_axis, 1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(noise.path_str(path), tuple(x.shape), model_axis=model_axis,
                               axis_size=size), params)


def shard_params(params: PyTree, mesh: jax.sharding.Mesh, *,
                 model_axis: str = MODEL_AXIS) -> PyTree:
  """``device_put`` of every param with its tensor-parallel sharding on ``mesh``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> p = shard_params({"lm_head": {"kernel": jnp.zeros((4, 8))}}, mesh)
    >>> p["lm_head"]["kernel"].sharding.spec
    P(None, 'model')
  """
  specs = param_specs(params, mesh, model_axis=model_axis)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def auto_sharded(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs ``fn`` with the ambient mesh's explicit axes switched to automatic (GSPMD) sharding.

  ``jax.make_mesh`` makes explicit axes, under which a matmul contracting a
  model-sharded dimension is an error unless every einsum names its output
  sharding. The decoder's einsums are written once for any sharding, so they
  run in auto mode and the compiler inserts the collectives; outputs come back
  replicated (and split over the population axis when ``fn`` is vmapped over
  it). Without a mesh, or with an auto mesh, ``fn`` runs unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> auto_sharded(lambda x: x + 1)(jnp.zeros(2)).tolist()
    [1.0, 1.0]
  """
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    explicit = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                     if kind == AxisType.Explicit)
    if not explicit:
      return fn(*args)
    # P() is a prefix of any output tree: every output leaf comes back replicated.
    return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=P())(*args)
  return wrapped

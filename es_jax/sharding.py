"""The population axis on a device mesh: the one home of ``POP_AXIS``.

es_jax reads the ambient mesh (``jax.set_mesh``); when it has the population
axis, member ids, noise draws and per-member activations are split along it
(tensor-parallel rules for a model's params live in :mod:`es_jax.models.sharding`).
Two verbs, one per side of ``jit``:

* :func:`constrain_population` inside a traced function: a sharding constraint
  on the leading (member) axis of every leaf.
* :func:`place_population` outside: ``device_put`` of concrete arrays (e.g.
  stacked noise trees) onto a mesh.

Both kinds of mesh axis work: ``Explicit`` (the ``jax.make_mesh`` default:
arrays carry their sharding in their type) and ``Auto`` (GSPMD/Shardy
propagate from constraints). A leading axis that the devices do not divide is
left as it is (inside jit) or replicated (placed).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding

PyTree = Any

POP_AXIS = "pop"


def _axis_type(axis: str | None) -> AxisType | None:
  if axis is None:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if axis not in mesh.axis_names:
    return None
  return dict(zip(mesh.axis_names, mesh.axis_types))[axis]


def axis_size(axis: str | None) -> int:
  """Number of devices along ``axis`` in the ambient mesh (1 if absent)."""
  if _axis_type(axis) is None:
    return 1
  return jax.sharding.get_abstract_mesh().shape[axis]


def _constrain_leaf(x: jax.Array, axis: str | None) -> jax.Array:
  kind = _axis_type(axis)
  if kind is None or x.ndim == 0 or x.shape[0] % axis_size(axis):
    return x
  if kind == AxisType.Explicit:
    return jax.sharding.reshard(x, jax.P(axis))
  return jax.lax.with_sharding_constraint(x, jax.P(axis))


def constrain_population(tree: PyTree, axis: str | None = POP_AXIS) -> PyTree:
  """Inside jit: splits every leaf's leading (member) axis over mesh axis ``axis``.

  A no-op without an ambient mesh that has ``axis``. A leading axis that the
  devices do not divide stays as it is (every device then computes all of it):
  callers that care check :func:`axis_size` first.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> with jax.set_mesh(jax.make_mesh((1,), (POP_AXIS,))):
    ...   jax.jit(constrain_population)(jnp.zeros((4, 3))).sharding.spec
    P('pop', None)
  """
  return jax.tree.map(lambda x: _constrain_leaf(x, axis), tree)


def population_spec(ndim: int, population: int, mesh: jax.sharding.Mesh, *,
                    axis: str = POP_AXIS) -> jax.sharding.PartitionSpec:
  """``P(axis)`` on the leading (member) axis when the mesh has it and it divides, else ``P()``."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  if axis in sizes and ndim > 0 and population % sizes[axis] == 0:
    return jax.P(axis, *([None] * (ndim - 1)))
  return jax.P()


def place_population(tree: PyTree, mesh: jax.sharding.Mesh, *, axis: str = POP_AXIS) -> PyTree:
  """``device_put`` of every leaf with its leading (member) axis split over ``axis`` of ``mesh``.

  For arrays made outside jit, e.g. stacked noise trees; a leaf whose leading
  axis the devices do not divide is replicated.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> mesh = jax.make_mesh((1,), (POP_AXIS,))
    >>> place_population(jnp.zeros((4, 3)), mesh).sharding.spec
    P('pop', None)
  """
  def put(x):
    spec = population_spec(x.ndim, x.shape[0] if x.ndim else 0, mesh, axis=axis)
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(put, tree)


def replicate(x: jax.Array, axis: str | None) -> jax.Array:
  """Gathers a population-sharded array onto every device."""
  kind = _axis_type(axis)
  if kind == AxisType.Explicit:
    return jax.sharding.reshard(x, jax.P())
  if kind == AxisType.Auto:
    return jax.lax.with_sharding_constraint(x, jax.P())
  return x


def reduced_sharding(axis: str | None) -> jax.P | None:
  """``out_sharding`` for a contraction over the population axis (explicit meshes need one)."""
  return jax.P() if _axis_type(axis) == AxisType.Explicit else None

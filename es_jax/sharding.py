"""Placing the population axis on a device mesh.

es_jax reads the ambient mesh (``jax.set_mesh``); when it has the population
axis, member ids and noise draws are split along it. Both kinds of mesh axis
work: ``Explicit`` (the ``jax.make_mesh`` default: arrays carry their sharding
in their type) and ``Auto`` (GSPMD/Shardy propagate from constraints).
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType


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


def shard_population(x: jax.Array, axis: str | None) -> jax.Array:
  """Splits ``x``'s leading (member) axis over mesh axis ``axis``, if the mesh has it.

  A leading axis that the devices do not divide stays as it is (every device
  then computes all of it): callers that care check :func:`axis_size` first.
  """
  kind = _axis_type(axis)
  if kind is not None and x.shape[0] % axis_size(axis):
    return x
  if kind == AxisType.Explicit:
    return jax.sharding.reshard(x, jax.P(axis))
  if kind == AxisType.Auto:
    return jax.lax.with_sharding_constraint(x, jax.P(axis))
  return x


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

"""Perturbation-aware Flax layers: the EGGROLL fast path.

A layer reads its member's perturbation from the ``'perturbation'`` variable
collection, passed explicitly beside the params::

  model.apply({'params': params, 'perturbation': member_noise}, x)

so a population forward is a ``jax.vmap`` over the noise trees of
:func:`es_jax.member_noise` with the params shared. ``x W`` is then one GEMM
over all members and the low-rank term costs ``O(r (m + n))`` per token; no
member's dense weights are formed.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from es_jax.noise import LowRank

PERTURBATION = "perturbation"


def param_noise(module: nn.Module, name: str):
  """The perturbation of ``module``'s param ``name`` (``LowRank``, an array or ``None``)."""
  if module.has_variable(PERTURBATION, name):
    return module.get_variable(PERTURBATION, name)
  return None


def add_noise(value: jax.Array, noise) -> jax.Array:
  """``value + noise`` for a dense (full-rank) perturbation; ``value`` if none."""
  if noise is None:
    return value
  if isinstance(noise, LowRank):
    raise TypeError("a low-rank perturbation must be applied by a layer that uses it as a "
                    "matmul (es_jax.Dense), not added to a parameter.")
  return value + noise.astype(value.dtype)


def lowrank_matmul(x: jax.Array, noise: LowRank, dtype) -> jax.Array:
  """``x @ (scale * a @ b.T)`` without forming the matrix: ``scale * (x a) b^T``."""
  xa = jnp.einsum("...m,mr->...r", x.astype(dtype), noise.a.astype(dtype))
  return jnp.einsum("...r,nr->...n", xa * noise.scale.astype(dtype), noise.b.astype(dtype))


class Dense(nn.Module):
  """``y = x W (+ b)`` with the member's perturbation of ``W`` and ``b`` applied.

  The kernel has shape ``(d_in, *features)``; the noise convention treats it as a
  ``d_in x prod(features)`` matrix. A :class:`LowRank` perturbation adds
  ``scale * (x a) b^T``; a dense one (full-rank, vanilla ES) is added to ``W``.

  Attributes:
    features: output size, or a tuple of output axes (e.g. ``(heads, head_dim)``).
    use_bias: add a bias, stored flat with shape ``(prod(features),)``.
    dtype: computation dtype (default: the input's).
    param_dtype: parameter dtype (keep float32 as the ES master copy).

  Example:
    >>> import jax, jax.numpy as jnp, es_jax
    >>> layer = es_jax.Dense(5)
    >>> x = jnp.ones((2, 3))
    >>> params = layer.init(jax.random.key(0), x)["params"]
    >>> layer.apply({"params": params}, x).shape
    (2, 5)
  """

  features: int | Sequence[int]
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features) if isinstance(self.features, Sequence) else (self.features,)
    dtype = self.dtype or x.dtype
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], *features), self.param_dtype)
    noise = param_noise(self, "kernel")
    if not isinstance(noise, LowRank):
      kernel = add_noise(kernel, noise)
    y = jnp.einsum("...m,mn->...n", x.astype(dtype), kernel.reshape(x.shape[-1], -1).astype(dtype))
    if isinstance(noise, LowRank):
      y = y + lowrank_matmul(x, noise, dtype)
    if self.use_bias:
      # Kept 1-D whatever the feature axes, so the noise rule sees a vector.
      bias = self.param("bias", self.bias_init, (y.shape[-1],), self.param_dtype)
      y = y + add_noise(bias, param_noise(self, "bias")).astype(dtype)
    return y.reshape(*x.shape[:-1], *features)

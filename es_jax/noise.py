"""Perturbation noise: a pure function of (key, generation, member, parameter path).

Nothing here stores noise for a population. Every function regenerates what it
needs from the key, so the forward pass and the update see the same noise, and
memory stays at one chunk of members at a time.

Conventions (documented once here, used everywhere):
  * Member ``i`` perturbs the parameters to ``theta + sigma * eps_i``.
  * With antithetic sampling, members ``2k`` and ``2k + 1`` share the draw of
    pair ``k`` with signs ``+1`` and ``-1``.
  * Low-rank (EGGROLL) noise for a matrix leaf ``W`` of shape ``(m, n)`` is
    ``eps = A B^T / sqrt(r)`` with ``A ~ N(0, 1)^{m x r}`` and
    ``B ~ N(0, 1)^{n x r}``; each element of ``eps`` has unit variance, so
    low-rank and full-rank estimates share one scale.
  * Axis rule for leaves with more than 2 dims: the first axis is the matrix's
    rows and the remaining axes, flattened, its columns, i.e. a kernel
    ``(d_in, *features)`` as in :class:`es_jax.Dense`.
  * Vectors (and scalars) get full-rank noise by default or are frozen.
  * Leaves whose '/'-joined path matches a ``freeze`` regex get no noise.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from es_jax import _checks
from es_jax import sharding

PyTree = Any
LeafKind = Literal["lowrank", "full", "frozen"]
_F32 = np.finfo(np.float32)


class LowRank(NamedTuple):
  """One member's low-rank perturbation of a kernel: ``scale * a @ b.T``.

  ``a`` has shape ``(m, r)``, ``b`` ``(n, r)`` with ``n`` the product of the
  kernel's trailing axes; ``scale`` is ``sign * sigma / sqrt(r)``. Under a vmap
  over members every field gains a leading population axis.
  """

  a: jax.Array
  b: jax.Array
  scale: jax.Array


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
  """Static description of a population's noise (hashable: lives in jit caches).

  Attributes:
    population: number of members N.
    sigma: perturbation scale; member params are ``theta + sigma * eps``.
    rank: rank r of the EGGROLL noise of matrix leaves; ``None`` = full-rank
      Gaussian noise everywhere (vanilla ES / OpenES).
    antithetic: members come in (+eps, -eps) pairs.
    vector_noise: ``"full"`` (full-rank noise for leaves with ndim < 2) or
      ``"frozen"``.
    freeze: regexes; a leaf whose '/'-joined path matches any of them (with
      ``re.search``) is not perturbed, e.g. ``("embed", "norm")``.
  """

  population: int
  sigma: float
  rank: int | None = 1
  antithetic: bool = True
  vector_noise: Literal["full", "frozen"] = "full"
  freeze: tuple[str, ...] = ()

  def __post_init__(self):
    # NumPy / JAX scalars are welcome but stored as Python numbers: the spec is
    # hashed into jit caches, and a 0-d jax.Array is not hashable.
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("population", _checks.integer("population", self.population, minimum=2))
    if not isinstance(self.antithetic, (bool, np.bool_)):
      raise TypeError(f"antithetic must be a bool, got {self.antithetic!r}.")
    set_("antithetic", bool(self.antithetic))
    if self.antithetic and self.population % 2:
      raise ValueError(
          f"population={self.population} is odd but antithetic sampling pairs members; "
          "use an even population or antithetic=False.")
    sigma = _checks.real("sigma", self.sigma)
    if not (math.isfinite(sigma) and sigma > 0):
      raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}.")
    if not float(_F32.tiny) <= sigma <= float(_F32.max):
      # Below float32's smallest normal number sigma flushes to 0 on accelerators
      # (every member equals theta) and 1/(N sigma) overflows to inf.
      raise ValueError(
          f"sigma={sigma!r} is outside float32's normal range [{_F32.tiny:.3g}, {_F32.max:.3g}], "
          "so sigma * eps and 1/(N sigma) cannot be represented; use a sigma on the scale of "
          "the weights' changes (1e-4 to 1e-1 is typical).")
    set_("sigma", sigma)
    if self.rank is not None:
      set_("rank", _checks.integer("rank (or None for full-rank noise)", self.rank, minimum=1))
    if self.vector_noise not in ("full", "frozen"):
      raise ValueError(f"vector_noise must be 'full' or 'frozen', got {self.vector_noise!r}.")
    for pattern in self.freeze:
      re.compile(pattern)

  @property
  def num_pairs(self) -> int:
    """Number of independent draws: N/2 with antithetic sampling, else N."""
    return self.population // 2 if self.antithetic else self.population


def path_str(path) -> str:
  """'/'-joined path of a pytree leaf, e.g. ``'layers_0/attn/q/kernel'``."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def leaf_kind(spec: NoiseSpec, path: str, shape: tuple[int, ...]) -> LeafKind:
  """How a leaf is perturbed; raises if ``spec.rank`` is too large for it."""
  if any(re.search(p, path) for p in spec.freeze):
    return "frozen"
  if len(shape) < 2:
    return "full" if spec.vector_noise == "full" else "frozen"
  if spec.rank is None:
    return "full"
  m, n = matrix_shape(shape)
  if spec.rank > min(m, n):
    raise ValueError(
        f"rank={spec.rank} exceeds min(m, n)={min(m, n)} of leaf '{path}' with shape {shape} "
        f"(matricised as {m} x {n}); lower the rank or freeze this leaf.")
  return "lowrank"


def check_params(spec: NoiseSpec, params: PyTree) -> None:
  """Raises, naming the leaf, unless ES can perturb every leaf of ``params``.

  A leaf must be an array (or ``jax.ShapeDtypeStruct``) of a floating dtype:
  noise added to an integer or bool leaf would be rounded away, so such a
  leaf is accepted only when frozen (``freeze`` or ``vector_noise="frozen"``).
  ``None`` and Python-number leaves are refused too. Also checks the rank
  against every matrix leaf (:func:`leaf_kind`).

  Example:
    >>> import jax.numpy as jnp
    >>> spec = NoiseSpec(population=2, sigma=0.1)
    >>> check_params(spec, {"w": jnp.zeros((3, 2)), "step": jnp.zeros((), jnp.int32)})
    Traceback (most recent call last):
    ...
    TypeError: params leaf 'step' has dtype int32: noise added to it would be rounded away. Make it a float array, or freeze it with freeze=('^step$',) or move it out of params.
    >>> check_params(NoiseSpec(population=2, sigma=0.1, freeze=("step",)),
    ...              {"w": jnp.zeros((3, 2)), "step": jnp.zeros((), jnp.int32)})
  """
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0]
  for path, x in leaves:
    name = path_str(path)
    where = f"params leaf '{name}'" if name else "params"
    if x is None:
      raise ValueError(f"{where} is None; ES needs an array at every leaf: remove the entry "
                       "or give it an array.")
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      raise TypeError(f"{where} is a {type(x).__name__}, not an array; wrap it with "
                      "jnp.asarray(...) (as a float array).")
    kind = leaf_kind(spec, name, tuple(x.shape))
    if kind != "frozen" and not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{where} has dtype {x.dtype}: noise added to it would be rounded away. "
                      f"Make it a float array, or freeze it with freeze=('^{re.escape(name)}$',) "
                      "or move it out of params.")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """Rows and columns of a leaf under the axis rule (first axis x the rest)."""
  return shape[0], math.prod(shape[1:])


def _leaf_key(key: jax.Array, generation, path: str) -> jax.Array:
  # crc32 is stable across processes and Python runs (unlike hash()).
  path_id = zlib.crc32(path.encode()) & 0x7FFFFFFF
  return jax.random.fold_in(jax.random.fold_in(key, generation), path_id)


def pair_of(spec: NoiseSpec, member) -> tuple[jax.Array, jax.Array]:
  """(pair index, sign) of a member."""
  member = jnp.asarray(member, jnp.int32)
  if spec.antithetic:
    return member // 2, 1 - 2 * (member % 2)
  return member, jnp.ones_like(member)


def draw(spec: NoiseSpec, key, generation, path: str, shape, pair):
  """Unit-variance noise of one leaf for one pair: an array, LowRank(a, b, 1/sqrt(r)), or None."""
  kind = leaf_kind(spec, path, tuple(shape))
  if kind == "frozen":
    return None
  leaf_key = jax.random.fold_in(_leaf_key(key, generation, path), pair)
  if kind == "full":
    return jax.random.normal(leaf_key, shape, jnp.float32)
  m, n = matrix_shape(tuple(shape))
  key_a, key_b = jax.random.split(leaf_key)
  a = jax.random.normal(key_a, (m, spec.rank), jnp.float32)
  b = jax.random.normal(key_b, (n, spec.rank), jnp.float32)
  return LowRank(a, b, jnp.float32(1.0 / math.sqrt(spec.rank)))


def _is_noise_leaf(x) -> bool:
  return x is None or isinstance(x, LowRank)


def member_noise(spec: NoiseSpec, key, generation, params: PyTree, member) -> PyTree:
  """One member's perturbation ``sigma * eps`` as a tree shaped like ``params``.

  Matrix leaves hold :class:`LowRank` factors (with sign and sigma folded into
  ``scale``), full-rank leaves dense arrays, frozen leaves ``None``. Works on
  ``jax.ShapeDtypeStruct`` leaves too and under ``jax.vmap`` over ``member``.
  """
  pair, sign = pair_of(spec, member)
  scale = sign.astype(jnp.float32) * spec.sigma

  def leaf(path, x):
    noise = draw(spec, key, generation, path_str(path), x.shape, pair)
    if noise is None:
      return None
    if isinstance(noise, LowRank):
      return noise._replace(scale=noise.scale * scale)
    return noise * scale

  return jax.tree_util.tree_map_with_path(leaf, params)


def scale_noise(noise: PyTree, factor) -> PyTree:
  """A noise tree times ``factor`` (e.g. -1 for the antithetic partner), factors untouched."""
  def leaf(n):
    if n is None:
      return None
    if isinstance(n, LowRank):
      return n._replace(scale=n.scale * factor)
    return n * factor
  return jax.tree.map(leaf, noise, is_leaf=_is_noise_leaf)


def materialize(noise, shape, dtype=jnp.float32) -> jax.Array:
  """Dense array of one leaf's noise (zeros for a frozen leaf)."""
  if noise is None:
    return jnp.zeros(shape, dtype)
  if isinstance(noise, LowRank):
    return (noise.scale * noise.a @ noise.b.T).reshape(shape).astype(dtype)
  return noise.astype(dtype)


def perturb(params: PyTree, noise: PyTree) -> PyTree:
  """``params + noise`` with every member's noise materialised (the generic path)."""
  # A frozen leaf stays bit-exact (an integer leaf must not round-trip through float32).
  return jax.tree.map(
      lambda n, p: p if n is None else (p + materialize(n, p.shape, jnp.float32)).astype(p.dtype),
      noise, params, is_leaf=_is_noise_leaf)


def weighted_sum(spec: NoiseSpec, key, generation, params: PyTree, pair_weights: jax.Array,
                 *, chunk_size: int | None = None, population_axis: str | None = None) -> PyTree:
  """``sum_k w_k eps_k`` over pairs (unit noise, no sigma), shaped like ``params``.

  Low-rank leaves are reduced as ``A^T diag(w) B`` by one einsum per chunk of
  pairs, so no ``(pairs, m, n)`` array is formed; full-rank leaves accumulate
  chunk by chunk. Frozen leaves get zeros.

  Args:
    spec: the population's noise.
    key, generation: as in :func:`member_noise`.
    params: tree of arrays or ``ShapeDtypeStruct`` giving shapes and dtypes.
    pair_weights: ``(spec.num_pairs,)`` weights.
    chunk_size: at most this many pairs per chunk (the largest divisor of
      ``num_pairs`` that divides it); ``None`` = all at once.
    population_axis: mesh axis to split each chunk's pairs over (see
      :mod:`es_jax.sharding`); every device reduces its share, then one all-reduce.
  """
  num_pairs = spec.num_pairs
  chunk = num_pairs if chunk_size is None else math.gcd(chunk_size, num_pairs)
  pair_ids = jnp.arange(num_pairs, dtype=jnp.int32).reshape(-1, chunk)
  weights = pair_weights.astype(jnp.float32).reshape(-1, chunk)

  def leaf(path, x):
    path = path_str(path)
    kind = leaf_kind(spec, path, tuple(x.shape))
    if kind == "frozen":
      return jnp.zeros(x.shape, x.dtype)

    def body(total, ids_and_w):
      ids, w = ids_and_w
      ids = sharding.shard_population(ids, population_axis)
      w = sharding.shard_population(w, population_axis)
      noise = jax.vmap(lambda p: draw(spec, key, generation, path, x.shape, p))(ids)
      out = sharding.reduced_sharding(population_axis)
      if kind == "lowrank":
        part = jnp.einsum("kmr,k,knr->mn", noise.a, w, noise.b, out_sharding=out)
        part = part.reshape(x.shape) / math.sqrt(spec.rank)
      else:
        part = jnp.einsum("k,k...->...", w, noise, out_sharding=out)
      return total + part, None

    total, _ = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (pair_ids, weights))
    return total.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params)

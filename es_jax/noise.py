"""Perturbation noise: a pure function of (key, generation, member, the tree's layout).

Nothing here stores noise for a population. Every function regenerates what it
needs from the key, so the forward pass and the update see the same noise, and
memory stays at one chunk of members at a time.

This is the low-level public layer under :func:`es_jax.es_step` (its names are
``__all__``): functions of a :class:`NoiseSpec` and an explicit key and
generation, for benchmarks and custom loops. With an optimizer state,
:func:`es_jax.member_noise` and :func:`es_jax.member_params` draw the same noise.

Conventions (documented once here, used everywhere):
  * Member ``i`` perturbs the parameters to ``theta + sigma * eps_i``.
  * With antithetic sampling, members ``2k`` and ``2k + 1`` share the draw of
    pair ``k`` with signs ``+1`` and ``-1`` (exact negatives). Without it,
    member ``i`` is pair ``i``.
  * Low-rank (EGGROLL) noise for a matrix leaf ``W`` of shape ``(m, n)`` is
    ``eps = A B^T / sqrt(r)`` with ``A ~ N(0, 1)^{m x r}`` and
    ``B ~ N(0, 1)^{n x r}``; each element of ``eps`` has unit variance, so
    low-rank and full-rank estimates share one scale.
  * Axis rule for leaves with more than 2 dims: the first axis is the matrix's
    rows and the remaining axes, flattened, its columns, i.e. a kernel
    ``(d_in, *features)`` as in :class:`es_jax.Dense`.
  * Vectors (and scalars) get full-rank noise by default or are frozen.
  * Leaves whose '/'-joined path matches a ``freeze`` regex get no noise.
  * Scanned leaves (path matches a ``scanned`` regex) stack layers along their
    first axis, as ``nn.scan`` stores them: slice ``x[l]`` is perturbed like
    an unstacked leaf of shape ``x.shape[1:]``, by its own draw.
  * Drawing (the static layout): the perturbed leaves are grouped by kind and
    shape (:func:`layout`); a group holds its leaves in tree-flatten order.
    Pair ``k`` of generation ``g`` draws each group with ONE call,
    ``normal(fold_in(fold_in(fold_in(key, g), k), tag), shape)``, where
    ``tag`` is the crc32 of the group's name (e.g. ``'lowrank:576x1536'``)
    and ``shape`` is ``(G, m + n, r)`` for a low-rank group of ``G`` leaves
    (leaf ``j`` takes ``A = z[j, :m]``, ``B = z[j, m:]``) or ``(G, *shape)``
    for a full-rank group (a scanned leaf's ``L`` slices count as ``L``
    consecutive leaves). So a leaf's noise depends on the key, the
    generation, its pair and its place in its group (which leaves share its
    kind and shape), never on how members are chunked or sharded or on the
    device count; and the number of random draws does not grow with depth: a
    30-layer decoder has as many groups as a 2-layer one. With scanned layers
    the number of noise and update arrays does not grow either, and with it
    the compile time of the ES programs (one XLA:CPU kernel per array).
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

__all__ = [
    "NOISE_CONVENTION",
    "Group",
    "Layout",
    "LowRank",
    "NoiseSpec",
    "check_params",
    "is_noise_leaf",
    "layout",
    "leaf_kind",
    "materialize",
    "matrix_shape",
    "member_noise",
    "normals_per_draw",
    "num_perturbed",
    "pair_of",
    "path_str",
    "perturb",
    "scale_noise",
    "weighted_sum",
]

PyTree = Any
LeafKind = Literal["lowrank", "full", "frozen"]
# Which drawing rule the docstring above describes. Bump it with any change that gives a
# member other noise for the same (key, generation, member, layout): ES patches store it,
# and replaying a history under another rule would silently give other weights.
# 1: one draw per leaf; 2: one draw per (kind, shape) group. Scanned leaves came later
# within 2: a tree without them draws exactly as before, and no older patch has them.
NOISE_CONVENTION = 2
_F32 = np.finfo(np.float32)


class LowRank(NamedTuple):
  """One member's low-rank perturbation of a kernel: ``scale * a @ b.T``.

  ``a`` has shape ``(m, r)``, ``b`` ``(n, r)`` with ``n`` the product of the
  kernel's trailing axes; ``scale`` is ``sign * sigma / sqrt(r)``. A scanned
  leaf's factors have a leading layer axis, ``(L, m, r)``, ``(L, n, r)`` and
  ``(L,)``, which ``nn.scan`` slices. Under a vmap over members every field
  gains a leading population axis.
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
    scanned: regexes of leaves that stack layers along their first axis
      (``nn.scan``), e.g. ``("^layers/",)``; each layer's slice is perturbed
      as an unstacked leaf. ``ModelConfig.scanned`` gives a model's.
  """

  population: int
  sigma: float
  rank: int | None = 1
  antithetic: bool = True
  vector_noise: Literal["full", "frozen"] = "full"
  freeze: tuple[str, ...] = ()
  scanned: tuple[str, ...] = ()

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
    for name in ("freeze", "scanned"):
      set_(name, _checks.regexes(name, getattr(self, name)))

  @property
  def num_pairs(self) -> int:
    """Number of independent draws: N/2 with antithetic sampling, else N."""
    return self.population // 2 if self.antithetic else self.population


def path_str(path) -> str:
  """'/'-joined path of a pytree leaf, e.g. ``'layers_0/attn/q/kernel'``.

  The names that ``freeze`` regexes, sharding rules and ES patches match: dict
  keys, attribute names and sequence indices, as ``jax.tree_util.keystr``
  writes them in its simple form.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
    ...     {"layers_0": {"attn": [jnp.zeros(1), jnp.zeros(2)]}})]
    ['layers_0/attn/0', 'layers_0/attn/1']
  """
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def is_scanned(spec: NoiseSpec, path: str) -> bool:
  """Whether the leaf at ``path`` stacks layers (matches a ``spec.scanned`` regex)."""
  return any(re.search(p, path) for p in spec.scanned)


def slice_shape(spec: NoiseSpec, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape one draw of a leaf perturbs: a layer's, ``shape[1:]``, if scanned, else ``shape``."""
  if not is_scanned(spec, path):
    return tuple(shape)
  if not shape:
    raise ValueError(f"leaf '{path}' matches scanned={spec.scanned} but is a scalar, and a "
                     "scanned leaf stacks its layers along its first axis; fix the regexes.")
  return tuple(shape[1:])


def leaf_kind(spec: NoiseSpec, path: str, shape: tuple[int, ...]) -> LeafKind:
  """How a leaf (a layer's slice, if scanned) is perturbed; raises if ``spec.rank`` is too large."""
  if any(re.search(p, path) for p in spec.freeze):
    return "frozen"
  if is_scanned(spec, path):
    path, shape = f"{path}[layer]", slice_shape(spec, path, shape)
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


class Group(NamedTuple):
  """The perturbed leaves of one kind and shape: drawn together, by one normal call per pair.

  Attributes:
    kind: ``"lowrank"`` or ``"full"``.
    shape: the shape of each of its leaves (of each layer's slice, for a scanned leaf).
    leaves: the leaves' positions in tree-flatten order.
    paths: their '/'-joined paths, in the same order.
    layers: per leaf, its number of stacked layers if scanned, else ``None``.
  """

  kind: LeafKind
  shape: tuple[int, ...]
  leaves: tuple[int, ...]
  paths: tuple[str, ...]
  layers: tuple[int | None, ...]

  @property
  def size(self) -> int:
    """How many draws the group stacks: one per unscanned leaf, one per layer of a scanned one."""
    return sum(1 if n is None else n for n in self.layers)

  def slots(self):
    """``(leaf index, its place in the group's stack)``: an int, or a slice for a scanned leaf."""
    start = 0
    for index, n in zip(self.leaves, self.layers):
      yield index, (start if n is None else slice(start, start + n))
      start += 1 if n is None else n

  @property
  def name(self) -> str:
    return f"{self.kind}:{'x'.join(map(str, self.shape))}"

  @property
  def tag(self) -> int:
    """The group's key salt: crc32 is stable across processes and Python runs (unlike hash())."""
    return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

  def draw_shape(self, rank: int | None) -> tuple[int, ...]:
    """Shape of one pair's normals: ``(G, m + n, r)`` (rows of A then of B) or ``(G, *shape)``."""
    if self.kind == "lowrank":
      m, n = matrix_shape(self.shape)
      return (self.size, m + n, rank)
    return (self.size, *self.shape)

  def sum_shape(self) -> tuple[int, ...]:
    """Shape of the group's stacked weighted sum: ``(G, m, n)`` or ``(G, *shape)``."""
    if self.kind == "lowrank":
      return (self.size, *matrix_shape(self.shape))
    return (self.size, *self.shape)


class Layout(NamedTuple):
  """The static part of a tree's noise: its structure and its groups (:func:`layout`)."""

  treedef: Any
  num_leaves: int
  groups: tuple[Group, ...]


def layout(spec: NoiseSpec, params: PyTree) -> Layout:
  """Groups ``params``' perturbed leaves by kind and shape, in order of first appearance.

  Raises (via :func:`leaf_kind`) if ``spec.rank`` is too large for a leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> spec = NoiseSpec(population=2, sigma=1.0, freeze=("emb",))
    >>> params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(4), "c": jnp.zeros((3, 4)),
    ...           "emb": jnp.zeros((9, 3))}
    >>> [(g.name, g.paths) for g in layout(spec, params).groups]
    [('lowrank:3x4', ('a', 'c')), ('full:4', ('b',))]
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  depths = {path_str(p): x.shape[0] for p, x in leaves
            if is_scanned(spec, path_str(p)) and len(x.shape)}
  if len(set(depths.values())) > 1:
    # Layers of one scan share a depth; different ones mean the regexes caught other leaves.
    raise ValueError(f"the leaves matching scanned={spec.scanned} stack different numbers of "
                     f"layers on their first axis ({depths}); fix the regexes.")
  members: dict[tuple[str, tuple[int, ...]], list[tuple[int, str, int | None]]] = {}
  for index, (path, x) in enumerate(leaves):
    path, shape = path_str(path), tuple(x.shape)
    kind = leaf_kind(spec, path, shape)
    if kind != "frozen":
      layers = shape[0] if is_scanned(spec, path) else None
      members.setdefault((kind, slice_shape(spec, path, shape)), []).append((index, path, layers))
  groups = tuple(Group(kind, shape, *(tuple(column) for column in zip(*group)))
                 for (kind, shape), group in members.items())
  tags = [g.tag for g in groups]
  if len(set(tags)) != len(tags):  # Two names with one crc32: never seen, but never silent.
    raise ValueError(f"noise groups {[g.name for g in groups]} collide in crc32; "
                     "freeze or reshape one of the colliding leaves.")
  return Layout(treedef, len(leaves), groups)


def num_perturbed(spec: NoiseSpec, params: PyTree) -> int:
  """How many parameters ``spec`` perturbs: the sizes of every leaf that is not frozen.

  Example:
    >>> import jax.numpy as jnp
    >>> spec = NoiseSpec(population=2, sigma=1.0, freeze=("emb",))
    >>> num_perturbed(spec, {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "emb": jnp.zeros((9, 3))})
    16
  """
  return sum(g.size * math.prod(g.shape) for g in layout(spec, params).groups)


def normals_per_draw(spec: NoiseSpec, params: PyTree) -> int:
  """How many unit normals one pair's noise draws: ``r (m + n)`` a low-rank leaf, its size else.

  The memory and RNG work of one member's noise (a full-rank draw is as large
  as the perturbed params).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    >>> normals_per_draw(NoiseSpec(population=2, sigma=1.0, rank=2), params)  # 2 * (3 + 4) + 4
    18
    >>> normals_per_draw(NoiseSpec(population=2, sigma=1.0, rank=None), params)  # 12 + 4
    16
  """
  return sum(math.prod(g.draw_shape(spec.rank)) for g in layout(spec, params).groups)


def pair_of(spec: NoiseSpec, member) -> tuple[jax.Array, jax.Array]:
  """(pair index, sign) of a member."""
  member = jnp.asarray(member, jnp.int32)
  if spec.antithetic:
    return member // 2, 1 - 2 * (member % 2)
  return member, jnp.ones_like(member)


def draw_pair(spec: NoiseSpec, key, generation, tree_layout: Layout, pair) -> tuple[jax.Array, ...]:
  """Unit-variance normals of every group for one pair: one ``jax.random.normal`` call per group.

  Shapes are :meth:`Group.draw_shape`; see the module docstring for the keys.
  """
  pair_key = jax.random.fold_in(jax.random.fold_in(key, generation), pair)
  return tuple(
      jax.random.normal(jax.random.fold_in(pair_key, group.tag), group.draw_shape(spec.rank),
                        jnp.float32)
      for group in tree_layout.groups)


def is_noise_leaf(x) -> bool:
  """True for what a noise tree holds at a param leaf (``None``, :class:`LowRank`): ``is_leaf=``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> spec = NoiseSpec(population=2, sigma=1.0, freeze=("b",))
    >>> noise = member_noise(spec, jax.random.key(0), 0, {"w": jnp.zeros((3, 2)),
    ...                                                    "b": jnp.zeros(2)}, 0)
    >>> jax.tree.map(lambda n: type(n).__name__, noise, is_leaf=is_noise_leaf)
    {'b': 'NoneType', 'w': 'LowRank'}
  """
  return x is None or isinstance(x, LowRank)


def member_noise(spec: NoiseSpec, key, generation, params: PyTree, member) -> PyTree:
  """One member's perturbation ``sigma * eps`` as a tree shaped like ``params``.

  Matrix leaves hold :class:`LowRank` factors (with sign and sigma folded into
  ``scale``), full-rank leaves dense arrays, frozen leaves ``None``. Works on
  ``jax.ShapeDtypeStruct`` leaves too and under ``jax.vmap`` over ``member``.
  """
  pair, sign = pair_of(spec, member)
  scale = sign.astype(jnp.float32) * spec.sigma
  tree_layout = layout(spec, params)
  noise = [None] * tree_layout.num_leaves
  for group, z in zip(tree_layout.groups, draw_pair(spec, key, generation, tree_layout, pair)):
    if group.kind == "lowrank":
      # Asks for the factors to be materialised once, not the sampler fused into the ops
      # that apply b in (x a) b^T (recomputed per token and sign). XLA:CPU drops the
      # barrier before fusing: the 11.5M fast path (benchmarks part a, N=128) took 604 ms
      # with it and 596 ms without. Kept for backends that honour it (not measured).
      z = jax.lax.optimization_barrier(z)
      m, _ = matrix_shape(group.shape)
      lowrank_scale = scale / math.sqrt(spec.rank)
      for index, at in group.slots():
        # A scanned leaf's scale gets its layer axis too: nn.scan slices every field.
        leaf_scale = lowrank_scale if isinstance(at, int) else jnp.full(
            (at.stop - at.start,), lowrank_scale)
        noise[index] = LowRank(z[at, :m], z[at, m:], leaf_scale)
    else:
      for index, at in group.slots():
        noise[index] = z[at] * scale
  return jax.tree_util.tree_unflatten(tree_layout.treedef, noise)


def scale_noise(noise: PyTree, factor) -> PyTree:
  """A noise tree times ``factor`` (e.g. -1 for the antithetic partner), factors untouched."""
  def leaf(n):
    if n is None:
      return None
    if isinstance(n, LowRank):
      return n._replace(scale=n.scale * factor)
    return n * factor
  return jax.tree.map(leaf, noise, is_leaf=is_noise_leaf)


def materialize(noise, shape, dtype=jnp.float32) -> jax.Array:
  """Dense array of one leaf's noise (zeros for a frozen leaf)."""
  if noise is None:
    return jnp.zeros(shape, dtype)
  if isinstance(noise, LowRank):  # (L, m, r) factors of a scanned leaf give (L, m, n)
    dense = jnp.einsum("...mr,...nr->...mn", noise.a, noise.b)
    return (jnp.asarray(noise.scale)[..., None, None] * dense).reshape(shape).astype(dtype)
  return noise.astype(dtype)


def perturb(params: PyTree, noise: PyTree) -> PyTree:
  """``params + noise`` with every member's noise materialised (the generic path)."""
  # A frozen leaf stays bit-exact (an integer leaf must not round-trip through float32).
  return jax.tree.map(
      lambda n, p: p if n is None else (p + materialize(n, p.shape, jnp.float32)).astype(p.dtype),
      noise, params, is_leaf=is_noise_leaf)


# Full-rank groups of more pair-chunk normals than this are reduced one pair per
# device at a time when no chunk_size is given, so that the update of a
# full-rank population does not hold every pair's copy of the weights at once.
_FULL_RANK_BYTES_AT_ONCE = 64 * 2**20


def weighted_sum(spec: NoiseSpec, key, generation, params: PyTree, pair_weights: jax.Array,
                 *, chunk_size: int | None = None, population_axis: str | None = None) -> PyTree:
  """``sum_k w_k eps_k`` over pairs (unit noise, no sigma), shaped like ``params``.

  Reduced per group of same-shape leaves (:func:`layout`), not per leaf: a
  low-rank group is ``A^T diag(w) B`` by one batched einsum per chunk of pairs
  over its stacked ``(G, m, n)`` leaves, so no ``(pairs, m, n)`` array is
  formed; a full-rank group accumulates chunk by chunk. Frozen leaves get zeros.

  Args:
    spec: the population's noise.
    key, generation: as in :func:`member_noise`.
    params: tree of arrays or ``ShapeDtypeStruct`` giving shapes and dtypes.
    pair_weights: ``(spec.num_pairs,)`` weights.
    chunk_size: at most this many pairs per chunk (the largest divisor of
      ``num_pairs`` that divides it); ``None`` = all at once, except large
      full-rank groups, which then go one pair per device at a time.
    population_axis: mesh axis to split each chunk's pairs over (see
      :mod:`es_jax.sharding`); every device reduces its share, then one all-reduce.
  """
  num_pairs = spec.num_pairs
  tree_layout = layout(spec, params)
  leaves = jax.tree.leaves(params)
  chunk = num_pairs if chunk_size is None else math.gcd(chunk_size, num_pairs)
  together = [g for g in tree_layout.groups if g.kind == "lowrank"]
  full = [g for g in tree_layout.groups if g.kind == "full"]
  full_bytes = 4 * chunk * sum(math.prod(g.draw_shape(None)) for g in full)
  if chunk_size is None and full_bytes > _FULL_RANK_BYTES_AT_ONCE:
    devices = sharding.axis_size(population_axis)
    passes = [(together, chunk), (full, devices if num_pairs % devices == 0 else 1)]
  else:
    passes = [(together + full, chunk)]
  totals = {}
  for groups, pairs_per_chunk in passes:
    if groups:
      sums = _reduce_groups(spec, key, generation, groups, pair_weights, pairs_per_chunk,
                            population_axis)
      totals.update(zip((g.name for g in groups), sums))
  out = [jnp.zeros(x.shape, x.dtype) for x in leaves]
  for group in tree_layout.groups:
    for index, at in group.slots():
      x = leaves[index]
      out[index] = totals[group.name][at].reshape(x.shape).astype(x.dtype)
  return jax.tree_util.tree_unflatten(tree_layout.treedef, out)


def _reduce_groups(spec: NoiseSpec, key, generation, groups: list[Group], pair_weights, chunk: int,
                   population_axis: str | None) -> tuple[jax.Array, ...]:
  """Stacked weighted sums of ``groups`` (each :meth:`Group.sum_shape`), ``chunk`` pairs at a time."""
  pair_ids = jnp.arange(spec.num_pairs, dtype=jnp.int32).reshape(-1, chunk)
  weights = pair_weights.astype(jnp.float32).reshape(-1, chunk)
  sub_layout = Layout(None, 0, tuple(groups))

  def body(totals, ids_and_w):
    ids, w = ids_and_w
    ids = sharding.constrain_population(ids, population_axis)
    w = sharding.constrain_population(w, population_axis)
    draws = jax.vmap(lambda p: draw_pair(spec, key, generation, sub_layout, p))(ids)
    out = sharding.reduced_sharding(population_axis)
    parts = []
    for group, z in zip(groups, draws):
      if group.kind == "lowrank":
        m, _ = matrix_shape(group.shape)
        part = jnp.einsum("kgmr,k,kgnr->gmn", z[:, :, :m], w, z[:, :, m:], out_sharding=out)
        parts.append(part / math.sqrt(spec.rank))
      else:
        parts.append(jnp.einsum("k,kg...->g...", w, z, out_sharding=out))
    return tuple(t + p for t, p in zip(totals, parts)), None

  init = tuple(jnp.zeros(g.sum_shape(), jnp.float32) for g in groups)
  totals, _ = jax.lax.scan(body, init, (pair_ids, weights))
  return totals

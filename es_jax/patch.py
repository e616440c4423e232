"""ES patches: a whole fine-tune stored as its recipe and fitness history.

A patch holds what :func:`es_jax.replay` needs besides theta_0: the optimizer
chain as an :class:`es_jax.recipe.EsRecipe` and the ``(generations, N)``
fitness history, plus a checksum of theta_0 so that it is never replayed onto
another base. 500 generations at N=30 are 60,000 bytes of history.

File layout (version 1, integers little-endian)::

  offset 0   8 bytes   magic b"ESPATCH\\x00"
  offset 8   uint32    format version (1)
  offset 12  uint64    header length H
  offset 20  H bytes   header: UTF-8 JSON (sorted keys) with
                         recipe, recipe_sha256 (sha256 of its canonical JSON),
                         base: sha256 of theta_0 (see :func:`params_sha256`),
                               tensors [[path, dtype, shape], ...],
                         generations G, population N, noise_convention
                         (:data:`es_jax.noise.NOISE_CONVENTION`), metadata (free-form JSON)
  20 + H     4*G*N     fitness history, float32 little-endian, row-major
  end - 32   32 bytes  sha256 of every byte before it

A file whose length disagrees with its header is refused as truncated, one
whose trailing sha256 does not match as corrupted, before anything else is
read from it.
A header with a valid sha256 may still come from a faulty or hostile tool, so
it is bounded too: generations and population are integers >= 1 (the
population the recipe's), no field nests more than :data:`MAX_NESTING` JSON
levels, and the recipe's own checks bound its seed and post-step transforms.

The command that applies a patch to a model checkpoint lives with the models
(:mod:`es_jax.models.patch_cli`)::

  python -m es_jax.models.patch_cli apply --base CKPT --patch run.espatch --out DIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import struct
import sys
from typing import Any

import jax
import numpy as np

from es_jax import _checks
from es_jax import noise as noise_lib
from es_jax.recipe import EsRecipe
from es_jax.replay import replay

PyTree = Any
MAGIC = b"ESPATCH\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_BYTES = 32
SUFFIX = ".espatch"
#: JSON levels a header field may nest (the base's tensor list needs 3).
MAX_NESTING = 16


class PatchError(ValueError):
  """A patch that cannot be read (truncated, corrupted, unknown) or applied (wrong base)."""


def _nesting(value: Any) -> int:
  """How many JSON arrays/objects deep ``value`` nests (0 for a scalar), without recursing."""
  depth, level = 0, [value]
  while containers := [v for v in level if isinstance(v, (dict, list))]:
    depth += 1
    level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
  return depth


def _check_nesting(field: str, value: Any) -> None:
  depth = _nesting(value)
  if depth > MAX_NESTING:
    raise ValueError(f"header field {field!r} nests {depth} levels deep; a patch allows at most "
                     f"{MAX_NESTING}.")


def tensor_manifest(params: PyTree) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
  """``(path, dtype, shape)`` of every leaf, in tree order: a :class:`Patch`'s ``base_tensors``.

  Example:
    >>> import jax.numpy as jnp
    >>> tensor_manifest({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3, jnp.bfloat16)})
    (('b', 'bfloat16', (3,)), ('w', 'float32', (2, 3)))
  """
  return tuple((noise_lib.path_str(path), np.dtype(x.dtype).name, tuple(x.shape))
               for path, x in jax.tree_util.tree_leaves_with_path(params))


def params_sha256(params: PyTree) -> str:
  """sha256 hex digest of a params tree: every leaf's path, dtype, shape and bytes, in tree order.

  Leaves are fetched to the host one at a time (sharded arrays are gathered),
  and hashed as little-endian C-order bytes, so the digest does not depend on
  the device layout. The same weights in another dtype have another digest.

  Example:
    >>> import jax.numpy as jnp
    >>> params_sha256({"w": jnp.zeros(2)}) == params_sha256({"w": jnp.zeros(2)})
    True
    >>> params_sha256({"w": jnp.zeros(2)}) == params_sha256({"w": jnp.zeros(2, jnp.bfloat16)})
    False
  """
  digest = hashlib.sha256()
  for (path, dtype, shape), leaf in zip(tensor_manifest(params), jax.tree.leaves(params)):
    digest.update(json.dumps([path, dtype, shape]).encode() + b"\x00")
    host = np.ascontiguousarray(jax.device_get(leaf))
    if host.dtype.byteorder == ">" or (host.dtype.byteorder == "=" and sys.byteorder == "big"):
      host = host.byteswap()
    digest.update(host.reshape(-1).view(np.uint8))  # no copy; works for bfloat16
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no truth value to compare by
class Patch:
  """A fine-tune as data: apply it with :func:`apply_patch` onto the base it was made from.

  Attributes:
    recipe: the optimizer chain.
    fitness_history: ``(generations, population)`` float32, NaN = failed member.
    base_sha256: :func:`params_sha256` of theta_0.
    base_tensors: ``(path, dtype, shape)`` of theta_0's leaves, for error messages.
    metadata: free-form JSON-serialisable notes (model name, task, devices...).
  """

  recipe: EsRecipe
  fitness_history: np.ndarray
  base_sha256: str
  base_tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def generations(self) -> int:
    return self.fitness_history.shape[0]

  def header(self) -> dict[str, Any]:
    return {"recipe": self.recipe.to_dict(), "recipe_sha256": self.recipe.fingerprint(),
            "base": {"sha256": self.base_sha256,
                     "tensors": [[p, d, list(s)] for p, d, s in self.base_tensors]},
            "generations": self.generations, "population": self.fitness_history.shape[1],
            "noise_convention": noise_lib.NOISE_CONVENTION, "metadata": self.metadata}

  def to_bytes(self) -> bytes:
    header = json.dumps(self.header(), sort_keys=True, separators=(",", ":"),
                        allow_nan=False).encode()
    body = (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header +
            self.fitness_history.astype("<f4").tobytes(order="C"))
    return body + hashlib.sha256(body).digest()

  @classmethod
  def from_bytes(cls, data: bytes, *, source: str = "patch") -> Patch:
    """Parses and verifies a patch; raises :class:`PatchError` naming what is wrong."""
    if len(data) < _PREFIX.size + _DIGEST_BYTES:
      raise PatchError(f"{source} is truncated: {len(data)} bytes, shorter than any patch.")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
      raise PatchError(f"{source} is not an es_jax patch (its first bytes are {magic!r}).")
    if version != FORMAT_VERSION:
      raise PatchError(f"{source} has patch format version {version}; this es_jax reads version "
                       f"{FORMAT_VERSION}.")
    if _PREFIX.size + header_len + _DIGEST_BYTES > len(data):
      raise PatchError(f"{source} is truncated or corrupted: its header length ({header_len} "
                       f"bytes) runs past the end of the file ({len(data)} bytes).")
    try:
      header = json.loads(data[_PREFIX.size:_PREFIX.size + header_len].decode())
    except ValueError as e:
      raise PatchError(f"{source} is corrupted: its header does not parse ({e}).") from None
    except RecursionError:
      raise PatchError(f"{source} has an invalid header: it nests too deeply for JSON to parse; "
                       f"a patch allows at most {MAX_NESTING} levels.") from None
    try:
      if not isinstance(header, dict):
        raise ValueError(f"it is a JSON {type(header).__name__}, not an object.")
      for field, value in header.items():
        _check_nesting(field, value)
      generations = _checks.integer("generations", header["generations"], minimum=1)
      population = _checks.integer("population", header["population"], minimum=1)
    except (ValueError, KeyError, TypeError) as e:
      raise PatchError(f"{source} has an invalid header: {_reason(e)}") from None
    expected = _PREFIX.size + header_len + 4 * generations * population + _DIGEST_BYTES
    if len(data) != expected:
      raise PatchError(f"{source} is truncated or corrupted: {len(data)} bytes, but its header "
                       f"({generations} generations x {population} members) makes {expected}.")
    if hashlib.sha256(data[:-_DIGEST_BYTES]).digest() != data[-_DIGEST_BYTES:]:
      raise PatchError(f"{source} is corrupted: its sha256 does not match its contents.")
    try:
      recipe = EsRecipe.from_dict(header["recipe"])
      if population != recipe.es.population:
        raise ValueError(f"population {population} differs from its recipe's population "
                         f"{recipe.es.population}.")
      base = header["base"]
      tensors = tuple(
          (str(p), str(d), tuple(_checks.integer(f"a dimension of base tensor {p!r}", n, minimum=0)
                                 for n in s))
          for p, d, s in base["tensors"])
      base_sha256, metadata, recipe_sha256 = (str(base["sha256"]), header["metadata"],
                                              header["recipe_sha256"])
      if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(metadata).__name__}.")
    except (ValueError, KeyError, TypeError) as e:
      raise PatchError(f"{source} has an invalid header: {_reason(e)}") from None
    if header.get("noise_convention") != noise_lib.NOISE_CONVENTION:
      raise PatchError(f"{source} was written under noise convention "
                       f"{header.get('noise_convention')!r}; this es_jax draws member noise "
                       f"under convention {noise_lib.NOISE_CONVENTION}, so replaying it would give "
                       "other weights. Apply it with the es_jax version that wrote it.")
    if recipe.fingerprint() != recipe_sha256:
      raise PatchError(f"{source}'s recipe does not match its fingerprint: written by an es_jax "
                       "that serialises recipes differently.")
    offset = _PREFIX.size + header_len
    history = np.frombuffer(data, "<f4", generations * population, offset)
    return cls(recipe=recipe, fitness_history=history.reshape(generations, population)
               .astype(np.float32), base_sha256=base_sha256, base_tensors=tensors,
               metadata=metadata)


def _reason(error: Exception) -> str:
  """An exception as the rest of a sentence (a KeyError alone says just the key)."""
  return f"it has no field {error}." if isinstance(error, KeyError) else str(error)


def make_patch(recipe: EsRecipe, theta0: PyTree, fitness_history: Any, *,
               metadata: dict[str, Any] | None = None) -> Patch:
  """The patch of a run that started from ``theta0`` and fed ``fitness_history`` to ``recipe``'s chain.

  Args:
    recipe: the run's chain (``recipe.build()`` is what it ran).
    theta0: the params the run started from.
    fitness_history: ``(generations, population)`` fitness vectors, in order.
    metadata: JSON-serialisable notes stored in the header.
  """
  history = np.asarray(fitness_history, np.float32)
  if history.ndim != 2 or history.shape[1] != recipe.es.population:
    raise ValueError(f"fitness_history must have shape (generations, {recipe.es.population}), "
                     f"got {history.shape}.")
  if not len(history):
    raise ValueError("fitness_history must hold at least one generation, got none.")
  metadata = dict(metadata or {})
  # Fails now, not at save or load time (nesting first: json recurses).
  _check_nesting("metadata", metadata)
  json.dumps(metadata, allow_nan=False)
  return Patch(recipe=recipe, fitness_history=history, base_sha256=params_sha256(theta0),
               base_tensors=tensor_manifest(theta0),
               metadata=metadata)


def save_patch(path: str | os.PathLike, patch: Patch) -> pathlib.Path:
  """Writes ``patch`` atomically (a temporary file renamed over ``path``), as open() would.

  The file's mode is 0666 less the umask, like the run's other files.
  """
  path = pathlib.Path(path)
  data = patch.to_bytes()
  tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
  # os.open, not tempfile: the umask sets the mode as for open() (tempfile's is 0600).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise
  return path


def load_patch(path: str | os.PathLike) -> Patch:
  """Reads and verifies a patch file (:class:`PatchError` if unreadable, truncated or corrupted)."""
  path = pathlib.Path(path)
  source = f"patch {str(path)!r}"
  try:
    data = path.read_bytes()
  except OSError as e:  # missing, a directory, no permission
    raise PatchError(f"{source} cannot be read: {e.strerror or e}.") from None
  return Patch.from_bytes(data, source=source)


def check_base(patch: Patch, params: PyTree) -> None:
  """Raises :class:`PatchError` unless ``params`` is the theta_0 the patch was made from."""
  got = {p: (d, tuple(s)) for p, d, s in tensor_manifest(params)}
  want = {p: (d, s) for p, d, s in patch.base_tensors}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise PatchError(f"wrong base model: the patch's base has tensors {missing[:5]} that these "
                     f"params lack, and lacks {extra[:5]} that they have.")
  for p, (d, s) in want.items():
    if got[p] != (d, s):
      raise PatchError(f"wrong base model: tensor '{p}' is {got[p][0]}{list(got[p][1])} here, "
                       f"{d}{list(s)} in the patch's base.")
  digest = params_sha256(params)
  if digest != patch.base_sha256:
    raise PatchError(f"wrong base model: the params' sha256 is {digest[:16]}..., the patch was "
                     f"made from {patch.base_sha256[:16]}... (same shapes, other weights: another "
                     "checkpoint, revision or quantisation).")


def apply_patch(patch: Patch, params: PyTree) -> PyTree:
  """The fine-tuned params: checks that ``params`` is the patch's base, then replays it.

  Raises:
    PatchError: ``params`` is not the patch's base, or the replay does not give
      finite weights (naming the generation where they stopped being finite).
  """
  check_base(patch, params)
  try:
    return replay(patch.recipe, params, patch.fitness_history)[0]
  except ValueError as e:
    raise PatchError(f"the patch cannot be applied: {e}") from None

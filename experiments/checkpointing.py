"""Checkpoints of an experiment run: atomic saves, keep-last-n, bit-identical resume.

A thin layer over ``orbax.checkpoint.CheckpointManager``. Each step directory
``<directory>/<step>/`` holds three items:

  * ``arrays``: every leaf of the state as a flat ``{leaf path: array}`` dict
    (typed PRNG keys as their ``jax.random.key_data``);
  * ``manifest``: JSON with the run ``fingerprint``, a SHA-256 of ``meta``,
    per leaf, its path, shape, dtype, PRNG impl and a checksum of its bits,
    and ``anchors``, the subtrees left out (below);
  * ``meta``: the caller's JSON (iteration, data position, metrics, config).

theta_0 is not stored. A run's state holds the base params theta_0 in its
anchored transforms' states (AWD, the norm cap): 28 GB at 7B in float32, the
same in every checkpoint, and already on disk as the base checkpoint the run
loads. ``save(..., anchors=paths)`` names those subtrees (the trainer knows
where they are: :func:`experiments.trainers.anchor_paths`); orbax writes none
of their leaves, and the manifest records, per path, the
:func:`es_jax.params_sha256` of the subtree, the digest an ``.espatch`` of the
run records for its base. ``restore(like)`` takes those subtrees from
``like``, the state the run initialised from the base it loaded afresh (so
they are the base's own arrays again, shared, not copies), once their digest
is the recorded one; a base that changed since the run started is refused,
naming both digests. A path is named, not found by comparing values, because
a state may hold theta_0's values elsewhere by chance (the params, before the
first step) and those must be stored. Checkpoints of earlier versions hold the
anchors: restored with the same ``anchors=``, their stored anchors are
checked bit for bit against ``like``'s and then replaced by them. The
manifest format is 3 when anchors were left out and 2 (the earlier layout)
otherwise, so earlier versions read every checkpoint they can and refuse the
others by their format.

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp``
and renamed to ``<step>`` only once complete (one ``rename``, atomic on POSIX
file systems), so a kill mid-save leaves only a tmp directory, which orbax does
not list as a step and removes when that step is saved again. The checksums
exist because tensorstore does not notice flipped bytes inside an array chunk
(its zstd frames carry no checksum): it returns wrong values without an error.
The meta has one too: an edited iteration or metric would otherwise resume
silently, skipping iterations or carrying a false record.

Decisions:
  * Saving a step that is not after the latest one (an existing step included)
    raises :class:`RunCheckpointError`; nothing is overwritten or skipped silently.
  * A corrupt or incompatible checkpoint raises :class:`RunCheckpointError` and
    nothing on disk is touched. Corruption is only detected on restore: a save
    after a corrupt latest step still works, the corrupt step counts toward
    ``keep_last_n`` like any other and only the oldest steps are pruned.
  * A save that the file system refuses (a full disk, a file-size limit) raises
    ``OSError`` naming the step; the earlier steps are untouched.
  * ``meta`` goes through JSON: tuples come back as lists, non-string dict keys
    as strings, NumPy/JAX scalars and arrays as Python numbers and lists; NaN
    and +-inf survive as floats (written as Python's ``NaN``/``Infinity``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import operator
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from es_jax.patch import params_sha256

PyTree = Any
# Version of the manifest layout, so a future change is recognised (2: meta checksum, 3: anchors
# left out; written only when some are).
_FORMAT = 3
_FORMAT_WITHOUT_ANCHORS = 2
_READABLE_FORMATS = (2, 3)
_INCOMPATIBLE_HINT = ("Resume with the configuration that wrote it, or start a fresh run with a "
                      "new --out.")


class RunCheckpointError(ValueError):
  """A run checkpoint (this module's orbax state of a run) is corrupt, incompatible with the
  run (or with its base, theta_0), or would be overwritten. A model's weights that cannot be
  read raise :class:`es_jax.models.checkpoint.CheckpointError` instead."""


class RunCheckpointer:
  """Saves and restores the state of one run in ``directory``, keeping the last n steps.

  Args:
    directory: the run's checkpoint directory (created if missing).
    keep_last_n: how many of the newest steps to keep; older ones are deleted
      after each successful save.
    fingerprint: JSON-able settings that must match to resume (model, preset,
      population, rank...); stored with every step and checked on restore and
      before saving into a directory that already has steps.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> state = {"params": {"w": jnp.ones(3, jnp.bfloat16)}, "rng": jax.random.key(0)}
    >>> with RunCheckpointer(tempfile.mkdtemp(), fingerprint={"preset": "tiny"}) as checkpointer:
    ...   checkpointer.save(10, state, {"iteration": 10, "metrics": [{"reward": float("nan")}]})
    ...   restored, meta = checkpointer.restore(like=state)
    ...   print(checkpointer.all_steps(), restored["params"]["w"].dtype, meta)
    [10] bfloat16 {'iteration': 10, 'metrics': [{'reward': nan}]}
  """

  def __init__(self, directory: str | pathlib.Path, *, keep_last_n: int = 3,
               fingerprint: Mapping[str, Any]):
    if keep_last_n < 1:
      raise ValueError(f"keep_last_n must be >= 1, got {keep_last_n}.")
    self.directory = pathlib.Path(directory).absolute()
    self.fingerprint = _through_json(dict(fingerprint), "fingerprint")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep_last_n, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("arrays", "manifest", "meta"))
    self._known_fingerprint_step = None  # a step known to carry self.fingerprint
    self._digest_cache = None  # (key, leaves, sha256) of the last anchor subtree hashed

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (tmp directories of unfinished saves are not steps)."""
    self._manager.reload()  # another process (or a person) may have changed the directory
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or ``None`` if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *,
           anchors: Sequence[str] = ()) -> None:
    """Writes ``state`` and ``meta`` as ``step``; returns once it is committed on disk.

    Args:
      step: the step number; after the latest step.
      state: the pytree to store.
      meta: JSON-able data stored beside it.
      anchors: paths (``"opt_state/2/anchor"``, as the manifest names leaves) of
        subtrees of ``state`` that hold theta_0, the run's base params: not
        written; their sha256 is recorded and :meth:`restore` takes them from
        its ``like``. Hashing reads theta_0 to the host once per checkpointer
        (the digest is kept while the subtree's arrays are the same objects).

    Raises:
      RunCheckpointError: ``step`` is not after the latest step, or the directory
        holds a run with a different fingerprint.
      TypeError: ``meta`` is not JSON-able.
      ValueError: a path of ``anchors`` names no subtree of ``state``.
    """
    step = operator.index(step)
    subtrees = _subtrees(state, anchors, "state")
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise RunCheckpointError(
          f"Not saving step {step} into {self.directory}: step {latest} exists and checkpoints "
          "are never overwritten, so steps must increase. To redo later steps, delete their "
          "directories first, or start a fresh run with a new --out.")
    if latest is not None and latest != self._known_fingerprint_step:
      try:  # refuse to mix two runs' steps in one directory
        stored = self._read_json(latest)[0]["fingerprint"]
      except (RunCheckpointError, KeyError, TypeError):
        stored = None  # a corrupt latest step is restore's to report; it must not block saving
      if stored is not None:
        self._check_fingerprint(latest, stored)
    meta = _through_json(dict(meta), "meta")
    paths, leaves, _ = _flatten(state)
    kept = [(path, leaf) for path, leaf in zip(paths, leaves) if not _under(path, subtrees)]
    paths, leaves = [path for path, _ in kept], [leaf for _, leaf in kept]
    data = [_key_data_or_array(leaf) for leaf in leaves]
    manifest = {"format": _FORMAT if subtrees else _FORMAT_WITHOUT_ANCHORS,
                "fingerprint": self.fingerprint, "meta_sha256": _meta_digest(meta), "leaves": [
        {"path": path, "shape": list(np.shape(leaf)), "dtype": str(_dtype(leaf)),
         "key_impl": _key_impl(leaf), "checksum": checksum}
        for path, leaf, checksum in zip(paths, leaves, _checksums(data))]}
    if subtrees:
      manifest["anchors"] = {path: self._sha256(tree) for path, tree in subtrees.items()}
    try:
      with _orbax_error_logs_silenced():  # the error is raised below, once, with its cause
        self._manager.save(step, force=True, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(dict(zip(paths, data))),
            manifest=ocp.args.JsonSave(manifest), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()  # a no-op while saves are synchronous; a guarantee
    except Exception as error:
      failure = self._write_failed(step, error)
      if failure is error:
        raise
      raise failure from error
    self._known_fingerprint_step = step

  def read_meta(self, step: int | None = None) -> dict:
    """The verified ``meta`` of ``step`` (default: the latest), without reading its arrays.

    Cheap: a run can check what it would resume (iteration, metrics) before
    loading a model. :meth:`restore` verifies the same and the arrays.

    Raises:
      RunCheckpointError: no such step, the step is corrupt (its manifest or meta
        unreadable, the meta not the one saved), or written by a run with
        another fingerprint.
    """
    step = self._step_to_restore(step)
    return self._verified_json(step)[1]

  def restore(self, like: PyTree, step: int | None = None, *,
              anchors: Sequence[str] = ()) -> tuple[PyTree, dict]:
    """Returns ``(state, meta)`` of ``step`` (default: the latest).

    ``like`` is a freshly initialised state: the result has its tree structure
    (NamedTuples, static nodes), dtypes, PRNG impls and shardings. The anchors
    that :meth:`save` left out are ``like``'s subtrees themselves (theta_0 as
    this run loaded it), once their sha256 is the one recorded.

    Args:
      like: the state initialised from the run's base params.
      step: the step to restore; default the latest.
      anchors: the paths of ``like``'s theta_0 subtrees, as given to
        :meth:`save`. Needed only for checkpoints that hold the anchors
        (written before they were left out): those are checked bit for bit
        against ``like``'s and replaced by them, so theta_0 is held once.

    Raises:
      RunCheckpointError: no such step; the step is corrupt (unreadable files,
        checksum mismatch); it is incompatible (fingerprint, tree structure,
        leaf shape or dtype differ from ``like``); or its theta_0 is not
        ``like``'s (the base checkpoint changed since the run started).
      ValueError: a path of ``anchors`` names no subtree of ``like``.
    """
    step = self._step_to_restore(step)
    manifest, meta = self._verified_json(step)
    left_out = manifest.get("anchors", {})
    named = _subtrees(like, anchors, "`like`")
    rebuilt = _subtrees(like, left_out, None)
    if missing := sorted(set(left_out) - set(rebuilt)):
      raise RunCheckpointError(
          f"Checkpoint {self.directory / str(step)} left out theta_0 at {_listed(missing)} (to be "
          "rebuilt from the base params on restore), but `like` has no such subtree. "
          f"{_INCOMPATIBLE_HINT}")
    for path, tree in rebuilt.items():
      if (digest := self._sha256(tree)) != left_out[path]:
        raise self._base_changed(step, f"its theta_0 (at {path}) has sha256 {left_out[path]}, "
                                       f"the base params this run loaded have sha256 {digest}")
    all_paths, all_like_leaves, treedef = _flatten(like)
    stored_paths = [(path, leaf) for path, leaf in zip(all_paths, all_like_leaves)
                    if not _under(path, left_out)]
    paths, like_leaves = [path for path, _ in stored_paths], [leaf for _, leaf in stored_paths]
    self._check_leaves(step, manifest["leaves"], paths, like_leaves)
    target = {path: _restore_target(leaf) for path, leaf in zip(paths, like_leaves)}
    try:
      arrays = self._manager.restore(
          step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target)))["arrays"]
    except Exception as error:  # tensorstore raises plain Exception/ValueError on bad files
      raise self._corrupt(step, f"its arrays could not be read ({type(error).__name__}: "
                                f"{str(error)[:300]})") from error
    data = [arrays[path] for path in paths]
    stored = {entry["path"]: entry["checksum"] for entry in manifest["leaves"]}
    garbled = [path for path, checksum in zip(paths, _checksums(data)) if checksum != stored[path]]
    if garbled:
      raise self._corrupt(step, f"the bits of {_listed(garbled)} differ from those it was saved "
                                "with")
    # Anchors stored by an earlier version must be this run's theta_0, bit for bit.
    if differing := [path for path, like_leaf, array in zip(paths, like_leaves, data)
                     if _under(path, named)
                     and not bool(_same_bits(array, _key_data_or_array(like_leaf)))]:
      raise self._base_changed(step, f"its stored theta_0 differs from the base params this run "
                                     f"loaded at {_listed(differing)}")
    restored = {path: _like_type(like_leaf, array)
                for path, like_leaf, array in zip(paths, like_leaves, data)}
    # Every anchor, left out or stored, is like's own array: the state holds theta_0 once.
    leaves = [restored[path] if path in restored and not _under(path, named) else like_leaf
              for path, like_leaf in zip(all_paths, all_like_leaves)]
    return jax.tree.unflatten(treedef, leaves), meta

  def close(self) -> None:
    self._digest_cache = None
    self._manager.close()

  def __enter__(self) -> RunCheckpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _step_to_restore(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None and not steps:
      raise RunCheckpointError(f"No checkpoint in {self.directory}.")
    step = steps[-1] if step is None else operator.index(step)
    if step not in steps:
      raise RunCheckpointError(f"No step {step} in {self.directory}; the steps there are {steps}.")
    return step

  def _verified_json(self, step: int) -> tuple[dict, dict]:
    """The manifest and meta of ``step``, checked for format, fingerprint and meta checksum."""
    manifest, meta = self._read_json(step)
    if isinstance(manifest, dict) and manifest.get("format") not in (*_READABLE_FORMATS, None):
      raise RunCheckpointError(
          f"Checkpoint {self.directory / str(step)} has manifest format "
          f"{manifest.get('format')!r}; this version reads formats "
          f"{', '.join(map(str, _READABLE_FORMATS))}. Resume it with the version of es_jax that "
          "wrote it, or start a fresh run with a new --out.")
    if not (isinstance(manifest, dict) and manifest.get("format") in _READABLE_FORMATS
            and isinstance(manifest.get("leaves"), list) and isinstance(meta, dict)
            and isinstance(manifest.get("meta_sha256"), str)
            and _valid_anchors(manifest.get("anchors", {}), manifest["format"])):
      raise self._corrupt(step, "its manifest or meta is missing or malformed")
    self._check_fingerprint(step, manifest.get("fingerprint"))
    if _meta_digest(meta) != manifest["meta_sha256"]:
      raise self._corrupt(step, "its meta (iteration, metrics...) differs from the meta it was "
                                "saved with")
    return manifest, meta

  def _sha256(self, tree: PyTree) -> str:
    """:func:`es_jax.params_sha256` of ``tree``, kept while its arrays are the same objects.

    The runner's anchors stay the base's own arrays for the whole run (JAX
    arrays are immutable), so theta_0 is read to the host and hashed once, not
    at every save (a minute at 7B). The leaves are held with the digest, so
    their ids cannot be reused by other arrays while it is kept.
    """
    leaves, treedef = jax.tree.flatten(tree)
    key = (treedef, tuple(id(leaf) for leaf in leaves))
    if self._digest_cache is None or self._digest_cache[0] != key:
      self._digest_cache = (key, leaves, params_sha256(tree))
    return self._digest_cache[2]

  def _base_changed(self, step: int, problem: str) -> RunCheckpointError:
    return RunCheckpointError(
        f"Checkpoint {self.directory / str(step)} was written from another theta_0: the base "
        f"checkpoint changed since this run started ({problem}). Nothing was changed; resume with "
        "the base the run started from (its model.checkpoint as it was), or start a fresh run "
        "with a new --out.")

  def _write_failed(self, step: int, error: Exception) -> Exception:
    """An ``OSError`` naming the step for a save the file system refused; else ``error``."""
    if isinstance(error, OSError):
      code, reason = error.errno, error.strerror or str(error)
    else:  # tensorstore reports its file errors as ValueError("... [os_error_code='28']")
      found = re.search(r"os_error_code='?(\d+)", str(error))
      if not found:
        return error
      code = int(found.group(1))
      reason = os.strerror(code)
    earlier = [s for s in self._manager.all_steps() if s < step]
    kept = f"steps {earlier} are intact" if earlier else "no earlier step exists"
    return OSError(code or errno.EIO, f"could not write checkpoint step {step} ({reason}); {kept}",
                   str(self.directory / str(step)))

  def _read_json(self, step: int) -> tuple[Any, Any]:
    try:
      items = self._manager.restore(step, args=ocp.args.Composite(
          manifest=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as error:
      raise self._corrupt(step, f"its manifest or meta could not be read ({type(error).__name__}: "
                                f"{str(error)[:300]})") from error
    return items["manifest"], items["meta"]

  def _check_fingerprint(self, step: int, stored: Any) -> None:
    stored = stored if isinstance(stored, dict) else {}
    differing = [f"{key}: checkpoint {stored.get(key, '<missing>')!r}, "
                 f"this run {self.fingerprint.get(key, '<missing>')!r}"
                 for key in sorted(set(stored) | set(self.fingerprint))
                 if stored.get(key, KeyError) != self.fingerprint.get(key, KeyError)]
    if differing:
      raise RunCheckpointError(f"Checkpoint {self.directory / str(step)} was written by a run "
                               f"with a different configuration ({'; '.join(differing)}). "
                               f"{_INCOMPATIBLE_HINT}")

  def _check_leaves(self, step: int, entries: list, paths: list[str], like_leaves: list) -> None:
    stored = {entry["path"]: entry for entry in entries}
    problems = []
    if missing := [path for path in paths if path not in stored]:
      problems.append(f"in `like` but not in the checkpoint: {_listed(missing)}")
    if extra := sorted(set(stored) - set(paths)):
      problems.append(f"in the checkpoint but not in `like`: {_listed(extra)}")
    for path, leaf in zip(paths, like_leaves):
      entry = stored.get(path)
      expected = (list(np.shape(leaf)), str(_dtype(leaf)), _key_impl(leaf))
      if entry and (entry["shape"], entry["dtype"], entry["key_impl"]) != expected:
        problems.append(f"leaf {path}: checkpoint {entry['dtype']}{entry['shape']}, "
                        f"`like` {expected[1]}{expected[0]}")
    if problems:
      raise RunCheckpointError(f"Checkpoint {self.directory / str(step)} does not fit this run's "
                               f"state: {'; '.join(problems[:6])}. {_INCOMPATIBLE_HINT}")

  def _corrupt(self, step: int, problem: str) -> RunCheckpointError:
    earlier = [s for s in self._manager.all_steps() if s < step]
    fallback = (f"delete it to fall back to step {max(earlier)}, the previous checkpoint,"
                if earlier else "delete it to start over from scratch,")
    return RunCheckpointError(f"Checkpoint {self.directory / str(step)} is corrupt: {problem}. "
                              f"Nothing on disk was changed; {fallback} or start a fresh run with a "
                              "new --out.")


def _valid_anchors(anchors: Any, manifest_format: int) -> bool:
  """Whether ``anchors`` is a manifest's record of left-out subtrees (none before format 3)."""
  if manifest_format < _FORMAT:
    return anchors == {}
  return (isinstance(anchors, dict) and bool(anchors)
          and all(isinstance(v, str) for v in anchors.values()))


def _meta_digest(meta: dict) -> str:
  # Canonical text: the meta as saved and as read back (through JSON both) give the same bytes.
  text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


class _OrbaxErrorFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def _orbax_error_logs_silenced():
  """Drops orbax's ERROR logs (each a full traceback) while a save runs: its failure is raised."""
  logger, log_filter = logging.getLogger("absl"), _OrbaxErrorFilter()
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)


def silence_closed_event_loop_noise() -> None:
  """Stops printing orbax's ``RuntimeError: Event loop is closed`` tracebacks (process-wide).

  When one tensorstore read or write fails, orbax closes its event loop while
  the others are still finishing; their callbacks then fail from tensorstore's
  threads and Python prints each as an unraisable exception, after the real
  error was already handled and reported. Only that error is dropped; every
  other unraisable exception still reaches the previous hook. Idempotent.

  Example:
    >>> silence_closed_event_loop_noise()
    >>> sys.unraisablehook.__name__
    '_drop_closed_event_loop'
  """
  previous = sys.unraisablehook
  if getattr(previous, "__name__", "") == "_drop_closed_event_loop":
    return

  def _drop_closed_event_loop(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = _drop_closed_event_loop


def path_name(key_path: tuple) -> str:
  """A leaf's (or subtree's) name in the manifest, e.g. ``opt_state/2/anchor/embed``.

  Example:
    >>> path_name((jax.tree_util.DictKey("opt_state"), jax.tree_util.SequenceKey(2)))
    'opt_state/2'
  """
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/") or "<root>"


def _subtrees(tree: PyTree, paths: Iterable[str], what: str | None) -> dict[str, PyTree]:
  """The subtrees of ``tree`` at ``paths`` (manifest names), by name.

  With ``what`` (how the tree is named in the message) a path that names no
  subtree raises ValueError; without, it is left out of the result.
  """
  wanted = set(paths)
  if not wanted:
    return {}
  nodes, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda key_path, _: path_name(key_path) in wanted, is_leaf_takes_path=True)
  found = {path_name(key_path): node for key_path, node in nodes
           if path_name(key_path) in wanted}
  if what is not None and (missing := sorted(wanted - set(found))):
    raise ValueError(f"no subtree of {what} is at the anchors path(s) {_listed(missing)}; name "
                     "its theta_0 subtrees as the manifest names leaves, e.g. "
                     "'opt_state/2/anchor' (experiments.trainers.anchor_paths finds them).")
  return found


def _under(path: str, prefixes: Iterable[str]) -> bool:
  """Whether the leaf named ``path`` is in one of the subtrees named ``prefixes``."""
  return any(path == prefix or path.startswith(prefix + "/") or prefix == "<root>"
             for prefix in prefixes)


@jax.jit
def _same_bits(a: jax.Array, b: jax.Array) -> jax.Array:
  """Whether two arrays of one dtype and shape hold the same bits (NaNs and -0.0 included)."""
  if a.dtype == jnp.bool_:
    return jnp.array_equal(a, b)
  unsigned = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
  return jnp.array_equal(jax.lax.bitcast_convert_type(a, unsigned),
                         jax.lax.bitcast_convert_type(b, unsigned))


def _flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_name(path) for path, _ in path_leaves]
  if len(set(paths)) != len(paths):
    raise ValueError(f"Leaf paths must be unique to be stored by name, got {paths}.")
  return paths, [leaf for _, leaf in path_leaves], treedef


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> str | None:
  return str(jax.random.key_impl(leaf)) if _is_key(leaf) else None


def _dtype(leaf: Any) -> np.dtype:
  return leaf.dtype if isinstance(leaf, jax.Array) else np.asarray(leaf).dtype


def _key_data_or_array(leaf: Any) -> Any:
  # Typed keys are stored as their raw bits: orbax has no handler for key dtypes.
  if _is_key(leaf):
    return jax.random.key_data(leaf)
  return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _restore_target(like_leaf: Any) -> Any:
  data = _key_data_or_array(like_leaf)
  if isinstance(data, jax.Array):
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
  return data  # a NumPy target makes orbax return NumPy


def _like_type(like_leaf: Any, array: Any) -> Any:
  if _is_key(like_leaf):
    return jax.random.wrap_key_data(array, impl=jax.random.key_impl(like_leaf))
  if isinstance(like_leaf, (jax.Array, np.ndarray)):
    return array
  return type(like_leaf)(np.asarray(array))  # Python or NumPy scalar


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Sum of each element's bits times an odd weight from its position, mod 2**32.

  Any single changed element changes it (odd weights are invertible mod 2**32);
  it is elementwise plus one reduction, so sharded leaves are never gathered.
  """
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
  if bits.dtype.itemsize == 8:
    bits = bits ^ (bits >> 32)
  position, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for axis in reversed(range(x.ndim)):
    position += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  return jnp.sum(bits.astype(jnp.uint32) * (2 * position + 1), dtype=jnp.uint32)


_leaf_checksum_jit = jax.jit(_leaf_checksum)


def _checksums(leaves: list[Any]) -> list[int]:
  # One jit per leaf: a single jit over all leaves would refuse leaves committed to different
  # devices (params on a mesh, the run's key on device 0).
  return [int(c) for c in jax.device_get([_leaf_checksum_jit(leaf) for leaf in leaves])]


def _through_json(value: dict, what: str) -> dict:
  def to_json(obj):
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(obj).tolist()
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")

  try:
    return json.loads(json.dumps(value, default=to_json))
  except (TypeError, ValueError) as error:
    raise TypeError(f"{what} must be JSON-able (dicts, lists, str, numbers, None): "
                    f"{error}") from None


def _listed(paths: list[str], limit: int = 5) -> str:
  more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more

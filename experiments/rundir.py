"""Run directories of :mod:`experiments.run`: an exclusive lock, a marker, atomic JSON files.

A directory belongs to the runner when its marker file (``config.json`` of a
run, ``sweep.json`` of a sweep) carries ``"runner": "experiments.run"``. The
runner claims a directory with :func:`claim` before it writes anything:

  * a path that is a file, or a non-empty directory that is not the runner's,
    is refused without touching it (the user's files stay as they were);
  * a new run needs a missing or empty directory; one that already holds a run
    is refused (resume it instead), and only a run can be resumed;
  * an exclusive ``fcntl.flock`` on ``<dir>/.lock`` is held until the run ends,
    so a second runner on the same directory is refused at once, before it can
    overwrite ``config.json`` or ``metrics.jsonl``. The kernel drops the lock
    when its process dies, so a killed run leaves no stale lock behind.

Example:
  >>> import pathlib, tempfile
  >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
  >>> with claim(out, marker="config.json", resume=False):  # doctest: +ELLIPSIS
  ...   write_json(out / "config.json", mark({"seed": 0}))
  ...   with claim(out, marker="config.json", resume=True):  # a second runner
  ...     pass
  Traceback (most recent call last):
  experiments.rundir.RunError: ... is in use by another experiments.run process (pid ...); wait ...
  >>> read_json(out / "config.json", expect_runner=True)
  {'seed': 0}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

RUNNER = "experiments.run"
FORMAT = 1  # layout of the marker files; a future change is recognised by it
LOCK_NAME = ".lock"


class RunError(RuntimeError):
  """A run directory that cannot be used as asked (nothing in it was changed)."""


def mark(content: Mapping[str, Any]) -> dict[str, Any]:
  """``content`` with the runner's marker fields, as written to ``config.json``/``sweep.json``."""
  return {"runner": RUNNER, "runner_format": FORMAT, **content}


def write_json(path: pathlib.Path, content: Any) -> None:
  """Writes ``content`` as JSON to ``path`` atomically: the old file or the new one, never half.

  The text goes to ``<path>.tmp``, is flushed to disk, and replaces ``path`` in
  one ``os.replace``. A full disk fails the temporary file, which is removed,
  and leaves ``path`` as it was.
  """
  write_text(path, json.dumps(content, indent=2) + "\n")


def write_text(path: pathlib.Path, text: str) -> None:
  """Atomic ``path.write_text(text)`` (see :func:`write_json`)."""
  write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_atomically(path: pathlib.Path, write: Callable[[BinaryIO], Any]) -> None:
  """Calls ``write(f)`` on a binary temporary file, then moves it over ``path`` (see :func:`write_json`)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as error:
    with contextlib.suppress(OSError):
      tmp.unlink()
    if isinstance(error, OSError) and error.filename is None:  # a failed write names no file
      raise OSError(error.errno, error.strerror, str(path)) from error
    raise


def read_json(path: pathlib.Path, *, expect_runner: bool = False) -> Any:
  """The JSON in ``path``; errors name the file. With ``expect_runner``, checks and drops the marker.

  Raises:
    RunError: ``path`` is not valid JSON, or (``expect_runner``) was not
      written by this runner or by a version with another layout.
  """
  path = pathlib.Path(path)
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise RunError(f"{path} is not valid JSON ({error}); it was not written whole by "
                   "experiments.run. Restore it from a copy or rewrite it; the checkpoints "
                   "beside it are untouched.") from None
  if expect_runner:
    if not (isinstance(content, dict) and content.get("runner") == RUNNER):
      raise RunError(f"{path} was not written by {RUNNER} (it has no \"runner\": "
                     f"\"{RUNNER}\" field), so {path.parent} is not one of its run "
                     "directories.")
    if content.get("runner_format") != FORMAT:
      raise RunError(f"{path} has runner_format {content.get('runner_format')!r}; this "
                     f"version of {RUNNER} reads format {FORMAT}. Use the version that "
                     "wrote it.")
    content = {k: v for k, v in content.items() if k not in ("runner", "runner_format")}
  return content


def is_claimed_by_runner(directory: pathlib.Path, marker: str) -> bool:
  """Whether ``directory/marker`` exists and carries the runner's marker (unreadable: False)."""
  try:
    read_json(pathlib.Path(directory) / marker, expect_runner=True)
  except (OSError, RunError):
    return False
  return True


def _leftover(marker: str) -> str:
  """The temporary file of a first ``marker`` write that was killed before its rename.

  A run killed there leaves only it and ``.lock``: it never started, and a new
  run in the directory replaces the leftover (under the lock, so never a live run's).
  """
  return marker + ".tmp"


def _check(out: pathlib.Path, *, marker: str, resume: bool) -> None:
  """Refuses ``out`` as the runner's directory unless it may be used as asked (reads only)."""
  what = "sweep" if marker == "sweep.json" else "run"
  if out.exists() and not out.is_dir():
    raise RunError(f"--out {out} is a file, not a directory; choose a directory (new or "
                   "empty) for the run.")
  ours = out.is_dir() and is_claimed_by_runner(out, marker)
  if resume:
    if not ours:
      if out.is_dir() and (out / _leftover(marker)).exists() and not (out / marker).exists():
        raise RunError(f"Cannot resume {out}: its {what} was stopped while writing its first "
                       f"{marker}, so it never started. Start it again with the same command "
                       f"without --resume (and --out {out}); the leftover is replaced.")
      reason = ("does not exist" if not out.exists() else
                f"has no {marker} written by {RUNNER}")
      raise RunError(f"Cannot resume {out}: it {reason}, so it is not a {what} directory "
                     f"of {RUNNER}.")
    return
  if ours:
    raise RunError(f"{out} already holds a {what} of {RUNNER}; resume it with "
                   f"`python -m experiments.run --resume {out}` or choose another --out. "
                   "Nothing was written.")
  if out.is_dir():
    others = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, _leftover(marker)))
    if others:
      listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
      raise RunError(f"--out {out} is not empty ({listed}) and is not a {what} directory "
                     f"of {RUNNER} (no {marker} of its own); choose a new or empty "
                     "directory. Nothing was written.")


def check_resumable(out: pathlib.Path, *, marker: str) -> None:
  """Raises the :class:`RunError` :func:`claim` would for a resume of ``out`` (reads only)."""
  _check(pathlib.Path(out), marker=marker, resume=True)


@contextlib.contextmanager
def claim(out: pathlib.Path, *, marker: str, resume: bool) -> Iterator[pathlib.Path]:
  """Checks ``out`` (see the module doc), then holds its lock until the block ends.

  Args:
    out: the run or sweep directory.
    marker: ``config.json`` for a run, ``sweep.json`` for a sweep.
    resume: the directory must hold a run (sweep) of the runner; else it must
      be missing or empty.

  Raises:
    RunError: the directory may not be used as asked, or another process
      holds its lock. Nothing in it was changed.
  """
  out = pathlib.Path(out)
  _check(out, marker=marker, resume=resume)  # before the lock: nothing is created in user dirs
  created_dir = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  lock_path = out / LOCK_NAME
  created_lock = not lock_path.exists()
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  locked = False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      created_lock = created_dir = False  # the lock and the directory are the other runner's
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise RunError(f"{out} is in use by another {RUNNER} process (pid {holder}, holding "
                     f"{lock_path}); wait for it to end or choose another --out. Nothing "
                     "was written.") from None
    locked = True
    # A failed claim may have unlinked the lock file between our open and our flock: a lock
    # on a file no longer at lock_path locks nothing.
    if not (lock_path.exists() and os.path.samestat(os.fstat(fd), os.stat(lock_path))):
      created_lock = created_dir = False
      raise RunError(f"{out} was claimed by another {RUNNER} process at the same moment; "
                     "try again.")
    _check(out, marker=marker, resume=resume)  # again under the lock: another run may have begun
    if not (out / marker).exists():
      with contextlib.suppress(FileNotFoundError):
        (out / _leftover(marker)).unlink()
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    yield out
  except BaseException:
    # Leave no trace of a claim whose run wrote nothing (a failed check, a model that did not
    # load): the lock file only if we made it, the directory only if we made it and it is empty.
    if locked and created_lock and not (out / marker).exists():
      with contextlib.suppress(OSError):
        lock_path.unlink()
      if created_dir:
        with contextlib.suppress(OSError):
          out.rmdir()
    raise
  finally:
    os.close(fd)  # releases the lock

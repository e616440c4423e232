"""Experiment tracking for the runner: its metrics records as TensorBoard and wandb scalars.

``metrics.jsonl`` stays the source of truth; a tracker is a view of it. With
``tracking.tensorboard=true`` the records go to TensorBoard event files in
``<run dir>/tensorboard/`` (through tensorboardX, no TensorFlow needed); with
``tracking.wandb=true`` to a Weights & Biases run in ``<run dir>/wandb/``,
offline unless ``tracking.wandb_mode=online``. Each record is logged at
``step = iteration`` as the scalars of :func:`scalars`.

A tracker never loses a run: a library that is not installed is reported by
:func:`check_available` before the model loads, and a tracker whose writes
fail mid-run is warned about once and dropped while training goes on.

Example:
  >>> import tempfile, types
  >>> spec = types.SimpleNamespace(tensorboard=False, wandb=False)
  >>> config = types.SimpleNamespace(name="demo", tracking=spec)
  >>> with Tracker(config, pathlib.Path(tempfile.mkdtemp()), resumed_at=0) as tracker:
  ...   tracker.log([{"iteration": 0, "update_norm": 0.0}])  # nothing is on: nothing is written
"""

from __future__ import annotations

import importlib
import pathlib
import secrets
import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from experiments import rundir

if TYPE_CHECKING:  # annotations only
  from experiments.config import ExperimentConfig, TrackingSpec

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=<run dir>) writes here itself
# The W&B run id, kept so that a resumed run's offline segments sync into one W&B run.
WANDB_ID_FILE = "es_jax_run_id"
# Record keys logged under another tag: a prior task's accuracy is prior/<task>/accuracy.
TAG_NAMES = {"prior_tasks": "prior"}
_EXTRAS = {"tensorboardX": ("tracking.tensorboard", "tracking"),
           "wandb": ("tracking.wandb", "wandb")}


class TrackingUnavailableError(ImportError, ValueError):
  """A tracker the config turns on is not installed.

  Also a ``ValueError``: to the runner it is a config that cannot run here,
  reported in one line before anything is written.
  """


def _import(module: str) -> ModuleType:
  """``module`` imported, or a :class:`TrackingUnavailableError` naming its field and extra."""
  field, extra = _EXTRAS[module]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    if error.name is not None and error.name != module and not error.name.startswith(module + "."):
      raise  # installed, but one of its own dependencies is missing: its message says which
    raise TrackingUnavailableError(
        f"{field}=true needs {module}, which is not installed; install it with "
        f"pip install -e '.[{extra}]' (from the repository root), or set {field}=false",
        name=module) from None


def check_available(spec: TrackingSpec) -> None:
  """Raises :class:`TrackingUnavailableError` unless every tracker ``spec`` turns on is installed.

  Args:
    spec: the config's ``tracking`` section (:class:`experiments.config.TrackingSpec`).
  """
  if spec.tensorboard:
    _import("tensorboardX")
  if spec.wandb:
    _import("wandb")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """The numbers of a metrics record by tag, nested dicts flattened with ``/``.

  ``iteration`` is the step, not a scalar; ``None`` (a metric this record did
  not measure) and lists (per-item ``correct``/``margin``) are left out.

  Example:
    >>> scalars({"iteration": 4, "update_norm": 0.5, "train_reward": None,
    ...          "group_norms": {"q": 0.25},
    ...          "prior_tasks": {"piqa": {"accuracy": 0.75, "correct": [1, 0], "margin": None}}})
    {'update_norm': 0.5, 'group_norms/q': 0.25, 'prior/piqa/accuracy': 0.75}
  """
  flat: dict[str, float] = {}

  def visit(tag: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for key, inner in value.items():
        visit(f"{tag}/{key}", inner)
    elif isinstance(value, (int, float)):
      flat[tag] = float(value)

  for key, value in record.items():
    if key != "iteration":
      visit(TAG_NAMES.get(key, key), value)
  return flat


class _TensorBoard:
  """Event files in ``<run dir>/tensorboard/``, one per process that wrote to it."""

  name = "TensorBoard"

  def __init__(self, out: pathlib.Path, resumed_at: int):
    tensorboardX = _import("tensorboardX")
    directory = out / TENSORBOARD_DIR
    resumed = directory.exists()
    # A resumed run's records up to its checkpoint are in the earlier event files already
    # (a run that had tracking off gets all of them). A killed run may have logged records
    # past its checkpoint, which this one logs again: purge_step makes TensorBoard drop them.
    self.logged_through = resumed_at if resumed else -1
    self._writer = tensorboardX.SummaryWriter(
        str(directory), purge_step=resumed_at + 1 if resumed else None)

  def write(self, step: int, values: Mapping[str, float]) -> None:
    for tag, value in values.items():
      self._writer.add_scalar(tag, value, global_step=step)
    self._writer.flush()  # records are minutes apart: a kill loses none of them

  def close(self, failed: bool) -> None:
    del failed
    self._writer.close()


class _Wandb:
  """A W&B run written to ``<run dir>/wandb/``; each resumption adds a segment with the same id."""

  name = "wandb"

  def __init__(self, out: pathlib.Path, config: ExperimentConfig, resumed_at: int):
    wandb = _import("wandb")
    spec = config.tracking
    id_file = out / WANDB_DIR / WANDB_ID_FILE
    resumed = id_file.exists()
    run_id = id_file.read_text(encoding="utf-8").strip() if resumed else secrets.token_hex(6)
    if not resumed:
      id_file.parent.mkdir(exist_ok=True)
      rundir.write_text(id_file, run_id + "\n")
    self.logged_through = resumed_at if resumed else -1
    self._run = wandb.init(
        project=spec.wandb_project, name=config.name, id=run_id, resume="allow", dir=str(out),
        mode=spec.wandb_mode, config=config.to_dict(),
        # console="off": wandb would otherwise wrap stdout and stderr (the progress bar, the
        # runner's errors); the rest keeps an offline run to the metrics and the config.
        settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                x_disable_stats=True, x_save_requirements=False))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    self._run.log(dict(values), step=step)

  def close(self, failed: bool) -> None:
    self._run.finish(exit_code=1 if failed else 0)


class Tracker:
  """The trackers a config turns on, for one run directory; a context manager that closes them.

  Open it once the run has claimed its directory and passed its checks (it
  writes into the directory). :meth:`log` takes all the records so far and
  logs each one a tracker has not logged yet, so no step is logged twice.
  A tracker that fails to open, write or close is warned about once and
  dropped; ``metrics.jsonl`` has every record regardless.

  Args:
    config: the run's :class:`experiments.config.ExperimentConfig`.
    out: the run directory.
    resumed_at: the iteration of the checkpoint the run resumes (0 for a new run).

  Raises:
    TrackingUnavailableError: a tracker it turns on is not installed.
  """

  def __init__(self, config: ExperimentConfig, out: pathlib.Path, *, resumed_at: int):
    spec = config.tracking
    check_available(spec)
    self._trackers: list[Any] = []
    opens = [("TensorBoard", lambda: _TensorBoard(out, resumed_at)) if spec.tensorboard else None,
             ("wandb", lambda: _Wandb(out, config, resumed_at)) if spec.wandb else None]
    for name, open_ in filter(None, opens):
      try:
        self._trackers.append(open_())
      except Exception as error:  # noqa: BLE001 - any failure of a tracker must spare the run
        _warn(name, "could not be opened", error)

  def log(self, records: Sequence[Mapping[str, Any]]) -> None:
    """Logs each record of ``records`` not logged yet, at step ``record["iteration"]``."""
    for tracker in list(self._trackers):
      try:
        for record in records:
          if record["iteration"] > tracker.logged_through:
            tracker.write(record["iteration"], scalars(record))
            tracker.logged_through = record["iteration"]
      except Exception as error:  # noqa: BLE001
        self._trackers.remove(tracker)
        _warn(tracker.name, "stopped logging", error)
        _close_quietly(tracker)

  def close(self, failed: bool = False) -> None:
    """Flushes and closes every tracker (``failed``: the run ended with an error)."""
    trackers, self._trackers = self._trackers, []
    for tracker in trackers:
      try:
        tracker.close(failed)
      except Exception as error:  # noqa: BLE001
        _warn(tracker.name, "could not be closed", error)

  def __enter__(self) -> Tracker:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(failed=exc_type is not None)


def _warn(name: str, what: str, error: Exception) -> None:
  warnings.warn(f"{name} tracking {what} ({type(error).__name__}: {error}); the run goes on "
                "without it, and metrics.jsonl has every record.", RuntimeWarning, stacklevel=3)


def _close_quietly(tracker: Any) -> None:
  try:
    tracker.close(True)
  except Exception:  # noqa: BLE001 - already warned about this tracker
    pass

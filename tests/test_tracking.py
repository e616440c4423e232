"""Experiment tracking in the runner (experiments/tracking.py): TensorBoard and wandb (offline).

Each tracker's files are read back with the library's own reader (TensorBoard's
``EventAccumulator``; wandb's protobuf records) and compared with
``metrics.jsonl``, the runner's source of truth. Two short runs (2 iterations,
a record at each, a checkpoint at 2) are made once, one plain and one tracked,
and copied per test that resumes them.
"""

from __future__ import annotations

import importlib.abc
import json
import pathlib
import shutil
import struct
import sys
import warnings

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiment_fixtures import digit_share_reward, make_short_run_assets, short_run_overrides
from experiments import rollouts, tracking
from experiments import run as run_lib
from experiments.config import apply_overrides, preset


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return make_short_run_assets(tmp_path_factory.mktemp("assets"))


def overrides(assets, *extra: str) -> list[str]:
  return (short_run_overrides(assets.checkpoint, assets.gsm8k, assets.hellaswag)
          + ["iterations=2", "eval_every=1"] + list(extra))


def short_config(assets, *extra: str):
  return apply_overrides(preset("countdown_es"), overrides(assets, *extra))


def finished(assets, name: str, *extra: str) -> pathlib.Path:
  patch = pytest.MonkeyPatch()
  patch.setattr(rollouts, "score", digit_share_reward)
  try:
    out = assets.root / name
    run_lib.run(short_config(assets, *extra), out, progress=False)
  finally:
    patch.undo()
  return out


@pytest.fixture(scope="module")
def plain_run(assets):
  """A finished run with the default config: records at 0, 1 and 2, a checkpoint at 2."""
  return finished(assets, "plain")


@pytest.fixture(scope="module")
def tracked_run(assets):
  """The same run with TensorBoard and wandb (offline) on."""
  return finished(assets, "tracked", "tracking.tensorboard=true", "tracking.wandb=true")


def copy_of(run: pathlib.Path, tmp_path) -> pathlib.Path:
  target = tmp_path / "run"
  shutil.copytree(run, target)
  return target


def metrics(run: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(record: dict) -> dict[str, float]:
  """What the trackers should hold of a record, written out from the spec (not the module's code):
  each number by its key, a nested dict's as key/inner, each prior task's accuracy as
  prior/<task>/accuracy; no iteration (it is the step), no None, no per-item lists."""
  flat = {}
  for key, value in record.items():
    if key == "iteration" or value is None:
      continue
    if key == "prior_tasks":
      flat.update({f"prior/{task}/accuracy": scores["accuracy"] for task, scores in value.items()})
    elif isinstance(value, dict):
      flat.update({f"{key}/{inner}": v for inner, v in value.items()})
    else:
      flat[key] = value
  return flat


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """Each tag's (step, value) pairs over ``records``, as float32 (TensorBoard's scalar type)."""
  series: dict[str, list] = {}
  for record in records:
    for tag, value in expected_scalars(record).items():
      series.setdefault(tag, []).append((record["iteration"], float(np.float32(value))))
  return series


def tensorboard_series(run: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Each scalar tag's (step, value) pairs, as TensorBoard shows them (all event files)."""
  accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
  accumulator.Reload()
  return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


def raw_tensorboard_events(run: pathlib.Path) -> list[list]:
  """Each event file's events as written (oldest file first), before any purge a reader does."""
  files = [list(event_file_loader.LegacyEventFileLoader(str(path)).Load())
           for path in (run / "tensorboard").glob("events.out.tfevents.*")]
  return sorted(files, key=lambda events: events[0].wall_time)  # each opens with its version


def wandb_records(path: pathlib.Path) -> list:
  """The protobuf records of an offline run's ``.wandb`` file.

  wandb (0.31) writes them in LevelDB's log format behind a 7-byte header
  (``:W&B``, a magic number and a version) and ships no Python reader: 32 KiB
  blocks of chunks, each a 7-byte header (CRC, little-endian length, kind:
  1 whole record, 2/3/4 first/middle/last piece) and its bytes.
  """
  from wandb.proto import wandb_internal_pb2

  data = path.read_bytes()
  assert data[:4] == b":W&B", path
  block, position, pending, records = 32768, 7, b"", []
  while position + 7 <= len(data):
    if block - position % block < 7:  # a block's tail too short for a header is padding
      position += block - position % block
      continue
    _, length, kind = struct.unpack("<IHB", data[position:position + 7])
    pending += data[position + 7:position + 7 + length]
    position += 7 + length
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(pending))
      pending = b""
  return records


def wandb_segments(run: pathlib.Path) -> list[list]:
  """The records of each offline segment in ``<run>/wandb`` (one per process), oldest first."""
  return [wandb_records(next(directory.glob("run-*.wandb")))
          for directory in sorted((run / "wandb").glob("offline-run-*"))]


def wandb_history(records) -> list[dict]:
  """Each logged row, by its key (wandb keeps a key with "/" as its parts), with ``_step``."""
  return [{**{item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for item in record.history.item}, "_step": record.history.step.num}
          for record in records if record.WhichOneof("record_type") == "history"]


# ----------------------------------------------------------------------------- off by default


def test_tracking_is_off_by_default(plain_run):
  config = preset("countdown_es").tracking
  assert not config.tensorboard and not config.wandb
  assert not (plain_run / "tensorboard").exists() and not (plain_run / "wandb").exists()
  stored = json.loads((plain_run / "config.json").read_text())["tracking"]
  assert not stored["tensorboard"] and not stored["wandb"]


def test_tracking_stays_out_of_the_resume_fingerprint():
  """It does not change the trajectory: a resume may turn it on or off, and a checkpoint
  written before the section existed still resumes."""
  plain = preset("countdown_es")
  tracked = apply_overrides(plain, ["tracking.tensorboard=true", "tracking.wandb=true"])
  assert run_lib.fingerprint(tracked) == run_lib.fingerprint(plain)
  assert "tracking" not in run_lib.fingerprint(tracked)
  assert run_lib.baseline_key(tracked) == run_lib.baseline_key(plain)


@pytest.mark.parametrize("override, message", [
    ("tracking.tensorboard=yes", "tracking.tensorboard=yes: expected true/false"),
    ("tracking.wandb_mode=cloud", "tracking.wandb_mode='cloud': use one of"),
    ("tracking.wandb_project=a/b", "tracking.wandb_project='a/b'"),
])
def test_bad_tracking_fields_name_themselves(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(preset("countdown_es"), [override])


# ----------------------------------------------------------------------------- what is logged


def test_tensorboard_scalars_equal_metrics_jsonl_at_each_step(tracked_run):
  records = metrics(tracked_run)
  assert [r["iteration"] for r in records] == [0, 1, 2]
  series = tensorboard_series(tracked_run)
  expected = expected_series(records)
  assert series == expected
  # The spec's tags are there, the per-item lists are not.
  assert {"target_accuracy", "update_norm", "group_norms/q", "seconds/total",
          "prior/hellaswag/accuracy", "train_reward", "wall_time_s"} <= set(series)
  assert not [tag for tag in series if "correct" in tag or "margin" in tag]
  assert [step for step, _ in series["train_reward"]] == [1, 2]  # None at 0: not logged


def test_wandb_offline_run_holds_the_config_and_the_records(tracked_run):
  [segment] = wandb_segments(tracked_run)
  [run] = [r.run for r in segment if r.WhichOneof("record_type") == "run"]
  assert run.display_name == "countdown_es" and run.project == "es_jax"
  stored = json.loads((tracked_run / "config.json").read_text())
  logged = {item.key: json.loads(item.value_json) for item in run.config.update
            if not item.key.startswith("_")}
  assert logged == {k: v for k, v in stored.items() if k not in ("runner", "runner_format")}
  history = wandb_history(segment)
  # wandb keeps float64: the values are metrics.jsonl's exactly.
  assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in history] == [
      expected_scalars(record) for record in metrics(tracked_run)]
  assert [row["_step"] for row in history] == [0, 1, 2]


# ----------------------------------------------------------------------------- resume


def test_a_resume_logs_only_the_records_after_its_checkpoint(tracked_run, tmp_path, monkeypatch):
  run = copy_of(tracked_run, tmp_path)
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  assert run_lib.main(["--resume", str(run), "--no-progress", "--set", "iterations=3"]) == 0
  records = metrics(run)
  assert [r["iteration"] for r in records] == [0, 1, 2, 3]
  assert tensorboard_series(run) == expected_series(records)
  # As written, before any purge by a reader: each (tag, step) in one event file, once.
  first, second = raw_tensorboard_events(run)
  logged = [(value.tag, event.step) for events in (first, second) for event in events
            for value in event.summary.value]
  assert len(logged) == len(set(logged))
  assert {step for _, step in logged} == {0, 1, 2, 3}
  assert {event.step for event in second if event.summary.value} == {3}
  # The resumed file tells TensorBoard to drop steps from 3 on that a killed run may have left.
  assert [event.step for event in second if event.HasField("session_log")] == [3]
  # wandb: a second segment of the same run id with the new record only.
  segments = wandb_segments(run)
  assert len(segments) == 2
  ids = {r.run.run_id for segment in segments for r in segment
         if r.WhichOneof("record_type") == "run"}
  assert len(ids) == 1
  assert [row["_step"] for row in wandb_history(segments[1])] == [3]


def test_a_resume_may_turn_tracking_on_and_then_logs_every_record(plain_run, tmp_path,
                                                                   monkeypatch):
  """The run had none: the records before the checkpoint are logged too (once each)."""
  run = copy_of(plain_run, tmp_path)
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  assert run_lib.main(["--resume", str(run), "--no-progress", "--set", "iterations=3",
                       "tracking.tensorboard=true"]) == 0
  assert tensorboard_series(run) == expected_series(metrics(run))
  [events] = raw_tensorboard_events(run)
  logged = [(value.tag, event.step) for event in events for value in event.summary.value]
  assert len(logged) == len(set(logged)) and {step for _, step in logged} == {0, 1, 2, 3}
  assert not (run / "wandb").exists()


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("field, module, extra", [("tensorboard", "tensorboardX", "tracking"),
                                                  ("wandb", "wandb", "wandb")])
def test_a_missing_library_fails_before_the_run_with_its_extra(assets, tmp_path, monkeypatch,
                                                               capsys, field, module, extra):
  # As if it were not installed: out of sys.modules, and not found by the import system.
  for name in [name for name in sys.modules if name.partition(".")[0] == module]:
    monkeypatch.delitem(sys.modules, name)

  class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.partition(".")[0] == module:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
      return None

  monkeypatch.setattr(sys, "meta_path", [NotInstalled(), *sys.meta_path])
  out = tmp_path / "run"
  with pytest.raises(ImportError, match=rf"pip install -e '\.\[{extra}\]'"):
    run_lib.run(short_config(assets, f"tracking.{field}=true"), out, progress=False)
  assert not out.exists()  # refused before the model loaded: nothing was written
  # The command line says it in one line, as for any config that cannot run.
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress", "--set",
                       *overrides(assets, f"tracking.{field}=true")]) == 2
  message = capsys.readouterr().err.strip()
  assert message.startswith(f"error: tracking.{field}=true needs {module}")
  assert f"pip install -e '.[{extra}]'" in message and f"tracking.{field}=false" in message
  assert "\n" not in message and not out.exists()


def test_a_failing_write_warns_once_and_the_run_goes_on(assets, tmp_path, monkeypatch):
  real_write = tracking._TensorBoard.write

  def write_once(self, step, values):
    if step > 0:
      raise OSError(28, "No space left on device")
    real_write(self, step, values)

  monkeypatch.setattr(tracking._TensorBoard, "write", write_once)
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  out = tmp_path / "run"
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    records = run_lib.run(short_config(assets, "tracking.tensorboard=true"), out, progress=False)
  ours = [w for w in caught if "TensorBoard tracking" in str(w.message)]
  assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
  assert "No space left on device" in str(ours[0].message)
  assert "metrics.jsonl has every record" in str(ours[0].message)
  assert [r["iteration"] for r in records] == [0, 1, 2] == [r["iteration"] for r in metrics(out)]
  assert (out / "run.espatch").exists()  # the run finished
  assert {step for steps in tensorboard_series(out).values() for step, _ in steps} == {0}

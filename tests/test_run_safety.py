"""The runner under hostile use (issue 13, defects 4-8 and 14): a second runner, a wrong --out,
edited checkpoint meta, a full disk, infinite hyperparameters, data smaller than the config.

Every case ends in a one-line error that names the input and leaves the run directory as it
was. One short run (2 iterations, a checkpoint at 2) is made once and copied per test.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from experiment_fixtures import digit_share_reward, make_short_run_assets, short_run_overrides
from experiments import components, rollouts
from experiments import run as run_lib
from experiments.checkpointing import RunCheckpointError, RunCheckpointer
from experiments.config import apply_overrides, preset

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return make_short_run_assets(tmp_path_factory.mktemp("assets"))


def overrides(assets, *extra: str) -> list[str]:
  return short_run_overrides(assets.checkpoint, assets.gsm8k, assets.hellaswag) + list(extra)


def short_config(assets, *extra: str):
  return apply_overrides(preset("countdown_es"), overrides(assets, *extra))


@pytest.fixture(scope="module")
def finished_run(assets):
  """A finished 2-iteration run (records at 0 and 2, one checkpoint at 2)."""
  patch = pytest.MonkeyPatch()
  patch.setattr(rollouts, "score", digit_share_reward)
  try:
    out = assets.root / "finished"
    run_lib.run(short_config(assets, "iterations=2"), out, progress=False)
  finally:
    patch.undo()
  return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(finished_run, target)
  return target


def snapshot(directory: pathlib.Path) -> dict:
  return {p.relative_to(directory): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def error_of(capsys) -> str:
  err = capsys.readouterr().err.strip()
  return err


# ----------------------------------------------------------------------------- 4: the run directory


def test_a_second_runner_on_a_locked_directory_is_refused_before_writing(assets, run_copy, capsys):
  """A run holds the directory's lock; a second runner (resuming, or a fresh run with another
  config, the issue's case) is refused at once and changes no file."""
  before = snapshot(run_copy)
  lock = os.open(run_copy / ".lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first runner holds while it runs
  try:
    assert run_lib.main(["--resume", str(run_copy), "--no-progress", "--set", "iterations=3"]) == 2
    assert "in use by another experiments.run process" in error_of(capsys)
    assert snapshot(run_copy) == before
    # The case: the first runner is still loading its model (it has written nothing
    # yet), and a second one with another config starts on the same --out.
    for path in run_copy.iterdir():
      if path.name != ".lock":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_lib.main(["countdown_es", "--out", str(run_copy), "--no-progress", "--set",
                         *overrides(assets, "seed=1")]) == 2
    assert "in use by another" in error_of(capsys)
  finally:
    os.close(lock)
  assert [p.name for p in run_copy.iterdir()] == [".lock"]


def test_an_out_dir_of_other_files_is_refused_and_left_as_it_was(assets, tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "config.json").write_text('{"my": "settings"}')
  (out / "metrics.jsonl").write_text("my numbers\n")
  (out / "forgetting.png").write_bytes(b"my plot")
  before = snapshot(out)
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress", "--set",
                       *overrides(assets, "iterations=1")]) == 2
  message = error_of(capsys)
  assert f"--out {out} is not empty" in message and "not a run directory" in message
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "forgetting.png", "metrics.jsonl"]
  assert snapshot(out) == before
  # Resuming it is refused the same way.
  assert run_lib.main(["--resume", str(out), "--no-progress"]) == 2
  assert "not written by experiments.run" in error_of(capsys)
  assert snapshot(out) == before


def test_a_new_run_over_a_run_without_checkpoints_is_refused(assets, run_copy):
  """A run killed before its first save holds config.json and metrics.jsonl: still a run."""
  shutil.rmtree(run_copy / "checkpoints")
  before = snapshot(run_copy)
  with pytest.raises(run_lib.RunError, match="already holds a run.*--resume"):
    run_lib.run(short_config(assets, "iterations=2", "seed=3"), run_copy, progress=False)
  assert snapshot(run_copy) == before


def test_a_sweep_rerun_without_resume_refuses_before_rewriting_sweep_json(assets, run_copy,
                                                                          tmp_path, capsys):
  sweep_dir = tmp_path / "sweep"
  sweep_dir.mkdir()
  (sweep_dir / "sweep.json").write_text(json.dumps({
      "runner": "experiments.run", "runner_format": 1, "sweep": "awd_l1_sweep",
      "overrides": overrides(assets, "iterations=2")}))
  shutil.move(run_copy, sweep_dir / "awd_l1_0.0001")
  before = snapshot(sweep_dir)
  assert run_lib.main(["awd_l1_sweep", "--out", str(sweep_dir), "--no-progress", "--set",
                       *overrides(assets, "iterations=2", "seed=5")]) == 2
  assert "already holds a sweep" in error_of(capsys)
  assert snapshot(sweep_dir) == before


def test_resume_with_fewer_iterations_than_the_checkpoint_is_refused(run_copy, capsys):
  before = snapshot(run_copy)
  assert run_lib.main(["--resume", str(run_copy), "--no-progress", "--set", "iterations=1"]) == 2
  message = error_of(capsys)
  assert "at iteration 2, past iterations=1" in message and "iterations=N with N > 2" in message
  assert snapshot(run_copy) == before


def test_a_failed_check_leaves_no_trace_in_a_new_directory(assets, tmp_path):
  out = tmp_path / "new" / "run"
  config = short_config(assets, "iterations=1", "task.num_train=20")  # the file has 7 rows
  with pytest.raises(ValueError, match="task.num_train=20"):
    run_lib.run(config, out, progress=False)
  assert not out.exists()


# ----------------------------------------------------------------------------- 5: checkpoint meta


@pytest.mark.parametrize("edit", [(b'"iteration": 12', b'"iteration": 13'),
                                  (b"0.25", b"0.75")])
def test_an_edited_checkpoint_meta_is_refused(tmp_path, edit):
  state = {"w": jnp.arange(4.0)}
  with RunCheckpointer(tmp_path, fingerprint={"run": 1}) as checkpointer:
    checkpointer.save(11, state, {"iteration": 11, "metrics": [{"accuracy": 0.5}]})
    checkpointer.save(12, state, {"iteration": 12, "metrics": [{"accuracy": 0.25}]})
  meta_file = tmp_path / "12" / "meta" / "metadata"
  text = meta_file.read_bytes()
  assert edit[0] in text
  meta_file.write_bytes(text.replace(*edit))
  with RunCheckpointer(tmp_path, fingerprint={"run": 1}) as checkpointer:
    for attempt in (lambda: checkpointer.restore(state), checkpointer.read_meta):
      with pytest.raises(RunCheckpointError, match=r"12 is corrupt: its meta .* differs.*fall back "
                                                "to step 11"):
        attempt()
    assert checkpointer.restore(state, step=11)[1]["iteration"] == 11


def test_a_checkpoint_whose_iteration_is_not_its_step_is_refused(run_copy, capsys):
  (run_copy / "checkpoints" / "2").rename(run_copy / "checkpoints" / "3")
  before = snapshot(run_copy)
  assert run_lib.main(["--resume", str(run_copy), "--no-progress", "--set", "iterations=4"]) == 2
  assert "says iteration 2 but is step 3" in error_of(capsys)
  assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- 6: config.json


def _limit_file_size(limit: int):
  """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ: Python ignores it)."""
  old = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, old)


# Under the limit JAX cannot add to its compilation cache either; it warns and goes on.
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache")
def test_a_full_disk_during_resume_leaves_config_json_whole(run_copy, capsys, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  config_before = (run_copy / "config.json").read_bytes()
  assert len(config_before) > 1000
  restore = _limit_file_size(1000)  # the config fits no more: the write of config.json fails
  try:
    rc = run_lib.main(["--resume", str(run_copy), "--no-progress", "--set", "iterations=3"])
  finally:
    restore()
  message = error_of(capsys)
  assert rc == 1 and "\n" not in message, message
  assert f"File too large: '{run_copy / 'config.json'}'" in message and "intact" in message
  assert f"--resume {run_copy}" in message
  assert (run_copy / "config.json").read_bytes() == config_before
  assert not (run_copy / "config.json.tmp").exists()


def test_a_full_disk_while_plotting_leaves_the_previous_plots_whole(run_copy):
  from experiments import plots
  records = {"run": run_lib.read_metrics(run_copy)}
  before = snapshot(run_copy)
  restore = _limit_file_size(2000)  # smaller than each plot
  try:
    with pytest.raises(OSError, match="File too large") as error:
      plots.write_plots(records, run_copy)
    assert error.value.filename == str(run_copy / "forgetting.png")
  finally:
    restore()
  assert snapshot(run_copy) == before


@pytest.mark.parametrize("name", ["config.json", "sweep.json"])
def test_a_truncated_json_file_is_named_in_the_error(run_copy, capsys, name):
  path = run_copy / name
  path.write_text((run_copy / "config.json").read_text()[:40])
  assert run_lib.main(["--resume", str(run_copy), "--no-progress"]) == 2
  message = error_of(capsys)
  assert f"{path} is not valid JSON" in message and "\n" not in message


def test_a_malformed_metrics_line_is_named_with_its_file(run_copy):
  records = run_lib.read_metrics(run_copy)
  assert [r["iteration"] for r in records] == [0, 2]
  with open(run_copy / "metrics.jsonl", "a") as f:
    f.write('{"iteration": 3, "target_acc')
  with pytest.raises(run_lib.RunError, match=f"line 3 of {run_copy / 'metrics.jsonl'} is not "
                                             "valid JSON"):
    run_lib.read_metrics(run_copy)


# ----------------------------------------------------------------------------- 7: finite values


@pytest.mark.parametrize("override", [
    "es.learning_rate=inf", "es.learning_rate=nan", "es.sigma=inf", "es.sigma=1e400",
    "grpo.learning_rate=inf", "grpo.clip_eps=inf", "grpo.max_grad_norm=inf",
    "grpo.temperature=inf", "grpo.kl_beta=inf"])
def test_non_finite_hyperparameters_are_refused_by_the_config(override):
  field = override.split("=")[0]
  with pytest.raises(ValueError, match=f"{field}=(inf|nan) must be a finite number"):
    apply_overrides(preset("countdown_es"), [override])


def test_non_finite_awd_strength_is_refused_by_the_config():
  with pytest.raises(ValueError, match="awd.strength=inf must be a finite number"):
    apply_overrides(preset("countdown_es"), ["awd.kind=l1", "awd.strength=inf"])


def test_params_that_stop_being_finite_stop_the_run_before_they_are_saved(assets, tmp_path,
                                                                          monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  out = tmp_path / "run"
  # Finite, so the config takes it; alpha times an O(1) direction overflows float32.
  config = short_config(assets, "iterations=2", "es.learning_rate=3e38")
  with pytest.raises(run_lib.RunError, match="iteration 1 of .*no longer finite.*no checkpoint "
                                             "was saved.*Lower es.learning_rate"):
    run_lib.run(config, out, progress=False)
  assert not any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
  assert [r["iteration"] for r in run_lib.read_metrics(out)] == [0]


# ----------------------------------------------------------------------------- 8: data sizes


@pytest.mark.parametrize("case", ["num_train", "empty_train", "empty_eval", "empty_prior"])
def test_data_smaller_than_the_config_is_refused_before_the_model_loads(assets, tmp_path, case):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  extra, field, source = {
      "num_train": (["task.num_train=20"], "num_train=20", assets.gsm8k),
      "empty_train": ([f"task.train_source={empty}"], "num_train=4", empty),
      "empty_eval": ([f"task.eval_source={empty}"], "num_eval=3", empty),
      "empty_prior": ([f"task.prior_source={empty}"], "num_prior=2", empty),
  }[case]
  # No checkpoint there: the size check has to come first to be reached at all.
  config = short_config(assets, *extra, f"model.checkpoint={tmp_path / 'no_model'}")
  found = "has only 7 examples" if case == "num_train" else "is empty"
  with pytest.raises(ValueError, match=f"task.{field} but the .* data \\({source}\\) {found}"):
    components.build(config)


def test_the_prior_task_needs_at_least_one_item():
  with pytest.raises(ValueError, match="task.num_prior=0 must be >= 1"):
    apply_overrides(preset("countdown_es"), ["task.num_prior=0"])
  apply_overrides(preset("countdown_es"), ["task.num_prior=0", "task.prior=none"])


# ----------------------------------------------------------------------------- 14: OSError


def test_an_out_that_is_a_file_gives_one_line(assets, tmp_path, capsys):
  out = tmp_path / "a_file"
  out.write_text("mine")
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress", "--set",
                       *overrides(assets)]) == 2
  message = error_of(capsys)
  assert message.count("\n") == 0 and f"--out {out} is a file" in message
  assert out.read_text() == "mine"


def test_a_checkpoint_the_disk_refuses_raises_os_error_naming_the_step(tmp_path, caplog):
  state = {"w": jax.random.normal(jax.random.key(0), (20_000,))}  # ~80 kB of incompressible bits
  with RunCheckpointer(tmp_path, fingerprint={}) as checkpointer:
    checkpointer.save(1, {"w": jnp.zeros(3)}, {"iteration": 1})
    before = snapshot(tmp_path / "1")
    restore = _limit_file_size(20_000)
    try:
      with pytest.raises(OSError, match=r"could not write checkpoint step 2 \(File too large\); "
                                        r"steps \[1\] are intact") as error:
        checkpointer.save(2, state, {"iteration": 2})
    finally:
      restore()
    assert error.value.filename == str(tmp_path / "2")
    assert checkpointer.all_steps() == [1]
  assert snapshot(tmp_path / "1") == before
  assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no orbax traceback logs


def test_event_loop_is_closed_noise_is_silenced_after_a_failed_restore(tmp_path):
  """A truncated checkpoint makes orbax's threads print "Event loop is closed" tracebacks after
  the restore has failed and its error was reported; the runner's main silences them."""
  script = textwrap.dedent(f"""
      import pathlib, jax
      from experiments.checkpointing import (RunCheckpointError, RunCheckpointer,
                                             silence_closed_event_loop_noise)
      silence_closed_event_loop_noise()
      d = pathlib.Path({str(tmp_path)!r})
      state = {{f"w{{i}}": jax.random.normal(jax.random.key(i), (5000,)) for i in range(6)}}
      with RunCheckpointer(d, fingerprint={{}}) as c:
        c.save(1, state, {{"iteration": 1}})
      for path in (d / "1" / "arrays").rglob("*"):
        if path.is_file() and path.parent.name == "d":
          path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
      for attempt in range(8):  # the noise is timing-dependent: most tries show it
        with RunCheckpointer(d, fingerprint={{}}) as c:
          try:
            c.restore(state)
          except RunCheckpointError as error:
            print("handled", str(error)[:40])
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  assert result.stdout.decode().count("handled") == 8
  assert "Event loop is closed" not in result.stderr.decode()


def test_main_installs_the_silencing_hook(capsys):
  hook = sys.unraisablehook
  try:
    assert run_lib.main(["--resume", "/nonexistent/run", "--no-progress"]) == 2
    assert sys.unraisablehook.__name__ == "_drop_closed_event_loop"
  finally:
    sys.unraisablehook = hook


# ----------------------------------------------------------------------------- a later audit
# Each failed before its fix: a lost patch, dropped overrides, sizes and names that crashed
# (or escaped --out) late, values float32 turns into 0 or inf, a directory a kill made unusable.


def test_a_complete_run_killed_before_its_patch_writes_it_on_resume(run_copy, capsys):
  written = (run_copy / "run.espatch").read_bytes()  # by the run itself, after its last save
  (run_copy / "run.espatch").unlink()  # as if killed between the last checkpoint and the patch
  assert run_lib.main(["--resume", str(run_copy), "--no-progress"]) == 0
  assert "lacks run.espatch" in capsys.readouterr().err
  assert (run_copy / "run.espatch").read_bytes() == written
  assert [r["iteration"] for r in run_lib.read_metrics(run_copy)] == [0, 2]


def test_a_complete_run_with_its_patch_does_nothing_on_resume(run_copy, capsys):
  before = snapshot(run_copy)
  assert run_lib.main(["--resume", str(run_copy), "--no-progress"]) == 0
  assert "is complete at iteration 2" in capsys.readouterr().err
  assert snapshot(run_copy) == before


def test_every_repeated_set_applies(assets, tmp_path, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  out, first = tmp_path / "run", overrides(assets)
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress", "--set", *first[:4],
                       "--set", *first[4:], "iterations=1", "--set=es.population=4",
                       "--set", "es.chunk_size=2"]) == 0
  stored = json.loads((out / "config.json").read_text())
  assert stored["model"]["checkpoint"] == str(assets.checkpoint)
  assert (stored["iterations"], stored["es"]["population"], stored["es"]["chunk_size"]) == (1, 4, 2)


def test_a_preset_or_out_beside_resume_is_refused(run_copy, capsys):
  for extra in (["countdown_es"], ["--out", str(run_copy)]):
    with pytest.raises(SystemExit) as exit_:
      run_lib.main(["--resume", str(run_copy), "--no-progress", *extra])
    assert exit_.value.code == 2 and "--resume takes the run directory's own" in error_of(capsys)


@pytest.mark.parametrize("override, message", [
    ("es.population=1000000000000", "es.population=1000000000000 is too large: at most 1048576"),
    ("es.chunk_size=1000000000000", "es.chunk_size=1000000000000 is too large"),
    ("task.max_new_tokens=1000000000000", "task.max_new_tokens=1000000000000 is too large"),
    ("task.num_train=1000000000000", "task.num_train=1000000000000 is too large"),
    ("prompt_batch=1000000000000", "prompt_batch=1000000000000 is too large"),
    ("iterations=1000000000000", "iterations=1000000000000 is too large"),
    (f"seed={2**70}", f"seed={2**70} is too large: at most {2**32 - 1}"),
    (f"seed={2**32}", f"seed={2**32} is too large"),
    ("seed=-1", "seed=-1 must be >= 0"),
    ("grpo.group_size=1000000000000", "grpo.group_size=1000000000000 is too large"),
    ("mitigation.norm_cap=1e-300", "mitigation.norm_cap=1e-300 is outside float32's range"),
    ("es.sigma=1e-39", "es.sigma=1e-39 is outside float32's range"),
    ("es.learning_rate=1e39", "es.learning_rate=1e\\+39 is outside float32's range"),
    ("awd.strength=1e-320", "awd.strength=1e-320 is outside float32's range"),
    ("task.kl_prompts=201", "task.kl_prompts=201 must be in \\[0, num_eval=200\\]"),
    ("name=../x", "name='../x': use letters"), ("name=/tmp/x", "name='/tmp/x'"),
    ("name=..", "name='..'"), ("name=", "name=''"),
])
def test_sizes_names_and_values_a_run_cannot_take_are_refused_up_front(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(preset("countdown_es"), [override])


def test_a_size_too_large_is_refused_before_anything_is_written(assets, tmp_path, capsys):
  out = tmp_path / "run"
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress", "--set",
                       *overrides(assets), "es.population=1000000000000"]) == 2
  assert "es.population=1000000000000 is too large" in error_of(capsys) and not out.exists()


def test_a_sweep_whose_runs_share_a_name_is_refused_before_writing(assets, tmp_path, capsys):
  out = tmp_path / "sweep"
  assert run_lib.main(["awd_l1_sweep", "--out", str(out), "--no-progress", "--set",
                       *overrides(assets), "name=same"]) == 2
  assert "distinct names, but same names several" in error_of(capsys) and not out.exists()


def test_a_run_killed_while_writing_its_first_config_starts_again(assets, tmp_path, capsys,
                                                                   monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  out = tmp_path / "run"
  out.mkdir()
  (out / ".lock").write_text("12345")
  (out / "config.json.tmp").write_text('{"runner": "experi')  # the kill's leftovers
  assert run_lib.main(["--resume", str(out), "--no-progress"]) == 2
  assert "never started. Start it again with the same command without --resume" in error_of(capsys)
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress", "--set",
                       *overrides(assets), "iterations=1"]) == 0
  assert not (out / "config.json.tmp").exists()
  assert json.loads((out / "config.json").read_text())["iterations"] == 1


def test_other_leftovers_still_make_a_directory_foreign(tmp_path, capsys):
  out = tmp_path / "run"
  out.mkdir()
  (out / "config.json.tmp").write_text("")
  (out / "notes.txt").write_text("mine")
  assert run_lib.main(["countdown_es", "--out", str(out), "--no-progress"]) == 2
  assert "is not empty (notes.txt)" in error_of(capsys)
  assert (out / "config.json.tmp").exists() and (out / "notes.txt").read_text() == "mine"

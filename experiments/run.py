"""The experiment runner: a preset (or sweep), overrides, metrics, plots, checkpoints, resume.

Usage::

  python -m experiments.run --list
  python -m experiments.run countdown_es --out runs/countdown_es \\
      --set model.checkpoint=/ckpt/Qwen2.5-0.5B-Instruct task.prior_source=hellaswag.jsonl.gz
  python -m experiments.run --resume runs/countdown_es          # after a kill, or to extend:
  python -m experiments.run --resume runs/countdown_es --set iterations=1000
  python -m experiments.run awd_l2_sweep --out runs/awd_l2      # one sub-directory per lambda

A run directory holds ``config.json``, ``metrics.jsonl`` (one record per
``eval_every`` iterations: target-task accuracy and reward, prior-task
accuracy, KL to the base model, update norm and sparsity, per group too,
training reward (with ``es.kl_beta`` > 0 also ``train_kl``: the members' mean KL
to the base model, the fitness penalty divided by beta), and ``wall_time_s``:
seconds spent training so far, evaluation excluded, summed over resumptions),
the plots ``forgetting.png``, ``update_norm.png`` and ``sparsity.png``,
``checkpoints/`` (orbax; params, optimizer and ES state with its keys and
counts, the data position, the metrics and the ES fitness vectors so far;
not theta_0, see below), and for ES ``run.espatch``: the whole fine-tune as its
fitness history, which ``python -m es_jax.models.patch_cli apply`` (or
``es_jax.apply_patch``) turns back into the trained weights (with
``tracking.tensorboard`` / ``tracking.wandb`` also ``tensorboard/`` and
``wandb/``: the same records, for those viewers). Every run and
sweep ends with a Markdown table of its first and last records (a sweep's is
also written to ``summary.md``). Resuming restores the newest checkpoint and
continues bit-identically: every random draw is a function of the seed and
the iteration.

theta_0 is not in the checkpoints: the AWD and norm-cap anchors are the base
params the run loads (``model.checkpoint``; one copy in memory, shared by both),
so each checkpoint records only their :func:`es_jax.params_sha256` and a
resume takes them from the freshly loaded base, refusing it if its digest
differs (the base checkpoint changed since the run started). Checkpoints that
hold the anchors (written by earlier versions) resume too, once their anchors
equal the base bit for bit (see :mod:`experiments.checkpointing`).

The directory is the runner's: ``config.json`` carries ``"runner":
"experiments.run"``, and a run holds an exclusive lock on ``.lock`` while it
runs (see :mod:`experiments.rundir`). A second runner on the same directory,
an ``--out`` holding other files, a new run over an old one, and a resume
with fewer ``iterations`` than its checkpoint are refused before anything is
written. ``config.json`` and ``metrics.jsonl`` are replaced atomically; the
run stops with an error, before saving, when the params stop being finite.

With more than one device the population is split over a ``'pop'`` mesh axis
(``pop_devices``, default all devices); the metrics equal a one-device run's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

import es_jax
from es_jax.sharding import POP_AXIS

from experiments import (components, config as config_lib, evaluate, plots, rundir, summary,
                         tracking)
from experiments.checkpointing import (RunCheckpointError, RunCheckpointer,
                                       silence_closed_event_loop_noise)
from experiments.config import ExperimentConfig
from experiments.rundir import RunError
from experiments.trainers import anchor_paths, make_trainer

Record = dict[str, Any]
PATCH_NAME = "run.espatch"
# Fields that may change between a run and its resumption (they do not change the trajectory).
# The tracking section is one of them: a resume may turn TensorBoard or wandb on or off, and a
# checkpoint written before the section existed resumes as well.
SCHEDULE_FIELDS = ("name", "iterations", "eval_every", "checkpoint_every", "keep_checkpoints",
                   "prompt_batch", "pop_devices", "tracking")


# Fields added after runs were checkpointed, as (section, field): left out of the fingerprint
# while at their default, so those runs still resume (their trajectory had the default).
LATER_FIELDS = (("grpo", "adv_eps"), ("es", "kl_beta"), ("es", "fitness"),
                ("es", "prompt_centering"), ("task", "shots"), ("task", "prior_every"),
                ("task", "prior_seed"),
                ("model", "scan_layers"))
LATER_SECTIONS = ("mitigation",)


def fingerprint(config: ExperimentConfig) -> dict[str, Any]:
  """The config fields a checkpoint must agree with to be resumed (JSON-able)."""
  d = config.to_dict()
  for name in SCHEDULE_FIELDS:
    d.pop(name)
  d["es"].pop("chunk_size")
  for section in LATER_SECTIONS:
    if d[section] == dataclasses.asdict(type(getattr(config, section))()):
      d.pop(section)
  for section, name in LATER_FIELDS:
    default = next(f.default for f in dataclasses.fields(getattr(config, section))
                   if f.name == name)
    if d[section][name] == default:
      d[section].pop(name)
  return json.loads(json.dumps(d))


def mesh_for(config: ExperimentConfig):
  """A ``'pop'`` mesh over ``pop_devices`` devices, or no mesh for one device."""
  n = config.pop_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"pop_devices={n} but only {jax.device_count()} devices are visible")
  if n == 1:
    return contextlib.nullcontext()
  return jax.set_mesh(jax.make_mesh((n,), (POP_AXIS,), devices=jax.devices()[:n]))


def _write_metrics(path: pathlib.Path, records: Sequence[Record]) -> None:
  # atomic: a kill or a full disk never leaves a half-written metrics file
  rundir.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(run_dir: str | pathlib.Path) -> list[Record]:
  """The records of ``run_dir/metrics.jsonl``; a malformed line is named with the file.

  Raises:
    RunError: a line is not valid JSON.
  """
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  records = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      raise RunError(f"line {number} of {path} is not valid JSON ({error}); the same records "
                     "are in the newest checkpoint's meta, and a --resume rewrites the file "
                     "from them.") from None
  return records


def _non_finite_error(config: ExperimentConfig, out: pathlib.Path, iteration: int,
                      saved: int | None) -> RunError:
  kept = (f"checkpoint {saved} is intact" if saved is not None else "no checkpoint was saved")
  hint = ("es.learning_rate (each step moves a weight by about alpha times its noise)"
          if config.algorithm == "es" else "grpo.learning_rate")
  return RunError(f"iteration {iteration} of {out}: the params are no longer finite (NaN or inf) "
                  f"after the update, so the run stopped; nothing of iteration {iteration} was "
                  f"saved and {kept}. Lower {hint} and start a fresh run with a new --out.")


def baseline_key(config: ExperimentConfig) -> str:
  """What the iteration-0 record depends on: the model, the data and the evaluation.

  Runs of a sweep that agree on it (plain ES and ES + AWD from the same theta_0)
  share one iteration-0 evaluation instead of repeating minutes of decoding.
  """
  d = config.to_dict()
  d["task"].pop("prior_every")  # the first record always scores the prior task
  return json.dumps({k: d[k] for k in ("model", "task", "prompt_batch", "seed")}, sort_keys=True)


def run(config: ExperimentConfig, out: str | pathlib.Path, *, resume: bool = False,
        progress: bool = True, baselines: dict[str, Record] | None = None) -> list[Record]:
  """Runs (or resumes) one experiment in ``out``; returns its metrics records.

  ``out`` is locked for the whole run, and nothing is written into it before
  every check (the directory, the checkpoint to resume and its config, the data
  sizes, the model) has passed.

  Raises:
    RunError: ``out`` is a file, a non-empty directory that is not a run of
      this runner, already holds a run and ``resume`` is False, is in use by
      another runner, or its checkpoint is past ``config.iterations``; or the
      params stopped being finite (the run stops before saving them).
    RunCheckpointError: the newest checkpoint is corrupt or from an incompatible config.
    OSError: a file could not be written (earlier checkpoints are intact).

  ``baselines`` (a sweep's) maps :func:`baseline_key` to an iteration-0 record
  already measured; a new one is added to it.
  """
  out = pathlib.Path(out)
  with rundir.claim(out, marker="config.json", resume=resume):
    return _run_claimed(config, out, progress=progress,
                        baselines={} if baselines is None else baselines)


def _run_claimed(config: ExperimentConfig, out: pathlib.Path, *, progress: bool,
                 baselines: dict[str, Record]) -> list[Record]:
  ckpt_dir = out / "checkpoints"
  with contextlib.ExitStack() as stack:
    checkpointer, latest, meta = None, None, None
    if ckpt_dir.exists():  # only in a run being resumed: a new run's directory is empty
      checkpointer = stack.enter_context(RunCheckpointer(
          ckpt_dir, keep_last_n=config.keep_checkpoints, fingerprint=fingerprint(config)))
      latest = checkpointer.latest_step()
    if latest is not None:  # cheap checks first: no model is loaded for a resume that would fail
      meta = checkpointer.read_meta(latest)  # verifies its checksum and the fingerprint
      _check_resumable(checkpointer, latest, meta, config)
      if latest == config.iterations and not _patch_missing(out, config, meta):
        print(f"{out} is complete at iteration {latest} (iterations={config.iterations}); "
              "nothing to do. Pass --set iterations=N with N > "
              f"{latest} to extend it.", file=sys.stderr)
        return list(meta["metrics"])
      if latest == config.iterations:
        print(f"note: {out} is complete but lacks {PATCH_NAME} (the run was stopped before "
              "writing it); writing it from the checkpoint's fitness history.", file=sys.stderr)
    tracking.check_available(config.tracking)  # a missing library fails before the model loads
    stack.enter_context(mesh_for(config))
    parts = components.build(config)  # checks the data's size before loading the model
    trainer = make_trainer(parts, config)
    state = trainer.init(parts.params0)
    start, records, wall, history = 0, [], 0.0, []
    if latest is not None:
      state, meta = checkpointer.restore(state, step=latest, anchors=anchor_paths(state))
      _check_resumable(checkpointer, latest, meta, config)
      start, records, wall = meta["iteration"], list(meta["metrics"]), meta["wall_time_s"]
      history = _history_from_meta(meta, start)
      if history is None and config.algorithm == "es":
        print(f"note: checkpoint {latest} of {out} holds no fitness history (written before the "
              f"runner recorded it), so this run will end without {PATCH_NAME}; its weights are "
              "in the checkpoints as before.", file=sys.stderr)
    # Every check has passed: only now is anything written.
    rundir.write_json(out / "config.json", rundir.mark(config.to_dict()))
    if checkpointer is None:
      checkpointer = stack.enter_context(RunCheckpointer(
          ckpt_dir, keep_last_n=config.keep_checkpoints, fingerprint=fingerprint(config)))
    tracker = stack.enter_context(tracking.Tracker(config, out, resumed_at=start))
    if start == 0:
      key = baseline_key(config)
      if key not in baselines:
        baselines[key] = evaluate.snapshot(parts, config, state["params"], 0, progress=progress)
      records.append({**baselines[key], "train_reward": None, "wall_time_s": 0.0})
    # On resume this also drops records a killed run wrote after its last checkpoint.
    _write_metrics(out / "metrics.jsonl", records)
    tracker.log(records)
    saved = latest
    bar = tqdm(range(start + 1, config.iterations + 1), initial=start, total=config.iterations,
               desc=config.name, disable=not progress, ncols=100)
    for iteration in bar:
      t0 = time.perf_counter()
      state, info = trainer.step(state, iteration)
      jax.block_until_ready(state["params"])
      wall += time.perf_counter() - t0
      if not info["params_finite"]:
        raise _non_finite_error(config, out, iteration, saved)
      if history is not None and "fitness" in info:
        history.append(info["fitness"])
      bar.set_postfix(reward=f"{info['train_reward']:.3f}", refresh=False)
      last = iteration == config.iterations
      if iteration % config.eval_every == 0 or last:
        with_prior = last or (iteration // config.eval_every) % config.task.prior_every == 0
        records.append({**evaluate.snapshot(parts, config, state["params"], iteration,
                                            progress=progress, with_prior=with_prior),
                        "train_reward": info["train_reward"], "wall_time_s": wall,
                        **({"train_kl": info["train_kl"]} if "train_kl" in info else {})})
        _write_metrics(out / "metrics.jsonl", records)
        tracker.log(records)
        plots.write_plots({config.name: records}, out)
        bar.write(_summary_line(records[-1]))
      if (config.checkpoint_every and iteration % config.checkpoint_every == 0) or last:
        checkpointer.save(iteration, state, {
            "iteration": iteration, "data_position": info["data_position"], "metrics": records,
            "wall_time_s": wall, **_history_meta(history)}, anchors=anchor_paths(state))
        saved = iteration
    if history:
      write_patch(out / PATCH_NAME, trainer.recipe, parts.params0, history, config)
  plots.write_plots({config.name: records}, out)
  return records


def _patch_missing(out: pathlib.Path, config: ExperimentConfig, meta: dict) -> bool:
  """Whether a complete ES run lacks the patch its checkpoint's fitness history can give.

  The patch is written after the last checkpoint, so a kill between the two
  leaves a complete run without it; its resumption writes it (no iteration runs).
  """
  return (config.algorithm == "es" and not (out / PATCH_NAME).exists()
          and _history_from_meta(meta, meta["iteration"]) is not None)


def _history_meta(history: list | None) -> dict[str, Any]:
  # JSON has no NaN: a failed member's fitness is stored as null.
  if history is None:
    return {}
  return {"fitness_history": [[None if not math.isfinite(v) else float(v) for v in f]
                              for f in history]}


def _history_from_meta(meta: dict, start: int) -> list | None:
  """The fitness vectors of a resumed run's first ``start`` iterations (None: not recorded)."""
  stored = meta.get("fitness_history")
  if not isinstance(stored, list) or len(stored) != start:
    return None  # a checkpoint of a GRPO run, or of a runner that did not record them
  return [np.array([np.nan if v is None else v for v in f], np.float32) for f in stored]


def write_patch(path: pathlib.Path, recipe: Any, params0: Any, history: Sequence[np.ndarray],
                config: ExperimentConfig) -> None:
  """The run as an ES patch: ``es_jax.apply_patch(es_jax.load_patch(path), theta_0)`` rebuilds
  its final params (bit for bit on as many ``pop`` devices as the run had)."""
  pop_devices = config.pop_devices or jax.device_count()
  patch = es_jax.make_patch(recipe, params0, np.stack(history), metadata={
      "runner": "experiments.run", "name": config.name, "checkpoint": config.model.checkpoint,
      "pop_devices": pop_devices, "iterations": len(history)})
  es_jax.save_patch(path, patch)


def _check_resumable(checkpointer: RunCheckpointer, step: int, meta: dict,
                     config: ExperimentConfig) -> None:
  """The checkpoint's meta agrees with its step, and the run has iterations left to do."""
  where = checkpointer.directory / str(step)
  if not (isinstance(meta.get("iteration"), int) and isinstance(meta.get("metrics"), list)
          and isinstance(meta.get("wall_time_s"), (int, float))):
    raise RunCheckpointError(f"Checkpoint {where} has no iteration, metrics or wall_time_s in its "
                             "meta: it was not written by experiments.run. Delete it to fall back "
                             "to the previous checkpoint, or start a fresh run with a new --out.")
  if meta["iteration"] != step:
    raise RunCheckpointError(f"Checkpoint {where} says iteration {meta['iteration']} but is step "
                             f"{step}: its directory was renamed or it belongs to another run. "
                             "Nothing was changed; delete it to fall back to the previous "
                             "checkpoint, or start a fresh run with a new --out.")
  if config.iterations < step:
    raise RunError(f"{checkpointer.directory.parent} is at iteration {step}, past "
                   f"iterations={config.iterations}: checkpoints are never rewound, so there is "
                   f"nothing to do and nothing was changed. To extend the run pass --set "
                   f"iterations=N with N > {step}.")


def _summary_line(r: Record) -> str:
  prior = "n/a" if r["prior_accuracy"] is None else f"{r['prior_accuracy']:.3f}"
  return (f"it {r['iteration']}: target acc {r['target_accuracy']:.3f}, prior acc {prior}, "
          f"norm {r['update_norm']:.4g}, sparsity {r['sparsity']:.3f}, KL {r['kl_to_base']:.3g}")


def run_sweep(configs: Sequence[ExperimentConfig], out: pathlib.Path, *, resume: bool,
              progress: bool = True, sweep: str | None = None,
              overrides: Sequence[str] = ()) -> dict[str, list[Record]]:
  """Each config in ``out/<name>``, then comparison plots of all of them in ``out``.

  ``out`` is locked for the whole sweep (each run locks its own sub-directory
  too). A new sweep needs a new or empty ``out`` and writes ``sweep.json``
  (``sweep`` and ``overrides``, what ``--resume`` rebuilds the configs from)
  once the directory has passed its checks; a resumed sweep leaves it as it is.
  """
  out = pathlib.Path(out)
  names = [config.name for config in configs]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:  # each run is the directory out/<name>: one name, one run
    raise ValueError(f"the sweep's runs need distinct names, but {', '.join(repeated)} names "
                     "several (was name set with --set? a sweep names its own runs; drop it)")
  with rundir.claim(out, marker="sweep.json", resume=resume):
    if not resume:
      rundir.write_json(out / "sweep.json", rundir.mark({"sweep": sweep,
                                                         "overrides": list(overrides)}))
    results, baselines = {}, {}
    for config in configs:
      run_dir = out / config.name
      results[config.name] = run(
          config, run_dir, resume=resume and rundir.is_claimed_by_runner(run_dir, "config.json"),
          progress=progress, baselines=baselines)
    plots.write_plots(results, out)
    table = summary.table(results)
    rundir.write_text(out / "summary.md", table + "\n")
  print(table)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("preset", nargs="?", help="preset or sweep name (see --list)")
  # extend, not store: with store a repeated --set keeps only its last list of overrides.
  parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                      help="override config fields, e.g. es.population=128 awd.kind=l2 "
                           "(may be repeated; all apply, in order)")
  parser.add_argument("--out", type=pathlib.Path, help="run directory (default runs/<preset>)")
  parser.add_argument("--resume", type=pathlib.Path, metavar="RUN_DIR",
                      help="continue the run (or sweep) in this directory from its newest checkpoint")
  parser.add_argument("--list", action="store_true", help="list presets and sweeps")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  if args.list:
    for name, cfg in config_lib.PRESETS.items():
      print(f"{name:20s} {cfg.algorithm}: {cfg.task.target}, N={cfg.es.population}, "
            f"rank={cfg.es.rank}, awd={cfg.awd.kind} {cfg.awd.strength:g}")
    for name, cfgs in config_lib.SWEEPS.items():
      print(f"{name:20s} sweep: {', '.join(c.name for c in cfgs)}")
    return 0
  # A failed tensorstore read or write makes orbax print "Event loop is closed" tracebacks from
  # its threads after the error itself was handled; the one-line error below says it all.
  silence_closed_event_loop_noise()
  out = args.resume
  if args.resume is not None and (args.preset or args.out):
    # The run directory's own config.json (or sweep.json) names the preset and the place.
    parser.error(f"--resume takes the run directory's own preset and place; drop "
                 f"{'the preset ' + repr(args.preset) if args.preset else '--out'} (or start a "
                 "new run without --resume)")
  try:
    if args.resume is not None:
      return _resume(args.resume, args.set, not args.no_progress)
    if not args.preset:
      parser.error("name a preset (see --list) or --resume RUN_DIR")
    configs = [config_lib.apply_overrides(cfg, args.set) for cfg in config_lib.expand(args.preset)]
    out = args.out or pathlib.Path("runs") / args.preset
    if args.preset in config_lib.SWEEPS:
      run_sweep(configs, out, resume=False, progress=not args.no_progress, sweep=args.preset,
                overrides=args.set)
    else:
      records = run(configs[0], out, progress=not args.no_progress)
      print(summary.table({configs[0].name: records}))
  # ValueError covers bad configs and a model checkpoint that cannot be read
  # (es_jax.models.checkpoint.CheckpointError); RunCheckpointError is the run's own state.
  except (RunError, RunCheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(_os_error_line(e, out), file=sys.stderr)
    return 1
  return 0


def _os_error_line(error: OSError, out: pathlib.Path | None) -> str:
  """One line: what failed, that the checkpoints are intact, and what to do."""
  what = " ".join(str(error).split())  # tensorstore messages span lines
  if error.filename is None and error.__traceback__ is not None:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    what += f" (in {frame.filename}, line {frame.lineno})"
  resumable = out is not None and (rundir.is_claimed_by_runner(out, "config.json")
                                   or rundir.is_claimed_by_runner(out, "sweep.json"))
  then = (f"continue with `python -m experiments.run --resume {out}`" if resumable
          else "run the same command again")
  return (f"error: {what}. Checkpoints saved before this are intact (a failed write never "
          f"replaces a good file); fix the cause (free disk space, check the path and its "
          f"permissions), then {then}.")


def _resume(run_dir: pathlib.Path, overrides: Sequence[str], progress: bool) -> int:
  if (run_dir / "sweep.json").exists():
    sweep = rundir.read_json(run_dir / "sweep.json", expect_runner=True)
    if not (isinstance(sweep, dict) and isinstance(sweep.get("sweep"), str)
            and isinstance(sweep.get("overrides"), list)):
      raise RunError(f"{run_dir / 'sweep.json'} names no sweep and its overrides (it was "
                     "written by run_sweep without a sweep name); resume its runs one by one "
                     "with --resume <sub-directory>.")
    configs = [config_lib.apply_overrides(cfg, list(sweep["overrides"]) + list(overrides))
               for cfg in config_lib.expand(sweep["sweep"])]
    run_sweep(configs, run_dir, resume=True, progress=progress)
    return 0
  config_path = run_dir / "config.json"
  if not config_path.exists():
    rundir.check_resumable(run_dir, marker="config.json")  # says why, e.g. a kill's leftover
    raise RunError(f"{run_dir} has no config.json: not a run directory of experiments.run")
  stored = rundir.read_json(config_path, expect_runner=True)
  try:
    config = ExperimentConfig.from_dict(stored)
  except (ValueError, TypeError) as error:
    raise RunError(f"{config_path} does not hold a valid config: {error}") from None
  run(config_lib.apply_overrides(config, overrides), run_dir, resume=True, progress=progress)
  return 0


if __name__ == "__main__":
  sys.exit(main())

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
training reward, and ``wall_time_s``: seconds spent training so far, evaluation
excluded, summed over resumptions), the plots ``forgetting.png``,
``update_norm.png`` and ``sparsity.png``, and ``checkpoints/`` (orbax; params,
optimizer and ES state with its keys and counts, the AWD anchor, the data
position and the metrics so far). Resuming restores the newest checkpoint and
continues bit-identically: every random draw is a function of the seed and
the iteration.

With more than one device the population is split over a ``'pop'`` mesh axis
(``pop_devices``, default all devices); the metrics equal a one-device run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from tqdm import tqdm

from experiments import components, config as config_lib, evaluate, plots
from experiments.checkpointing import CheckpointError, RunCheckpointer
from experiments.config import ExperimentConfig
from experiments.trainers import make_trainer

Record = dict[str, Any]
# Fields that may change between a run and its resumption (they do not change the trajectory).
SCHEDULE_FIELDS = ("name", "iterations", "eval_every", "checkpoint_every", "keep_checkpoints",
                   "prompt_batch", "pop_devices")


class RunError(RuntimeError):
  """A run directory that cannot be used as asked."""


def fingerprint(config: ExperimentConfig) -> dict[str, Any]:
  """The config fields a checkpoint must agree with to be resumed (JSON-able)."""
  d = config.to_dict()
  for name in SCHEDULE_FIELDS:
    d.pop(name)
  d["es"].pop("member_chunk")
  return json.loads(json.dumps(d))


def mesh_for(config: ExperimentConfig):
  """A ``'pop'`` mesh over ``pop_devices`` devices, or no mesh for one device."""
  n = config.pop_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"pop_devices={n} but only {jax.device_count()} devices are visible")
  if n == 1:
    return contextlib.nullcontext()
  return jax.set_mesh(jax.make_mesh((n,), ("pop",), devices=jax.devices()[:n]))


def _write_metrics(path: pathlib.Path, records: Sequence[Record]) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  tmp.replace(path)  # atomic: a kill never leaves a half-written metrics file


def run(config: ExperimentConfig, out: str | pathlib.Path, *, resume: bool = False,
        progress: bool = True) -> list[Record]:
  """Runs (or resumes) one experiment in ``out``; returns its metrics records.

  Raises:
    RunError: ``out`` holds checkpoints and ``resume`` is False (nothing is overwritten).
    CheckpointError: the newest checkpoint is corrupt or from an incompatible config.
  """
  out = pathlib.Path(out)
  ckpt_dir = out / "checkpoints"
  checkpointer = RunCheckpointer(ckpt_dir, keep_last_n=config.keep_checkpoints,
                                 fingerprint=fingerprint(config))
  latest = checkpointer.latest_step()
  if latest is not None and not resume:
    raise RunError(f"{out} already holds checkpoints (newest: iteration {latest}); resume it with "
                   f"`python -m experiments.run --resume {out}` or choose another --out")
  with mesh_for(config), checkpointer:
    c = components.build(config)
    trainer = make_trainer(c, config)
    state = trainer.init(c.params0)
    start, records, wall = 0, [], 0.0
    if latest is not None:
      state, meta = checkpointer.restore(state)
      start, records, wall = meta["iteration"], list(meta["metrics"]), meta["wall_time_s"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if start == 0:
      records.append({**evaluate.snapshot(c, config, state["params"], 0), "train_reward": None,
                      "wall_time_s": 0.0})
    # On resume this also drops records a killed run wrote after its last checkpoint.
    _write_metrics(out / "metrics.jsonl", records)
    bar = tqdm(range(start + 1, config.iterations + 1), initial=start, total=config.iterations,
               desc=config.name, disable=not progress, ncols=100)
    for iteration in bar:
      t0 = time.perf_counter()
      state, info = trainer.step(state, iteration)
      jax.block_until_ready(state["params"])
      wall += time.perf_counter() - t0
      bar.set_postfix(reward=f"{info['train_reward']:.3f}", refresh=False)
      last = iteration == config.iterations
      if iteration % config.eval_every == 0 or last:
        records.append({**evaluate.snapshot(c, config, state["params"], iteration),
                        "train_reward": info["train_reward"], "wall_time_s": wall})
        _write_metrics(out / "metrics.jsonl", records)
        plots.write_plots({config.name: records}, out)
        bar.write(_summary_line(records[-1]))
      if (config.checkpoint_every and iteration % config.checkpoint_every == 0) or last:
        checkpointer.save(iteration, state, {
            "iteration": iteration, "data_position": info["data_position"], "metrics": records,
            "wall_time_s": wall})
  plots.write_plots({config.name: records}, out)
  return records


def _summary_line(r: Record) -> str:
  prior = "n/a" if r["prior_accuracy"] is None else f"{r['prior_accuracy']:.3f}"
  return (f"it {r['iteration']}: target acc {r['target_accuracy']:.3f}, prior acc {prior}, "
          f"norm {r['update_norm']:.4g}, sparsity {r['sparsity']:.3f}, KL {r['kl_to_base']:.3g}")


def run_sweep(configs: Sequence[ExperimentConfig], out: pathlib.Path, *, resume: bool,
              progress: bool = True) -> dict[str, list[Record]]:
  """Each config in ``out/<name>``, then comparison plots of all of them in ``out``."""
  results = {}
  for config in configs:
    run_dir = out / config.name
    results[config.name] = run(config, run_dir, resume=resume and run_dir.exists(),
                               progress=progress)
  plots.write_plots(results, out)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("preset", nargs="?", help="preset or sweep name (see --list)")
  parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                      help="override config fields, e.g. es.population=128 awd.kind=l2")
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
  try:
    if args.resume is not None:
      return _resume(args.resume, args.set, not args.no_progress)
    if not args.preset:
      parser.error("name a preset (see --list) or --resume RUN_DIR")
    configs = [config_lib.apply_overrides(c, args.set) for c in config_lib.expand(args.preset)]
    out = args.out or pathlib.Path("runs") / args.preset
    if args.preset in config_lib.SWEEPS:
      out.mkdir(parents=True, exist_ok=True)
      (out / "sweep.json").write_text(json.dumps({"sweep": args.preset, "overrides": args.set}))
      run_sweep(configs, out, resume=False, progress=not args.no_progress)
    else:
      run(configs[0], out, progress=not args.no_progress)
  except (RunError, CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _resume(run_dir: pathlib.Path, overrides: Sequence[str], progress: bool) -> int:
  if (run_dir / "sweep.json").exists():
    sweep = json.loads((run_dir / "sweep.json").read_text())
    configs = [config_lib.apply_overrides(c, list(sweep["overrides"]) + list(overrides))
               for c in config_lib.expand(sweep["sweep"])]
    run_sweep(configs, run_dir, resume=True, progress=progress)
    return 0
  config_path = run_dir / "config.json"
  if not config_path.exists():
    raise RunError(f"{run_dir} has no config.json: not a run directory of experiments.run")
  config = ExperimentConfig.from_dict(json.loads(config_path.read_text()))
  run(config_lib.apply_overrides(config, overrides), run_dir, resume=True, progress=progress)
  return 0


if __name__ == "__main__":
  sys.exit(main())

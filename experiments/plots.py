"""PNG plots of a run's (or a sweep's) metrics: forgetting curves, drift norm, sparsity per
group, and new task against prior task.

Each function takes ``{run name: [metrics record, ...]}`` so that a single run
and a sweep (one line per run) are drawn by the same code.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from experiments import rundir, summary

Records = Mapping[str, Sequence[Mapping[str, Any]]]


def _lines(ax, runs: Records, key: str, title: str, xlabel: str = "iteration") -> None:
  for name, records in runs.items():
    points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
    if points:
      ax.plot(*zip(*points), marker="o", ms=3, label=name)
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.grid(alpha=0.3)
  if len(runs) > 1 or key == "target_accuracy":
    ax.legend(fontsize="small")


def _prior_bands(ax, runs: Records, task: str) -> None:
  """Each run's accuracy on ``task`` over iterations, with a band of +-1 paired SE of its
  change since the run's first record (the items are the same, so the change is what is
  measured; the band is 0 wide at the first record)."""
  for name, records in runs.items():
    scored = [r for r in records if task in summary.prior_items(r)]
    if not scored:
      continue
    changes = [summary.prior_changes(scored[0], r).get(task) for r in scored]
    points = [(r["iteration"], c["accuracy"]) for r, c in zip(scored, changes) if c]
    if not points:
      continue
    x = np.array([i for i, _ in points])
    y = np.array([c.after for _, c in points])
    se = np.nan_to_num(np.array([c.se for _, c in points]))
    line, = ax.plot(x, y, marker="o", ms=3, label=name)
    ax.fill_between(x, y - se, y + se, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_title(f"prior task: {task} (band: paired SE of the change)")
  ax.set_xlabel("iteration")
  ax.grid(alpha=0.3)
  if len(runs) > 1:
    ax.legend(fontsize="small")


def forgetting_curves(runs: Records) -> Figure:
  """Target task and KL to base, then one panel per prior task."""
  tasks = list(dict.fromkeys(task for records in runs.values() for r in records
                             for task in summary.prior_items(r)))
  panels = 2 + len(tasks)
  cols = min(panels, 3)
  rows = -(-panels // cols)
  fig = Figure(figsize=(5 * cols, 4 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
  for ax, (key, title) in zip(axes, (("target_accuracy", "target-task accuracy (held out, greedy)"),
                                     ("kl_to_base", "KL(pi_theta || pi_0) per token"))):
    _lines(ax, runs, key, title)
  for ax, task in zip(axes[2:], tasks):
    _prior_bands(ax, runs, task)
  for ax in axes[panels:]:
    ax.set_axis_off()
  return fig


def update_norm(runs: Records) -> Figure:
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.subplots()
  _lines(ax, runs, "update_norm", "update norm ||theta_t - theta_0||_F")
  norms = [r["update_norm"] for records in runs.values() for r in records
           if r.get("update_norm")]
  # Runs of very different scale (ES against GRPO: ~1000x) share the axis only on a log
  # scale; symlog keeps the iteration-0 zero on it. Within two decades linear reads better.
  if norms and max(norms) > 100 * min(norms):
    ax.set_yscale("symlog", linthresh=min(norms))
  return fig


def pareto(runs: Records) -> Figure:
  """New-task reward against prior-task accuracy: each run's path over its records with both
  (small markers, from the shared start), its last such record large, with the paired SE of
  the prior-task change since the first (the runs share their items, so the change, not
  either accuracy, is what is compared). Up and right is better: learning without
  forgetting."""
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.subplots()
  for name, records in runs.items():
    scored = [r for r in records
              if r.get("target_reward") is not None and r.get("prior_accuracy") is not None]
    if not scored:
      continue
    x = [r["target_reward"] for r in scored]
    y = [r["prior_accuracy"] for r in scored]
    line, = ax.plot(x, y, marker="o", ms=3, alpha=0.5)
    suite = summary.suite_changes(summary.prior_changes(scored[0], scored[-1]))
    se = suite["accuracy"].se if "accuracy" in suite and len(scored) > 1 else None
    ax.errorbar(x[-1], y[-1], yerr=se, marker="o", ms=8, color=line.get_color(), capsize=3,
                label=f"{name} (iteration {scored[-1]['iteration']})")
  ax.set_xlabel("new-task reward (held out)")
  ax.set_ylabel("prior-task accuracy (mean over the suite's tasks)")
  ax.set_title("new task against prior tasks\n(error bar: paired SE of the prior-task change)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  return fig


def sparsity_per_group(runs: Records) -> Figure:
  """Bars: each group's share of unchanged weights (|delta| <= 1e-6) at the last record."""
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  groups = list(dict.fromkeys(g for records in runs.values()
                              for g in records[-1].get("group_sparsity", {})))
  width = 0.8 / max(len(runs), 1)
  for i, (name, records) in enumerate(runs.items()):
    values = [records[-1].get("group_sparsity", {}).get(g, np.nan) for g in groups]
    ax.bar(np.arange(len(groups)) + i * width, values, width, label=name)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
  ax.set_ylim(0, 1)
  ax.set_title("sparsity per group at the last evaluation (tau = 1e-6)")
  ax.legend(fontsize="small")
  return fig


def write_plots(runs: Records, out: pathlib.Path) -> list[pathlib.Path]:
  """``forgetting.png``, ``update_norm.png``, ``sparsity.png`` and ``pareto.png`` in ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, make in (("forgetting", forgetting_curves), ("update_norm", update_norm),
                     ("sparsity", sparsity_per_group), ("pareto", pareto)):
    path = out / f"{name}.png"
    # Atomic like metrics.jsonl: a full disk leaves the previous plot, not half of one.
    rundir.write_atomically(path, lambda f, make=make: make(runs).savefig(f, dpi=110, format="png"))
    paths.append(path)
  return paths

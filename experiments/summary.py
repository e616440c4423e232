"""The Markdown tables a run (or a sweep) ends with: each run's first and last metrics record.

Prior-task changes are paired comparisons over the same items
(:mod:`es_jax.evaluation.paired`): for each task, the mean change of the items'
0/1 correctness and of their log-prob margins (the continuous form of the
task's accuracy), each with its paired standard error and minimum detectable
effect (MDE, 2.8 SE: the true change detected with 80% power at a two-sided
5% level); the suite's change is the mean of its tasks'. The first table has
one line per run; the second one line per run and prior task.

Example:
  >>> first = {"iteration": 0, "target_reward": 0.2, "prior_accuracy": 0.5,
  ...          "prior_tasks": {"piqa": {"accuracy": 0.5, "correct": [1, 1, 0, 0],
  ...                                   "margin": [0.5, 0.25, -0.5, -1.0]}},
  ...          "kl_to_base": 0.0, "update_norm": 0.0, "sparsity": 1.0, "wall_time_s": 0.0}
  >>> last = {**first, "iteration": 10, "target_reward": 0.4, "prior_accuracy": 0.25,
  ...         "prior_tasks": {"piqa": {"accuracy": 0.25, "correct": [1, 0, 0, 0],
  ...                                  "margin": [0.5, -0.25, -0.5, -1.0]}},
  ...         "kl_to_base": 0.01, "update_norm": 2.5, "sparsity": 0.1, "wall_time_s": 50.0,
  ...         "seconds": {"prior": 30.0, "total": 40.0}}
  >>> print(table({"es": [first, last]}).splitlines()[2])
  | es | 10 | 0.200 -> 0.400 | 0.500 -> 0.250 | -0.250 ± 0.250 (MDE 0.700) | -0.125 ± 0.125 (MDE 0.350) | 0.01 | 2.5 | 0.100 | 5.0 | 30 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from es_jax.evaluation import PairedChange, paired_change, suite_change

Records = Mapping[str, Sequence[Mapping[str, Any]]]
Record = Mapping[str, Any]
HEADER = ("| run | iterations | new task (target) reward, held out | prior accuracy (suite mean) "
          "| prior accuracy change (paired SE) | prior margin change (paired SE) "
          "| KL to base (per token) | update norm | sparsity (tau=1e-6) "
          "| s / iteration | s / prior eval |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
TASK_HEADER = ("| run | prior task | items | accuracy | accuracy change (paired SE) "
               "| margin change (paired SE) |\n|---|---|---|---|---|---|")


def prior_items(record: Record) -> dict[str, Mapping[str, Any]]:
  """``{task: {"correct": [...], "margin": [...] or None}}`` of a record (empty if unscored).

  Records written before the suite held HellaSwag's items as ``prior_correct``.
  """
  if record.get("prior_tasks"):
    return dict(record["prior_tasks"])
  if record.get("prior_correct"):
    return {"hellaswag": {"correct": record["prior_correct"], "margin": None}}
  return {}


def prior_changes(first: Record, last: Record) -> dict[str, dict[str, PairedChange]]:
  """Each prior task's paired changes from ``first`` to ``last`` (``accuracy``, and ``margin``
  where both records hold margins), for the tasks both scored on the same number of items."""
  before, after = prior_items(first), prior_items(last)
  changes = {}
  for name, b in before.items():
    a = after.get(name)
    if not a or len(a["correct"]) != len(b["correct"]) or not b["correct"]:
      continue
    changes[name] = {"accuracy": paired_change(b["correct"], a["correct"])}
    if b.get("margin") and a.get("margin"):
      changes[name]["margin"] = paired_change(b["margin"], a["margin"])
  return changes


def suite_changes(changes: Mapping[str, Mapping[str, PairedChange]]) -> dict[str, PairedChange]:
  """The suite's ``accuracy`` (and, if every task has one, ``margin``) change."""
  out = {}
  for kind in ("accuracy", "margin"):
    if changes and all(kind in c for c in changes.values()):
      out[kind] = suite_change({name: c[kind] for name, c in changes.items()})
  return out


def _change(change: PairedChange | None) -> str:
  if change is None:
    return "-"
  return f"{change.mean:+.3f} ± {change.se:.3f} (MDE {change.mde:.3f})"


def row(name: str, records: Sequence[Record]) -> str:
  """One run's line: its first record against its last."""
  first, last = records[0], records[-1]
  iterations = last["iteration"]
  per_iteration = f"{last['wall_time_s'] / iterations:.1f}" if iterations else "-"
  prior_seconds = (last.get("seconds") or {}).get("prior")
  suite = suite_changes(prior_changes(first, last))
  accuracy = (f"{suite['accuracy'].before:.3f} -> {suite['accuracy'].after:.3f}"
              if "accuracy" in suite else "-")
  return (f"| {name} | {iterations} | {first['target_reward']:.3f} -> {last['target_reward']:.3f} "
          f"| {accuracy} | {_change(suite.get('accuracy'))} | {_change(suite.get('margin'))} "
          f"| {last['kl_to_base']:.3g} | {last['update_norm']:.4g} "
          f"| {last['sparsity']:.3f} | {per_iteration} "
          f"| {'-' if prior_seconds is None else f'{prior_seconds:.0f}'} |")


def task_rows(name: str, records: Sequence[Record]) -> list[str]:
  """One line per prior task of a run: its first record against its last."""
  lines = []
  for task, change in prior_changes(records[0], records[-1]).items():
    acc = change["accuracy"]
    lines.append(f"| {name} | {task} | {acc.n} | {acc.before:.3f} -> {acc.after:.3f} "
                 f"| {_change(acc)} | {_change(change.get('margin'))} |")
  return lines


def table(runs: Records) -> str:
  """The Markdown tables of ``{run name: records}``: one line per run, then per prior task."""
  runs = {name: records for name, records in runs.items() if records}
  lines = [HEADER] + [row(name, records) for name, records in runs.items()]
  per_task = [line for name, records in runs.items() for line in task_rows(name, records)]
  if per_task:
    lines += ["", TASK_HEADER] + per_task
  return "\n".join(lines)

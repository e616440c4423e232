"""The Markdown table a run (or a sweep) ends with: each run's first and last metrics record.

The prior task's standard error is the binomial one of its last accuracy,
``sqrt(p (1 - p) / n)`` over the ``n`` HellaSwag items scored, so a reader can
tell a difference between runs from the noise of the subset.

Example:
  >>> first = {"iteration": 0, "target_reward": 0.2, "prior_accuracy": 0.5, "prior_examples": 100,
  ...          "kl_to_base": 0.0, "update_norm": 0.0, "sparsity": 1.0, "wall_time_s": 0.0}
  >>> last = {**first, "iteration": 10, "target_reward": 0.4, "prior_accuracy": 0.4,
  ...         "kl_to_base": 0.01, "update_norm": 2.5, "sparsity": 0.1, "wall_time_s": 50.0,
  ...         "seconds": {"prior": 30.0, "total": 40.0}}
  >>> print(table({"es": [first, last]}).splitlines()[2])
  | es | 10 | 0.200 -> 0.400 | 0.500 -> 0.400 (SE 0.049) | 0.01 | 2.5 | 0.100 | 5.0 | 30 |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Records = Mapping[str, Sequence[Mapping[str, Any]]]
HEADER = ("| run | iterations | new-task reward (held out) | prior-task accuracy | KL to base "
          "(per token) | update norm | sparsity (tau=1e-6) | s / iteration | s / prior eval |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _prior(first: Mapping[str, Any], last: Mapping[str, Any]) -> str:
  p, n = last.get("prior_accuracy"), last.get("prior_examples")
  if p is None or first.get("prior_accuracy") is None:
    return "-"
  se = f" (SE {math.sqrt(p * (1 - p) / n):.3f})" if n else ""
  return f"{first['prior_accuracy']:.3f} -> {p:.3f}{se}"


def row(name: str, records: Sequence[Mapping[str, Any]]) -> str:
  """One run's line: its first record against its last."""
  first, last = records[0], records[-1]
  iterations = last["iteration"]
  per_iteration = f"{last['wall_time_s'] / iterations:.1f}" if iterations else "-"
  prior_seconds = (last.get("seconds") or {}).get("prior")
  return (f"| {name} | {iterations} | {first['target_reward']:.3f} -> {last['target_reward']:.3f} "
          f"| {_prior(first, last)} | {last['kl_to_base']:.3g} | {last['update_norm']:.4g} "
          f"| {last['sparsity']:.3f} | {per_iteration} "
          f"| {'-' if prior_seconds is None else f'{prior_seconds:.0f}'} |")


def table(runs: Records) -> str:
  """The Markdown table of ``{run name: records}``."""
  return "\n".join([HEADER] + [row(name, records) for name, records in runs.items() if records])

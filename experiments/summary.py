"""The Markdown table a run (or a sweep) ends with: each run's first and last metrics record.

The prior task's change is a paired comparison over the same HellaSwag items:
``mean(c_last - c_first)`` with the standard error
``std(c_last - c_first, ddof=1) / sqrt(n)`` of the items' 0/1 correctness, which
is far smaller than the binomial SE of either accuracy (``sqrt(p (1 - p) / n)``,
also shown) when few items change, so a few points of forgetting can be told
from the noise of the subset.

Example:
  >>> first = {"iteration": 0, "target_reward": 0.2, "prior_accuracy": 0.5,
  ...          "prior_correct": [1, 1, 0, 0], "kl_to_base": 0.0, "update_norm": 0.0,
  ...          "sparsity": 1.0, "wall_time_s": 0.0}
  >>> last = {**first, "iteration": 10, "target_reward": 0.4, "prior_accuracy": 0.25,
  ...         "prior_correct": [1, 0, 0, 0], "kl_to_base": 0.01, "update_norm": 2.5,
  ...         "sparsity": 0.1, "wall_time_s": 50.0, "seconds": {"prior": 30.0, "total": 40.0}}
  >>> print(table({"es": [first, last]}).splitlines()[2])
  | es | 10 | 0.200 -> 0.400 | 0.500 -> 0.250 (SE 0.217) | -0.250 ± 0.250 | 0.01 | 2.5 | 0.100 | 5.0 | 30 |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Records = Mapping[str, Sequence[Mapping[str, Any]]]
HEADER = ("| run | iterations | new task (target) reward, held out | prior-task accuracy "
          "| prior change "
          "(paired SE) | KL to base (per token) | update norm | sparsity (tau=1e-6) "
          "| s / iteration | s / prior eval |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def paired_change(first: Sequence[int], last: Sequence[int]) -> tuple[float, float]:
  """Mean change of per-item 0/1 correctness and its standard error (the items are paired)."""
  d = np.asarray(last, np.float64) - np.asarray(first, np.float64)
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
  return float(d.mean()), se


def _prior(first: Mapping[str, Any], last: Mapping[str, Any]) -> tuple[str, str]:
  c0, c1 = first.get("prior_correct"), last.get("prior_correct")
  if not c0 or not c1 or len(c0) != len(c1):
    return "-", "-"
  p, n = float(np.mean(c1)), len(c1)
  change, se = paired_change(c0, c1)
  return (f"{np.mean(c0):.3f} -> {p:.3f} (SE {math.sqrt(p * (1 - p) / n):.3f})",
          f"{change:+.3f} ± {se:.3f}")


def row(name: str, records: Sequence[Mapping[str, Any]]) -> str:
  """One run's line: its first record against its last."""
  first, last = records[0], records[-1]
  iterations = last["iteration"]
  per_iteration = f"{last['wall_time_s'] / iterations:.1f}" if iterations else "-"
  prior_seconds = (last.get("seconds") or {}).get("prior")
  prior, change = _prior(first, last)
  return (f"| {name} | {iterations} | {first['target_reward']:.3f} -> {last['target_reward']:.3f} "
          f"| {prior} | {change} | {last['kl_to_base']:.3g} | {last['update_norm']:.4g} "
          f"| {last['sparsity']:.3f} | {per_iteration} "
          f"| {'-' if prior_seconds is None else f'{prior_seconds:.0f}'} |")


def table(runs: Records) -> str:
  """The Markdown table of ``{run name: records}``."""
  return "\n".join([HEADER] + [row(name, records) for name, records in runs.items() if records])

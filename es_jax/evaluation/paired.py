"""Change between two evaluations of the same items, with its paired standard error.

Forgetting is a change of a model's scores on items it was already scored on,
so the before and after scores of each item are paired: the item's own
difficulty cancels in ``d_i = after_i - before_i``, and the standard error of
the mean change is ``std(d, ddof=1) / sqrt(n)``, far smaller than the two
accuracies' independent errors when most items do not move.

A null result is only as strong as the effect it could have seen: the
minimum detectable effect ``(z_{1 - alpha/2} + z_{power}) * SE`` (2.80 SE at a
two-sided alpha of 0.05 and 80% power) is the true change that a test at that
level would detect with that probability. A suite's change is the mean of its
tasks' changes (every task weighs the same); its items are disjoint, so the
tasks' errors add in quadrature.

Example:
  >>> change = paired_change([1, 0, 1, 1], [1, 0, 0, 1])
  >>> change.mean, round(change.se, 4), change.n
  (-0.25, 0.25, 4)
  >>> round(change.mde / change.se, 2)
  2.8
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class PairedChange(NamedTuple):
  """The mean change of a score over the same items.

  Attributes:
    before: mean score of the first evaluation.
    after: mean score of the second.
    mean: ``after - before``, the mean of the per-item differences.
    se: paired standard error of ``mean`` (NaN with fewer than 2 items).
    mde: minimum detectable effect, ``(z_{1-alpha/2} + z_{power}) * se``.
    n: number of items.
  """
  before: float
  after: float
  mean: float
  se: float
  mde: float
  n: int

  @property
  def z(self) -> float:
    """``mean / se``: the change in standard errors (NaN if ``se`` is 0 or NaN)."""
    return self.mean / self.se if self.se > 0 else math.nan


def detectable_multiple(alpha: float = 0.05, power: float = 0.8) -> float:
  """``z_{1 - alpha/2} + z_{power}``: the minimum detectable effect in standard errors.

  Example:
    >>> round(detectable_multiple(), 3)
    2.802
  """
  if not (0 < alpha < 1 and 0 < power < 1):
    raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha!r}, power={power!r}.")
  normal = statistics.NormalDist()
  return normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)


def paired_change(before: Sequence[float], after: Sequence[float], *, alpha: float = 0.05,
                  power: float = 0.8) -> PairedChange:
  """The change from ``before`` to ``after``, two scores per item in the same order.

  Args:
    before: each item's score in the first evaluation (0/1 accuracy, a margin, ...).
    after: the same items' scores in the second.
    alpha: two-sided significance level of the minimum detectable effect.
    power: its power.

  Raises:
    ValueError: the two are not 1-D of one non-zero length, or hold NaN/inf
      (an unscored item must be dropped from both, not averaged as a number).
  """
  b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
  if b.ndim != 1 or b.shape != a.shape or not b.size:
    raise ValueError(f"before and after must be 1-D scores of the same items, got shapes "
                     f"{b.shape} and {a.shape}.")
  if not (np.isfinite(b).all() and np.isfinite(a).all()):
    raise ValueError("before and after must be finite; drop unscored items from both.")
  d = a - b
  se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
  return PairedChange(before=float(b.mean()), after=float(a.mean()), mean=float(d.mean()),
                      se=se, mde=detectable_multiple(alpha, power) * se, n=int(d.size))


def suite_change(changes: Mapping[str, PairedChange], *, alpha: float = 0.05,
                 power: float = 0.8) -> PairedChange:
  """The mean of several tasks' changes, each task weighing the same.

  The tasks' items are disjoint, so their errors are independent:
  ``se = sqrt(sum se_t^2) / T``. ``n`` is the total number of items.

  Example:
    >>> t1 = PairedChange(0.5, 0.4, -0.1, 0.03, 0.084, 100)
    >>> t2 = PairedChange(0.6, 0.6, 0.0, 0.04, 0.112, 50)
    >>> s = suite_change({"a": t1, "b": t2})
    >>> round(s.mean, 3), round(s.se, 3), s.n
    (-0.05, 0.025, 150)
  """
  if not changes:
    raise ValueError("suite_change needs at least one task's change.")
  values = list(changes.values())
  count = len(values)
  se = math.sqrt(sum(c.se ** 2 for c in values)) / count
  return PairedChange(before=sum(c.before for c in values) / count,
                      after=sum(c.after for c in values) / count,
                      mean=sum(c.mean for c in values) / count, se=se,
                      mde=detectable_multiple(alpha, power) * se,
                      n=sum(c.n for c in values))

"""Paired change statistics against SciPy's paired t statistic, hand-worked items and simulation."""

import math

import numpy as np
import pytest

from es_jax.evaluation import paired


def test_paired_se_is_the_one_behind_scipys_paired_t():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  before = rng.integers(0, 2, 200).astype(float)
  after = np.where(rng.random(200) < 0.1, 1 - before, before)  # 10% of items flip
  change = paired.paired_change(before, after)
  t = stats.ttest_rel(after, before).statistic
  assert change.mean == pytest.approx(after.mean() - before.mean(), abs=1e-15)
  assert change.z == pytest.approx(t, rel=1e-12)
  assert change.mde == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * change.se,
                                     rel=1e-12)


def test_hand_worked_items():
  # d = (0, 0, -1, 0): mean -1/4, std (ddof 1) sqrt(3/16 * 4/3) = 1/2, se = 1/2 / 2.
  change = paired.paired_change([1, 0, 1, 1], [1, 0, 0, 1])
  assert (change.before, change.after, change.mean, change.se, change.n) == (0.75, 0.5, -0.25,
                                                                            0.25, 4)
  assert math.isnan(paired.paired_change([1.0], [0.0]).se)
  assert math.isnan(paired.paired_change([1, 0], [1, 0]).z)  # no item moved: se 0


def test_a_true_change_of_one_mde_is_detected_with_the_stated_power():
  rng = np.random.default_rng(1)
  n, sigma, trials = 400, 1.0, 4000
  mde = paired.detectable_multiple() * sigma / math.sqrt(n)
  d = rng.normal(mde, sigma, (trials, n))
  z = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
  detected = np.mean(np.abs(z) > 1.959964)
  assert detected == pytest.approx(0.80, abs=0.025)  # binomial sd at 4000 trials: 0.006


def test_suite_change_weighs_tasks_equally_and_adds_errors_in_quadrature():
  rng = np.random.default_rng(2)
  tasks = {name: (rng.random(n), rng.random(n)) for name, n in (("a", 30), ("b", 300))}
  changes = {name: paired.paired_change(*pair) for name, pair in tasks.items()}
  suite = paired.suite_change(changes)
  assert suite.mean == pytest.approx(np.mean([b.mean() - a.mean() for a, b in tasks.values()]))
  assert suite.se == pytest.approx(math.hypot(changes["a"].se, changes["b"].se) / 2)
  assert suite.n == 330


@pytest.mark.parametrize("before, after, message", [
    ([1, 0], [1], "same items"), ([], [], "same items"), ([[1]], [[1]], "same items"),
    ([1, float("nan")], [1, 0], "must be finite"), ([1, 0], [1, float("inf")], "must be finite")])
def test_bad_scores_are_refused(before, after, message):
  with pytest.raises(ValueError, match=message):
    paired.paired_change(before, after)


def test_bad_alpha_or_power_and_an_empty_suite_are_refused():
  with pytest.raises(ValueError, match="alpha and power"):
    paired.detectable_multiple(alpha=0.0)
  with pytest.raises(ValueError, match="at least one task"):
    paired.suite_change({})

"""The runner's prior-task suite: config, data roots, per-task records and paired summaries.

References: the items a data root gives are those ``select_indices`` draws from the file
(computed here from the rows); each recorded margin agrees in sign with its item's
correctness; the summary's paired changes are recomputed in float64 NumPy from the records.
"""

from __future__ import annotations

import gzip
import json
import math
import types

import numpy as np
import pytest

from es_jax.evaluation import select_indices
from experiment_fixtures import (digit_share_reward, make_tiny_checkpoint, short_run_overrides,
                                 write_short_gsm8k)
from experiments import components, rollouts, summary
from experiments import run as run_lib
from experiments.config import apply_overrides, preset

NUM_ROWS, NUM_PRIOR = 9, 4


def write_root(root):
  """A data root in ../shared/data's layout with HellaSwag, PIQA and ARC-Easy items."""
  (root / "hellaswag").mkdir(parents=True)
  with gzip.open(root / "hellaswag" / "validation.jsonl.gz", "wt") as f:
    for i in range(NUM_ROWS):
      f.write(json.dumps({"ind": i, "activity_label": "Cooking", "ctx": f"He cracks egg {i} and",
                          "endings": ["fries it.", "sings.", "flies.", "eats it."],
                          "label": i % 4}) + "\n")
  (root / "piqa").mkdir()
  (root / "piqa" / "valid.jsonl").write_text("".join(
      json.dumps({"goal": f"Open jar {i}", "sol1": "twist the lid", "sol2": "sing to it"}) + "\n"
      for i in range(NUM_ROWS)))
  (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(NUM_ROWS)))
  (root / "arc_easy").mkdir()
  (root / "arc_easy" / "test.jsonl").write_text("".join(
      json.dumps({"id": f"q{i}", "prompt": f"What is {i}+1?", "choices": [str(i + 1), "0", "x"],
                  "answer_idx": 0}) + "\n" for i in range(NUM_ROWS)))
  return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("prior")
  return types.SimpleNamespace(checkpoint=make_tiny_checkpoint(root / "ckpt"),
                               gsm8k=write_short_gsm8k(root / "gsm8k.jsonl"),
                               data=write_root(root / "data"))


def suite_config(assets, *extra):
  overrides = short_run_overrides(assets.checkpoint, assets.gsm8k, assets.data)
  return apply_overrides(preset("countdown_es"), overrides + [
      "task.prior=hellaswag,piqa,arc_easy", f"task.num_prior={NUM_PRIOR}", "task.prior_seed=0",
      *extra])


def test_prior_names_one_or_more_suite_tasks():
  config = apply_overrides(preset("countdown_es"), ["task.prior=hellaswag, piqa,mmlu_pro"])
  assert config.task.prior_tasks == ("hellaswag", "piqa", "mmlu_pro")
  assert apply_overrides(preset("countdown_es"), ["task.prior=none"]).task.prior_tasks == ()
  for bad in ("squad", "piqa,piqa", "piqa,,arc_easy", ""):
    with pytest.raises(ValueError, match="task.prior=.*use none, or one or more"):
      apply_overrides(preset("countdown_es"), [f"task.prior={bad}"])


def test_a_data_root_gives_each_task_a_fixed_random_subset(assets):
  priors = components.load_priors(suite_config(assets))
  assert [p.name for p in priors] == ["hellaswag", "piqa", "arc_easy"]
  drawn = list(select_indices(NUM_ROWS, NUM_PRIOR, 0))
  assert len(set(drawn)) == NUM_PRIOR and drawn != list(range(NUM_PRIOR))
  assert [int(ex.context.split()[3]) for ex in priors[0].examples] == drawn
  assert [ex.question for ex in priors[1].examples] == [f"Open jar {i}" for i in drawn]
  assert [ex.label for ex in priors[1].examples] == [i % 2 for i in drawn]
  assert [ex.question for ex in priors[2].examples] == [f"What is {i}+1?" for i in drawn]


def test_without_a_prior_seed_each_task_scores_its_first_items(assets):
  priors = components.load_priors(suite_config(assets, "task.prior_seed=none"))
  assert [ex.question for ex in priors[1].examples] == [f"Open jar {i}" for i in range(NUM_PRIOR)]


def test_sources_that_cannot_serve_the_suite_are_refused(assets):
  one_file = str(assets.data / "piqa" / "valid.jsonl")
  with pytest.raises(ValueError, match="is one file, but task.prior=.* names several tasks"):
    components.load_priors(suite_config(assets, f"task.prior_source={one_file}"))
  with pytest.raises(ValueError, match="no subset of mmlu is shipped"):
    components.load_priors(suite_config(assets, "task.prior=piqa,mmlu",
                                        "task.prior_source=shipped"))
  more = suite_config(assets, "task.num_prior=20")
  with pytest.raises(ValueError, match="task.num_prior=20 but the hellaswag prior data "
                                       f"\\({assets.data}/hellaswag/.*\\) has only 9"):
    components.check_sizes(more, [0] * 4, [0] * 3, components.load_priors(more))


def test_a_run_records_and_summarises_every_prior_task(assets, tmp_path, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  out = tmp_path / "run"
  records = run_lib.run(suite_config(assets, "iterations=2"), out, progress=False)
  first, last = records[0], records[-1]
  for record in (first, last):
    tasks = record["prior_tasks"]
    assert list(tasks) == ["hellaswag", "piqa", "arc_easy"]
    for scores in tasks.values():
      correct, margin = np.array(scores["correct"]), np.array(scores["margin"])
      assert len(correct) == len(margin) == NUM_PRIOR
      np.testing.assert_array_equal(correct, margin > 0)  # gold wins exactly when ahead
      assert scores["accuracy"] == pytest.approx(correct.mean())
    assert record["prior_accuracy"] == pytest.approx(np.mean([t["accuracy"]
                                                              for t in tasks.values()]))
  table = summary.table({"es": records})
  per_task = {line.split("|")[2].strip(): line for line in table.splitlines()[6:]}
  assert list(per_task) == ["hellaswag", "piqa", "arc_easy"]
  ses = []
  for name, line in per_task.items():
    d = (np.array(last["prior_tasks"][name]["margin"], np.float64)
         - np.array(first["prior_tasks"][name]["margin"], np.float64))
    se = d.std(ddof=1) / math.sqrt(len(d))
    ses.append(se)
    assert f"{d.mean():+.3f} ± {se:.3f} (MDE {2.801585 * se:.3f})" in line
  suite_se = math.sqrt(sum(se ** 2 for se in ses)) / 3
  assert f"± {suite_se:.3f}" in table.splitlines()[2].split("|")[6]
  assert (out / "forgetting.png").stat().st_size > 0


def test_records_written_before_the_suite_still_summarise():
  first = {"iteration": 0, "target_reward": 0.1, "prior_accuracy": 0.5, "prior_correct": [1, 0],
           "kl_to_base": 0.0, "update_norm": 0.0, "sparsity": 1.0, "wall_time_s": 0.0}
  last = {**first, "iteration": 4, "prior_correct": [0, 0], "wall_time_s": 8.0}
  table = summary.table({"old": [first, last]})
  assert "| old | hellaswag | 2 | 0.500 -> 0.000 | -0.500 ± 0.500 (MDE 1.401) | - |" in table

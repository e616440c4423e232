"""The main job (experiments/demo.py) at a tiny size: runs, writes its files, AWD bounds the norm.

Wiring only: the phenomenon itself (ES forgets, AWD forgets less) needs the
full-size run, ``python -m experiments.demo``.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from es_jax.models import char_tokenizer
from experiments import demo
from experiments import demo_tasks

OUTPUT_FILES = ("metrics.jsonl", "summary.json", "table.md", "demo.png", "new_task_reward.png",
                "prior_task_accuracy.png", "update_norm.png")


def test_tasks_are_verifiable_and_pretraining_labels_are_right_or_off_by_one():
  tok = char_tokenizer()
  prior = demo_tasks.letter_shift_task(tok)
  new = demo_tasks.digit_product_task(tok)
  off_by_one = demo_tasks.digit_product_task(tok, offset=1)
  assert prior.input_ids.shape == (260, 4) and new.input_ids.shape == (100, 4)
  assert tok.decode(new.input_ids[37]) == "3*7=" and new.answers[37] == "1"
  assert tok.decode(prior.input_ids[259]) == "z+9=" and prior.answers[259] == "i"
  ids, answers = demo_tasks.pretraining_batch(jax.random.key(0), prior, new,
                                              off_by_one.answer_ids, 0.4, 64)
  ids, answers = np.asarray(ids), np.asarray(answers)
  lookup = {tuple(p): a for p, a in zip(prior.input_ids.tolist(), prior.answer_ids)}
  assert all(lookup[tuple(row)] == a for row, a in zip(ids[:32].tolist(), answers[:32]))
  right = {tuple(p): a for p, a in zip(new.input_ids.tolist(), new.answer_ids)}
  wrong = {tuple(p): a for p, a in zip(new.input_ids.tolist(), off_by_one.answer_ids)}
  labels = [(right[tuple(row)] == a, wrong[tuple(row)] == a)
            for row, a in zip(ids[32:].tolist(), answers[32:])]
  assert all(r or w for r, w in labels)
  assert any(r for r, _ in labels) and any(w for _, w in labels)


def test_random_walk_prediction_matches_its_closed_forms():
  cfg = demo.DemoConfig(alpha=0.01, population=16, awd_strength=2.0)
  d, steps = 10_000, 400
  plain = demo.random_walk_norm(cfg, d, 0.0, steps)
  assert plain == pytest.approx(cfg.alpha * math.sqrt(d / cfg.population) * math.sqrt(steps))
  # With AWD it settles at (alpha / sqrt(N)) * sqrt(d) / sqrt(2 alpha lambda) (reference sec. 3).
  settled = demo.random_walk_norm(cfg, d, cfg.awd_strength, 100_000)
  stationary = (cfg.alpha / math.sqrt(cfg.population) * math.sqrt(d)
                / math.sqrt(2 * cfg.alpha * cfg.awd_strength))
  assert settled == pytest.approx(stationary, rel=0.02)
  assert demo.random_walk_norm(cfg, d, cfg.awd_strength, steps) < plain


@pytest.mark.slow
def test_quick_demo_writes_table_metrics_and_plots(tmp_path, capsys):
  summary = demo.main(["--quick", "--out", str(tmp_path)])
  printed = capsys.readouterr().out

  for name in OUTPUT_FILES:
    assert (tmp_path / name).stat().st_size > 0, name
  for name in OUTPUT_FILES[3:]:
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  table = (tmp_path / "table.md").read_text()
  assert table.strip() in printed
  assert table.startswith("| run |") and "| ES + AWD (L2, lambda=" in table and "| GRPO (G=" in table
  assert "ES/GRPO update-norm ratio" in printed

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  runs = list(dict.fromkeys(r["run"] for r in records))
  assert runs == [row["run"] for row in summary["rows"]] and len(runs) == 3
  plain, awd, gradient = ([r for r in records if r["run"] == run] for run in runs)
  assert runs[2].startswith("GRPO")
  cfg = summary["config"]
  expected_iterations = list(range(0, cfg["iterations"] + 1, cfg["eval_every"]))
  assert [r["iteration"] for r in plain] == [r["iteration"] for r in awd] == expected_iterations
  assert [r["iteration"] for r in gradient] == list(
      range(0, cfg["grpo_iterations"] + 1, cfg["eval_every"]))
  assert gradient[-1]["update_norm"] > 0.0
  for r in records:
    assert math.isfinite(r["update_norm"]) and 0.0 <= r["sparsity"] <= 1.0
    assert 0.0 <= r["sparsity_bf16"] <= 1.0
    assert 0.0 <= r["new_task_reward"] <= 1.0 and 0.0 <= r["prior_task_accuracy"] <= 1.0
  assert plain[0]["update_norm"] == 0.0 and plain[0]["sparsity"] == 1.0
  assert plain[-1]["update_norm"] > 0.0
  # The quick preset's AWD shrinks the deviation by 1 - alpha * lambda = 0.55 per
  # step, so at equal steps its norm must be well below plain ES's.
  assert awd[-1]["update_norm"] < 0.8 * plain[-1]["update_norm"]
  assert summary["rows"][1]["update_norm"] == awd[-1]["update_norm"]

"""The runner with fake deterministic models, population mode, JSON round-trips, the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from es_jax.evaluation import (
    CountdownExample,
    CountdownTask,
    DataError,
    EvalResult,
    GSM8KExample,
    GSM8KTask,
    HellaSwagExample,
    HellaSwagTask,
    PopulationEvalResult,
    evaluate_generation,
    evaluate_loglik,
    evaluate_population,
    get_task,
)

COUNTDOWN = [
    CountdownExample((2, 3, 4), 14),
    CountdownExample((1, 2, 3), 6),
    CountdownExample((10, 5), 2),
]
# Completions keyed by instance, with the reward worked out by hand.
COMPLETIONS = {
    (2, 3, 4): ("ok</think>\n<answer>2 + 3 * 4</answer>", 1.1, 1.0),    # full format, right
    (1, 2, 3): ("ok</think> <answer>1 + 2 + 3</answer>", 1.06, 1.0),   # loose format, right
    (10, 5): ("ok</think>\n<answer>10 - 5</answer>", 0.1, 0.0),        # full format, wrong
}


def _fake_model(task, examples):
  """A deterministic 'model': prompt -> known completion."""
  table = {task.build_prompt(ex): COMPLETIONS[ex.numbers][0] for ex in examples}
  calls = []

  def generate(prompts):
    calls.append(len(prompts))
    return [table[p] for p in prompts]

  return generate, calls


def test_records_and_summary_match_hand_computation():
  task = CountdownTask()
  generate, calls = _fake_model(task, COUNTDOWN)
  result = evaluate_generation(task, COUNTDOWN, generate, batch_size=2)
  assert calls == [2, 1]
  assert [r.index for r in result.records] == [0, 1, 2]
  for record, ex in zip(result.records, COUNTDOWN):
    completion, reward, accuracy = COMPLETIONS[ex.numbers]
    assert record.prompt == task.build_prompt(ex)
    assert record.completion == completion
    assert record.target == str(ex.target)
    assert record.metrics["reward"] == pytest.approx(reward)
    assert record.metrics["accuracy"] == accuracy
  assert result.summary.task == "countdown" and result.summary.num_examples == 3
  assert result.summary.metrics["accuracy"] == pytest.approx(2 / 3)
  assert result.summary.metrics["reward"] == pytest.approx((1.1 + 1.06 + 0.1) / 3)
  assert result.summary.metrics["format"] == pytest.approx((1.0 + 0.6 + 1.0) / 3)


def test_gsm8k_with_a_fake_model_and_a_chat_tokenizer():
  from es_jax.models.tokenizer import char_tokenizer

  tok = char_tokenizer()
  examples = [GSM8KExample("What is 6 * 7?", "6 * 7 = 42\n#### 42", "42"),
              GSM8KExample("What is 1 + 1?", "#### 2", "2")]
  answers = {"What is 6 * 7?": "6 * 7 = 42.\n#### 42", "What is 1 + 1?": "It is 3."}

  def generate(prompts):
    assert all(p.startswith("<|im_start|>user\n") for p in prompts)
    return [next(a for q, a in answers.items() if q in p) for p in prompts]

  result = evaluate_generation(GSM8KTask(), examples, generate, tokenizer=tok)
  assert [r.prediction for r in result.records] == ["42", "3."]
  assert [r.metrics["accuracy"] for r in result.records] == [1.0, 0.0]
  assert result.summary.metrics == {"reward": 0.5, "accuracy": 0.5, "strict_match": 0.5,
                                    "flexible_match": 0.5}


def test_population_mode_gives_per_member_summaries():
  task = CountdownTask()
  right = {task.build_prompt(ex): COMPLETIONS[ex.numbers][0] for ex in COUNTDOWN}

  def generate(prompts):
    # Member 0 answers as in COMPLETIONS, member 1 says nothing, member 2 always "10 - 5".
    return [[right[p] for p in prompts], ["" for _ in prompts],
            ["ok</think>\n<answer>10 - 5</answer>" for _ in prompts]]

  pop = evaluate_population(task, COUNTDOWN, generate, batch_size=2, progress=True)
  assert len(pop.members) == 3
  accuracy = [s.metrics["accuracy"] for s in pop.summaries]
  assert accuracy == pytest.approx([2 / 3, 0.0, 0.0])
  np.testing.assert_allclose(pop.fitness(), [(1.1 + 1.06 + 0.1) / 3, 0.0, 0.1])
  assert [r.completion for r in pop.members[1].records] == ["", "", ""]


def test_generator_output_is_checked():
  task = CountdownTask()
  with pytest.raises(ValueError, match="returned 1 completions for 3 prompts"):
    evaluate_generation(task, COUNTDOWN, lambda ps: ["x"])
  with pytest.raises(ValueError, match="returned 2 completions for member 1"):
    evaluate_population(task, COUNTDOWN, lambda ps: [["x"] * len(ps), ["x", "y"]])
  calls = iter([2, 3])
  with pytest.raises(ValueError, match="returned 3 members .* but 2 before"):
    evaluate_population(task, COUNTDOWN, lambda ps: [["x"] * len(ps)] * next(calls),
                        batch_size=2)


def test_json_round_trip(tmp_path):
  task = CountdownTask()
  generate, _ = _fake_model(task, COUNTDOWN)
  result = evaluate_generation(task, COUNTDOWN, generate)
  text = result.to_json(tmp_path / "result.json")
  assert EvalResult.from_json(text) == result
  assert EvalResult.from_json(tmp_path / "result.json") == result
  assert json.loads(text)["summary"]["num_examples"] == 3

  pop = evaluate_population(task, COUNTDOWN, lambda ps: [generate(ps), generate(ps)])
  assert PopulationEvalResult.from_json(pop.to_json(tmp_path / "pop.json")) == pop
  assert PopulationEvalResult.from_json(str(tmp_path / "pop.json")) == pop
  with pytest.raises(ValueError, match="cannot read results file"):
    EvalResult.from_json(tmp_path / "missing.json")


def test_loglik_evaluation_and_protocol_check():
  from es_jax.models.tokenizer import char_tokenizer

  item = HellaSwagExample(0, "Act", "Some context.", ("aaaa", "bb", "cccccc", "d"), 1)

  def logits_fn(input_ids, attention_mask):
    # Every next token is "b" with high probability, so " bb" wins on acc and acc_norm.
    logits = np.zeros(input_ids.shape + (103,), np.float32)
    logits[..., char_tokenizer().convert_tokens_to_ids("b")] = 5.0
    return logits

  result = evaluate_loglik(HellaSwagTask(), [item, item], logits_fn, char_tokenizer())
  assert result.summary.metrics["acc"] == 1.0 and result.summary.metrics["acc_norm"] == 1.0
  assert [c[1:] for c in result.records[0].details["choices"]] == [[5, 5], [3, 3], [7, 7],
                                                                    [2, 2]]
  assert EvalResult.from_json(result.to_json()) == result
  with pytest.raises(ValueError, match="loglik protocol"):
    evaluate_generation(HellaSwagTask(), [item], lambda ps: ["1"] * len(ps))


def test_registry():
  assert isinstance(get_task("countdown"), CountdownTask)
  assert get_task("GSM8K", mode="strict").mode == "strict"
  assert get_task("hellaswag", protocol="generative").protocol == "generative"
  with pytest.raises(ValueError, match="unknown task 'squad'; known tasks: arc_challenge, "
                                       "arc_easy, arithmetic, countdown, gsm8k, hellaswag, mmlu, "
                                       "mmlu_pro, piqa, winogrande"):
    get_task("squad")
  with pytest.raises(ValueError, match="bad options for task 'gsm8k'"):
    get_task("gsm8k", protocol="generative")


def test_unreadable_sources_give_clear_errors(tmp_path):
  for name in ("countdown", "gsm8k", "hellaswag"):
    with pytest.raises(DataError, match=f"{name}: data file .*does not exist"):
      get_task(name).load(str(tmp_path / "absent.jsonl"))
  binary = tmp_path / "binary.jsonl"
  binary.write_bytes(b"\xff\xfe\x00garbage\n")
  with pytest.raises(DataError, match="binary.jsonl"):
    get_task("gsm8k").load(str(binary))

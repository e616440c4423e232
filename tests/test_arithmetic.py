"""The arithmetic task: generated problems, disjoint splits, the exact-answer reward."""

import operator
import time

import pytest

from es_jax.evaluation import ArithmeticTask, arithmetic_reward, generate_problems, get_task
from es_jax.evaluation.arithmetic import first_number, parse_only_number, split_of

_PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_problems_are_distinct_in_range_and_correct():
  problems = generate_problems(300, seed=3, ops=("+", "-", "*"))
  assert len({(p.a, p.op, p.b) for p in problems}) == 300
  for p in problems:
    assert 10 <= p.a <= 99 and 10 <= p.b <= 99
    assert p.answer == _PY_OPS[p.op](p.a, p.b)
    assert p.question == f"{p.a} {p.op} {p.b}"


def test_splits_never_share_a_problem_whatever_the_seeds():
  train = {(p.a, p.op, p.b) for s in range(3) for p in generate_problems(500, seed=s)}
  test = {(p.a, p.op, p.b) for s in range(3) for p in generate_problems(500, seed=s,
                                                                          split="test")}
  assert not train & test
  # About TEST_FRACTION of all two-digit sums are test problems.
  share = sum(split_of(a, "+", b) == "test" for a in range(10, 100) for b in range(10, 100)) / 8100
  assert 0.18 < share < 0.22


def test_same_seed_same_problems_other_seed_other_problems():
  assert generate_problems(20, seed=5) == generate_problems(20, seed=5)
  assert generate_problems(20, seed=5) != generate_problems(20, seed=6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(count=10, low=1, high=2), "give only"),         # 4 pairs in all
    (dict(count=1, low=5, high=4), "low=5 > high=4"),
    (dict(count=1, ops=("/",)), "ops="),
    (dict(count=1, ops=()), "ops="),
    (dict(count=-1), "count=-1"),
    (dict(count=1, split="validation"), "split="),
])
def test_impossible_requests_fail_at_once_naming_the_constraint(kwargs, match):
  start = time.perf_counter()
  with pytest.raises(ValueError, match=match):
    generate_problems(**kwargs)
  assert time.perf_counter() - start < 5


@pytest.mark.parametrize("completion, expected", [
    ("85", 1.0), (" 85.\n", 1.0), ("85<|im_end|>", 1.0), ("\n85 <|im_end|>", 1.0),
    ("The answer is 85.", 0.0), ("85 + 0", 0.0), ("84", 0.0), ("", 0.0), ("85.0", 0.0),
    ("0085", 1.0),  # leading zeros still name the number 85
    ("８５", 0.0),   # full-width digits are not ASCII digits
])
def test_reward_is_one_only_for_exactly_the_number(completion, expected):
  assert arithmetic_reward(completion, 85, end_token="<|im_end|>") == expected


def test_negative_answers_and_the_first_number_diagnostic():
  task = ArithmeticTask(ops=("-",), end_token="<|im_end|>")
  ex = next(p for p in task.load(limit=50, seed=0) if p.answer < 0)
  assert task.score(f"{ex.answer}", ex).metrics == {
      "reward": 1.0, "accuracy": 1.0, "first_number": 1.0}
  wordy = task.score(f"The result is {ex.answer}.", ex)
  assert wordy.metrics == {"reward": 0.0, "accuracy": 0.0, "first_number": 1.0}
  assert wordy.prediction is None and wordy.target == str(ex.answer)


def test_parsers_never_raise_and_stay_linear_on_hostile_text():
  hostile = ["9" * 10_000_000, "-" * 1_000_000 + "1", "1" * 19, None, 12, "1e5", "0x10"]
  start = time.perf_counter()
  for text in hostile:
    assert parse_only_number(text) is None
  assert first_number("9" * 10_000_000) == int("9" * 18)
  assert time.perf_counter() - start < 5


def test_prompts_and_registry():
  task = get_task("arithmetic")
  ex = task.load(limit=1, seed=0)[0]
  assert task.build_prompt(ex) == f"{ex.a} + {ex.b} ="

  class ChatTokenizer:
    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
      return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

  assert task.build_prompt(ex, ChatTokenizer()) == (
      f"user:What is {ex.a} + {ex.b}? Answer with only the number.|assistant:")
  with pytest.raises(ValueError, match="generates its problems"):
    task.load("some/file.jsonl")


def test_few_shot_prompt_shows_solved_training_problems_and_scores_the_first_line():
  task = get_task("arithmetic", shots=3)
  shown = task.solved_examples
  assert len(shown) == 3 and all(split_of(p.a, p.op, p.b) == "train" for p in shown)
  assert all(p.answer == p.a + p.b for p in shown)
  asked = task.load(limit=2000, seed=0)  # a large draw: a shown problem would surely be in it
  assert len(asked) == 2000 and not set(shown) & set(asked)
  ex = asked[0]
  lines = task.build_prompt(ex).split("\n")
  assert lines == [f"{p.a} + {p.b} = {p.a + p.b}" for p in shown] + [f"{ex.a} + {ex.b} ="]
  # One problem per line: the model's next problem after the answer is not part of it.
  assert task.score(f" {ex.answer}\n{ex.a} + 1 = 3", ex).metrics["reward"] == 1.0
  assert task.score(f" {ex.answer + 1}\n{ex.answer}", ex).metrics["reward"] == 0.0
  assert ArithmeticTask().score(f" {ex.answer}\n1 + 1 = 2", ex).metrics["reward"] == 0.0
  with pytest.raises(ValueError, match="plain prompts"):
    task.build_prompt(ex, tokenizer=object())
  with pytest.raises(ValueError, match="shots=-1"):
    ArithmeticTask(shots=-1)

"""Countdown: the published reward, the safe evaluator, the instance generator, loading."""

from __future__ import annotations

import itertools
import json
import re
import time
import warnings
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from es_jax.evaluation import countdown as cd
from es_jax.evaluation import safe_arith
from es_jax.evaluation.data import DataError

NUMS, TARGET = [2, 3, 4], 14  # 2 + 3 * 4 = 14

# (completion, numbers, target, expected reward) -- expected values worked out by hand
# from the published definition: reward = 0.1 * format + answer on "<think>" + completion.
REWARD_CASES = [
    # Correct, full format: 0.1 * 1.0 + 1.0.
    ("Multiply first.</think>\n<answer>2 + 3 * 4</answer>", NUMS, TARGET, 1.1),
    # Correct, but a space instead of the newline: think 0.1 + answer 0.5 -> 0.1 * 0.6 + 1.
    ("Multiply first.</think> <answer>2 + 3 * 4</answer>", NUMS, TARGET, 1.06),
    # Equals the target but the wrong multiset (4 twice, no 3): format only.
    ("ok</think>\n<answer>4 * 4 - 2</answer>", NUMS, TARGET, 0.1),
    # A number not given (7): format only.
    ("ok</think>\n<answer>2 * 7</answer>", NUMS, TARGET, 0.1),
    # A given number used twice.
    ("ok</think>\n<answer>2 + 3 * 4 + 2 - 2</answer>", NUMS, TARGET, 0.1),
    # A number left out.
    ("ok</think>\n<answer>3 * 4</answer>", NUMS, TARGET, 0.1),
    # '=' inside the answer fails the character filter.
    ("ok</think>\n<answer>2 + 3 * 4 = 14</answer>", NUMS, TARGET, 0.1),
    # No tags at all: no think block closes, no answer block.
    ("2 + 3 * 4 = 14", NUMS, TARGET, 0.0),
    # Several answer blocks: the last one counts (correct last).
    ("ok</think>\n<answer>1 + 1</answer> then <answer>2 + 3 * 4</answer>", NUMS, TARGET, 1.1),
    # ... and wrong last.
    ("ok</think>\n<answer>2 + 3 * 4</answer> then <answer>1 + 1</answer>", NUMS, TARGET, 0.1),
    # Non-integer target reached exactly.
    ("ok</think>\n<answer>7 / 2</answer>", [7, 2], 3.5, 1.1),
    # Non-integer value against an integer target.
    ("ok</think>\n<answer>(2 + 3) / 4</answer>", NUMS, TARGET, 0.1),
    # Think block only: 0.1 * 0.1.
    ("I am thinking hard</think>", NUMS, TARGET, 0.01),
    # Answer block but the think block never closes: 0.1 * 0.5 + 1.
    ("<answer>2 + 3 * 4</answer>", NUMS, TARGET, 1.05),
    # Empty answer block: format only.
    ("ok</think>\n<answer></answer>", NUMS, TARGET, 0.1),
    # '$' in the published regexes also matches before one final newline.
    ("ok</think>\n<answer>2 + 3 * 4</answer>\n", NUMS, TARGET, 1.1),
    ("ok</think>\n<answer>2 + 3 * 4\n</answer>", NUMS, TARGET, 1.1),
    # Two trailing newlines inside the answer fail the character filter.
    ("ok</think>\n<answer>2 + 3 * 4\n\n</answer>", NUMS, TARGET, 0.1),
    # Text after the final answer breaks the full format: 0.1 * 0.6.
    ("ok</think>\n<answer>2 + 3 * 4</answer> done", NUMS, TARGET, 1.06),
    # Division by zero scores no answer.
    ("ok</think>\n<answer>5 / (3 - 3)</answer>", [5, 3, 3], 1, 0.1),
    # '**' and '//' are not allowed (the reference's eval would accept them).
    ("ok</think>\n<answer>9**9**9**9</answer>", [9, 9, 9, 9], 1, 0.1),
    ("ok</think>\n<answer>7 // 2</answer>", [7, 2], 3, 0.1),
    # Leading zero: a syntax error for eval, so no answer credit either.
    ("ok</think>\n<answer>02 + 3 * 4</answer>", NUMS, TARGET, 0.1),
    # Unicode digits fail the filter.
    ("ok</think>\n<answer>\uff12 + 3 * 4</answer>", NUMS, TARGET, 0.1),
    # An extra opening <think> in the completion is still inside the format.
    ("<think>hm</think>\n<answer>(2 + 3) * 4 - 6</answer>", [2, 3, 4, 6], 14, 1.1),
    # Unary minus is fine, as in eval.
    ("ok</think>\n<answer>4 * 3 - -2</answer>", NUMS, TARGET, 1.1),
    ("", NUMS, TARGET, 0.0),
]


@pytest.mark.parametrize("completion, numbers, target, expected", REWARD_CASES)
def test_reward_matches_hand_computed_values(completion, numbers, target, expected):
  assert cd.countdown_reward(completion, numbers, target) == pytest.approx(expected, abs=1e-12)


def test_reward_parts_and_end_token():
  text = "ok</think>\n<answer>2 + 3 * 4</answer><|im_end|>"
  assert cd.countdown_reward(text, NUMS, TARGET, end_token="<|im_end|>") == pytest.approx(1.1)
  parts = cd.countdown_reward_parts(text, NUMS, TARGET)
  assert (parts.format, parts.answer) == (0.6, 1.0)


def test_reward_of_non_string_is_zero():
  assert cd.countdown_reward(None, NUMS, TARGET) == 0.0  # type: ignore[arg-type]


# The published regexes, used only as an oracle on short strings where they are fast.
_FULL = re.compile(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", re.DOTALL)
_THINK = re.compile(r"<think>.*?<\/think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>.*?<\/answer>", re.DOTALL)
_ANSWER_GROUP = re.compile(r"<answer>(.*?)<\/answer>", re.DOTALL)


def _published_format(response: str) -> float:
  if _FULL.match(response):
    return 1.0
  return (0.1 if _THINK.search(response) else 0.0) + (0.5 if _ANSWER.search(response) else 0.0)


_FRAGMENTS = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "1", "+", "x", "<", ">", "/"])


@settings(max_examples=250, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=12).map("".join))
def test_format_and_answer_blocks_agree_with_published_regexes(completion):
  response = "<think>" + completion
  assert cd.format_score(response) == _published_format(response)
  assert cd.answer_blocks(response) == _ANSWER_GROUP.findall(response)


# ---- safe arithmetic ----

@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", Fraction(7, 2)), ("8 - 3 - 2", 3),
    ("16 / 4 / 2", 2), ("-(3 - 10)", 7), ("- - 4", 4), ("+5", 5), ("00", 0),
    ("((((2))))", 2), ("  12*  3 ", 36), ("1/3*3", 1),
])
def test_safe_arith_values(expression, value):
  assert safe_arith.evaluate(expression) == value


@pytest.mark.parametrize("expression", [
    "", "   ", "9**9**9**9", "2 ** 3", "7 // 2", "1 / 0", "5 / (3 - 3)", "01", "1 2", "(1",
    "1)", "()", "1 +", "3(4)", "\u00b2", "\u0663 + 1", "\uff11", "1.5", "1e5", "1_000", "a",
    "__import__('os')", "(" * 5000 + "1" + ")" * 5000, "-" * 100 + "1", "9" * 40,
    "1" + "+1" * 300,
])
def test_safe_arith_rejects(expression):
  with pytest.raises(safe_arith.UnsafeExpressionError):
    safe_arith.evaluate(expression)
  assert safe_arith.try_evaluate(expression) is None


def test_safe_arith_bounds_magnitude():
  limits = safe_arith.ArithLimits(max_bits=64)
  assert safe_arith.try_evaluate("99999 * 99999 * 99999", limits) is not None
  assert safe_arith.try_evaluate("99999 * 99999 * 99999 * 99999 * 99999", limits) is None


_ARITH_TOKENS = st.sampled_from(["1", "2", "7", "10", "0", "00", "03", "+", "-", "*", "/", "(",
                                 ")", " "])


@settings(max_examples=300, deadline=None)
@given(st.lists(_ARITH_TOKENS, min_size=1, max_size=10).map("".join))
def test_safe_arith_agrees_with_python_parser(expression):
  # CPython's own parser is the oracle on short inputs without '**' or '//'
  # (the two forms we reject on purpose).
  if "**" in expression or "//" in expression:
    return
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      expected = eval(expression, {"__builtins__": {}}, {})  # noqa: S307 -- short, no '**'
    if not isinstance(expected, (int, float)):
      expected = None
  except (SyntaxError, TypeError, ZeroDivisionError):
    expected = None
  got = safe_arith.try_evaluate(expression)
  if expected is None:
    assert got is None
  else:
    assert got is not None and float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---- adversarial completions: fast, never raise ----

_ADVERSARIAL = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["9**9**9**9", "(" * 5000, "9" * 5000, "<answer>" * 20000,
                     "<think>" * 20000, "</think>\n<answer>" * 5000 + "x",
                     "\u0663\u00b2\uff11" * 1000, "\ud800", "\x00" * 1000]),
    st.tuples(st.sampled_from(["9**9**9**9", "(" * 5000 + "1" + ")" * 5000, "9" * 10000,
                               "1+" * 2000 + "1", "\u0663 + \u00b2", "1/0", "99999999" * 50]),
              st.booleans())
    .map(lambda p: ("x</think>\n" if p[1] else "") + "<answer>" + p[0] + "</answer>"),
    st.integers(1, 200_000).map(lambda n: "<answer>" + "(" * n),
    st.integers(1, 200_000).map(lambda n: "<think>" * (n // 7) + "</answer>"),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ADVERSARIAL)
def test_reward_is_fast_and_total_on_adversarial_strings(completion):
  start = time.perf_counter()
  reward = cd.countdown_reward(completion, [9, 9, 9, 9], 1)
  elapsed = time.perf_counter() - start
  assert isinstance(reward, float)
  assert 0.0 <= reward <= 1.1 + 1e-9
  assert elapsed < 0.05, f"reward took {elapsed * 1e3:.1f} ms on a {len(completion)}-char input"


def test_reward_on_one_megabyte_of_digits_is_fast():
  completion = "x</think>\n<answer>" + "9" * 1_000_000 + "</answer>"
  start = time.perf_counter()
  assert cd.countdown_reward(completion, [9], 9) == pytest.approx(0.1)
  assert time.perf_counter() - start < 0.05


# ---- instances ----

def _all_values(numbers):
  """Every value reachable using all numbers once: brute force over permutations and bracketings."""

  def bracketings(seq):
    if len(seq) == 1:
      return {Fraction(seq[0])}
    values = set()
    for split in range(1, len(seq)):
      for a in bracketings(seq[:split]):
        for b in bracketings(seq[split:]):
          values.update((a + b, a - b, a * b))
          if b != 0:
            values.add(a / b)
    return values

  reachable = set()
  for perm in set(itertools.permutations(numbers)):
    reachable |= bracketings(perm)
  return reachable


def test_generated_instances_are_solvable_by_brute_force():
  instances = cd.generate_instances(40, seed=123)
  assert len(instances) == 40
  for ex in instances:
    assert len(ex.numbers) in (3, 4)
    assert all(1 <= n <= 99 for n in ex.numbers)
    assert isinstance(ex.target, int)
    assert Fraction(ex.target) in _all_values(ex.numbers), ex
    # The stored solution earns the full reward.
    completion = f"searching</think>\n<answer>{ex.solution}</answer>"
    assert cd.countdown_reward(completion, ex.numbers, ex.target) == pytest.approx(1.1)


def test_generator_is_seeded():
  assert cd.generate_instances(20, seed=5) == cd.generate_instances(20, seed=5)
  assert cd.generate_instances(20, seed=5) != cd.generate_instances(20, seed=6)


@pytest.mark.parametrize("kwargs, message", [
    # The largest value of 3 or 4 numbers <= 2 is 16 ((2+2)*(2+2)); 2**3 * 2**4 = 128 bounds it.
    (dict(low=1, high=2, min_target=1000, max_target=1000),
     r"magnitude at most 128, outside \[min_target=1000, max_target=1000\]"),
    (dict(low=1, high=3, number_counts=(3,), min_target=-10**6, max_target=-1000),
     r"magnitude at most 108, outside \[min_target=-1000000, max_target=-1000\]"),
    # Four 1s reach at most (1+1)*(1+1) = 4, yet 7 is within the magnitude bound 2**3 = 8.
    (dict(low=1, high=1, min_target=7, max_target=7),
     r"from \[low=1, high=1\] equals an integer in \[min_target=7, max_target=7\] "
     r"\(checked exhaustively\)"),
    (dict(low=5, high=7, min_target=1, max_target=1, number_counts=(3,)),
     r"from \[low=5, high=7\] equals an integer in \[min_target=1, max_target=1\]"),
])
def test_generator_refuses_unreachable_targets_at_once(kwargs, message):
  # Brute force agrees that no target in the range is reachable at all.
  assert not any(v.denominator == 1 and kwargs["min_target"] <= v <= kwargs["max_target"]
                 for n in kwargs.get("number_counts", (3, 4))
                 for numbers in itertools.product(range(kwargs["low"], kwargs["high"] + 1),
                                                  repeat=n)
                 for v in _all_values(numbers))
  start = time.perf_counter()
  with pytest.raises(ValueError, match="no instance exists: .*" + message):
    cd.generate_instances(3, **kwargs)
  assert time.perf_counter() - start < 1.0


def test_generator_gives_up_after_max_draws_naming_the_constraints():
  # 997 from three numbers <= 99 is reachable (e.g. 99 * 10 + 7) but about 1 draw in 1e5 hits it.
  assert Fraction(997) in _all_values((99, 10, 7))
  with pytest.raises(ValueError, match=r"no target in \[min_target=997, max_target=997\] was "
                     r"reached in 50 draws of \(3,\) numbers from \[low=1, high=99\]; .* "
                     r"raise max_draws"):
    cd.generate_instances(2, number_counts=(3,), min_target=997, max_target=997, max_draws=50)
  # The budget counts draws per instance: rare but reachable targets are found.
  assert [ex.target for ex in cd.generate_instances(
      3, seed=2, low=1, high=1, min_target=4, max_target=4, max_draws=500)] == [4, 4, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(number_counts=()), "number_counts must be a non-empty sequence of ints >= 1"),
    (dict(number_counts=(3, -1)), r"number_counts .* got \(3, -1\)"),
    (dict(number_counts=(0,)), r"number_counts .* got \(0,\)"),
    (dict(number_counts=3), "number_counts .* got 3"),
    (dict(low=1.5), "low must be an int, got 1.5"),
    (dict(max_draws=0), "max_draws must be >= 1"),
])
def test_generator_validates_its_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    cd.generate_instances(2, **kwargs)


@pytest.mark.parametrize("numbers, target", [
    ([1, 1, 1], 100), ([2, 3, 4], 14), ([99, 98, 1, 1], 1), ([5, 7, 11], 0), ([3, 8, 8], 1),
    ([10, 10, 10, 10], 999), ([4, 7], Fraction(4, 7)),
])
def test_solver_agrees_with_brute_force(numbers, target):
  solution = cd.solve(numbers, target)
  assert (solution is not None) == (Fraction(target) in _all_values(numbers))
  if solution is not None:
    assert safe_arith.evaluate(solution) == Fraction(target)
    assert sorted(int(n) for n in re.findall(r"[0-9]+", solution)) == sorted(numbers)


# ---- prompts ----

def test_plain_prompt_is_the_published_text():
  expected = (
      "A conversation between User and Assistant. The user asks a question, and the Assistant "
      "solves it. The assistant first thinks about the reasoning process in the mind and then "
      "provides the user with the answer.\n"
      "User: Using the numbers [79, 17, 60], create an equation that equals 36. You can use "
      "basic arithmetic operations (+, -, *, /) and each number can only be used once. Show "
      "your work in <think> </think> tags. And return the final answer in <answer> </answer> "
      "tags, for example <answer> (1 + 2) / 3 </answer>.\n"
      "Assistant: Let me solve this step by step.\n<think>")
  assert cd.countdown_prompt([79, 17, 60], 36) == expected


def test_chat_prompt_uses_the_template_and_opens_the_think_block():
  from es_jax.models.tokenizer import char_tokenizer

  prompt = cd.CountdownTask().build_prompt(cd.CountdownExample((79, 17, 60), 36), char_tokenizer())
  assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.")
  assert "<|im_start|>user\nUsing the numbers [79, 17, 60], create an equation that equals 36." \
      in prompt
  assert prompt.endswith("<|im_start|>assistant\nLet me solve this step by step.\n<think>")


# ---- loading ----

def test_load_generated_and_from_file(tmp_path):
  task = cd.CountdownTask()
  assert task.load(limit=5, seed=1) == cd.generate_instances(5, seed=1)
  path = tmp_path / "countdown.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      {"target": 14, "nums": [2, 3, 4]}, {"target": 36.0, "nums": [79, 17, 60]}]) + "\n")
  loaded = task.load(str(path))
  assert loaded == [cd.CountdownExample((2, 3, 4), 14), cd.CountdownExample((79, 17, 60), 36)]
  score = task.score("x</think>\n<answer>2 + 3 * 4</answer>", loaded[0])
  assert score.metrics == {"reward": pytest.approx(1.1), "accuracy": 1.0, "format": 1.0}
  assert score.prediction == "2 + 3 * 4"


def test_load_reports_bad_rows(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"target": 14, "nums": [2, 3, 4]}\n{"target": 5}\n')
  with pytest.raises(DataError, match=r"row 1 .*'nums'"):
    cd.CountdownTask().load(str(path))
  path.write_text('{"target": 14, "nums": [2, 3, 4]}\n{"target": 5, "nums": [1, "x"]}\n')
  with pytest.raises(DataError, match=r"row 1 .*'nums'.*integers"):
    cd.CountdownTask().load(str(path))
  path.write_text('{"target": 14, "nums": [2, 3, 4]}\n{"target": 5, "nums": [1, 2}\n')
  with pytest.raises(DataError, match=r"line 2"):
    cd.CountdownTask().load(str(path))

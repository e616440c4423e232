"""GSM8K: gold extraction and scoring on the real test split, extraction modes, bad input."""

from __future__ import annotations

import json
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from es_jax.evaluation import gsm8k
from es_jax.evaluation.data import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TEST = DATA / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def test_rows():
  if not GSM8K_TEST.exists():
    pytest.skip(f"shared GSM8K data not found at {GSM8K_TEST}")
  with open(GSM8K_TEST) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def test_examples():
  if not GSM8K_TEST.exists():
    pytest.skip(f"shared GSM8K data not found at {GSM8K_TEST}")
  return gsm8k.GSM8KTask().load(str(GSM8K_TEST))


def _gold_by_hand(answer_text: str) -> Fraction:
  return Fraction(answer_text.split("####")[-1].strip().replace(",", ""))


def test_gold_extraction_on_every_row(test_rows, test_examples):
  assert len(test_examples) == len(test_rows) == 1319
  for row, ex in zip(test_rows, test_examples):
    assert ex.question == row["question"] and ex.solution == row["answer"]
    assert Fraction(ex.gold) == _gold_by_hand(row["answer"])


def test_reference_solutions_score_one_and_changed_answers_zero(test_examples):
  task = gsm8k.GSM8KTask()
  strict, flexible = gsm8k.GSM8KTask(mode="strict"), gsm8k.GSM8KTask(mode="flexible")
  for i, ex in enumerate(test_examples):
    for t in (task, strict, flexible):
      assert t.score(ex.solution, ex).metrics["accuracy"] == 1.0, (i, t.mode)
    head = ex.solution[:ex.solution.rindex("####")]
    changed = head + f"#### {_gold_by_hand(ex.solution) + 1}"
    for t in (task, strict, flexible):
      assert t.score(changed, ex).metrics["accuracy"] == 0.0, (i, t.mode)


@pytest.mark.parametrize("text, mode, expected", [
    ("so 3 eggs\n#### 3", "strict", "3"),
    ("#### -3", "strict", "-3"),
    ("#### 1,000", "strict", "1,000"),
    ("####3", "strict", None),
    ("#### $5", "strict", None),
    ("#### 4 then #### 5", "strict", "4"),
    ("The answer is 42.", "flexible", "42."),
    ("It costs $1,250.50 in total", "flexible", "$1,250.50"),
    ("3 apples, then 5...", "flexible", "5..."),
    ("Temperature drops to -7", "flexible", "-7"),
    ("no numbers here", "flexible", None),
    (r"So \boxed{42}.", "boxed", "42"),
    (r"\boxed{1} then \boxed{ 2 }", "boxed", "2"),
    (r"\boxed{x = 15 \text{ apples}}", "boxed", "15"),
    (r"\boxed{42", "boxed", None),
    ("<answer> 17 </answer>", "tag", "17"),
    ("<answer>1</answer><answer>2</answer>", "tag", "2"),
    ("<answer>about 9 cats</answer>", "tag", "9"),
    # auto: '####' first, then \boxed, then <answer>, then the last number.
    (r"#### 5 and \boxed{6}", "auto", "5"),
    (r"\boxed{6}. Check: 6 * 2 = 12", "auto", "6"),
    ("<answer>7</answer> because 7 + 1 = 8", "auto", "7"),
    ("First 2, then 9", "auto", "9"),
])
def test_extraction_modes(text, mode, expected):
  assert gsm8k.extract_answer(text, mode) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("#### 18", "18", 1.0),
    ("#### 18.00", "18", 1.0),
    ("The total is $1,000.", "1000", 1.0),
    ("#### 18.5", "18", 0.0),
    ("#### -4", "-4", 1.0),
    ("#### 4", "-4", 0.0),
    (r"\boxed{0.5}", "0.5", 1.0),
    ("no answer", "3", 0.0),
    ("", "3", 0.0),
])
def test_numeric_comparison(completion, gold, expected):
  assert gsm8k.gsm8k_reward(completion, gold) == expected


def test_parse_number_rejects_non_numbers():
  for text in ["", ".", "-", "1.2.3", "1e5", "--5", "\u0663", "9" * 100, None]:
    assert gsm8k.parse_number(text) is None, text
  assert gsm8k.parse_number("1,234.50") == Fraction(246_9, 2)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200),
                 st.sampled_from(["." * 100_000, "9" * 100_000, "\\boxed{" * 20_000,
                                  "#### " + "," * 50_000, "<answer>" * 20_000,
                                  "-$" * 50_000 + "1"])))
def test_reward_never_raises_and_is_fast(text):
  start = time.perf_counter()
  for mode in gsm8k.EXTRACT_MODES:
    assert gsm8k.gsm8k_reward(text, "18", mode) in (0.0, 1.0)
  assert time.perf_counter() - start < 0.5


def test_prompts():
  from es_jax.models.tokenizer import char_tokenizer

  ex = gsm8k.GSM8KExample("What is 2 + 2?", "2 + 2 = 4\n#### 4", "4")
  task = gsm8k.GSM8KTask()
  assert task.build_prompt(ex) == "Question: What is 2 + 2?\nAnswer:"
  chat = task.build_prompt(ex, char_tokenizer())
  assert chat.startswith("<|im_start|>user\nWhat is 2 + 2?\n\n")
  assert "'#### <number>'" in chat and chat.endswith("<|im_start|>assistant\n")


def test_seeded_subset(test_examples):
  task = gsm8k.GSM8KTask()
  a = task.load(str(GSM8K_TEST), limit=20, seed=7)
  b = task.load(str(GSM8K_TEST), limit=20, seed=7)
  assert a == b and len(a) == 20
  assert a != task.load(str(GSM8K_TEST), limit=20, seed=8)
  assert task.load(str(GSM8K_TEST), limit=3) == test_examples[:3]


# ---- bad input ----

def test_missing_field_names_row_and_field(tmp_path):
  path = tmp_path / "g.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
                  + json.dumps({"question": "q2"}) + "\n")
  with pytest.raises(DataError, match=r"row 1 .*missing field 'answer'"):
    gsm8k.GSM8KTask().load(str(path))


def test_malformed_line_names_the_line(tmp_path):
  path = tmp_path / "g.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
                  + '{"question": "q2", "answer": \n')
  with pytest.raises(DataError, match=r"line 2 of .*not valid JSON"):
    gsm8k.GSM8KTask().load(str(path))


def test_answer_without_final_number(tmp_path):
  path = tmp_path / "g.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
  with pytest.raises(DataError, match=r"row 0 .*field 'answer' has no '#### <number>'"):
    gsm8k.GSM8KTask().load(str(path))
  path.write_text(json.dumps({"question": "q", "answer": "#### many"}) + "\n")
  with pytest.raises(DataError, match=r"row 0 .*not a number"):
    gsm8k.GSM8KTask().load(str(path))


def test_wrong_type_names_field(tmp_path):
  path = tmp_path / "g.jsonl"
  path.write_text(json.dumps({"question": 3, "answer": "#### 1"}) + "\n")
  with pytest.raises(DataError, match=r"row 0 .*'question' should be str"):
    gsm8k.GSM8KTask().load(str(path))


def test_unreadable_path(tmp_path):
  missing = tmp_path / "nope" / "test.jsonl"
  with pytest.raises(DataError, match=re.escape(str(missing)) + ".*does not exist"):
    gsm8k.GSM8KTask().load(str(missing))
  with pytest.raises(DataError, match="not a file"):
    gsm8k.GSM8KTask().load(str(tmp_path) + "/")


def test_unknown_mode():
  with pytest.raises(ValueError, match="unknown extraction mode 'loose'"):
    gsm8k.GSM8KTask(mode="loose")  # type: ignore[arg-type]

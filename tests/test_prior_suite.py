"""The prior-task suite (PIQA, ARC-Easy/-Challenge, MMLU, MMLU-Pro, WinoGrande).

Prompts are compared with strings written out by hand from lm-eval's task YAMLs and es-awd's
``prior_tasks/*/template.py``; parse rules with es-awd's on hand-written (and hostile) replies;
loaders with the files in ../shared/data and AI2's answer keys; log-likelihood metrics with a
float64 NumPy reference over a tiny transformers model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from es_jax.evaluation import suite
from es_jax.evaluation.base import GenerativeTask, LoglikTask
from es_jax.evaluation.data import DataError
from es_jax.evaluation.hellaswag import HellaSwagTask
from es_jax.evaluation.loglik import ChoiceLoglik
from es_jax.evaluation.multiple_choice import (MultipleChoiceExample as Ex, choice_margin,
                                               parse_option_letter, parse_option_number)
from es_jax.evaluation.registry import get_task
from es_jax.evaluation.runner import evaluate_generation, evaluate_loglik
from test_hellaswag import ITEMS as HELLASWAG_ITEMS, tiny_qwen2  # noqa: F401 (a fixture)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# es-awd's system messages (prior_tasks/{piqa,arc_challenge,mmlu_pro}/template.py), copied by hand.
PIQA_SYSTEM = ("You are given a physical commonsense goal and two possible solutions. Choose the "
               "better solution by selecting the corresponding number. Reply with only the "
               "option number: 1 or 2.")
ARC_SYSTEM = ("You are a science question answering expert. Think step by step and finish your "
              'answer with "The answer is (X)" where X is the correct letter choice.')
MMLU_PRO_SYSTEM = ("You are a knowledge expert solving multiple-choice questions. Think step by "
                   'step and finish your answer with "The answer is (X)" where X is the correct '
                   "letter choice.")
THINK = ('Think step by step and then finish your answer with "The answer is (X)" where X is the '
         "correct letter choice.")


def _chatml(system: str, user: str) -> str:
  """What char_tokenizer's ChatML template renders for es-awd's [system, user] messages."""
  return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
          "<|im_start|>assistant\n")


# ---- prompts, by hand ----

def test_piqa_prompts():
  ex = Ex("3", "To keep bread fresh,", ("store it in a bread box.", "store it in the oven. "), 0)
  # lm-eval piqa.yaml: doc_to_text "Question: {{goal}}\nAnswer:", choices [sol1, sol2], " " delim.
  assert suite.PIQATask().loglik_requests(ex) == [
      ("Question: To keep bread fresh,\nAnswer:", " store it in a bread box."),
      ("Question: To keep bread fresh,\nAnswer:", " store it in the oven. "),
  ]
  task = suite.PIQATask(protocol="generative")
  user = ("Goal: To keep bread fresh,\n\nPossible solutions:\n1. store it in a bread box.\n"
          "2. store it in the oven. \n\nWhich solution is more likely to work?")
  assert task.system_message == PIQA_SYSTEM and task.user_message(ex) == user
  from es_jax.models.tokenizer import char_tokenizer
  assert task.build_prompt(ex, char_tokenizer()) == _chatml(PIQA_SYSTEM, user)
  assert task.build_prompt(ex) == PIQA_SYSTEM + "\n\n" + user + "\nAnswer:"


ARC_ITEM = Ex("Mercury_7175875", "An astronomer observes that a planet rotates faster after a "
              "meteorite impact. Which is the most likely effect of this increase in rotation?",
              ("Planetary density will decrease.", "Planetary years will become longer.",
               "Planetary days will become shorter.", "Planetary gravity will become stronger."), 2)


@pytest.mark.parametrize("task_class", [suite.ARCEasyTask, suite.ARCChallengeTask])
def test_arc_prompts(task_class):
  question = ("Question: An astronomer observes that a planet rotates faster after a meteorite "
              "impact. Which is the most likely effect of this increase in rotation?")
  # lm-eval arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, " " delimiter.
  assert task_class().loglik_requests(ARC_ITEM) == [
      (question + "\nAnswer:", " Planetary density will decrease."),
      (question + "\nAnswer:", " Planetary years will become longer."),
      (question + "\nAnswer:", " Planetary days will become shorter."),
      (question + "\nAnswer:", " Planetary gravity will become stronger."),
  ]
  # es-awd arc_challenge/data.py: header + "\n" + question block, zero-shot.
  user = ("The following are multiple choice science questions. " + THINK + "\n\n\n" + question
          + "\nOptions:\nA. Planetary density will decrease.\nB. Planetary years will become "
          "longer.\nC. Planetary days will become shorter.\nD. Planetary gravity will become "
          "stronger.\nAnswer:")
  task = task_class(protocol="generative")
  assert task.system_message == ARC_SYSTEM and task.user_message(ARC_ITEM) == user
  assert task.build_prompt(ARC_ITEM) == ARC_SYSTEM + "\n\n" + user


def test_mmlu_prompts():
  ex = Ex("abstract_algebra/0", "Find the degree for the given field extension Q(sqrt(2), "
          "sqrt(3), sqrt(18)) over Q.\n ", ("0", "4", "2", "6"), 1, subject="abstract_algebra")
  # lm-eval mmlu _default_template_yaml (question.strip(), choices unstripped) after the
  # subject's description; choices A-D with the " " delimiter.
  query = ("The following are multiple choice questions (with answers) about abstract algebra."
           "\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over "
           "Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
  assert suite.MMLUTask().loglik_requests(ex) == [(query, " A"), (query, " B"), (query, " C"),
                                                  (query, " D")]
  # Not in es-awd: its MMLU-Pro prompt, zero-shot, the subject as category, question as given.
  user = ("The following are multiple choice questions (with answers) about abstract algebra. "
          + THINK + "\n\n\nQuestion: Find the degree for the given field extension Q(sqrt(2), "
          "sqrt(3), sqrt(18)) over Q.\n \nOptions:\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
  task = suite.MMLUTask(protocol="generative")
  assert task.system_message == MMLU_PRO_SYSTEM and task.user_message(ex) == user


def test_mmlu_pro_prompts():
  shots = (Ex("0", "What is 1+1?", ("1", "2"), 1, subject="math",
              explanation="A: Let's think step by step. 1+1=2. The answer is (B)."),
           Ex("1", "What is 3+3?", ("6", "7"), 0, subject="math",
              explanation="A: Let's think step by step. The answer is (A)."))
  ex = Ex("9", "What is 2+2?", tuple(str(n) for n in range(3, 13)), 1, subject="math",
          shots=shots)
  # MMLU's template with ten letters (lm-eval's own mmlu_pro is generative CoT).
  query = ("The following are multiple choice questions (with answers) about math.\n\nWhat is "
           "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nE. 7\nF. 8\nG. 9\nH. 10\nI. 11\nJ. 12\nAnswer:")
  assert suite.MMLUProTask().loglik_requests(ex) == [(query, " " + c) for c in "ABCDEFGHIJ"]
  # es-awd mmlu_pro/data.py: header, shots joined by "\n" (each ends "\n"), "\n", question;
  # cot_content shown as stored, so "Answer: A: Let's think...".
  user = ("The following are multiple choice questions (with answers) about math. " + THINK
          + "\n\nQuestion: What is 1+1?\nOptions:\nA. 1\nB. 2\nAnswer: A: Let's think step by "
          "step. 1+1=2. The answer is (B).\n\nQuestion: What is 3+3?\nOptions:\nA. 6\nB. 7\n"
          "Answer: A: Let's think step by step. The answer is (A).\n\nQuestion: What is 2+2?\n"
          "Options:\nA. 3\nB. 4\nC. 5\nD. 6\nE. 7\nF. 8\nG. 9\nH. 10\nI. 11\nJ. 12\nAnswer:")
  task = suite.MMLUProTask(protocol="generative")
  assert task.system_message == MMLU_PRO_SYSTEM and task.user_message(ex) == user


def test_winogrande_prompts_from_both_layouts(tmp_path):
  hub_row = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder "
             "cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"}
  partial_row = {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                                     "Sarah was a much better surgeon than Maria so Maria"],
                 "continuation": "always got the harder cases.", "gold": 0}
  path = tmp_path / "w.jsonl"
  path.write_text(json.dumps(hub_row) + "\n" + json.dumps(partial_row) + "\n")
  hub, partial = suite.WinoGrandeTask().load(str(path))
  # lm-eval preprocess_winogrande.py: contexts sentence[:i] + option, continuation
  # " " + sentence[i+1:].strip(), gold answer "1" -> 0.
  expected = [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder "
               "cases."),
              ("Sarah was a much better surgeon than Maria so Maria", " always got the harder "
               "cases.")]
  for item in (hub, partial):
    assert suite.WinoGrandeTask().loglik_requests(item) == expected
    assert item.label == 0
    assert suite.WinoGrandeTask(protocol="generative").user_message(item) == (
        "Possible sentences:\n1. Sarah was a much better surgeon than Maria so Sarah always got "
        "the harder cases.\n2. Sarah was a much better surgeon than Maria so Maria always got the "
        "harder cases.\n\nWhich sentence makes more sense?")


# ---- generative parse rules (es-awd's reward_function.py) ----

@pytest.mark.parametrize("text, expected", [
    ("1", 0), ("2", 1), (" 2\n", 1), ("Solution 2 is better than 1.", 1), ("(1)", 0),
    ("3 then 2", 1),     # numbers that are not options are skipped, as [12] does
    ("3", None), ("0", None), ("12", None), ("x1", None), ("", None), ("no digits", None),
    ("\u0661", None),    # Arabic-Indic one
    ("\uff12", None),    # full-width two
    ("\u00b2", None),    # superscript two
    ("9" * 100_000 + " 2", 1), ("x" * 200_000, None),
])
def test_option_number_rule(text, expected):
  assert parse_option_number(text, 2) == expected


@pytest.mark.parametrize("text, expected", [
    ("Let me think. The answer is (C).", 2), ("the answer is c", 2), ("ANSWER IS(E)", 4),
    ("The answer is (B), not (A).", 1),
    ("The answer is definitely B", 3),  # es-awd's "ANSWER IS\s*([A-E])" reads the D of DEFINITELY
    ("I'd say b", 3),                   # its fallback finds the D of "I'D" first
    ("Probably b", 1), ("ABCD", None), ("The answer is (F)", None), ("", None),
    ("\uff21", None),                   # full-width A
    ("\u00c9", None),                   # E with an accent
    ("x " * 100_000 + "The answer is (B)", 1), ("A" * 100_000, None),
])
def test_option_letter_rule_a_to_e(text, expected):
  assert parse_option_letter(text, 5) == expected


def test_letter_range_is_the_tasks_not_the_items():
  arc = suite.ARCChallengeTask(protocol="generative")
  # ARC reads A-E: "E" on a four-option item is a wrong answer, not a reason to read on.
  assert arc.parse("The answer is (E), so not A", ARC_ITEM) is None
  assert arc.score("The answer is (E), so not A", ARC_ITEM).metrics["accuracy"] == 0.0
  pro = suite.MMLUProTask(protocol="generative")
  ten = Ex("0", "q", tuple("abcdefghij"), 5, subject="x")
  assert pro.parse("The answer is (F).", ten) == 5
  assert arc.parse("The answer is (F). C", ARC_ITEM) == 2  # F is no ARC letter: fallback finds C
  assert parse_option_letter("The answer is (J)", 4) is None


@pytest.mark.parametrize("text, expected", [
    ("C", 0.0), ("... The answer is (C).", 1.0), ("the answer is (c)  \n", 1.0),
    ("The answer is (C). Done.", 0.0), ("The answer is C.", 0.0),
])
def test_letter_format_reward(text, expected):
  scored = suite.ARCChallengeTask(protocol="generative").score(text, ARC_ITEM)
  assert scored.metrics["format"] == expected
  assert scored.metrics["accuracy"] == 1.0 and scored.prediction == "2"


@pytest.mark.parametrize("text, fmt, acc", [
    ("1", 1.0, 1.0), (" 1 \n", 1.0, 1.0), ("1.", 0.0, 1.0), ("Solution 1", 0.0, 1.0),
    ("2", 1.0, 0.0), ("", 0.0, 0.0), (None, 0.0, 0.0), ("\u0661", 0.0, 0.0),
])
def test_number_score_never_raises(text, fmt, acc):
  ex = Ex("0", "goal", ("a", "b"), 0)
  for task in (suite.PIQATask(protocol="generative"), suite.WinoGrandeTask(protocol="generative")):
    scored = task.score(text, ex if task.name == "piqa" else Ex("0", "_ x.", ("a", "b"), 0))
    assert (scored.metrics["format"], scored.metrics["accuracy"]) == (fmt, acc)
    assert scored.metrics["reward"] == acc


def test_generative_end_to_end():
  task = suite.ARCChallengeTask(protocol="generative")
  replies = {task.build_prompt(ARC_ITEM): "Days get shorter. The answer is (C)."}
  result = evaluate_generation(task, [ARC_ITEM, ARC_ITEM], lambda ps: [replies[p] for p in ps])
  assert result.summary.metrics == {"reward": 1.0, "accuracy": 1.0, "format": 1.0}
  with pytest.raises(ValueError, match="loglik protocol"):
    evaluate_generation(suite.ARCChallengeTask(), [ARC_ITEM], lambda ps: ps)


def test_choice_margin_and_metrics_from_given_logprobs():
  assert choice_margin([-3.0, -1.0, -2.5], 1) == 1.5
  assert choice_margin([-3.0, -1.0, -2.5], 2) == -1.5
  with pytest.raises(ValueError, match="at least 2"):
    choice_margin([-1.0], 0)
  # ARC_ITEM's option lengths: 32, 35, 35, 39 characters. acc picks 0 (-20); per character
  # -20/32 = -0.625, -22/35 = -0.629, -21/35 = -0.6, -30/39 = -0.769 -> 2, the label.
  scored = suite.ARCEasyTask().score_logliks(
      ARC_ITEM, [ChoiceLoglik(lp, 9, 0) for lp in (-20.0, -22.0, -21.0, -30.0)])
  assert scored.metrics == pytest.approx({
      "reward": 1.0, "accuracy": 1.0, "acc": 0.0, "acc_norm": 1.0, "margin": -1.0,
      "margin_norm": -0.6 + 0.625})
  assert scored.prediction == "0" and scored.target == "2"


def test_registry_and_protocols():
  assert suite.PRIOR_SUITE == ("hellaswag", "piqa", "arc_easy", "arc_challenge", "mmlu",
                               "mmlu_pro", "winogrande")
  for name in suite.PRIOR_SUITE:
    task = get_task(name)
    assert task.name == name and task.protocol == "loglik" and isinstance(task, LoglikTask)
    assert isinstance(get_task(name, protocol="generative"), GenerativeTask)
  assert get_task("MMLU-Pro", num_fewshot=0).num_fewshot == 0
  with pytest.raises(ValueError, match="unknown piqa protocol"):
    get_task("piqa", protocol="mc")
  with pytest.raises(ValueError, match="num_fewshot"):
    suite.MMLUProTask(num_fewshot=-1)
  with pytest.raises(ValueError, match="label"):
    Ex("0", "q", ("a", "b"), 2)


# ---- loaders on ../shared/data ----

def _shared(relative: str) -> Path:
  path = DATA / relative
  if not path.exists():
    pytest.skip(f"shared data not found at {path}")
  return path


def _official_arc_keys(path: Path) -> dict[str, int]:
  """AI2's keys: letters A-E or numbers 1-5, either way the option's position."""
  keys = {}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    key = row["answerKey"]
    keys[row["id"]] = int(key) - 1 if key.isdigit() else "ABCDE".index(key)
  return keys


def test_piqa_loads_authors_files_with_their_labels():
  items = suite.PIQATask().load(str(_shared("piqa/valid.jsonl")))
  assert len(items) == 1838
  assert items[0].question == "How do I ready a guinea pig cage for it's new occupants?"
  assert [item.label for item in items[:3]] == [0, 1, 1]  # valid-labels.lst's first lines
  assert items[1].options == ("replace drawer with bobby pin ",
                              "finish, woodgrain with  bobby pin ")  # kept as written
  labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
  assert sum(item.label for item in items) == labels.count("1")


@pytest.mark.parametrize("task_class, relative, count, first", [
    (suite.ARCChallengeTask, "arc_challenge/test.parquet", 1172, ("Mercury_7175875", 2)),
    (suite.ARCEasyTask, "arc_easy/test.jsonl", 2376, ("Mercury_417466", 0)),
])
def test_arc_loads_and_agrees_with_ai2_answer_keys(task_class, relative, count, first):
  items = task_class().load(str(_shared(relative)))
  assert len(items) == count and (items[0].id, items[0].label) == first
  keys = _official_arc_keys(_shared(str(Path(relative).parent / "answer-key.jsonl")))
  assert {item.id: item.label for item in items} == keys
  assert {len(item.options) for item in items} == {3, 4, 5}
  if task_class is suite.ARCChallengeTask:
    assert items[0] == ARC_ITEM


def test_mmlu_loads_every_subject_from_a_directory():
  items = suite.MMLUTask().load(str(_shared("mmlu/test")))
  assert len(items) == 14042 and len({item.subject for item in items}) == 57
  first = items[0]
  assert (first.id, first.subject, first.options, first.label) == (
      "abstract_algebra/0", "abstract_algebra", ("0", "4", "2", "6"), 1)
  # A choice that is the text "None" stays text (pandas would read it as missing).
  assert any("None" in item.options for item in items if item.subject == "college_mathematics")
  one = suite.MMLUTask().load(str(DATA / "mmlu/test/anatomy_test.csv"), limit=2)
  assert [item.id for item in one] == ["anatomy/0", "anatomy/1"]


def test_mmlu_pro_loads_with_es_awd_shots():
  test_file, val_file = _shared("mmlu_pro/test.parquet"), _shared("mmlu_pro/validation.parquet")
  items = suite.MMLUProTask().load(str(test_file))
  assert len(items) == 12032 and len({item.subject for item in items}) == 14
  first = items[0]
  assert (first.id, first.subject, first.label, len(first.options)) == ("70", "business", 8, 9)
  assert first.shots == ()
  task = suite.MMLUProTask(protocol="generative")
  (item,) = task.load(str(test_file), limit=1, fewshot_source=str(val_file))
  assert len(item.shots) == 5 and {shot.subject for shot in item.shots} == {"business"}
  assert all(shot.explanation.startswith("A: Let's think step by step.") for shot in item.shots)
  prompt = task.build_prompt(item)
  assert prompt.count("\nAnswer: A: Let's think step by step.") == 5
  assert prompt.endswith("I. Unsafe practices, Distress, Fear, Serious\nAnswer:")
  with pytest.raises(DataError, match="pass fewshot_source"):
    task.load(str(test_file), limit=1)
  assert suite.MMLUProTask(protocol="generative", num_fewshot=0).load(
      str(test_file), limit=1)[0].shots == ()


def test_winogrande_loads_and_agrees_with_official_labels():
  items = suite.WinoGrandeTask().load(str(_shared("winogrande/dev.jsonl")))
  assert len(items) == 1267 and items[0].label == 1
  official = (DATA / "winogrande" / "dev-labels.lst").read_text().split()
  assert [item.label for item in items] == [int(label) - 1 for label in official]


def test_limit_and_seed():
  path = str(_shared("arc_easy/test.jsonl"))
  task = suite.ARCEasyTask()
  a = task.load(path, limit=7, seed=3)
  assert a == task.load(path, limit=7, seed=3) and len({x.id for x in a}) == 7
  assert a != task.load(path, limit=7, seed=4)
  assert task.load(path, limit=4) == task.load(path)[:4]


# ---- corrupt rows ----

def _jsonl(tmp_path: Path, name: str, *rows) -> str:
  path = tmp_path / name
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def test_piqa_bad_rows(tmp_path):
  good = {"goal": "g", "sol1": "a", "sol2": "b"}
  path = _jsonl(tmp_path, "valid.jsonl", good, good)
  with pytest.raises(DataError, match=r"no labels file '.*valid-labels\.lst'"):
    suite.PIQATask().load(path)
  (tmp_path / "valid-labels.lst").write_text("0\n2\n")
  with pytest.raises(DataError, match=r"piqa: line 2 of '.*valid-labels\.lst' is '2'"):
    suite.PIQATask().load(path)
  (tmp_path / "valid-labels.lst").write_text("0\n")
  with pytest.raises(DataError, match="has 1 labels but .* has 2 rows"):
    suite.PIQATask().load(path)
  (tmp_path / "valid-labels.lst").write_text("0\n1\n\n")
  assert [x.label for x in suite.PIQATask().load(path)] == [0, 1]
  bad = _jsonl(tmp_path, "hub.jsonl", {**good, "label": 0}, {"goal": "g", "sol1": "a", "label": 1})
  with pytest.raises(DataError, match=r"piqa: row 1 of .*missing field 'sol2'"):
    suite.PIQATask().load(bad)


def test_arc_bad_rows(tmp_path):
  hub = {"id": "q", "question": "Q?",
         "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "B"}
  es_awd = {"question_id": "q", "question": "Q?", "option_labels": "['A', 'B']",
            "options": "['yes', 'no']", "answer": "B"}
  items = suite.ARCChallengeTask().load(_jsonl(tmp_path, "ok.jsonl", hub, es_awd))
  assert [(x.options, x.label) for x in items] == [(("a", "b", "c"), 1), (("yes", "no"), 1)]
  for bad, pattern in [
      ({**hub, "answerKey": "Z"}, r"row 1 .*'answerKey' is 'Z'"),
      ({**hub, "choices": {"text": list("abcdef"), "label": list("ABCDEF")}},
       r"row 1 .*'choices.text' has 6 entries, expected 2-5"),
      ({**es_awd, "options": "['yes', 'no'"}, r"row 1 .*'options' is text that is not a list"),
      # literal_eval, never eval: a call is not a literal.
      ({**es_awd, "options": "__import__('os').getcwd()"}, r"row 1 .*'options' is text"),
      ({**es_awd, "options": "[1, 2]"}, r"row 1 .*'options' should be a list of strings"),
      ({"question": "Q?"}, r"arc_challenge: row 1 .* none of the ARC layouts"),
  ]:
    with pytest.raises(DataError, match=pattern):
      suite.ARCChallengeTask().load(_jsonl(tmp_path, "bad.jsonl", hub, bad))


def test_mmlu_bad_rows(tmp_path):
  header = "question,choice0,choice1,choice2,choice3,answer\n"
  csv_dir = tmp_path / "test"
  csv_dir.mkdir()
  with pytest.raises(DataError, match="has no .csv files"):
    suite.MMLUTask().load(str(csv_dir))
  path = csv_dir / "anatomy_test.csv"
  for body, pattern in [
      (header + 'Q,a,b,c,d,0\n"Q, two",a,b,c,d,4\n', r"row 1 of '.*anatomy_test\.csv'.*'answer' "
       r"is 4, expected 0-3"),
      (header + "Q,a,b,c,d,0\nQ,a,b,c,1\n", r"row 1 of '.*anatomy_test\.csv' has 5 columns"),
      ("Q,a,b,c,d,0\n", "should start with the header"),
  ]:
    path.write_text(body)
    with pytest.raises(DataError, match=pattern):
      suite.MMLUTask().load(str(csv_dir))
  hub = {"question": "Q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3}
  with pytest.raises(DataError, match=r"row 1 .*'choices' has 3 entries, expected 4"):
    suite.MMLUTask().load(_jsonl(tmp_path, "m.jsonl", hub, {**hub, "choices": ["a", "b", "c"]}))


def test_mmlu_pro_bad_rows(tmp_path):
  good = {"question_id": 1, "question": "Q", "options": ["a", "b", "c"], "answer": "C",
          "answer_index": 2, "category": "law", "cot_content": ""}
  assert suite.MMLUProTask().load(_jsonl(tmp_path, "ok.jsonl", good))[0].label == 2
  for bad, pattern in [
      ({**good, "answer": "B"}, r"row 1 .*'answer' is 'B' but 'answer_index' 2 is 'C'"),
      ({**good, "options": list("abcdefghijk")},
       r"row 1 .*'options' has 11 entries, expected 2-10"),
      ({**good, "answer_index": 3}, r"row 1 .*'answer_index' is 3, expected 0-2"),
  ]:
    with pytest.raises(DataError, match=pattern):
      suite.MMLUProTask().load(_jsonl(tmp_path, "bad.jsonl", good, bad))


def test_winogrande_bad_rows(tmp_path):
  hub = {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}
  partial = {"context_options": ["A x", "A y"], "continuation": "b.", "gold": 1}
  for bad, pattern in [
      ({**hub, "sentence": "no blank"}, r"row 1 .*'sentence' has no blank"),
      ({**hub, "answer": "3"}, r"row 1 .*'answer' is 3, expected 1-2"),
      ({**hub, "answer": ""}, r"row 1 .*'answer' is '', expected 1-2"),
      ({**partial, "context_options": ["a", "b", "c"]}, r"row 1 .*'context_options' has 3 "
       r"entries, expected 2$"),
      ({**partial, "gold": True}, r"row 1 .*'gold' is a bool"),
  ]:
    with pytest.raises(DataError, match=pattern):
      suite.WinoGrandeTask().load(_jsonl(tmp_path, "bad.jsonl", hub, bad))


# ---- log-likelihood metrics on a tiny model against a float64 reference ----

def _reference_logprob(torch, model, tokenizer, context: str, continuation: str) -> float:
  """One unbatched forward; log-softmax and the sum in float64 NumPy."""
  context_ids = tokenizer(context).input_ids
  continuation_ids = tokenizer(context + continuation).input_ids[len(context_ids):]
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([context_ids + continuation_ids])).logits[0]
  logits = logits.numpy().astype(np.float64)
  logits -= logits.max(axis=-1, keepdims=True)
  logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
  return float(sum(logprobs[len(context_ids) + j - 1, token]
                   for j, token in enumerate(continuation_ids)))


# (task, item, its requests written out by hand, the headline metric)
LOGLIK_CASES = [
    (suite.PIQATask(), Ex("0", "Open a jar.", ("Twist the lid.", "Freeze the jar overnight."), 0),
     [("Question: Open a jar.\nAnswer:", " Twist the lid."),
      ("Question: Open a jar.\nAnswer:", " Freeze the jar overnight.")], "acc_norm"),
    (suite.ARCEasyTask(), Ex("e", "Which is a gas?", ("steam", "ice", "rock"), 0),
     [("Question: Which is a gas?\nAnswer:", " steam"),
      ("Question: Which is a gas?\nAnswer:", " ice"),
      ("Question: Which is a gas?\nAnswer:", " rock")], "acc_norm"),
    (suite.ARCChallengeTask(), Ex("c", "Heat flows from?", ("hot to cold", "cold to hot",
                                                              "nowhere", "up", "down"), 0),
     [("Question: Heat flows from?\nAnswer:", " " + o)
      for o in ("hot to cold", "cold to hot", "nowhere", "up", "down")], "acc_norm"),
    (suite.MMLUTask(), Ex("m", "2+2?", ("3", "4", "5", "22"), 1, subject="elementary_mathematics"),
     [("The following are multiple choice questions (with answers) about elementary mathematics."
       "\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:", " " + c) for c in "ABCD"], "acc"),
    (suite.MMLUProTask(), Ex("p", "Pick J.", tuple("0123456789"), 9, subject="other"),
     [("The following are multiple choice questions (with answers) about other.\n\nPick J.\n"
       + "\n".join(f"{c}. {d}" for c, d in zip("ABCDEFGHIJ", "0123456789")) + "\nAnswer:",
       " " + c) for c in "ABCDEFGHIJ"], "acc"),
    (suite.WinoGrandeTask(), Ex("w", "The cup fell off the table because _ was tilted.",
                                ("the cup", "the table"), 1),
     [("The cup fell off the table because the cup", " was tilted."),
      ("The cup fell off the table because the table", " was tilted.")], "acc"),
    (suite.WinoGrandeTask(), Ex("w2", "_ so it broke.", ("The vase fell", "The rock fell"), 0),
     [("The vase fell", " so it broke."), ("The rock fell", " so it broke.")], "acc"),
]


@pytest.fixture
def one_torch_thread(tiny_qwen2):
  # A model this small gains nothing from threads; on a busy 2-core machine they only contend
  # (about 10x slower).
  torch = tiny_qwen2[0]
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def test_loglik_metrics_match_a_float64_reference(tiny_qwen2, one_torch_thread):
  torch, model, tokenizer = tiny_qwen2

  def logits_fn(input_ids, attention_mask):
    with torch.no_grad():
      return model(input_ids=torch.from_numpy(input_ids).long(),
                   attention_mask=torch.from_numpy(attention_mask).long()).logits.numpy()

  seen_acc = set()
  for task, item, requests, headline in LOGLIK_CASES:
    assert task.loglik_requests(item) == requests
    (record,) = evaluate_loglik(task, [item], logits_fn, tokenizer, batch_size=4).records
    lp = np.array([_reference_logprob(torch, model, tokenizer, c, x) for c, x in requests])
    gold, others = lp[item.label], np.delete(lp, item.label)
    expected = {"acc": float(np.argmax(lp) == item.label), "margin": gold - others.max()}
    if task.name != "winogrande":  # partial evaluation: acc only, margin unnormalised
      per_char = lp / np.array([len(x) - 1 for _, x in requests])  # without the " " delimiter
      expected["acc_norm"] = float(np.argmax(per_char) == item.label)
      expected["margin_norm"] = per_char[item.label] - np.delete(per_char, item.label).max()
    expected["accuracy"] = expected["reward"] = expected[headline]
    assert record.metrics.keys() == expected.keys(), task.name
    assert record.metrics == pytest.approx(expected, abs=1e-4), task.name
    assert record.prediction == str(int(np.argmax(lp)))
    assert (record.metrics["margin"] > 0) == (record.metrics["acc"] == 1.0)
    assert [c[0] for c in record.details["choices"]] == pytest.approx(lp.tolist(), abs=1e-4)
    seen_acc.add(record.metrics["acc"])
  assert seen_acc == {0.0, 1.0}  # the cases exercise both outcomes

  # HellaSwag gains margins; its other metrics keep their values (tests/test_hellaswag.py).
  for record, item in zip(evaluate_loglik(HellaSwagTask(), HELLASWAG_ITEMS, logits_fn, tokenizer,
                                          batch_size=4).records, HELLASWAG_ITEMS):
    lp = np.array([_reference_logprob(torch, model, tokenizer, c, x)
                   for c, x in HellaSwagTask().loglik_requests(item)])
    per_char = lp / np.array([len(e) for e in item.endings])  # no [step]/[title] markers here
    assert record.metrics["margin"] == pytest.approx(
        lp[item.label] - np.delete(lp, item.label).max(), abs=1e-4)
    assert record.metrics["margin_norm"] == pytest.approx(
        per_char[item.label] - np.delete(per_char, item.label).max(), abs=1e-4)
    assert record.metrics["acc_norm"] == float(np.argmax(per_char) == item.label)

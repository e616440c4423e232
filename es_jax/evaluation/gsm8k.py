"""GSM8K: grade-school math word problems with a numeric final answer.

Gold answers follow ``"####"`` in the reference solution, commas removed.
Completions are read in one of several ways (all linear-time, none raise):

* ``strict``: lm-eval's ``"#### (-?[0-9.,]+)"``, first match;
* ``flexible``: the last number in the text (lm-eval's flexible-extract,
  keeping only matches that contain a digit, so a trailing ``"..."`` does not
  hide the number before it);
* ``boxed``: the last ``\\boxed{...}``; ``tag``: the last ``<answer>...</answer>``;
* ``auto`` (the task default): strict, else boxed, else tag, else flexible.

Answers compare as numbers (``"18.00"`` equals ``"18"``, ``"$1,000"`` equals
``"1000"``) within a small tolerance.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from es_jax.evaluation import data
from es_jax.evaluation.base import Scored, chat_prompt, tag_blocks

ExtractMode = Literal["auto", "strict", "flexible", "boxed", "tag"]
EXTRACT_MODES: tuple[str, ...] = ("auto", "strict", "flexible", "boxed", "tag")

_STRICT = re.compile(r"#### (-?[0-9.,]+)")
# Must start with a digit so the match never backtracks (linear on any input).
_NUMBER = re.compile(r"-?\$?[0-9][0-9.,]*")
_MAX_NUMBER_CHARS = 64  # longer "numbers" are noise; also keeps int parsing cheap
_BRACE = re.compile(r"[{}]")
_LATEX_NOISE = re.compile(r"\\[$!,;]|\\text\{[^{}]*\}|[$ ]")

DEFAULT_HUB_NAME = "openai/gsm8k"
PLAIN_TEMPLATE = "Question: {user}\nAnswer:"  # lm-eval's zero-shot gsm8k format
CHAT_INSTRUCTION = ("Solve the problem step by step. On the last line, write the final "
                    "answer as '#### <number>'.")


@dataclasses.dataclass(frozen=True)
class GSM8KExample:
  """One GSM8K problem.

  Attributes:
    question: the word problem.
    solution: the reference solution text, ending in ``"#### <answer>"``.
    gold: the final answer, commas removed, e.g. ``"70000"``.
  """
  question: str
  solution: str
  gold: str


def gold_answer(solution: str) -> str:
  """The gold answer: the text after the last ``"####"``, stripped, commas removed.

  Raises:
    ValueError: if there is no ``"####"``.

  Example:
    >>> gold_answer("5 + 5 = 10 ...\\n#### 1,000")
    '1000'
  """
  if "####" not in solution:
    raise ValueError(f"no '####' final answer in {solution[-80:]!r}")
  return solution.split("####")[-1].strip().replace(",", "")


def parse_number(text: str | None) -> Fraction | None:
  """Reads a number such as ``"1,234.50"``, ``"$18"``, ``"18."`` or ``"-3"``; None if not one.

  Example:
    >>> parse_number("$1,234.50")
    Fraction(2469, 2)
  """
  if text is None:
    return None
  cleaned = _LATEX_NOISE.sub("", text.strip()).replace(",", "").rstrip(".")
  if not cleaned or len(cleaned) > _MAX_NUMBER_CHARS:
    return None
  if not all(ch in "0123456789.-" for ch in cleaned):  # Fraction would accept '1e5', ' 1/2'
    return None
  try:
    return Fraction(cleaned)
  except (ValueError, ZeroDivisionError):
    return None


def extract_strict(text: str) -> str | None:
  """The first ``"#### <number>"`` answer, as lm-eval's strict-match reads it.

  Example:
    >>> extract_strict("so 3 eggs\\n#### 3")
    '3'
  """
  match = _STRICT.search(text)
  return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
  """The last number in the text (with any ``$``, commas or trailing period it carries).

  Example:
    >>> extract_flexible("First 12 apples, then 15.")
    '15.'
  """
  last = None
  for last in _NUMBER.finditer(text):
    pass
  return last.group(0) if last else None


def extract_boxed(text: str) -> str | None:
  """The content of the last ``\\boxed{...}`` (nested braces allowed), or None.

  Example:
    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{42}")
    '42'
  """
  start = text.rfind("\\boxed{")
  if start == -1:
    return None
  depth = 0
  begin = start + len("\\boxed{")
  for brace in _BRACE.finditer(text, begin):
    if brace.group(0) == "{":
      depth += 1
    elif depth == 0:
      return text[begin:brace.start()]
    else:
      depth -= 1
  return None


def extract_tagged(text: str) -> str | None:
  """The content of the last ``<answer>...</answer>`` block, or None.

  Example:
    >>> extract_tagged("<answer> 7 </answer>")
    ' 7 '
  """
  blocks = tag_blocks(text, "<answer>", "</answer>")
  return blocks[-1] if blocks else None


def _number_in(content: str | None) -> str | None:
  """A boxed/tagged content if it is a number as a whole, else the last number inside it."""
  if content is None:
    return None
  if parse_number(content) is not None:
    return content.strip()
  return extract_flexible(content)


def extract_answer(text: str, mode: ExtractMode = "auto") -> str | None:
  """The answer string a completion gives under one of the extraction modes.

  Args:
    text: the completion.
    mode: ``"strict"``, ``"flexible"``, ``"boxed"``, ``"tag"`` or ``"auto"``
      (strict, else boxed, else tag, else flexible).

  Returns:
    The raw answer text (see :func:`parse_number` to read it), or None.

  Example:
    >>> extract_answer(r"It is \\boxed{12}. Check: 12 * 2 = 24")
    '12'
    >>> extract_answer(r"It is \\boxed{12}. Check: 12 * 2 = 24", mode="flexible")
    '24'
  """
  if not isinstance(text, str):
    return None
  if mode == "strict":
    return extract_strict(text)
  if mode == "flexible":
    return extract_flexible(text)
  if mode == "boxed":
    return _number_in(extract_boxed(text))
  if mode == "tag":
    return _number_in(extract_tagged(text))
  if mode == "auto":
    for found in (extract_strict(text), _number_in(extract_boxed(text)),
                  _number_in(extract_tagged(text))):
      if parse_number(found) is not None:
        return found
    return extract_flexible(text)
  raise ValueError(f"unknown extraction mode {mode!r}; expected one of {EXTRACT_MODES}")


def numbers_match(predicted: Fraction | None, gold: Fraction | None, *,
                  rel_tol: float = 1e-9, abs_tol: float = 1e-6) -> bool:
  """Whether two parsed numbers agree within the tolerance (False if either is missing).

  Example:
    >>> numbers_match(parse_number("18.00"), parse_number("18"))
    True
  """
  if predicted is None or gold is None:
    return False
  return abs(predicted - gold) <= max(Fraction(abs_tol), Fraction(rel_tol) * abs(gold))


def gsm8k_reward(completion: str, gold: str, mode: ExtractMode = "auto") -> float:
  """1.0 if the answer read from ``completion`` equals ``gold`` numerically, else 0.0.

  Example:
    >>> gsm8k_reward("She earns 9 * 2 = 18 dollars.\\n#### 18", "18")
    1.0
    >>> gsm8k_reward("#### 17", "18")
    0.0
  """
  return 1.0 if numbers_match(parse_number(extract_answer(completion, mode)),
                              parse_number(gold)) else 0.0


def _example_from_row(row: dict[str, Any], index: int, source: str | Path) -> GSM8KExample:
  question = data.require_field(row, "question", str, task="gsm8k", row_index=index,
                                source=source)
  solution = data.require_field(row, "answer", str, task="gsm8k", row_index=index,
                                source=source)
  if "####" not in solution:
    raise data.DataError(f"gsm8k: row {index} of '{source}': field 'answer' has no "
                         f"'#### <number>' final answer: {solution[-80:]!r}")
  gold = gold_answer(solution)
  if parse_number(gold) is None:
    raise data.DataError(f"gsm8k: row {index} of '{source}': the final answer {gold!r} in "
                         "field 'answer' is not a number")
  return GSM8KExample(question=question, solution=solution, gold=gold)


@dataclasses.dataclass(frozen=True)
class GSM8KTask:
  """GSM8K loading, prompting and scoring.

  Attributes:
    mode: extraction mode for ``reward``/``accuracy`` (see :func:`extract_answer`).
    instruction: appended to the question in chat prompts.
    system: optional system message of chat prompts.

  Example:
    >>> task = GSM8KTask()
    >>> ex = GSM8KExample("1+1?", "1+1=2\\n#### 2", "2")
    >>> task.score("#### 2", ex).metrics["accuracy"]
    1.0
  """
  mode: ExtractMode = "auto"
  instruction: str = CHAT_INSTRUCTION
  system: str | None = None
  name: str = "gsm8k"

  def __post_init__(self):
    if self.mode not in EXTRACT_MODES:
      raise ValueError(f"unknown extraction mode {self.mode!r}; expected one of {EXTRACT_MODES}")

  def load(self, source: str | Path | None = None, *, split: str = "test",
           limit: int | None = None, seed: int | None = None) -> list[GSM8KExample]:
    """Loads problems from the hub (default ``openai/gsm8k``, config ``main``) or a local file.

    Args:
      source: hub name, or a local ``.jsonl`` with ``question`` and ``answer``.
      split: hub split.
      limit: keep this many rows (the first ones, or a seeded subset).
      seed: seed of the random subset; None takes the first ``limit`` rows.
    """
    source = DEFAULT_HUB_NAME if source is None else source
    rows = data.load_rows(source, task="gsm8k", split=split, hub_config="main")
    return [_example_from_row(rows[i], i, source)
            for i in data.select_indices(len(rows), limit, seed)]

  def build_prompt(self, example: GSM8KExample, tokenizer: Any = None) -> str:
    """``"Question: ...\\nAnswer:"`` plain, or a chat turn asking for ``"#### <number>"``."""
    if tokenizer is None:
      return chat_prompt(example.question, None, plain_template=PLAIN_TEMPLATE)
    return chat_prompt(f"{example.question}\n\n{self.instruction}", tokenizer, system=self.system)

  def score(self, completion: str, example: GSM8KExample) -> Scored:
    """Accuracy under ``mode`` plus strict and flexible matches."""
    gold = parse_number(example.gold)
    prediction = extract_answer(completion, self.mode)
    correct = float(numbers_match(parse_number(prediction), gold))
    return Scored(
        prediction=prediction,
        target=example.gold,
        metrics={
            "reward": correct,
            "accuracy": correct,
            "strict_match": float(numbers_match(
                parse_number(extract_answer(completion, "strict")), gold)),
            "flexible_match": float(numbers_match(
                parse_number(extract_answer(completion, "flexible")), gold)),
        })

"""HellaSwag: pick the most plausible ending, under two protocols.

* ``"loglik"`` (lm-eval): query = ``preprocess(activity_label + ": " + ctx)``,
  each ending scored as the continuation ``" " + preprocess(ending)``;
  ``acc`` = argmax of summed log-prob, ``acc_norm`` = argmax of log-prob divided
  by the ending's length in characters (lm-eval divides by ``len(choice)``,
  without the leading space).
* ``"generative"`` (the ES-forgetting papers): the chat model sees the context
  and four numbered options and answers with a number; decoding is greedy and
  the first ASCII digit of the output is the answer.

The log-likelihood protocol also reports ``margin`` and ``margin_norm``, the
continuous counterparts of ``acc`` and ``acc_norm``
(:func:`~es_jax.evaluation.multiple_choice.choice_margin`).

When a row has ``ctx_a``/``ctx_b`` (the hub version), the context is
``ctx_a + " " + ctx_b.capitalize()`` as in lm-eval; otherwise ``ctx``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from es_jax.evaluation import data
from es_jax.evaluation.base import Scored, chat_prompt
from es_jax.evaluation.loglik import ChoiceLoglik
from es_jax.evaluation.multiple_choice import choice_margin

HellaSwagProtocol = Literal["loglik", "generative"]
PROTOCOLS: tuple[str, ...] = ("loglik", "generative")
NUM_ENDINGS = 4
DEFAULT_HUB_NAME = "Rowan/hellaswag"
GENERATIVE_INSTRUCTION = (
    "Choose the most plausible continuation of the text below.\n\n{query}...\n\n{options}\n\n"
    "Answer with the number of the correct option (1, 2, 3 or 4).")
PLAIN_TEMPLATE = "{user}\nAnswer:"
_BRACKETED = re.compile(r"\[.*?\]")


@dataclasses.dataclass(frozen=True)
class HellaSwagExample:
  """One HellaSwag item (raw text; :func:`query` and :func:`choices` preprocess it).

  Attributes:
    ind: the item's ``ind`` in the source, or its row number when absent.
    activity_label: e.g. ``"Roof shingle removal"``.
    context: the context to complete.
    endings: the four candidate endings.
    label: index of the correct ending (0-3).
  """
  ind: int
  activity_label: str
  context: str
  endings: tuple[str, ...]
  label: int


def preprocess(text: str) -> str:
  """lm-eval's HellaSwag text cleaning.

  Strips, turns ``" [title]"`` into ``". "``, drops ``[...]`` markers, then
  replaces double spaces once (a single pass, as lm-eval does).

  Example:
    >>> preprocess("How to cook [title] Boil water. [step] Add salt.")
    'How to cook. Boil water. Add salt.'
  """
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = _BRACKETED.sub("", text)
  return text.replace("  ", " ")


def query(example: HellaSwagExample) -> str:
  """The lm-eval query, ``preprocess(activity_label + ": " + context)``.

  Example:
    >>> ex = HellaSwagExample(0, "Roof shingle removal", "A man is on a roof. he", ("a",) * 4, 0)
    >>> query(ex)
    'Roof shingle removal: A man is on a roof. he'
  """
  return preprocess(example.activity_label + ": " + example.context)


def choices(example: HellaSwagExample) -> list[str]:
  """The preprocessed endings (what ``acc_norm`` measures the length of).

  Example:
    >>> choices(HellaSwagExample(0, "a", "b", ("[step] Go.", "x", "y", "z"), 0))
    [' Go.', 'x', 'y', 'z']
  """
  return [preprocess(ending) for ending in example.endings]


def loglik_requests(example: HellaSwagExample) -> list[tuple[str, str]]:
  """(query, ``" " + choice``) for each ending, the lm-eval requests."""
  q = query(example)
  return [(q, " " + choice) for choice in choices(example)]


def loglik_predictions(logprobs: Sequence[float], choice_lengths: Sequence[int]) -> tuple[int, int]:
  """(argmax of log-probs, argmax of log-prob per character); ties go to the first.

  Example:
    >>> loglik_predictions([-10.0, -12.0], [5, 10])
    (0, 1)
  """
  if len(logprobs) != len(choice_lengths) or not len(logprobs):
    raise ValueError(f"need one length per log-prob, got {len(logprobs)} log-probs and "
                     f"{len(choice_lengths)} lengths")
  lls = np.asarray(logprobs, np.float64)
  lengths = np.asarray(choice_lengths, np.float64)
  return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def generative_prompt(example: HellaSwagExample, tokenizer: Any = None) -> str:
  """The numbered-choice prompt (chat form when a tokenizer is given).

  Example:
    >>> ex = HellaSwagExample(0, "Cooking", "He cracks an egg", ("a", "b", "c", "d"), 0)
    >>> [line for line in generative_prompt(ex).splitlines() if line[:2] in ("1.", "4.")]
    ['1. a', '4. d']
  """
  options = "\n".join(f"{i + 1}. {choice}" for i, choice in enumerate(choices(example)))
  user = GENERATIVE_INSTRUCTION.format(query=query(example), options=options)
  return chat_prompt(user, tokenizer, plain_template=PLAIN_TEMPLATE)


def parse_choice(text: str) -> int | None:
  """The option picked by a generated answer: first ASCII digit, 1-based, as a 0-based index.

  Returns None when there is no digit or the first digit is not an option
  number (e.g. ``"0"`` or ``"7"``).

  Example:
    >>> parse_choice("The answer is 3, not 2."), parse_choice("Option 7"), parse_choice("none")
    (2, None, None)
  """
  if not isinstance(text, str):
    return None
  for ch in text:
    if "0" <= ch <= "9":
      value = int(ch)
      return value - 1 if 1 <= value <= NUM_ENDINGS else None
  return None


def _context_of(row: dict[str, Any], index: int, source: str | Path) -> str:
  if isinstance(row.get("ctx_a"), str) and isinstance(row.get("ctx_b"), str):
    return row["ctx_a"] + " " + row["ctx_b"].capitalize()
  return data.require_field(row, "ctx", str, task="hellaswag", row_index=index, source=source)


def _example_from_row(row: dict[str, Any], index: int, source: str | Path) -> HellaSwagExample:
  common = dict(task="hellaswag", row_index=index, source=source)
  activity_label = data.require_field(row, "activity_label", str, **common)
  context = _context_of(row, index, source)
  endings = data.check_str_list(data.require_field(row, "endings", (list, tuple), **common),
                                "endings", length=NUM_ENDINGS, **common)
  label = data.require_field(row, "label", (int, str), **common)
  if isinstance(label, str):  # the hub version stores labels as strings
    if not label.strip().isascii() or not label.strip().isdigit():
      raise data.DataError(f"hellaswag: row {index} of '{source}': field 'label' is {label!r}, "
                           f"expected 0-{NUM_ENDINGS - 1}")
    label = int(label)
  if not 0 <= label < NUM_ENDINGS:
    raise data.DataError(f"hellaswag: row {index} of '{source}': field 'label' is {label}, "
                         f"expected 0-{NUM_ENDINGS - 1}")
  ind = row.get("ind")
  ind = ind if isinstance(ind, int) and not isinstance(ind, bool) else index
  return HellaSwagExample(ind, activity_label, context, endings, label)


@dataclasses.dataclass(frozen=True)
class HellaSwagTask:
  """HellaSwag under the ``"loglik"`` (lm-eval) or ``"generative"`` (numbered choice) protocol.

  Example:
    >>> task = HellaSwagTask(protocol="generative")
    >>> ex = HellaSwagExample(0, "Cooking", "He cracks an egg", ("a", "b", "c", "d"), 2)
    >>> task.score("3", ex).metrics["accuracy"]
    1.0
  """
  protocol: HellaSwagProtocol = "loglik"
  name: str = "hellaswag"
  # The loglik metric that ``accuracy`` is, as for the suite's tasks (MultipleChoiceTask).
  headline: ClassVar[str] = "acc_norm"

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"unknown HellaSwag protocol {self.protocol!r}; expected one of "
                       f"{PROTOCOLS}")

  def load(self, source: str | Path | None = None, *, split: str = "validation",
           limit: int | None = None, seed: int | None = None) -> list[HellaSwagExample]:
    """Loads items from the hub (default ``Rowan/hellaswag``) or a local ``.jsonl(.gz)``.

    Args:
      source: hub name or local file with ``activity_label``, ``ctx`` (or
        ``ctx_a`` and ``ctx_b``), ``endings`` (4) and ``label``.
      split: hub split.
      limit: keep this many items (the first ones, or a seeded subset).
      seed: seed of the random subset; None takes the first ``limit`` items.
    """
    source = DEFAULT_HUB_NAME if source is None else source
    rows = data.load_rows(source, task="hellaswag", split=split)
    return [_example_from_row(rows[i], i, source)
            for i in data.select_indices(len(rows), limit, seed)]

  # Generative protocol.
  def build_prompt(self, example: HellaSwagExample, tokenizer: Any = None) -> str:
    """The numbered-choice prompt."""
    return generative_prompt(example, tokenizer)

  def score(self, completion: str, example: HellaSwagExample) -> Scored:
    """Accuracy of the first digit in a generated answer."""
    picked = parse_choice(completion)
    correct = float(picked == example.label)
    return Scored(prediction=None if picked is None else str(picked), target=str(example.label),
                  metrics={"reward": correct, "accuracy": correct})

  # Log-likelihood protocol.
  def loglik_requests(self, example: HellaSwagExample) -> list[tuple[str, str]]:
    """The four (query, " " + ending) requests."""
    return loglik_requests(example)

  def score_logliks(self, example: HellaSwagExample,
                    logliks: Sequence[ChoiceLoglik]) -> Scored:
    """``acc`` and ``acc_norm`` (per-character normalised by the ending's length), and
    their margins: the gold ending's score minus the best other's."""
    lengths = [max(len(choice), 1) for choice in choices(example)]
    lls = [ll.sum_logprob for ll in logliks]
    pred, pred_norm = loglik_predictions(lls, lengths)
    acc = float(pred == example.label)
    acc_norm = float(pred_norm == example.label)
    per_char = np.asarray(lls, np.float64) / np.asarray(lengths, np.float64)
    return Scored(prediction=str(pred), target=str(example.label),
                  metrics={"reward": acc_norm, "accuracy": acc_norm, "acc": acc,
                           "acc_norm": acc_norm, "margin": choice_margin(lls, example.label),
                           "margin_norm": choice_margin(per_char, example.label)})

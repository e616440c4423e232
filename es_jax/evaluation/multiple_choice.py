"""Multiple-choice tasks: the shared item record, log-likelihood scoring with margins, es-awd's
answer parsers, and the base class of the prior-task suite (:mod:`es_jax.evaluation.suite`).

Every task has two protocols, as :mod:`es_jax.evaluation.hellaswag` does:

* ``"loglik"`` (lm-eval): each option becomes a (context, continuation) request;
  ``acc`` is the argmax of the summed log-probs, ``acc_norm`` the argmax of the
  log-probs divided by each choice's length in characters (lm-eval's
  ``len(choice)``, without the target delimiter). ``margin`` and
  ``margin_norm`` are their continuous counterparts (:func:`choice_margin`):
  the gold choice's score minus the best other choice's, so a caller can pair
  items before and after fine-tuning. The item's ``accuracy`` and ``reward`` are
  the task's headline metric (``acc_norm``, or ``acc`` where lm-eval reports
  only that).
* ``"generative"`` (es-awd, github.com/kschweig/es-awd ``prior_tasks/``): a chat
  prompt with a system message and numbered or lettered options, greedy
  decoding, and the answer read from the text by es-awd's rules
  (:func:`parse_option_number`, :func:`parse_option_letter`). ``format`` is
  es-awd's format reward: 1 when the reply has exactly the requested form.
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

MultipleChoiceProtocol = Literal["loglik", "generative"]
PROTOCOLS: tuple[str, ...] = ("loglik", "generative")
LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
  """One multiple-choice item, as raw text; each task builds its prompts from it.

  Attributes:
    id: the item's id in the source, or its row number as text.
    question: what the options answer: PIQA's goal, an ARC/MMLU question, or a
      WinoGrande sentence with its blank ``"_"``.
    options: the answer texts (WinoGrande: the two fillers of the blank).
    label: index of the correct option.
    subject: MMLU's subject (``"abstract_algebra"``), MMLU-Pro's category, else ``""``.
    explanation: MMLU-Pro's worked answer (``cot_content``), shown in few-shot prompts.
    shots: worked examples the generative prompt shows first (MMLU-Pro only).

  Example:
    >>> ex = MultipleChoiceExample("7", "Which is a metal?", ("wood", "iron"), 1)
    >>> ex.options[ex.label]
    'iron'
  """
  id: str
  question: str
  options: tuple[str, ...]
  label: int
  subject: str = ""
  explanation: str = ""
  shots: tuple[MultipleChoiceExample, ...] = ()

  def __post_init__(self):
    if len(self.options) < 2:
      raise ValueError(f"item {self.id!r} has {len(self.options)} option(s); a multiple-choice "
                       "item needs at least 2")
    if isinstance(self.label, bool) or not 0 <= self.label < len(self.options):
      raise ValueError(f"item {self.id!r}: label {self.label!r} is not an index into its "
                       f"{len(self.options)} options")


def choice_margin(scores: Sequence[float], label: int) -> float:
  """The gold choice's score minus the best other choice's (> 0 exactly when gold wins outright).

  Pass summed log-probs for ``margin`` (the continuous ``acc``), or log-probs
  divided by the choices' lengths for ``margin_norm`` (the continuous ``acc_norm``).

  Example:
    >>> choice_margin([-3.0, -1.0, -2.5], 1)  # -1 - max(-3, -2.5)
    1.5
    >>> choice_margin([-3.0, -1.0, -2.5], 0)  # -3 - (-1)
    -2.0
  """
  values = np.asarray(scores, np.float64)
  if values.ndim != 1 or len(values) < 2:
    raise ValueError(f"need at least 2 scores to compare, got {len(values)}")
  if not 0 <= label < len(values):
    raise ValueError(f"label {label} is not an index into {len(values)} scores")
  return float(values[label] - np.delete(values, label).max())


def parse_option_number(text: str, num_options: int) -> int | None:
  """es-awd's PIQA rule: the first standalone option number, as a 0-based index.

  A standalone number is one of ``1``-``num_options`` between word boundaries
  (es-awd's ``\\b([12])\\b``): ``"12"`` and ``"x1"`` hold none, and numbers that
  are not option numbers are skipped, not read as a wrong answer.

  Args:
    text: the generated reply.
    num_options: how many options were offered (1-9).

  Returns:
    The index, or None when the text has no option number.

  Example:
    >>> parse_option_number("Solution 2.", 2), parse_option_number("3, then 1", 2)
    (1, 0)
    >>> parse_option_number("12", 2) is None
    True
  """
  if not 1 <= num_options <= 9:
    raise ValueError(f"option numbers are single digits: num_options must be 1-9, got "
                     f"{num_options}")
  if not isinstance(text, str):
    return None
  match = re.search(rf"\b([1-{num_options}])\b", text)
  return None if match is None else int(match.group(1)) - 1


def parse_option_letter(text: str, num_letters: int) -> int | None:
  """es-awd's ARC-Challenge and MMLU-Pro rule, as a 0-based index (``A`` = 0).

  On the upper-cased text, the first ``ANSWER IS (X)``; else the first
  ``ANSWER IS X`` (so ``"the answer is definitely B"`` reads ``D``, as in es-awd);
  else the first standalone letter. ``X`` is one of the first ``num_letters``
  letters (es-awd: A-E for ARC, A-J for MMLU-Pro), whatever the item's option
  count, so the index can exceed an item's options (a wrong answer).

  Example:
    >>> parse_option_letter("Think... The answer is (C).", 5)
    2
    >>> parse_option_letter("Probably b", 5), parse_option_letter("No idea", 5)
    (1, None)
    >>> parse_option_letter("I'd say b", 5)  # the fallback finds the D of "I'd" first
    3
  """
  if not 1 <= num_letters <= len(LETTERS):
    raise ValueError(f"num_letters must be 1-{len(LETTERS)}, got {num_letters}")
  if not isinstance(text, str):
    return None
  upper = text.upper()
  letter = f"[A-{LETTERS[num_letters - 1]}]"
  for pattern in (rf"ANSWER IS\s*\(({letter})\)", rf"ANSWER IS\s*({letter})", rf"\b({letter})\b"):
    match = re.search(pattern, upper)
    if match is not None:
      return ord(match.group(1)) - ord("A")
  return None


def _follows_format(text: str, num_letters: int, num_options: int) -> bool:
  """es-awd's format reward: the reply is only the option number, or ends "The answer is (X)"."""
  if not isinstance(text, str):
    return False
  if num_letters == 0:
    return re.fullmatch(rf"\s*[1-{num_options}]\s*", text) is not None
  letter = f"[A-{LETTERS[num_letters - 1]}]"
  return re.search(rf"THE ANSWER IS\s*\({letter}\)\.?\s*$", text.upper()) is not None


def options_block(options: Sequence[str], *, numbered: bool = False) -> str:
  """Options one a line, ``"A. text"`` (es-awd's ARC and MMLU-Pro) or ``"1. text"`` (its PIQA).

  Example:
    >>> print(options_block(["red", "blue"]))
    A. red
    B. blue
  """
  if not numbered and len(options) > len(LETTERS):
    raise ValueError(f"{len(options)} options, but letters stop at {LETTERS[-1]}")
  keys = [str(i + 1) for i in range(len(options))] if numbered else LETTERS
  return "\n".join(f"{key}. {option}" for key, option in zip(keys, options))


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
  """Base class of the suite's tasks: loading, both protocols and their metrics.

  A subclass sets the class attributes and defines :meth:`query` and
  :meth:`choices` (lm-eval's ``doc_to_text`` and ``doc_to_choice``),
  :meth:`user_message` (the es-awd prompt) and ``_example`` (one row to an
  item); it may override :meth:`loglik_requests` and ``_rows``.

  Attributes:
    protocol: ``"loglik"`` (lm-eval) or ``"generative"`` (es-awd).
    name: the task's name in results and error messages.
  """
  protocol: MultipleChoiceProtocol = "loglik"
  name: str = "multiple_choice"

  hub_name: ClassVar[str] = ""
  hub_config: ClassVar[str | None] = None
  default_split: ClassVar[str] = "test"
  # The metric reported as "accuracy" and "reward"; "acc" where lm-eval reports only acc.
  headline: ClassVar[str] = "acc_norm"
  # False for partial evaluation (WinoGrande): every choice scores the same continuation.
  length_normalised: ClassVar[bool] = True
  system_message: ClassVar[str] = ""
  # 0: the reply names an option number (es-awd's PIQA); else letters A.. (its ARC, MMLU-Pro).
  num_letters: ClassVar[int] = 0

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"unknown {self.name} protocol {self.protocol!r}; expected one of "
                       f"{PROTOCOLS}")

  def load(self, source: str | Path | None = None, *, split: str | None = None,
           limit: int | None = None, seed: int | None = None) -> list[MultipleChoiceExample]:
    """Loads items from the hub (the class's ``hub_name``) or a local file.

    Args:
      source: hub name or local file; None means ``hub_name``.
      split: hub split; None means the task's usual one (``default_split``).
      limit: keep this many items (the first ones, or a seeded subset).
      seed: seed of the random subset; None takes the first ``limit`` items.
    """
    source = self.hub_name if source is None else source
    rows = self._rows(source, self.default_split if split is None else split)
    return [self._example(rows[i], i, source)
            for i in data.select_indices(len(rows), limit, seed)]

  def _rows(self, source: str | Path, split: str) -> list[dict[str, Any]]:
    return data.load_rows(source, task=self.name, split=split, hub_config=self.hub_config)

  def _example(self, row: dict[str, Any], index: int,
               source: str | Path) -> MultipleChoiceExample:
    raise NotImplementedError

  # Log-likelihood protocol.
  def query(self, example: MultipleChoiceExample) -> str:
    """lm-eval's ``doc_to_text``: the context every choice continues."""
    raise NotImplementedError

  def choices(self, example: MultipleChoiceExample) -> list[str]:
    """lm-eval's ``doc_to_choice`` (what ``acc_norm`` measures the length of)."""
    raise NotImplementedError

  def loglik_requests(self, example: MultipleChoiceExample) -> list[tuple[str, str]]:
    """(query, ``" " + choice``) for each choice: lm-eval's target delimiter is one space."""
    query = self.query(example)
    return [(query, " " + choice) for choice in self.choices(example)]

  def score_logliks(self, example: MultipleChoiceExample,
                    logliks: Sequence[ChoiceLoglik]) -> Scored:
    """``acc``, ``margin`` and, unless partial evaluation, ``acc_norm`` and ``margin_norm``.

    ``prediction`` is the argmax of the summed log-probs (``acc``'s choice),
    as in :class:`~es_jax.evaluation.hellaswag.HellaSwagTask`.
    """
    if len(logliks) != len(example.options):
      raise ValueError(f"{self.name}: item {example.id!r} has {len(example.options)} options "
                       f"but {len(logliks)} scored requests")
    lls = np.array([ll.sum_logprob for ll in logliks], np.float64)
    pred = int(np.argmax(lls))  # ties go to the first, as in lm-eval
    metrics = {"acc": float(pred == example.label), "margin": choice_margin(lls, example.label)}
    if self.length_normalised:
      per_char = lls / np.array([max(len(c), 1) for c in self.choices(example)], np.float64)
      metrics["acc_norm"] = float(int(np.argmax(per_char)) == example.label)
      metrics["margin_norm"] = choice_margin(per_char, example.label)
    headline = metrics[self.headline]
    return Scored(prediction=str(pred), target=str(example.label),
                  metrics={"reward": headline, "accuracy": headline, **metrics})

  # Generative protocol.
  def user_message(self, example: MultipleChoiceExample) -> str:
    """The user turn of the es-awd chat prompt (the system turn is ``system_message``)."""
    raise NotImplementedError

  def build_prompt(self, example: MultipleChoiceExample, tokenizer: Any = None) -> str:
    """The es-awd prompt: system and user turns through the chat template.

    Without a tokenizer, a plain prompt: the system message, a blank line, the
    user message and, for numbered options, ``"\\nAnswer:"``.
    """
    system = self.system_message.replace("{", "{{").replace("}", "}}")
    plain = system + "\n\n{user}" + ("" if self.num_letters else "\nAnswer:")
    return chat_prompt(self.user_message(example), tokenizer, system=self.system_message,
                       plain_template=plain)

  def parse(self, completion: str, example: MultipleChoiceExample) -> int | None:
    """The option a reply picks (es-awd's rule), or None when none or one the item lacks."""
    if self.num_letters:
      picked = parse_option_letter(completion, self.num_letters)
    else:
      picked = parse_option_number(completion, len(example.options))
    return picked if picked is not None and picked < len(example.options) else None

  def score(self, completion: str, example: MultipleChoiceExample) -> Scored:
    """Accuracy of the parsed answer, and es-awd's ``format`` (never raises)."""
    picked = self.parse(completion, example)
    correct = float(picked == example.label)
    follows = _follows_format(completion, self.num_letters, len(example.options))
    return Scored(prediction=None if picked is None else str(picked), target=str(example.label),
                  metrics={"reward": correct, "accuracy": correct, "format": float(follows)})

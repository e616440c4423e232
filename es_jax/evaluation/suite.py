"""The prior-task suite: PIQA, ARC-Easy, ARC-Challenge, MMLU, MMLU-Pro and WinoGrande.

With HellaSwag (:mod:`es_jax.evaluation.hellaswag`) these are the tasks on which
forgetting during ES fine-tuning is measured (:data:`PRIOR_SUITE`): es-awd
(github.com/kschweig/es-awd, the AWD paper's code) scores HellaSwag, PIQA,
ARC-Challenge and MMLU-Pro; ARC-Easy, MMLU and WinoGrande are lm-eval staples
that a small model scores above chance on.

Each task has both protocols of :mod:`es_jax.evaluation.multiple_choice`. Its
class docstring gives lm-eval's prompt (from the task's YAML in
EleutherAI/lm-evaluation-harness) and the es-awd prompt (from
``prior_tasks/<task>/template.py``, ``data.py`` and ``reward_function.py`` in
es-awd), or says which es-awd format it borrows where es-awd has none.

Local files: the loaders read the layouts below (the hub's and those of
``../shared/data``); a row that does not fit raises
:class:`~es_jax.evaluation.data.DataError` naming the task, file, row and field.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from es_jax.evaluation import data
from es_jax.evaluation.multiple_choice import (LETTERS, MultipleChoiceExample, MultipleChoiceTask,
                                               options_block)

PRIOR_SUITE: tuple[str, ...] = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "mmlu",
                                "mmlu_pro", "winogrande")

# es-awd's prompts, word for word (prior_tasks/*/template.py).
PIQA_SYSTEM = (
    "You are given a physical commonsense goal and two possible solutions. "
    "Choose the better solution by selecting the corresponding number. "
    "Reply with only the option number: 1 or 2.")
PIQA_USER = ("Goal: {goal}\n\nPossible solutions:\n{options}\n\n"
             "Which solution is more likely to work?")
ARC_SYSTEM = (
    "You are a science question answering expert. "
    "Think step by step and finish your answer with "
    '"The answer is (X)" where X is the correct letter choice.')
ARC_HEADER = (
    "The following are multiple choice science questions. "
    'Think step by step and then finish your answer with "The answer is (X)" '
    "where X is the correct letter choice.\n\n")
MMLU_PRO_SYSTEM = (
    "You are a knowledge expert solving multiple-choice questions. "
    "Think step by step and finish your answer with "
    '"The answer is (X)" where X is the correct letter choice.')
MMLU_PRO_HEADER = (
    "The following are multiple choice questions (with answers) about {category}. "
    'Think step by step and then finish your answer with "The answer is (X)" '
    "where X is the correct letter choice.\n\n")
# Not in es-awd: WinoGrande in the style of its PIQA prompt.
WINOGRANDE_SYSTEM = (
    "You are given two versions of a sentence that differ only in how one blank is filled. "
    "Choose the version that makes more sense by selecting the corresponding number. "
    "Reply with only the option number: 1 or 2.")
WINOGRANDE_USER = "Possible sentences:\n{options}\n\nWhich sentence makes more sense?"

MMLU_CSV_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
_SPLIT_SUFFIX = re.compile(r"_(test|dev|val|validation|train)$")


# ---- row helpers ----

def _where(task: str, index: int, source: str | Path) -> str:
  return f"{task}: row {index} of '{source}'"


def _index(value: Any, field: str, count: int, *, base: int = 0, task: str, index: int,
           source: str | Path) -> int:
  """An option index stored as an int or a digit string (``base`` = 1 for 1-based labels)."""
  if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
    value = int(value.strip())
  if isinstance(value, bool) or not isinstance(value, int) or not base <= value < count + base:
    raise data.DataError(f"{_where(task, index, source)}: field '{field}' is {value!r:.40}, "
                         f"expected {base}-{count - 1 + base}")
  return value - base


def _str_list(row: dict[str, Any], field: str, *, sizes: range, task: str, index: int,
              source: str | Path) -> tuple[str, ...]:
  """A list of strings, also when stored as the text of a Python or JSON list."""
  common = dict(task=task, row_index=index, source=source)
  value = data.require_field(row, field, (list, tuple, str), **common)
  if isinstance(value, str):
    try:
      # literal_eval evaluates literals only, never code.
      value = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
      raise data.DataError(f"{_where(task, index, source)}: field '{field}' is text that is not "
                           f"a list literal ({type(e).__name__}): {row[field]!r:.80}") from e
  values = data.check_str_list(value, field, length=None, **common)
  if len(values) not in sizes:
    expected = sizes.start if len(sizes) == 1 else f"{sizes.start}-{sizes.stop - 1}"
    raise data.DataError(f"{_where(task, index, source)}: field '{field}' has {len(values)} "
                         f"entries, expected {expected}")
  return values


def _label_of(labels: Sequence[str], key: Any, field: str, *, task: str, index: int,
              source: str | Path) -> int:
  if not isinstance(key, str) or key.strip() not in labels:
    raise data.DataError(f"{_where(task, index, source)}: field '{field}' is {key!r:.40}, "
                         f"which is not one of the option labels {list(labels)}")
  return list(labels).index(key.strip())


def _id(row: dict[str, Any], fields: Sequence[str], index: int) -> str:
  for field in fields:
    if row.get(field) is not None and not isinstance(row[field], bool):
      return str(row[field])
  return str(index)


# ---- PIQA ----

@dataclasses.dataclass(frozen=True)
class PIQATask(MultipleChoiceTask):
  """PIQA: which of two solutions achieves a physical goal.

  * ``"loglik"`` (lm-eval ``piqa/piqa.yaml``): query ``"Question: {goal}\\nAnswer:"``,
    choices ``[sol1, sol2]``, each scored as ``" " + sol``; acc and acc_norm
    (``accuracy`` is acc_norm, as for HellaSwag).
  * ``"generative"`` (es-awd ``prior_tasks/piqa``, followed exactly): system
    :data:`PIQA_SYSTEM`, user ``"Goal: {goal}\\n\\nPossible solutions:\\n1. {sol1}\\n2.
    {sol2}\\n\\nWhich solution is more likely to work?"``; the answer is the first
    standalone ``1`` or ``2`` (:func:`~es_jax.evaluation.multiple_choice.parse_option_number`).

  Sources: the hub (``baber/piqa``, lm-eval's, fields ``goal``, ``sol1``,
  ``sol2``, ``label`` 0/1) or the authors' files: ``valid.jsonl`` without labels,
  read from ``valid-labels.lst`` beside it (0 or 1, one a line).

  Example:
    >>> ex = MultipleChoiceExample("0", "Dry a wet phone.", ("Put it in rice.", "Microwave it."), 0)
    >>> [continuation for _, continuation in PIQATask().loglik_requests(ex)]
    [' Put it in rice.', ' Microwave it.']
    >>> PIQATask().query(ex)
    'Question: Dry a wet phone.\\nAnswer:'
    >>> PIQATask(protocol="generative").score("1", ex).metrics
    {'reward': 1.0, 'accuracy': 1.0, 'format': 1.0}
  """
  name: str = "piqa"

  hub_name: ClassVar[str] = "baber/piqa"
  default_split: ClassVar[str] = "validation"
  system_message: ClassVar[str] = PIQA_SYSTEM

  def _rows(self, source: str | Path, split: str) -> list[dict[str, Any]]:
    rows = super()._rows(source, split)
    if not data.looks_like_local_path(source) or all(
        row.get("label") is not None for row in rows):
      return rows
    path = Path(source).expanduser()
    labels_path = path.with_name(path.name.split(".")[0] + "-labels.lst")
    if not labels_path.is_file():
      raise data.DataError(
          f"{self.name}: '{source}' has rows without a 'label' field and there is no labels "
          f"file '{labels_path}' beside it; PIQA's own files keep the labels there (0 or 1, one "
          "a line): put it back, or pass a file whose rows have 'label'")
    lines = labels_path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
      lines.pop()
    if len(lines) != len(rows):
      raise data.DataError(f"{self.name}: '{labels_path}' has {len(lines)} labels but "
                           f"'{source}' has {len(rows)} rows; they must be aligned line by line")
    for i, line in enumerate(lines):
      if line.strip() not in ("0", "1"):
        raise data.DataError(f"{self.name}: line {i + 1} of '{labels_path}' is {line!r:.40}, "
                             "expected 0 or 1")
    return [{**row, "label": int(line)} for row, line in zip(rows, lines)]

  def _example(self, row: dict[str, Any], index: int,
               source: str | Path) -> MultipleChoiceExample:
    common = dict(task=self.name, row_index=index, source=source)
    goal = data.require_field(row, "goal", str, **common)
    options = tuple(data.require_field(row, field, str, **common) for field in ("sol1", "sol2"))
    label = _index(data.require_field(row, "label", (int, str), **common), "label", 2,
                   task=self.name, index=index, source=source)
    return MultipleChoiceExample(_id(row, ("id",), index), goal, options, label)

  def query(self, example: MultipleChoiceExample) -> str:
    """``"Question: {goal}\\nAnswer:"``."""
    return f"Question: {example.question}\nAnswer:"

  def choices(self, example: MultipleChoiceExample) -> list[str]:
    """The two solutions."""
    return list(example.options)

  def user_message(self, example: MultipleChoiceExample) -> str:
    """es-awd's PIQA user turn."""
    return PIQA_USER.format(goal=example.question,
                            options=options_block(example.options, numbered=True))


# ---- ARC ----

@dataclasses.dataclass(frozen=True)
class _ARCTask(MultipleChoiceTask):
  """ARC, either set; the subclasses fix the name and hub configuration."""

  hub_name: ClassVar[str] = "allenai/ai2_arc"
  system_message: ClassVar[str] = ARC_SYSTEM
  num_letters: ClassVar[int] = 5  # es-awd reads A-E, whatever the item's option count

  def _example(self, row: dict[str, Any], index: int,
               source: str | Path) -> MultipleChoiceExample:
    common = dict(task=self.name, index=index, source=source)
    sizes = range(2, 6)
    if isinstance(row.get("choices"), dict):  # the hub: choices {text, label}, answerKey
      question = data.require_field(row, "question", str, task=self.name, row_index=index,
                                    source=source)
      choices = {f"choices.{k}": v for k, v in row["choices"].items()}
      options = _str_list(choices, "choices.text", sizes=sizes, **common)
      labels = _str_list(choices, "choices.label", sizes=range(len(options), len(options) + 1),
                         **common)
      label = _label_of(labels, row.get("answerKey"), "answerKey", **common)
    elif row.get("option_labels") is not None:  # es-awd's export (shared/data/arc_challenge)
      question = data.require_field(row, "question", str, task=self.name, row_index=index,
                                    source=source)
      options = _str_list(row, "options", sizes=sizes, **common)
      labels = _str_list(row, "option_labels", sizes=range(len(options), len(options) + 1),
                         **common)
      label = _label_of(labels, row.get("answer"), "answer", **common)
    elif row.get("prompt") is not None:  # shared/data/arc_easy: prompt, choices, answer_idx
      question = data.require_field(row, "prompt", str, task=self.name, row_index=index,
                                    source=source)
      options = _str_list(row, "choices", sizes=sizes, **common)
      label = _index(row.get("answer_idx"), "answer_idx", len(options), **common)
    else:
      raise data.DataError(
          f"{_where(self.name, index, source)} has none of the ARC layouts: the hub's "
          "(question, choices {text, label}, answerKey), es-awd's (question, options, "
          "option_labels, answer) or (prompt, choices, answer_idx); fields present: "
          f"{sorted(row)}")
    return MultipleChoiceExample(_id(row, ("id", "question_id"), index), question, options, label)

  def query(self, example: MultipleChoiceExample) -> str:
    """``"Question: {question}\\nAnswer:"``."""
    return f"Question: {example.question}\nAnswer:"

  def choices(self, example: MultipleChoiceExample) -> list[str]:
    """The option texts."""
    return list(example.options)

  def user_message(self, example: MultipleChoiceExample) -> str:
    """es-awd's ARC-Challenge user turn: the header, a blank line, the question, its options."""
    return ARC_HEADER + "\n" + _lettered_question(example)


def _lettered_question(example: MultipleChoiceExample) -> str:
  """es-awd's ``"Question: ...\\nOptions:\\nA. ...\\nAnswer:"`` block (ARC and MMLU-Pro)."""
  return f"Question: {example.question}\nOptions:\n{options_block(example.options)}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class ARCEasyTask(_ARCTask):
  """ARC-Easy: grade-school science questions with 3-5 options.

  * ``"loglik"`` (lm-eval ``arc/arc_easy.yaml``): query ``"Question: {question}\\nAnswer:"``,
    choices the option texts, each scored as ``" " + text``; gold = the position
    of ``answerKey`` among the labels; acc and acc_norm (``accuracy`` is acc_norm).
  * ``"generative"``: es-awd has no ARC-Easy; this is its ARC-Challenge prompt
    (see :class:`ARCChallengeTask`), letters A-E by position.

  Sources: the hub (``allenai/ai2_arc``, config ``ARC-Easy``), es-awd's export
  (``question``, ``options``, ``option_labels``, ``answer``; the lists may be
  stored as list text) or ``prompt``, ``choices``, ``answer_idx`` rows.

  Example:
    >>> ex = MultipleChoiceExample("q1", "What melts ice?", ("heat", "cold", "dark"), 0)
    >>> ARCEasyTask().loglik_requests(ex)[0]
    ('Question: What melts ice?\\nAnswer:', ' heat')
  """
  name: str = "arc_easy"

  hub_config: ClassVar[str | None] = "ARC-Easy"


@dataclasses.dataclass(frozen=True)
class ARCChallengeTask(_ARCTask):
  """ARC-Challenge: the ARC questions that simple retrieval and co-occurrence methods miss.

  * ``"loglik"`` (lm-eval ``arc/arc_challenge.yaml``, which includes ``arc_easy.yaml``):
    as :class:`ARCEasyTask`.
  * ``"generative"`` (es-awd ``prior_tasks/arc_challenge``, followed exactly):
    system :data:`ARC_SYSTEM`; user :data:`ARC_HEADER` + ``"\\n"`` +
    ``"Question: {question}\\nOptions:\\nA. ...\\nAnswer:"``; zero-shot. The
    answer, on the upper-cased reply: ``ANSWER IS (X)``, else ``ANSWER IS X``,
    else the first standalone letter, X in A-E
    (:func:`~es_jax.evaluation.multiple_choice.parse_option_letter`); es-awd
    normalises numeric labels 1-5 to A-E, i.e. letters go by position.

  Sources: as :class:`ARCEasyTask`, hub config ``ARC-Challenge``.

  Example:
    >>> ex = MultipleChoiceExample("q1", "What melts ice?", ("heat", "cold", "dark"), 0)
    >>> ARCChallengeTask(protocol="generative").score("The answer is (A).", ex).metrics
    {'reward': 1.0, 'accuracy': 1.0, 'format': 1.0}
  """
  name: str = "arc_challenge"

  hub_config: ClassVar[str | None] = "ARC-Challenge"


# ---- MMLU ----

def subject_description(subject: str) -> str:
  """lm-eval's MMLU description, the 0-shot prompt's first line and blank line.

  Example:
    >>> subject_description("high_school_biology")
    'The following are multiple choice questions (with answers) about high school biology.\\n\\n'
  """
  return ("The following are multiple choice questions (with answers) about "
          f"{subject.replace('_', ' ')}.\n\n")


def _mmlu_query(example: MultipleChoiceExample) -> str:
  """lm-eval's MMLU template, ``question.strip()`` then ``"\\nA. {choice}"`` per option."""
  return (subject_description(example.subject) + example.question.strip() + "\n"
          + options_block(example.options) + "\nAnswer:")


def _read_mmlu_csv(path: Path, task: str) -> list[dict[str, Any]]:
  """One subject's CSV, by the standard library: pandas would read a choice "None" as missing."""
  subject = _SPLIT_SUFFIX.sub("", path.name[:-len(".csv")])
  if not subject.strip("_ "):
    raise data.DataError(f"{task}: cannot tell the subject from the file name '{path.name}'; "
                         "name the file after it, e.g. 'anatomy_test.csv'")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      table = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise data.DataError(f"{task}: cannot read '{path}' as CSV: {e}") from e
  if not table or tuple(table[0]) != MMLU_CSV_HEADER:
    raise data.DataError(f"{task}: '{path}' should start with the header "
                         f"{','.join(MMLU_CSV_HEADER)}, got {table[0] if table else 'nothing'}")
  rows = []
  for i, record in enumerate(table[1:]):
    if len(record) != len(MMLU_CSV_HEADER):
      raise data.DataError(f"{task}: row {i} of '{path}' has {len(record)} columns, expected "
                           f"{len(MMLU_CSV_HEADER)} ({','.join(MMLU_CSV_HEADER)})")
    answer = _index(record[5], "answer", 4, task=task, index=i, source=path)
    rows.append({"id": f"{subject}/{i}", "question": record[0], "choices": record[1:5],
                 "answer": answer, "subject": subject})
  return rows


@dataclasses.dataclass(frozen=True)
class MMLUTask(MultipleChoiceTask):
  """MMLU: four-option questions on 57 subjects.

  * ``"loglik"`` (lm-eval ``mmlu/default/_default_template_yaml`` and the
    subject's ``description``, zero-shot): query
    ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
    ``+ question.strip() + "\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"``
    (underscores in the subject become spaces), choices ``A``-``D``, each scored
    as ``" A"`` etc.; lm-eval reports acc (``accuracy``); acc_norm equals it, as
    every choice is one character.
  * ``"generative"``: es-awd has no MMLU; this is its MMLU-Pro prompt
    (:class:`MMLUProTask`) with the subject as the category, letters A-D,
    zero-shot (MMLU's dev items have no worked answers).

  Sources: the hub (``cais/mmlu``, config ``all``: ``question``, ``subject``,
  ``choices``, ``answer`` 0-3), a CSV with header
  ``question,choice0,choice1,choice2,choice3,answer`` (answer 0-3; the subject is
  the file name without ``_test``), or a directory of such CSVs (every subject,
  in file-name order).

  Example:
    >>> ex = MultipleChoiceExample("0", "2 + 2 = ?", ("3", "4", "5", "6"), 1, subject="math")
    >>> print(MMLUTask().query(ex))
    The following are multiple choice questions (with answers) about math.
    <BLANKLINE>
    2 + 2 = ?
    A. 3
    B. 4
    C. 5
    D. 6
    Answer:
  """
  name: str = "mmlu"

  hub_name: ClassVar[str] = "cais/mmlu"
  hub_config: ClassVar[str | None] = "all"
  headline: ClassVar[str] = "acc"
  system_message: ClassVar[str] = MMLU_PRO_SYSTEM
  num_letters: ClassVar[int] = 4

  def _rows(self, source: str | Path, split: str) -> list[dict[str, Any]]:
    path = Path(source).expanduser()
    if data.looks_like_local_path(source) and path.is_dir():
      files = sorted(path.glob("*.csv"))
      if not files:
        raise data.DataError(f"{self.name}: directory '{source}' has no .csv files; pass MMLU's "
                             "test/ (or dev/) directory of per-subject CSVs")
      return [row for file in files for row in _read_mmlu_csv(file, self.name)]
    if data.looks_like_local_path(source) and path.name.endswith(".csv"):
      return _read_mmlu_csv(path, self.name)
    return super()._rows(source, split)

  def _example(self, row: dict[str, Any], index: int,
               source: str | Path) -> MultipleChoiceExample:
    # CSV rows were checked, by file and row, as they were read.
    common = dict(task=self.name, row_index=index, source=source)
    question = data.require_field(row, "question", str, **common)
    subject = data.require_field(row, "subject", str, **common)
    if not subject.strip():
      raise data.DataError(f"{_where(self.name, index, source)}: field 'subject' is empty; "
                           "lm-eval's prompt names the subject")
    options = _str_list(row, "choices", sizes=range(4, 5), task=self.name, index=index,
                        source=source)
    label = _index(data.require_field(row, "answer", (int, str), **common), "answer", 4,
                   task=self.name, index=index, source=source)
    return MultipleChoiceExample(_id(row, ("id",), index), question, options, label,
                                 subject=subject)

  def query(self, example: MultipleChoiceExample) -> str:
    """The subject's description, the question and its lettered options, ``"Answer:"``."""
    return _mmlu_query(example)

  def choices(self, example: MultipleChoiceExample) -> list[str]:
    """``["A", "B", "C", "D"]``."""
    return list(LETTERS[:len(example.options)])

  def user_message(self, example: MultipleChoiceExample) -> str:
    """es-awd's MMLU-Pro user turn, zero-shot, the subject as the category."""
    return (MMLU_PRO_HEADER.format(category=example.subject.replace("_", " ")) + "\n"
            + _lettered_question(example))


# ---- MMLU-Pro ----

@dataclasses.dataclass(frozen=True)
class MMLUProTask(MultipleChoiceTask):
  """MMLU-Pro: harder, reasoning-heavy questions with up to ten options, 14 categories.

  * ``"loglik"``: not an lm-eval task (lm-eval's ``mmlu_pro`` is generative
    chain-of-thought); this is lm-eval's MMLU template (:class:`MMLUTask`) with
    letters A-J for up to ten options and the category as the subject,
    zero-shot; acc (``accuracy``) and acc_norm (equal: one-letter choices).
  * ``"generative"`` (es-awd ``prior_tasks/mmlu_pro``, followed exactly):
    system :data:`MMLU_PRO_SYSTEM`; user :data:`MMLU_PRO_HEADER` with the
    category, then the first ``num_fewshot`` (5) validation items of the same
    category as ``"Question: ...\\nOptions:\\nA. ...\\nAnswer: {cot_content}\\n"``
    joined by ``"\\n"``, then ``"\\n"`` and the question ending ``"Answer:"``.
    As in es-awd, ``cot_content`` is shown as stored, so a shot reads ``"Answer:
    A: Let's think step by step. ..."``. The answer: as ARC-Challenge, letters A-J.

  Sources: the hub (``TIGER-Lab/MMLU-Pro``: ``question``, ``options``,
  ``answer_index``, optional ``answer`` letter, ``category``, ``cot_content``)
  or a local file with those fields (``options`` may be list text).

  Attributes:
    num_fewshot: worked examples per prompt in the generative protocol (es-awd: 5).

  Example:
    >>> ex = MultipleChoiceExample("1", "Q?", tuple("pqrstuvwxy"), 9, subject="law")
    >>> MMLUProTask().choices(ex)[-1], MMLUProTask(protocol="generative").parse("answer is (J)", ex)
    ('J', 9)
  """
  name: str = "mmlu_pro"
  num_fewshot: int = 5

  hub_name: ClassVar[str] = "TIGER-Lab/MMLU-Pro"
  headline: ClassVar[str] = "acc"
  system_message: ClassVar[str] = MMLU_PRO_SYSTEM
  num_letters: ClassVar[int] = 10
  fewshot_split: ClassVar[str] = "validation"

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.num_fewshot, bool) or not isinstance(self.num_fewshot, int) or (
        self.num_fewshot < 0):
      raise ValueError(f"num_fewshot must be an int >= 0, got {self.num_fewshot!r}")

  def load(self, source: str | Path | None = None, *, split: str | None = None,
           limit: int | None = None, seed: int | None = None,
           fewshot_source: str | Path | None = None) -> list[MultipleChoiceExample]:
    """Loads items; for the generative protocol, attaches each category's worked examples.

    Args:
      source, split, limit, seed: as :meth:`MultipleChoiceTask.load`.
      fewshot_source: where the worked examples come from (es-awd: the
        validation split). None means the hub source's ``validation`` split; a
        local ``source`` needs it (e.g. ``mmlu_pro/validation.parquet``) unless
        ``num_fewshot`` is 0.
    """
    examples = super().load(source, split=split, limit=limit, seed=seed)
    if self.protocol != "generative" or not self.num_fewshot:
      return examples
    source = self.hub_name if source is None else source
    if fewshot_source is None and data.looks_like_local_path(source):
      raise data.DataError(
          f"{self.name}: the generative protocol shows {self.num_fewshot} worked examples per "
          f"category from the validation split, as es-awd does; '{source}' is a local file, so "
          "pass fewshot_source=<validation file>, or make the task with num_fewshot=0")
    shot_source = source if fewshot_source is None else fewshot_source
    pool = super().load(shot_source, split=self.fewshot_split)
    by_category: dict[str, list[MultipleChoiceExample]] = {}
    for shot in pool:
      by_category.setdefault(shot.subject, []).append(shot)
    return [dataclasses.replace(ex, shots=tuple(by_category.get(ex.subject, [])[:self.num_fewshot]))
            for ex in examples]

  def _example(self, row: dict[str, Any], index: int,
               source: str | Path) -> MultipleChoiceExample:
    common = dict(task=self.name, row_index=index, source=source)
    question = data.require_field(row, "question", str, **common)
    category = data.require_field(row, "category", str, **common)
    options = _str_list(row, "options", sizes=range(2, len(LETTERS) + 1), task=self.name,
                        index=index, source=source)
    label = _index(data.require_field(row, "answer_index", (int, str), **common),
                   "answer_index", len(options), task=self.name, index=index, source=source)
    letter = row.get("answer")
    if letter is not None and letter != LETTERS[label]:
      raise data.DataError(f"{_where(self.name, index, source)}: field 'answer' is {letter!r:.40} "
                           f"but 'answer_index' {label} is {LETTERS[label]!r}; fix one of them")
    explanation = row.get("cot_content")
    return MultipleChoiceExample(_id(row, ("question_id", "id"), index), question, options, label,
                                 subject=category,
                                 explanation=explanation if isinstance(explanation, str) else "")

  def query(self, example: MultipleChoiceExample) -> str:
    """MMLU's template with the category and up to ten lettered options."""
    return _mmlu_query(example)

  def choices(self, example: MultipleChoiceExample) -> list[str]:
    """``A``, ``B``, ... one letter per option."""
    return list(LETTERS[:len(example.options)])

  def user_message(self, example: MultipleChoiceExample) -> str:
    """es-awd's MMLU-Pro user turn: header, the item's shots, the question."""
    shots = "\n".join(
        f"Question: {shot.question}\nOptions:\n{options_block(shot.options)}\n"
        f"Answer: {shot.explanation}\n" for shot in example.shots)
    return (MMLU_PRO_HEADER.format(category=example.subject) + shots + "\n"
            + _lettered_question(example))


# ---- WinoGrande ----

@dataclasses.dataclass(frozen=True)
class WinoGrandeTask(MultipleChoiceTask):
  """WinoGrande: which of two names or things fills a sentence's blank.

  * ``"loglik"`` (lm-eval ``winogrande/default.yaml`` and
    ``preprocess_winogrande.py``, "partial evaluation"): with ``i`` the position
    of the blank ``"_"``, each option gives a context ``sentence[:i] + option``
    and both score the same continuation ``" " + sentence[i+1:].strip()``; acc
    only, and ``margin`` unnormalised (the continuation is the same string).
  * ``"generative"``: es-awd has no WinoGrande; this follows its PIQA prompt:
    the two completed sentences numbered 1 and 2 (system :data:`WINOGRANDE_SYSTEM`,
    user :data:`WINOGRANDE_USER`), the answer the first standalone 1 or 2.

  Sources: the hub (``allenai/winogrande``, config ``winogrande_xl``:
  ``sentence``, ``option1``, ``option2``, ``answer`` "1"/"2") or partial-scoring
  rows (``context_options`` (2), ``continuation``, ``gold`` 0/1), which are
  held as the sentence ``"_ " + continuation`` with the contexts as options,
  giving the same requests.

  Example:
    >>> ex = MultipleChoiceExample("0", "Ann thanked Bo because _ had helped.", ("Ann", "Bo"), 1)
    >>> WinoGrandeTask().loglik_requests(ex)
    [('Ann thanked Bo because Ann', ' had helped.'), ('Ann thanked Bo because Bo', ' had helped.')]
  """
  name: str = "winogrande"

  hub_name: ClassVar[str] = "allenai/winogrande"
  hub_config: ClassVar[str | None] = "winogrande_xl"
  default_split: ClassVar[str] = "validation"
  headline: ClassVar[str] = "acc"
  length_normalised: ClassVar[bool] = False
  system_message: ClassVar[str] = WINOGRANDE_SYSTEM

  def _example(self, row: dict[str, Any], index: int,
               source: str | Path) -> MultipleChoiceExample:
    common = dict(task=self.name, row_index=index, source=source)
    if row.get("context_options") is not None:
      options = _str_list(row, "context_options", sizes=range(2, 3), task=self.name,
                          index=index, source=source)
      sentence = "_ " + data.require_field(row, "continuation", str, **common)
      label = _index(data.require_field(row, "gold", (int, str), **common), "gold", 2,
                     task=self.name, index=index, source=source)
    else:
      sentence = data.require_field(row, "sentence", str, **common)
      if "_" not in sentence:
        raise data.DataError(f"{_where(self.name, index, source)}: field 'sentence' has no "
                             f"blank '_': {sentence!r:.80}")
      options = tuple(data.require_field(row, f, str, **common) for f in ("option1", "option2"))
      label = _index(data.require_field(row, "answer", (int, str), **common), "answer", 2,
                     base=1, task=self.name, index=index, source=source)
    return MultipleChoiceExample(_id(row, ("qID", "id"), index), sentence, options, label)

  def query(self, example: MultipleChoiceExample) -> str:
    """Partial evaluation has no shared query; see :meth:`loglik_requests`."""
    raise TypeError(f"{self.name} scores a different context per option; use loglik_requests")

  def choices(self, example: MultipleChoiceExample) -> list[str]:
    """lm-eval's ``doc_to_choice``: the sentence up to the blank, filled with each option."""
    blank = example.question.index("_")
    return [example.question[:blank] + option for option in example.options]

  def loglik_requests(self, example: MultipleChoiceExample) -> list[tuple[str, str]]:
    """(sentence up to the blank + option, ``" " + rest.strip()``) per option."""
    continuation = " " + example.question[example.question.index("_") + 1:].strip()
    return [(context, continuation) for context in self.choices(example)]

  def sentences(self, example: MultipleChoiceExample) -> list[str]:
    """The sentence with its (first) blank filled by each option.

    Example:
      >>> ex = MultipleChoiceExample("0", "Ann thanked Bo because _ had helped.", ("Ann", "Bo"), 1)
      >>> WinoGrandeTask().sentences(ex)[1]
      'Ann thanked Bo because Bo had helped.'
    """
    blank = example.question.index("_")
    return [example.question[:blank] + option + example.question[blank + 1:]
            for option in example.options]

  def user_message(self, example: MultipleChoiceExample) -> str:
    """The two completed sentences, numbered, in es-awd's PIQA style."""
    return WINOGRANDE_USER.format(options=options_block(self.sentences(example), numbered=True))

"""Two-operand integer arithmetic answered with only the number.

A task a small instruct model can start on clearly above 0 and below its
ceiling, so that ES has room to raise it within a CPU budget: SmolLM2-135M
answers ``"What is 47 + 38? Answer with only the number."`` correctly some of
the time, often with extra words or a wrong carry.

* Problems: ``a op b`` with both operands drawn uniformly from ``[low, high]``
  (two-digit by default) and ``op`` from ``ops``. Every ordered pair belongs
  to the ``"train"`` or the ``"test"`` split by a fixed hash of the problem,
  so a held-out set never shares a problem with a training set, whatever the
  seeds.
* Reward (``"reward"`` and ``"accuracy"``): 1.0 if the completion, stripped of
  surrounding whitespace, an optional end token and one trailing period, is
  exactly the integer answer (``"85"``, ``" 85."``); else 0.0. An answer
  buried in words (``"The answer is 85."``) scores 0 for the reward and 1 for
  the diagnostic metric ``"first_number"`` (the first integer in the text is
  right), which separates wrong sums from wrong format.
* Few-shot plain prompts (``shots=k``): ``k`` solved training problems, one per
  line, then the question: ``"12 + 35 = 47\n...\n47 + 38 ="``. The format is
  one problem per line, so only the completion's first line is scored (a base
  model goes on with a next problem). SmolLM2-135M-Instruct (float32, greedy)
  answers 3-shot two-digit sums right about a quarter of the time, asked as a
  chat question never (see the README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import numpy as np

from es_jax.evaluation.base import Scored, chat_prompt

OPS: dict[str, Any] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                       "*": lambda a, b: a * b}
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
CHAT_INSTRUCTION = "What is {question}? Answer with only the number."
PLAIN_TEMPLATE = "{user} ="
_INTEGER = re.compile(r"-?[0-9]{1,18}")  # bounded: no huge int parse on any input
_MAX_ATTEMPTS_FACTOR = 1000
SHOTS_SEED = 2**31 - 1  # the solved examples' draw, apart from any training seed


@dataclasses.dataclass(frozen=True)
class ArithmeticExample:
  """One problem ``a op b``.

  Attributes:
    a: left operand.
    op: ``"+"``, ``"-"`` or ``"*"``.
    b: right operand.
    answer: the exact integer result.
  """
  a: int
  op: str
  b: int
  answer: int

  @property
  def question(self) -> str:
    return f"{self.a} {self.op} {self.b}"


def split_of(a: int, op: str, b: int) -> str:
  """The split a problem belongs to: a fixed hash, the same on every machine and run.

  Example:
    >>> split_of(47, "+", 38) in SPLITS
    True
  """
  digest = hashlib.sha256(f"{a}{op}{b}".encode()).digest()
  return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64 else "train"


def generate_problems(count: int, *, seed: int = 0, split: str = "train", low: int = 10,
                      high: int = 99, ops: tuple[str, ...] = ("+",)) -> list[ArithmeticExample]:
  """``count`` distinct problems of one split, drawn with ``seed``.

  Args:
    count: number of problems (>= 0).
    seed: seed of the draw.
    split: ``"train"`` or ``"test"`` (disjoint by :func:`split_of`).
    low: smallest operand.
    high: largest operand.
    ops: operators to draw from.

  Raises:
    ValueError: for an unknown split or operator, ``low > high``, or a
      ``count`` larger than the split can hold (the message says how many it has).

  Example:
    >>> [p.question for p in generate_problems(2, seed=1)]
    ['52 + 56', '77 + 95']
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: use one of {SPLITS}")
  unknown = [op for op in ops if op not in OPS]
  if not ops or unknown:
    raise ValueError(f"ops={ops!r}: use a non-empty tuple of {tuple(OPS)}")
  if not (isinstance(count, int) and count >= 0):
    raise ValueError(f"count={count!r} must be an int >= 0")
  if low > high:
    raise ValueError(f"low={low} > high={high}: no operands to draw")
  span = high - low + 1
  # An upper bound of the split's size, so an impossible request fails at once instead of
  # looping; exact when small enough to count.
  total = span * span * len(ops)
  if total <= 100_000:
    available = sum(split_of(a, op, b) == split for op in ops
                    for a in range(low, high + 1) for b in range(low, high + 1))
    if count > available:
      raise ValueError(f"{count} {split} problems requested but operands in [{low}, {high}] "
                       f"with ops {ops} give only {available}: lower the count or widen the range")
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  seen, problems = set(), []
  for _ in range(max(count, 1) * _MAX_ATTEMPTS_FACTOR):
    if len(problems) == count:
      break
    a, b = (int(x) for x in rng.integers(low, high + 1, size=2))
    op = ops[int(rng.integers(len(ops)))]
    if (a, op, b) in seen or split_of(a, op, b) != split:
      continue
    seen.add((a, op, b))
    problems.append(ArithmeticExample(a, op, b, OPS[op](a, b)))
  if len(problems) < count:
    raise ValueError(f"found only {len(problems)} of {count} distinct {split} problems with "
                     f"operands in [{low}, {high}]: lower the count or widen the range")
  return problems


def parse_only_number(completion: str, end_token: str | None = None) -> int | None:
  """The integer a completion consists of, or None if it holds anything else.

  Example:
    >>> parse_only_number(" 85.\\n"), parse_only_number("The answer is 85.")
    (85, None)
  """
  if not isinstance(completion, str):
    return None
  text = completion.strip()
  if end_token and text.endswith(end_token):
    text = text[:-len(end_token)].strip()
  text = text.removesuffix(".")
  return int(text) if _INTEGER.fullmatch(text) else None


def first_number(completion: str) -> int | None:
  """The first integer in the text (the diagnostic reading), or None.

  Example:
    >>> first_number("The answer is 85, I think")
    85
  """
  if not isinstance(completion, str):
    return None
  match = _INTEGER.search(completion)
  return int(match.group(0)) if match else None


def arithmetic_reward(completion: str, answer: int, end_token: str | None = None) -> float:
  """1.0 if the completion is exactly the answer (see the module docstring), else 0.0.

  Example:
    >>> arithmetic_reward("85", 85), arithmetic_reward("85 apples", 85)
    (1.0, 0.0)
  """
  return 1.0 if parse_only_number(completion, end_token) == answer else 0.0


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Generated arithmetic problems, their prompt and the exact-answer reward.

  Attributes:
    low: smallest operand.
    high: largest operand.
    ops: operators drawn from.
    system: optional system message of chat prompts.
    end_token: stripped from the end of a completion before scoring, if present.

  Example:
    >>> task = ArithmeticTask()
    >>> ex = task.load(limit=1, seed=0)[0]
    >>> task.score(str(ex.answer), ex).metrics["reward"]
    1.0
  """
  low: int = 10
  high: int = 99
  ops: tuple[str, ...] = ("+",)
  system: str | None = None
  end_token: str | None = None
  shots: int = 0
  name: str = "arithmetic"

  def __post_init__(self):
    if not (isinstance(self.shots, int) and not isinstance(self.shots, bool) and self.shots >= 0):
      raise ValueError(f"shots={self.shots!r} must be an int >= 0")

  @property
  def solved_examples(self) -> tuple[ArithmeticExample, ...]:
    """The ``shots`` training problems shown, solved, before each plain prompt (fixed)."""
    return tuple(generate_problems(self.shots, seed=SHOTS_SEED, split="train", low=self.low,
                                   high=self.high, ops=self.ops))

  def load(self, source: str | None = None, *, split: str = "train", limit: int | None = None,
           seed: int | None = None) -> list[ArithmeticExample]:
    """``limit`` (default 1000) generated problems of ``split`` (``"train"`` or ``"test"``)."""
    if source is not None:
      raise ValueError(f"the arithmetic task generates its problems; got source={source!r}: "
                       "leave the source unset (None)")
    count = 1000 if limit is None else limit
    shown = set(self.solved_examples)
    # A problem shown solved in the prompt would be answered by copying: never ask it.
    problems = generate_problems(count + len(shown), seed=0 if seed is None else seed,
                                 split=split, low=self.low, high=self.high, ops=self.ops)
    return [p for p in problems if p not in shown][:count]

  def build_prompt(self, example: ArithmeticExample, tokenizer: Any = None) -> str:
    """``"What is a + b? Answer with only the number."`` as a chat turn; ``"a + b ="`` plain,
    after the solved examples when ``shots > 0``."""
    if tokenizer is None:
      solved = "".join(f"{p.question} = {p.answer}\n" for p in self.solved_examples)
      return solved + chat_prompt(example.question, None, plain_template=PLAIN_TEMPLATE)
    if self.shots:
      raise ValueError(f"shots={self.shots} prefixes solved problems to plain prompts, one per "
                       "line; build the prompt without a tokenizer (no chat template), or use "
                       "shots=0 for the chat question")
    return chat_prompt(CHAT_INSTRUCTION.format(question=example.question), tokenizer,
                       system=self.system)

  def reference_completion(self, example: ArithmeticExample) -> str:
    """The gold completion of :meth:`build_prompt`'s prompt (``" 85"`` plain, ``"85"`` chat),
    for likelihood scoring."""
    return f" {example.answer}" if self.shots else f"{example.answer}"

  def score(self, completion: str, example: ArithmeticExample) -> Scored:
    """Exact-answer reward and accuracy, and the first-number diagnostic."""
    if self.shots and isinstance(completion, str):
      completion = completion.split("\n", 1)[0]
    parsed = parse_only_number(completion, self.end_token)
    correct = float(parsed == example.answer)
    return Scored(
        prediction=None if parsed is None else str(parsed),
        target=str(example.answer),
        metrics={"reward": correct, "accuracy": correct,
                 "first_number": float(first_number(completion) == example.answer)})

"""Countdown: reach a target with the given numbers and + - * /, each used once.

The reward is the published one (Qiu et al. 2025, after TinyZero):
``0.1 * format + answer`` on ``"<think>" + completion`` (the prompt already
opened the think block). ``format`` is 1.0 when the text matches
``^<think>.*?</think>\\n<answer>.*?</answer>$`` (dotall), else 0.1 for a think
block plus 0.5 for an answer block. ``answer`` is 1.0 iff the last answer block
holds only digits, ``+ - * / ( )`` and spaces, uses exactly the given multiset
of numbers and evaluates to the target within 1e-5.

Differences from the reference code, all on inputs it mishandles: expressions
are evaluated by :mod:`es_jax.evaluation.safe_arith` instead of ``eval`` (so
``**`` and ``//`` score 0 rather than hanging or being accepted), answers longer
than the evaluator's length bound score 0, and the regexes are replaced by
linear-time string searches with the same meaning (the originals backtrack
quadratically on inputs like ``"<answer>" * 10**5``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from collections.abc import Sequence
from fractions import Fraction
from numbers import Integral
from pathlib import Path
from typing import Any

from es_jax.evaluation import data
from es_jax.evaluation.base import Scored, chat_prompt, tag_blocks
from es_jax.evaluation.safe_arith import DEFAULT_LIMITS, try_evaluate

TASK_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
    "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>.")
# Published wording, grammar included (TinyZero's instruct template).
SYSTEM_PROMPT = ("You are a helpful assistant. You first thinks about the reasoning process in "
                 "the mind and then provides the user with the answer.")
# TinyZero's base-model template, used when no tokenizer is given.
PLAIN_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer.\nUser: {user}\nAssistant: ")
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"

_ALLOWED_ANSWER = re.compile(r"^[0-9+\-*/() ]+$")  # '$' also allows one final '\n', as published
_INTEGER = re.compile(r"[0-9]+")
_TOLERANCE = Fraction(1, 10**5)
DEFAULT_HUB_NAME = "Jiayi-Pan/Countdown-Tasks-3to4"


@dataclasses.dataclass(frozen=True)
class CountdownExample:
  """One Countdown instance.

  Attributes:
    numbers: the numbers to use, each exactly once.
    target: the value to reach (an int for every generated or public instance).
    solution: an expression proving the instance solvable, when known.
  """
  numbers: tuple[int, ...]
  target: int | float
  solution: str | None = None


@dataclasses.dataclass(frozen=True)
class CountdownReward:
  """The reward and its parts: ``reward == 0.1 * format + answer``."""
  reward: float
  format: float
  answer: float


def _has_block(text: str, open_tag: str, close_tag: str) -> bool:
  start = text.find(open_tag)
  return start != -1 and text.find(close_tag, start + len(open_tag)) != -1


def _matches_full_format(text: str) -> bool:
  """``re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", text, re.DOTALL)``, linear time."""
  if not text.startswith("<think>"):
    return False
  if text.endswith("</answer>"):
    close = len(text) - len("</answer>")
  elif text.endswith("</answer>\n"):  # '$' matches before a final newline
    close = len(text) - len("</answer>\n")
  else:
    return False
  middle = text.find("</think>\n<answer>", len("<think>"))
  return middle != -1 and middle + len("</think>\n<answer>") <= close


def answer_blocks(text: str) -> list[str]:
  """The contents of ``<answer>...</answer>`` blocks, like the published ``re.findall``.

  Example:
    >>> answer_blocks("<answer>1</answer> x <answer> 2 </answer>")
    ['1', ' 2 ']
  """
  return tag_blocks(text, "<answer>", "</answer>")


def format_score(text: str) -> float:
  """The published format score of a full response (``"<think>"`` already prepended).

  Example:
    >>> format_score("<think>hm</think>\\n<answer>1+2</answer>")
    1.0
    >>> format_score("<think>hm</think> <answer>1+2</answer>")
    0.6
  """
  if _matches_full_format(text):
    return 1.0
  score = 0.0
  if _has_block(text, "<think>", "</think>"):
    score += 0.1
  if _has_block(text, "<answer>", "</answer>"):
    score += 0.5
  return score


def answer_score(text: str, numbers: Sequence[int], target: int | float | Fraction) -> float:
  """1.0 iff the last answer block is a valid expression over ``numbers`` equal to ``target``.

  Example:
    >>> answer_score("<answer>(1 + 2) * 3</answer>", [1, 2, 3], 9)
    1.0
  """
  blocks = answer_blocks(text)
  if not blocks:
    return 0.0
  content = blocks[-1]
  # Length first: everything after this point is then cheap.
  if not content or len(content) > DEFAULT_LIMITS.max_chars + 1:
    return 0.0
  if not _ALLOWED_ANSWER.match(content):
    return 0.0
  used = sorted(int(n) for n in _INTEGER.findall(content))
  if used != sorted(int(n) for n in numbers):
    return 0.0
  value = try_evaluate(content.rstrip("\n"))
  if value is None:
    return 0.0
  return 1.0 if abs(value - Fraction(target)) < _TOLERANCE else 0.0


def countdown_reward_parts(completion: str, numbers: Sequence[int], target: int | float,
                           *, end_token: str | None = None) -> CountdownReward:
  """The published reward with its format and answer parts.

  Args:
    completion: the generated text after the prompt (which ended in ``<think>``).
    numbers: the instance's numbers.
    target: the instance's target.
    end_token: stripped from the end of the response if present (e.g.
      ``"<|im_end|>"`` when decoding keeps special tokens).

  Returns:
    A :class:`CountdownReward`; any string gives a result, never an exception.

  Example:
    >>> countdown_reward_parts("ok</think>\\n<answer>3*3</answer>", [3, 3], 9).reward
    1.1
  """
  if not isinstance(completion, str):
    return CountdownReward(0.0, 0.0, 0.0)
  response = "<think>" + completion
  if end_token and response.endswith(end_token):
    response = response[:-len(end_token)]
  fmt = format_score(response)
  ans = answer_score(response, numbers, target)
  return CountdownReward(reward=0.1 * fmt + ans, format=fmt, answer=ans)


def countdown_reward(completion: str, numbers: Sequence[int], target: int | float,
                     *, end_token: str | None = None) -> float:
  """The published Countdown reward, ``0.1 * format + answer`` (see the module docstring).

  Example:
    >>> countdown_reward("3 times 3</think>\\n<answer>3 * 3</answer>", [3, 3], 9)
    1.1
    >>> round(countdown_reward("3 times 3</think>", [3, 3], 9), 6)  # think block only
    0.01
  """
  return countdown_reward_parts(completion, numbers, target, end_token=end_token).reward


def countdown_prompt(numbers: Sequence[int], target: int | float, tokenizer: Any = None,
                     *, system: str | None = SYSTEM_PROMPT) -> str:
  """The published prompt, ending with ``"Let me solve this step by step.\\n<think>"``.

  Args:
    numbers: shown as a Python list, e.g. ``[1, 2, 3]``.
    target: the target.
    tokenizer: with a chat template, the prompt is a chat (system + user) whose
      assistant turn begins with the prefix; None gives TinyZero's plain template.
    system: the system message for chat prompts.

  Example:
    >>> countdown_prompt([1, 2], 3).endswith("Let me solve this step by step.\\n<think>")
    True
  """
  user = TASK_PROMPT.format(numbers=list(numbers), target=target)
  return chat_prompt(user, tokenizer, system=system, assistant_prefix=ASSISTANT_PREFIX,
                     plain_template=PLAIN_TEMPLATE)


def solve(numbers: Sequence[int], target: int | float | Fraction) -> str | None:
  """Finds an expression using every number once that equals ``target`` exactly, or None.

  Exhaustive over all orders and operator trees, with exact fractions (so
  intermediate fractions and negatives are allowed, as the reward allows them).

  Example:
    >>> solve([1, 2, 3], 9)
    '(1 + 2) * 3'
  """
  goal = Fraction(target)
  items = [(Fraction(n), str(n)) for n in numbers]
  if not items:
    return None
  found = _search(items, goal)
  if found is not None and len(items) > 1:
    found = found[1:-1]  # the outermost pair of parentheses is redundant
  return found


def _search(items: list[tuple[Fraction, str]], goal: Fraction) -> str | None:
  if len(items) == 1:
    return items[0][1] if items[0][0] == goal else None
  for i, (a, expr_a) in enumerate(items):
    for j, (b, expr_b) in enumerate(items):
      if i == j:
        continue
      rest = [item for k, item in enumerate(items) if k not in (i, j)]
      combined = [(a - b, f"({expr_a} - {expr_b})")]
      if i < j:  # + and * commute: one order is enough
        combined += [(a + b, f"({expr_a} + {expr_b})"), (a * b, f"({expr_a} * {expr_b})")]
      if b != 0:
        combined.append((a / b, f"({expr_a} / {expr_b})"))
      for value, expr in combined:
        found = _search([(value, expr)] + rest, goal)
        if found is not None:
          return found
  return None


def _random_value(numbers: list[int], rng: random.Random) -> Fraction | None:
  """Combines the numbers in a random order with random operators (None on division by 0)."""
  values = [Fraction(n) for n in numbers]
  while len(values) > 1:
    i, j = rng.sample(range(len(values)), 2)
    a, b = values[i], values[j]
    op = rng.choice("+-*/")
    if op == "/" and b == 0:
      return None
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
    values = [v for k, v in enumerate(values) if k not in (i, j)] + [result]
  return values[0]


def generate_instances(num_instances: int, seed: int = 0, *,
                       number_counts: Sequence[int] = (3, 4), low: int = 1, high: int = 99,
                       min_target: int = 1, max_target: int = 100,
                       max_draws: int = 200_000) -> list[CountdownExample]:
  """Seeded, solvable Countdown instances, each with a solution found by :func:`solve`.

  Numbers are drawn uniformly from ``[low, high]``; the target is the value of a
  random operator tree over them, kept when it is an integer in
  ``[min_target, max_target]``. The solver then proves each instance solvable
  independently of how it was drawn.

  Args:
    num_instances: how many to make.
    seed: the same seed gives the same instances (Python's ``random.Random``).
    number_counts: how many numbers an instance may have, drawn uniformly
      (each >= 1).
    low, high: range of the numbers.
    min_target, max_target: range of the targets.
    max_draws: draws allowed for one instance before giving up (a target
      range that no draw can hit would otherwise loop forever).

  Raises:
    ValueError: for invalid arguments, for a target range that no expression
      can reach (every value over ``n`` numbers is at most
      ``2**(n-1) * high**n`` in magnitude; small number ranges are searched
      exhaustively), or when ``max_draws`` draws in a row give no target in
      ``[min_target, max_target]`` (naming the constraints).

  Example:
    >>> [ex.numbers for ex in generate_instances(2, seed=1)] == [
    ...     ex.numbers for ex in generate_instances(2, seed=1)]
    True
    >>> generate_instances(1, low=1, high=1, min_target=7, max_target=7)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: no instance exists: no expression over (3, 4) numbers from [low=1, high=1] ...
  """
  for name, value in (("num_instances", num_instances), ("low", low), ("high", high),
                      ("min_target", min_target), ("max_target", max_target),
                      ("max_draws", max_draws)):
    if not _is_int(value):
      raise ValueError(f"{name} must be an int, got {value!r}")
  if num_instances < 0:
    raise ValueError(f"num_instances must be >= 0, got {num_instances}")
  if max_draws < 1:
    raise ValueError(f"max_draws must be >= 1, got {max_draws}")
  if not 1 <= low <= high or min_target > max_target:
    raise ValueError(f"need 1 <= low <= high and min_target <= max_target, got low={low}, "
                     f"high={high}, min_target={min_target}, max_target={max_target}")
  try:
    counts = [] if isinstance(number_counts, (str, bytes)) else list(number_counts)
  except TypeError:  # a bare int
    counts = []
  if not counts or not all(_is_int(n) and n >= 1 for n in counts):
    raise ValueError(f"number_counts must be a non-empty sequence of ints >= 1, such as (3, 4), "
                     f"got {number_counts!r}")
  # Any value over n numbers is p/q with |p|, |q| <= 2**(n-1) * prod(numbers) (induction over
  # + - * /), so a target range beyond that bound is unreachable, however long one draws.
  bound = max(2**(n - 1) * high**n for n in counts)
  if min_target > bound or max_target < -bound:
    raise ValueError(
        f"no instance exists: expressions over {tuple(counts)} numbers from [low={low}, "
        f"high={high}] have values of magnitude at most {bound}, outside [min_target="
        f"{min_target}, max_target={max_target}]; change the target range, high or "
        "number_counts.")
  if not _some_target_reachable(counts, low, high, min_target, max_target):
    raise ValueError(
        f"no instance exists: no expression over {tuple(counts)} numbers from [low={low}, "
        f"high={high}] equals an integer in [min_target={min_target}, max_target="
        f"{max_target}] (checked exhaustively); change the target range, the number range or "
        "number_counts.")
  rng = random.Random(seed)
  instances = []
  draws = 0
  while len(instances) < num_instances:
    if draws == max_draws:
      raise ValueError(
          f"no target in [min_target={min_target}, max_target={max_target}] was reached in "
          f"{max_draws} draws of {tuple(counts)} numbers from [low={low}, high={high}]; widen "
          "the target range, the number range or number_counts (or raise max_draws if such "
          "targets are merely rare).")
    draws += 1
    numbers = [rng.randint(low, high) for _ in range(rng.choice(counts))]
    value = _random_value(numbers, rng)
    if value is None or value.denominator != 1 or not min_target <= value <= max_target:
      continue
    target = int(value)
    solution = solve(numbers, target)
    if solution is None:  # cannot happen: the drawn tree is itself a solution
      raise AssertionError(f"solver found no solution for {numbers} -> {target}")
    instances.append(CountdownExample(tuple(numbers), target, solution))
    draws = 0
  return instances


def _is_int(value: Any) -> bool:
  return isinstance(value, Integral) and not isinstance(value, bool)


def _all_values(numbers: Sequence[int]) -> set[Fraction]:
  """Every value of an expression using each number once (subset dynamic programming)."""
  values = {1 << i: {Fraction(n)} for i, n in enumerate(numbers)}
  for mask in range(1, 1 << len(numbers)):  # submasks are smaller, so already filled
    if mask in values:
      continue
    out: set[Fraction] = set()
    part = (mask - 1) & mask
    while part:
      for a in values[part]:
        for b in values[mask ^ part]:
          out.update((a + b, a - b, a * b))
          if b:
            out.add(a / b)
      part = (part - 1) & mask
    values[mask] = out
  return values[(1 << len(numbers)) - 1]


def _some_target_reachable(counts: Sequence[int], low: int, high: int, min_target: int,
                           max_target: int, *, max_multisets: int = 100) -> bool:
  """False only when exhaustive search over every multiset proves no target reachable.

  Used when there are few multisets (e.g. ``low == high``), where the random
  draws could otherwise run for a long time before giving up; else True.
  """
  sizes = sorted(set(counts))
  if sizes[-1] > 4 or sum(math.comb(high - low + n, n) for n in sizes) > max_multisets:
    return True
  return any(v.denominator == 1 and min_target <= v <= max_target
             for n in sizes
             for numbers in itertools.combinations_with_replacement(range(low, high + 1), n)
             for v in _all_values(numbers))


def _example_from_row(row: dict[str, Any], index: int, source: str | Path) -> CountdownExample:
  key = "nums" if "nums" in row else "numbers"
  numbers = data.require_field(row, key, (list, tuple), task="countdown", row_index=index,
                               source=source)
  if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
    raise data.DataError(f"countdown: row {index} of '{source}': field '{key}' should be a "
                         f"non-empty list of integers, got {numbers!r:.120}")
  target = data.require_field(row, "target", (int, float), task="countdown", row_index=index,
                              source=source)
  if isinstance(target, float):
    if target != target or target in (float("inf"), float("-inf")):
      raise data.DataError(f"countdown: row {index} of '{source}': target {target} is not finite")
    target = int(target) if target.is_integer() else target
  return CountdownExample(tuple(numbers), target)


@dataclasses.dataclass(frozen=True)
class CountdownTask:
  """The Countdown task: generated or public instances, the published prompt and reward.

  Attributes:
    system: system message of chat prompts.
    end_token: stripped from the end of a completion before scoring, if present.

  Example:
    >>> task = CountdownTask()
    >>> ex = task.load(limit=1, seed=0)[0]
    >>> task.score("</think>\\n<answer>" + ex.solution + "</answer>", ex).metrics["reward"]
    1.1
  """
  system: str | None = SYSTEM_PROMPT
  end_token: str | None = None
  name: str = "countdown"

  def load(self, source: str | Path | None = None, *, split: str = "train",
           limit: int | None = None, seed: int | None = None) -> list[CountdownExample]:
    """Generated instances (``source=None``), or a public set by hub name or local file.

    Args:
      source: None to generate; a hub name such as
        ``"Jiayi-Pan/Countdown-Tasks-3to4"`` or a local file whose rows have
        ``nums`` (or ``numbers``) and ``target``.
      split: hub split.
      limit: number of instances (generated: default 1000).
      seed: generator seed (default 0) or, for loaded sets, the seed of a
        random subset of ``limit`` rows.
    """
    if source is None:
      return generate_instances(1000 if limit is None else limit, seed=seed or 0)
    rows = data.load_rows(source, task="countdown", split=split)
    return [_example_from_row(rows[i], i, source)
            for i in data.select_indices(len(rows), limit, seed)]

  def build_prompt(self, example: CountdownExample, tokenizer: Any = None) -> str:
    """The published prompt for one instance (chat form when a tokenizer is given)."""
    return countdown_prompt(example.numbers, example.target, tokenizer, system=self.system)

  def score(self, completion: str, example: CountdownExample) -> Scored:
    """Reward parts as metrics; ``accuracy`` is the answer part (0 or 1)."""
    parts = countdown_reward_parts(completion, example.numbers, example.target,
                                   end_token=self.end_token)
    blocks = answer_blocks("<think>" + completion) if isinstance(completion, str) else []
    return Scored(
        prediction=blocks[-1] if blocks else None,
        target=str(example.target),
        metrics={"reward": parts.reward, "accuracy": parts.answer, "format": parts.format})

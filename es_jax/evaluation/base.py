"""What every task shares: the scored-completion record, the task protocols, prompt formatting.

A task is a small object. Generative tasks (Countdown, GSM8K, HellaSwag's
numbered-choice protocol) turn an example into a prompt and score a
completion; log-likelihood tasks (HellaSwag's lm-eval protocol) turn an example
into (context, continuation) requests and score their log-probs. The runner
(:mod:`es_jax.evaluation.runner`) needs nothing else from a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from es_jax.evaluation.loglik import ChoiceLoglik


@dataclasses.dataclass(frozen=True)
class Scored:
  """The outcome of scoring one example.

  Attributes:
    prediction: what was parsed from the output (an expression, a number, an
      option index as text), or None when nothing could be parsed.
    target: the gold answer as text.
    metrics: named scores for this example; every task reports ``"accuracy"``
      (0 or 1) and ``"reward"`` (the training signal, equal to accuracy unless
      the task defines a shaped reward such as Countdown's format bonus).
  """
  prediction: str | None
  target: str
  metrics: Mapping[str, float]


@runtime_checkable
class GenerativeTask(Protocol):
  """A task scored on generated text."""

  name: str

  def load(self, source: str | None = None, **kwargs: Any) -> list[Any]:
    """Returns the examples (task-specific records)."""

  def build_prompt(self, example: Any, tokenizer: Any = None) -> str:
    """The model input for one example; with a tokenizer, via its chat template."""

  def score(self, completion: str, example: Any) -> Scored:
    """Parses and scores one completion; never raises on any string."""


@runtime_checkable
class LoglikTask(Protocol):
  """A task scored by comparing log-likelihoods of candidate continuations."""

  name: str

  def load(self, source: str | None = None, **kwargs: Any) -> list[Any]:
    """Returns the examples (task-specific records)."""

  def loglik_requests(self, example: Any) -> list[tuple[str, str]]:
    """The (context, continuation) pairs to score for one example."""

  def score_logliks(self, example: Any, logliks: Sequence[ChoiceLoglik]) -> Scored:
    """Turns the scored requests of one example into metrics."""


def chat_prompt(user: str, tokenizer: Any = None, *, system: str | None = None,
                assistant_prefix: str = "", plain_template: str = "{user}") -> str:
  """Builds a prompt, through the tokenizer's chat template when one is given.

  Args:
    user: the user message.
    tokenizer: a Hugging Face tokenizer with a ``chat_template``; None gives a
      plain prompt.
    system: optional system message (chat prompts only).
    assistant_prefix: text that opens the assistant turn (both forms), e.g.
      Countdown's ``"Let me solve this step by step.\\n<think>"``.
    plain_template: the plain prompt, with ``{user}`` standing for the message.

  Returns:
    The prompt text, ending with the assistant prefix.

  Example:
    >>> chat_prompt("2+2?", plain_template="Q: {user}\\nA:")
    'Q: 2+2?\\nA:'
  """
  if tokenizer is None:
    return plain_template.format(user=user) + assistant_prefix
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
        "the tokenizer has no chat_template; pass tokenizer=None for a plain prompt "
        "or set tokenizer.chat_template")
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return text + assistant_prefix


def tag_blocks(text: str, open_tag: str, close_tag: str) -> list[str]:
  """Contents of ``open_tag ... close_tag`` blocks, like ``re.findall`` with a lazy dotall group.

  Runs in linear time, unlike the regex, which backtracks quadratically on
  inputs with many opening tags and no closing one.

  Example:
    >>> tag_blocks("<answer>1</answer> x <answer> 2 </answer>", "<answer>", "</answer>")
    ['1', ' 2 ']
  """
  blocks = []
  pos = 0
  while True:
    start = text.find(open_tag, pos)
    if start == -1:
      return blocks
    end = text.find(close_tag, start + len(open_tag))
    if end == -1:
      return blocks
    blocks.append(text[start + len(open_tag):end])
    pos = end + len(close_tag)

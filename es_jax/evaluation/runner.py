"""Evaluate one model, or every member of an ES population, on a task.

Models plug in as plain callables, so this module knows nothing about Flax,
sampling or sharding:

* :class:`Generator` -- ``generate_fn(prompts) -> completions``, one string per
  prompt (greedy decoding is the caller's choice, as the papers use it);
* :class:`PopulationGenerator` -- ``generate_fn(prompts) -> [members][prompts]``,
  every member's completions for the same prompts (e.g. a vmapped EGGROLL
  forward), so member ``m``'s fitness is ``result.fitness()[m]``;
* :class:`~es_jax.evaluation.loglik.LogitsFn` -- ``logits_fn(input_ids,
  attention_mask) -> logits`` for log-likelihood tasks.

Completions should be decoded without special tokens (or set the task's
``end_token``). Results are frozen records that round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from es_jax.evaluation.base import GenerativeTask, LoglikTask, Scored
from es_jax.evaluation.loglik import LogitsFn, TokenLogprobsFn, score_continuations


class Generator(Protocol):
  """One model: ``generate_fn(prompts) -> list[str]``, one completion per prompt, in order."""

  def __call__(self, prompts: Sequence[str]) -> Sequence[str]:
    ...


class PopulationGenerator(Protocol):
  """A population: ``generate_fn(prompts) -> list[list[str]]``, shape members x prompts."""

  def __call__(self, prompts: Sequence[str]) -> Sequence[Sequence[str]]:
    ...


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """One example's outcome.

  Attributes:
    index: position of the example in the evaluated list.
    prompt: the model input (for log-likelihood tasks, the shared context).
    completion: the generated text ("" for log-likelihood tasks).
    prediction: what was parsed from the output, or None.
    target: the gold answer as text.
    metrics: per-example metrics (see :class:`~es_jax.evaluation.base.Scored`).
    details: extra JSON-serialisable data, e.g. per-choice log-likelihoods.
  """
  index: int
  prompt: str
  completion: str
  prediction: str | None
  target: str
  metrics: Mapping[str, float]
  details: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class EvalSummary:
  """Means of every per-example metric (``"accuracy"``, ``"reward"``, ...)."""
  task: str
  num_examples: int
  metrics: Mapping[str, float]


class _JsonMixin:
  """``to_json`` / ``from_json`` for a class with ``to_dict`` / ``from_dict``."""

  def to_json(self, path: str | Path | None = None) -> str:
    """The result as JSON text, also written to ``path`` when given."""
    text = json.dumps(self.to_dict(), indent=1)
    if path is not None:
      Path(path).write_text(text)
    return text

  @classmethod
  def from_json(cls, text_or_path: str | Path):
    """Reads :meth:`to_json` output (JSON text, or a path to a file holding it)."""
    return cls.from_dict(json.loads(_read_json_text(text_or_path)))


@dataclasses.dataclass(frozen=True)
class EvalResult(_JsonMixin):
  """A summary plus the per-example records; ``to_json``/``from_json`` round-trip."""
  summary: EvalSummary
  records: tuple[EvalRecord, ...]

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, payload: Mapping[str, Any]) -> EvalResult:
    """Inverse of :meth:`to_dict`."""
    try:
      return cls(EvalSummary(**payload["summary"]),
                 tuple(EvalRecord(**record) for record in payload["records"]))
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a serialised EvalResult: {e}") from e



@dataclasses.dataclass(frozen=True)
class PopulationEvalResult(_JsonMixin):
  """One :class:`EvalResult` per population member, on the same examples."""
  members: tuple[EvalResult, ...]

  @property
  def summaries(self) -> list[EvalSummary]:
    """Each member's summary, in member order."""
    return [member.summary for member in self.members]

  def fitness(self, metric: str = "reward") -> np.ndarray:
    """Each member's mean ``metric``, shape ``[members]`` (the ES fitness vector)."""
    return np.array([member.summary.metrics[metric] for member in self.members], np.float64)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict."""
    return {"members": [member.to_dict() for member in self.members]}

  @classmethod
  def from_dict(cls, payload: Mapping[str, Any]) -> PopulationEvalResult:
    """Inverse of :meth:`to_dict`."""
    if "members" not in payload:
      raise ValueError("not a serialised PopulationEvalResult: no 'members'")
    return cls(tuple(EvalResult.from_dict(member) for member in payload["members"]))



def _read_json_text(text_or_path: str | Path) -> str:
  if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
    try:
      return Path(text_or_path).read_text()
    except OSError as e:
      raise ValueError(f"cannot read results file '{text_or_path}': {e}") from e
  return str(text_or_path)


def summarize(task_name: str, records: Sequence[EvalRecord]) -> EvalSummary:
  """Averages every metric over the records.

  Example:
    >>> recs = [EvalRecord(i, "", "", None, "", {"accuracy": a}) for i, a in enumerate([1.0, 0.0])]
    >>> summarize("demo", recs).metrics
    {'accuracy': 0.5}
  """
  names = list(dict.fromkeys(name for record in records for name in record.metrics))
  metrics = {name: float(np.mean([record.metrics.get(name, 0.0) for record in records]))
             for name in names}
  return EvalSummary(task=task_name, num_examples=len(records), metrics=metrics)


def _record(index: int, prompt: str, completion: str, scored: Scored,
            details: Mapping[str, Any] | None = None) -> EvalRecord:
  return EvalRecord(index, prompt, completion, scored.prediction, scored.target,
                    {name: float(value) for name, value in scored.metrics.items()}, details)


def _check_generative(task: Any) -> None:
  if getattr(task, "protocol", "generative") == "loglik":
    raise ValueError(f"task '{task.name}' uses the loglik protocol: call evaluate_loglik, or "
                     "make the task with protocol='generative'")
  if not isinstance(task, GenerativeTask):
    raise TypeError(f"{type(task).__name__} is not a generative task (needs name, load, "
                    "build_prompt and score)")


def _batches(n: int, batch_size: int) -> list[range]:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _show_progress(progress: bool | None, num_batches: int) -> bool:
  return num_batches > 10 if progress is None else progress


def evaluate_generation(task: GenerativeTask, examples: Sequence[Any], generate_fn: Generator,
                        *, tokenizer: Any = None, batch_size: int = 32,
                        progress: bool | None = None) -> EvalResult:
  """Generates for every example, in batches, and scores each completion.

  Args:
    task: a generative task (Countdown, GSM8K, HellaSwag with ``protocol="generative"``).
    examples: the task's examples, e.g. ``task.load(...)``.
    generate_fn: one model, see :class:`Generator`.
    tokenizer: passed to ``task.build_prompt`` (chat template); None = plain prompts.
    batch_size: prompts per ``generate_fn`` call.
    progress: tqdm bar; None shows it when there are more than 10 batches.

  Returns:
    An :class:`EvalResult`.

  Example:
    >>> from es_jax.evaluation.gsm8k import GSM8KTask, GSM8KExample
    >>> examples = [GSM8KExample("1+1?", "#### 2", "2"), GSM8KExample("2+2?", "#### 4", "4")]
    >>> result = evaluate_generation(GSM8KTask(), examples, lambda ps: ["#### 2"] * len(ps))
    >>> result.summary.metrics["accuracy"]
    0.5
  """
  _check_generative(task)
  prompts = [task.build_prompt(example, tokenizer) for example in examples]
  completions: list[str] = []
  batches = _batches(len(prompts), batch_size)
  for batch in tqdm(batches, desc=f"eval {task.name}",
                    disable=not _show_progress(progress, len(batches))):
    outputs = list(generate_fn([prompts[i] for i in batch]))
    if len(outputs) != len(batch):
      raise ValueError(f"generate_fn returned {len(outputs)} completions for {len(batch)} "
                       f"prompts (examples {batch.start}-{batch.stop - 1})")
    completions.extend(outputs)
  records = tuple(
      _record(i, prompts[i], completions[i], task.score(completions[i], examples[i]))
      for i in range(len(examples)))
  return EvalResult(summarize(task.name, records), records)


def evaluate_population(task: GenerativeTask, examples: Sequence[Any],
                        generate_fn: PopulationGenerator, *, tokenizer: Any = None,
                        batch_size: int = 32, progress: bool | None = None) -> PopulationEvalResult:
  """Like :func:`evaluate_generation` for every population member at once.

  Args:
    task: a generative task.
    examples: the examples every member is evaluated on.
    generate_fn: see :class:`PopulationGenerator`; must return the same number
      of members for every batch.
    tokenizer: passed to ``task.build_prompt``.
    batch_size: prompts per call.
    progress: tqdm bar; None shows it when there are more than 10 batches.

  Returns:
    A :class:`PopulationEvalResult`; ``fitness()`` gives the per-member mean reward.

  Example:
    >>> from es_jax.evaluation.gsm8k import GSM8KTask, GSM8KExample
    >>> examples = [GSM8KExample("1+1?", "#### 2", "2")]
    >>> pop = evaluate_population(GSM8KTask(), examples, lambda ps: [["#### 2"], ["#### 3"]])
    >>> pop.fitness().tolist()
    [1.0, 0.0]
  """
  _check_generative(task)
  prompts = [task.build_prompt(example, tokenizer) for example in examples]
  per_member: list[list[str]] | None = None
  batches = _batches(len(prompts), batch_size)
  for batch in tqdm(batches, desc=f"eval {task.name} (population)",
                    disable=not _show_progress(progress, len(batches))):
    outputs = [list(member) for member in generate_fn([prompts[i] for i in batch])]
    if per_member is None:
      if not outputs:
        raise ValueError("generate_fn returned no population members")
      per_member = [[] for _ in outputs]
    if len(outputs) != len(per_member):
      raise ValueError(f"generate_fn returned {len(outputs)} members for examples "
                       f"{batch.start}-{batch.stop - 1}, but {len(per_member)} before")
    for m, member_outputs in enumerate(outputs):
      if len(member_outputs) != len(batch):
        raise ValueError(f"generate_fn returned {len(member_outputs)} completions for member "
                         f"{m} but {len(batch)} prompts (examples {batch.start}-{batch.stop - 1})")
      per_member[m].extend(member_outputs)
  members = []
  for completions in per_member or []:
    records = tuple(
        _record(i, prompts[i], completions[i], task.score(completions[i], examples[i]))
        for i in range(len(examples)))
    members.append(EvalResult(summarize(task.name, records), records))
  return PopulationEvalResult(tuple(members))


def evaluate_loglik(task: LoglikTask, examples: Sequence[Any], logits_fn: LogitsFn | None,
                    tokenizer: Any, *, batch_size: int = 8, bucket: int = 16,
                    max_length: int | None = None, progress: bool | None = None,
                    logprobs_fn: TokenLogprobsFn | None = None) -> EvalResult:
  """Scores every example's candidate continuations by log-likelihood.

  Args:
    task: a log-likelihood task (HellaSwag with ``protocol="loglik"``).
    examples: the task's examples.
    logits_fn: the model, see :class:`~es_jax.evaluation.loglik.LogitsFn`; None
      when ``logprobs_fn`` is given.
    tokenizer: the model's Hugging Face tokenizer.
    batch_size, bucket, max_length, logprobs_fn: see
      :func:`~es_jax.evaluation.loglik.score_continuations`.
    progress: tqdm bar; None shows it when there are more than 50 batches.

  Returns:
    An :class:`EvalResult` whose records carry per-choice
    ``[sum_logprob, num_tokens, num_chars]`` under ``details["choices"]``.
  """
  if not isinstance(task, LoglikTask):
    raise TypeError(f"{type(task).__name__} is not a log-likelihood task (needs "
                    "loglik_requests and score_logliks)")
  requests_per_example = [task.loglik_requests(example) for example in examples]
  flat = [request for requests in requests_per_example for request in requests]
  scores = score_continuations(logits_fn, tokenizer, flat, batch_size=batch_size, bucket=bucket,
                               max_length=max_length, progress=progress, logprobs_fn=logprobs_fn)
  records = []
  start = 0
  for i, (example, requests) in enumerate(zip(examples, requests_per_example)):
    example_scores = scores[start:start + len(requests)]
    start += len(requests)
    scored = task.score_logliks(example, example_scores)
    context = requests[0][0] if requests else ""
    records.append(_record(i, context, "", scored,
                           {"choices": [list(score) for score in example_scores]}))
  records = tuple(records)
  return EvalResult(summarize(task.name, records), records)

"""ES fitness from the likelihood of the gold answer (``es.fitness=answer_logprob``).

A member's fitness is the mean over the iteration's prompts (or another
reduction of the ``(members, prompts)`` matrix, see ``es.prompt_centering``) of
``log p_member(gold completion | prompt)``, teacher-forced: one batched forward
per member chunk, no decoding. It is a dense signal where the exact-answer
reward of a few prompts is almost the same for every member (a 135M model's
members, 16 prompts and a 0/1 reward gave identical fitness vectors, so a zero
update), and it needs a task that knows its gold completion
(``reference_completion``). Held-out evaluation still decodes greedily and
scores the task's own reward.

The gold completion is tokenized the lm-eval way
(:func:`es_jax.evaluation.encode_pair`), the same as HellaSwag's scoring.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import es_jax
from es_jax.evaluation import encode_pair
from es_jax.models import Transformer, token_logprobs

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AnswerSet:
  """Prompts followed by their gold completions, right-padded to one length."""
  input_ids: np.ndarray    # (n, T) int32
  attention_mask: np.ndarray  # (n, T) int32
  answer_mask: np.ndarray  # (n, T) float32: 1 at the gold completion's tokens


def encode_answers(task: Any, examples: Sequence[Any], tokenizer: Any, *,
                   chat_template: bool) -> AnswerSet:
  """``prompt + gold completion`` of every example, as the model reads them.

  Raises:
    ValueError: the task has no gold completion (``reference_completion``).
  """
  if not hasattr(task, "reference_completion"):
    raise ValueError(f"es.fitness=answer_logprob needs a task with a gold completion "
                     f"(reference_completion); {task.name!r} has none: use es.fitness=reward")
  pairs = [encode_pair(tokenizer, task.build_prompt(ex, tokenizer if chat_template else None),
                       task.reference_completion(ex)) for ex in examples]
  length = max(len(ctx) + len(ans) for ctx, ans in pairs)
  ids = np.full((len(pairs), length), tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((len(pairs), length), np.int32)
  answer = np.zeros((len(pairs), length), np.float32)
  for row, (ctx, ans) in enumerate(pairs):
    ids[row, :len(ctx) + len(ans)] = ctx + ans
    mask[row, :len(ctx) + len(ans)] = 1
    answer[row, len(ctx):len(ctx) + len(ans)] = 1
  return AnswerSet(ids, mask, answer)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk_logprob(model: Transformer, num_members: int, opt_state, params, first_member,
                   input_ids, attention_mask, answer_mask) -> jax.Array:
  """``(members, rows)`` summed log-probs of the gold tokens under members ``first + k``."""
  def member(i):
    noise = es_jax.member_noise(opt_state, params, i)
    return jnp.sum(token_logprobs(model, params, input_ids, attention_mask, noise) * answer_mask,
                   axis=-1)
  return jax.lax.map(member, first_member + jnp.arange(num_members))


def population_answer_logprob(model: Transformer, opt_state, params: PyTree, answers: AnswerSet,
                              indices, *, population: int, chunk_size: int) -> np.ndarray:
  """Each member's gold-answer log-probability on each of ``answers[indices]``, ``(N, P)``."""
  indices = np.asarray(indices)
  ids, mask, answer = (answers.input_ids[indices], answers.attention_mask[indices],
                       answers.answer_mask[indices])
  by_prompt = np.empty((population, len(indices)))
  for first in range(0, population, chunk_size):
    n = min(chunk_size, population - first)
    by_prompt[first:first + n] = np.asarray(
        _chunk_logprob(model, n, opt_state, params, first, ids, mask, answer))
  return by_prompt

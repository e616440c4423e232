"""Decoding for training and evaluation: greedy completions of one model, and the
population's completions scored per member (reward, and KL to the base model).

Members are decoded ``chunk_size`` at a time and prompts ``prompt_batch`` at
a time, which bounds memory: with full-rank noise each member holds a copy of
the weights, with EGGROLL noise only its factors.

This calls :func:`es_jax.models.decode_population` (the layer under
:func:`es_jax.models.generate_text_population`) because the runner's prompts
are tokenized once per split and every batch is filled to ``prompt_batch``
rows: one compiled decode per run, where the text API tokenizes and pads each
call anew.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import es_jax
from es_jax.models import completion_texts, decode, decode_population
from experiments import policy_kl
from experiments.components import Components, PromptSet

PyTree = Any


@functools.partial(jax.jit, static_argnums=0)
def _chunk_noise(num_members: int, opt_state, params, first_member) -> PyTree:
  members = first_member + jnp.arange(num_members)
  return jax.vmap(lambda i: es_jax.member_noise(opt_state, params, i))(members)


def greedy(parts: Components, params: PyTree, prompts: PromptSet, indices, *, prompt_batch: int,
           max_new_tokens: int):
  """Greedy completions of ``prompts[indices]``: ``(texts, tokens, lengths)`` in index order."""
  texts, tokens, lengths = [], [], []
  for chunk, ids, mask in prompts.batches(indices, prompt_batch):
    out = decode(parts.model, params, ids, mask, max_new_tokens=max_new_tokens,
                 eos_ids=parts.eos_ids)
    t, n = np.asarray(out.tokens)[:len(chunk)], np.asarray(out.lengths)[:len(chunk)]
    texts += completion_texts(parts.tokenizer, t, n, parts.eos_ids)
    tokens.append(t)
    lengths.append(n)
  return texts, np.concatenate(tokens), np.concatenate(lengths)


def score(task: Any, examples, texts) -> np.ndarray:
  """Per-completion ``reward`` of the task's published definition."""
  return np.array([task.score(text, ex).metrics["reward"] for text, ex in zip(texts, examples)],
                  np.float64)


class PopulationScores(NamedTuple):
  """What :func:`score_population` measured of each member.

  Attributes:
    by_prompt: ``(N, P)`` each member's reward on each of the iteration's prompts.
    kl: ``(N,)`` each member's mean per-token ``KL(member || base)`` over its
      own completion tokens of those prompts (nats), or None when not measured.
  """
  by_prompt: np.ndarray
  kl: np.ndarray | None

  @property
  def rewards(self) -> np.ndarray:
    """``(N,)`` each member's mean reward over the prompts."""
    return self.by_prompt.mean(axis=1)


def score_population(parts: Components, opt_state, params: PyTree, indices, *, population: int,
                     chunk_size: int, prompt_batch: int, max_new_tokens: int,
                     kl_to_base: bool = False) -> PopulationScores:
  """Each member's mean reward over ``train[indices]`` (greedy decoding), and with
  ``kl_to_base`` its KL to the base model ``parts.params0`` on those completions.

  ``opt_state`` is the ES optimizer's state (a chain holding the ES step's
  state). The KL is :mod:`experiments.policy_kl`'s: the full-distribution KL
  at each completion position, summed over the member's completion tokens of
  every batch and divided by their number (batch filler rows are not counted).
  It costs two forwards per member over ``[prompt; completion]`` (the member's
  and the base model's) after the decode; without ``kl_to_base`` nothing extra runs.
  """
  examples = [parts.train.examples[i] for i in indices]
  by_prompt = np.empty((population, len(examples)))
  kl = np.empty(population) if kl_to_base else None
  for first in range(0, population, chunk_size):
    n = min(chunk_size, population - first)
    noise = _chunk_noise(n, opt_state, params, first)
    texts = [[] for _ in range(n)]
    kl_sums, kl_counts = np.zeros(n), np.zeros(n, np.int64)
    for chunk, ids, mask in parts.train.batches(indices, prompt_batch):
      out = decode_population(parts.model, params, noise, ids, mask,
                              max_new_tokens=max_new_tokens, eos_ids=parts.eos_ids)
      tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      for m in range(n):
        texts[m] += completion_texts(parts.tokenizer, tokens[m, :len(chunk)],
                                     lengths[m, :len(chunk)], parts.eos_ids)
      if kl_to_base:
        rows, rows_mask, counted = policy_kl.completion_rows(ids, mask, tokens, lengths)
        counted[:, len(chunk):] = False  # filler rows repeat the batch's first prompt
        sums, counts = policy_kl.members_kl_sums(parts.model, params, noise, parts.params0,
                                                 rows, rows_mask, counted)
        kl_sums += np.asarray(sums, np.float64)
        kl_counts += np.asarray(counts)
    for m in range(n):
      by_prompt[first + m] = score(parts.target_task, examples, texts[m])
    if kl_to_base:
      kl[first:first + n] = kl_sums / np.maximum(kl_counts, 1)
  return PopulationScores(by_prompt, kl)

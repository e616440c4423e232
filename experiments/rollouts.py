"""Decoding for training and evaluation: greedy completions of one model, and the
population's completions scored into per-member fitness.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import es_jax
from es_jax.models import completion_texts, decode, decode_population
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


def population_fitness(parts: Components, opt_state, params: PyTree, indices, *, population: int,
                       chunk_size: int, prompt_batch: int,
                       max_new_tokens: int) -> np.ndarray:
  """Each member's mean reward over ``train[indices]`` (greedy decoding), shape ``(N,)``.

  ``opt_state`` is the ES optimizer's state (a chain holding the ES step's state).
  """
  examples = [parts.train.examples[i] for i in indices]
  fitness = np.empty(population)
  for first in range(0, population, chunk_size):
    n = min(chunk_size, population - first)
    noise = _chunk_noise(n, opt_state, params, first)
    texts = [[] for _ in range(n)]
    for chunk, ids, mask in parts.train.batches(indices, prompt_batch):
      out = decode_population(parts.model, params, noise, ids, mask, max_new_tokens=max_new_tokens,
                              eos_ids=parts.eos_ids)
      tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      for m in range(n):
        texts[m] += completion_texts(parts.tokenizer, tokens[m, :len(chunk)],
                                     lengths[m, :len(chunk)],
                                     parts.eos_ids)
    for m in range(n):
      fitness[first + m] = score(parts.target_task, examples, texts[m]).mean()
  return fitness

"""KL of a policy (or one ES member) to the base model on completions it wrote.

The per-token KL is the full-distribution ``KL(pi || pi_0)`` at each
completion position (:func:`es_jax.evaluation.per_token_kl`), averaged over
the completion tokens. Both the evaluation's ``kl_to_base`` and the ES fitness
penalty (``es.kl_beta``) use these functions, so they measure the same thing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from es_jax.evaluation import masked_kl_sum
from es_jax.models import Transformer, logits_fn

PyTree = Any


def _kl_sum(model: Transformer, params, noise, ref_params, input_ids, attention_mask, counted,
            last: int):
  # The vocabulary projection runs on the last ``last`` positions only: the others are never
  # counted, and their (B, T, V) log-softmax would be computed and thrown away.
  logits = functools.partial(logits_fn, model, input_ids=input_ids,
                             attention_mask=attention_mask, last=last)
  logp = jax.nn.log_softmax(logits(params, noise=noise), axis=-1)
  logp0 = jax.nn.log_softmax(logits(ref_params), axis=-1)
  return masked_kl_sum(logp, logp0, counted[..., -last:])


def counted_tail(counted) -> int:
  """How many trailing positions hold every counted one (at least 1): the logits needed.

  Example:
    >>> counted_tail(np.array([[0, 1, 1, 0, 0], [0, 0, 1, 0, 0]], bool))
    4
  """
  columns = np.flatnonzero(np.asarray(counted).reshape(-1, np.shape(counted)[-1]).any(axis=0))
  return int(np.shape(counted)[-1] - columns[0]) if columns.size else 1


@functools.partial(jax.jit, static_argnums=(0, 6))
def _kl_sum_jit(model, params, ref_params, input_ids, attention_mask, counted, last):
  return _kl_sum(model, params, None, ref_params, input_ids, attention_mask, counted, last)


def kl_sum(model: Transformer, params: PyTree, ref_params: PyTree, input_ids, attention_mask,
           counted) -> tuple[jax.Array, jax.Array]:
  """``(sum of KL(pi_params || pi_ref) over the counted positions, their count)``.

  ``counted`` is a host array (its counted columns fix how many positions get logits).
  """
  return _kl_sum_jit(model, params, ref_params, input_ids, attention_mask, counted,
                     counted_tail(counted))


@functools.partial(jax.jit, static_argnums=(0, 7))
def _members_kl_sums_jit(model, params, noise, ref_params, input_ids, attention_mask, counted,
                         last):
  def one(args):
    member_noise, ids, mask, rows_counted = args
    return _kl_sum(model, params, member_noise, ref_params, ids, mask, rows_counted, last)
  return jax.lax.map(one, (noise, input_ids, attention_mask, counted))


def members_kl_sums(model: Transformer, params: PyTree, noise: PyTree, ref_params: PyTree,
                    input_ids, attention_mask, counted) -> tuple[jax.Array, jax.Array]:
  """:func:`kl_sum` of each member ``theta + noise[m]`` on its own rows ``input_ids[m]``.

  ``noise`` stacks the members' perturbations on a leading axis (as
  ``decode_population`` takes them); ``input_ids``, ``attention_mask`` and
  ``counted`` (a host array) are ``(members, B, T)``. Members run one after
  another (``lax.map``), so memory is one member's logits. Returns
  ``(members,)`` sums and counts.
  """
  return _members_kl_sums_jit(model, params, noise, ref_params, input_ids, attention_mask,
                              counted, counted_tail(counted))


def completion_rows(prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray,
                    lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``[prompt; completion]`` rows, their attention mask, and the positions whose logits
  predict a completion token (``counted``), for :func:`kl_sum`.

  Prompts are left-padded and completions right-padded (as decode returns
  them); the logits at position ``t`` predict token ``t + 1``, so completion
  token ``j`` is predicted at ``t_prompt + j - 1``. Works on ``(B, T)`` rows or
  ``(members, B, T)`` stacks (the prompts then broadcast over members).

  Example:
    >>> ids, mask, counted = completion_rows(np.array([[0, 7]]), np.array([[0, 1]]),
    ...                                      np.array([[8, 9, 0]]), np.array([2]))
    >>> ids.tolist(), mask.tolist(), counted.astype(int).tolist()
    ([[0, 7, 8, 9, 0]], [[0, 1, 1, 1, 0]], [[0, 1, 1, 0, 0]])
  """
  t_prompt, t_completion = prompt_ids.shape[-1], tokens.shape[-1]
  completion_mask = np.arange(t_completion) < lengths[..., None]
  lead = tokens.shape[:-1]
  ids = np.concatenate([np.broadcast_to(prompt_ids, lead + (t_prompt,)), tokens], axis=-1)
  mask = np.concatenate([np.broadcast_to(prompt_mask, lead + (t_prompt,)),
                         completion_mask.astype(np.int32)], axis=-1)
  counted = np.zeros(ids.shape, bool)
  counted[..., t_prompt - 1:t_prompt - 1 + t_completion] = completion_mask
  return ids, mask, counted

"""One metrics record every ``eval_every`` iterations: target and prior task, drift, KL.

Every score is of the current, unperturbed weights: target-task accuracy and
reward on held-out prompts (greedy), prior-task (HellaSwag) accuracy under the
configured protocol, the drift of ``theta_t - theta_0`` (global norm, sparsity
at tau = 1e-6, and both per group), and the mean per-token
``KL(pi_theta || pi_0)`` on the current model's own greedy completions.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from es_jax.evaluation import drift_report, evaluate_generation, evaluate_loglik
from es_jax.evaluation.drift import per_token_kl
from es_jax.models import Transformer, generate_text, logits_fn, token_logprobs
from experiments import rollouts
from experiments.components import Components
from experiments.config import ExperimentConfig

TAU = 1e-6  # the forgetting paper's sparsity threshold
Record = dict[str, Any]


@functools.partial(jax.jit, static_argnums=0)
def _kl_sum(model: Transformer, params, params0, input_ids, attention_mask, counted):
  logp = jax.nn.log_softmax(logits_fn(model, params, input_ids, attention_mask), axis=-1)
  logp0 = jax.nn.log_softmax(logits_fn(model, params0, input_ids, attention_mask), axis=-1)
  kl = per_token_kl(logp, logp0)
  return jnp.sum(jnp.where(counted, kl, 0.0)), jnp.sum(counted)


def completion_kl(c: Components, params, indices, tokens: np.ndarray, lengths: np.ndarray,
                  *, batch_size: int) -> float:
  """Mean per-token KL to the base model over the completion tokens of ``eval[indices]``."""
  total, count = 0.0, 0
  for start in range(0, len(indices), batch_size):
    rows = np.asarray(indices[start:start + batch_size])
    prompt_ids, prompt_mask = c.eval.input_ids[rows], c.eval.attention_mask[rows]
    n, t_prompt = prompt_ids.shape
    completion = tokens[start:start + batch_size]
    completion_mask = np.arange(completion.shape[1]) < lengths[start:start + batch_size, None]
    ids = np.concatenate([prompt_ids, completion], axis=1)
    mask = np.concatenate([prompt_mask, completion_mask.astype(np.int32)], axis=1)
    # Logits at position t predict token t + 1: completion token j is predicted at t_prompt + j - 1.
    counted = np.zeros(ids.shape, bool)
    counted[:, t_prompt - 1:t_prompt - 1 + completion.shape[1]] = completion_mask
    kl_sum, n_counted = _kl_sum(c.model, params, c.params0, ids, mask, counted)
    total += float(kl_sum)
    count += int(n_counted)
  return total / count if count else 0.0


def prior_accuracy(c: Components, config: ExperimentConfig, params, *,
                   progress: bool = False) -> tuple[float, list[int]] | None:
  """HellaSwag accuracy (``acc_norm`` under ``loglik``) of the current weights, and each
  item's 0/1 correctness (what a paired comparison of two records needs)."""
  if c.prior_task is None:
    return None
  if config.task.prior_protocol == "loglik":
    result = evaluate_loglik(c.prior_task, c.prior_examples, None, c.tokenizer,
                             batch_size=config.prompt_batch, progress=progress,
                             logprobs_fn=functools.partial(_token_logprobs, c.model, params))
  else:
    def generate(prompts):
      return generate_text(c.model, params, c.tokenizer, prompts, max_new_tokens=8,
                           eos_ids=c.eos_ids)
    result = evaluate_generation(c.prior_task, c.prior_examples, generate,
                                 tokenizer=c.tokenizer if config.model.chat_template else None,
                                 batch_size=config.prompt_batch, progress=progress)
  return (float(result.summary.metrics["accuracy"]),
          [int(r.metrics["accuracy"]) for r in result.records])


_token_logprobs = jax.jit(token_logprobs, static_argnums=0)


def snapshot(c: Components, config: ExperimentConfig, params, iteration: int, *,
             progress: bool = False, with_prior: bool = True) -> Record:
  """The metrics record of ``params`` at ``iteration`` (the prior task only ``with_prior``).

  ``seconds`` holds what the record cost (``prior``: the HellaSwag evaluation,
  ``total``: all of it), so a user can plan a run's evaluations.
  """
  start = time.perf_counter()
  eval_indices = np.arange(len(c.eval))
  texts, tokens, lengths = rollouts.greedy(c, params, c.eval, eval_indices,
                                           prompt_batch=config.prompt_batch,
                                           max_new_tokens=config.task.max_new_tokens)
  scored = [c.target_task.score(text, ex).metrics for text, ex in zip(texts, c.eval.examples)]
  kl_rows = eval_indices[:config.task.kl_prompts]
  drift = drift_report(params, c.params0, tau=TAU)
  prior_start = time.perf_counter()
  prior = prior_accuracy(c, config, params, progress=progress) if with_prior else None
  prior_seconds = time.perf_counter() - prior_start
  record = {
      "iteration": iteration,
      "target_accuracy": float(np.mean([m["accuracy"] for m in scored])),
      "target_reward": float(np.mean([m["reward"] for m in scored])),
      "prior_accuracy": None if prior is None else prior[0],
      "prior_correct": None if prior is None else prior[1],
      "kl_to_base": completion_kl(c, params, kl_rows, tokens[:len(kl_rows)],
                                  lengths[:len(kl_rows)], batch_size=config.prompt_batch),
      "update_norm": drift.global_norm,
      "sparsity": drift.sparsity,
      "group_norms": {name: g.norm for name, g in drift.groups.items()},
      "group_sparsity": {name: g.sparsity for name, g in drift.groups.items()},
  }
  record["seconds"] = {"prior": prior_seconds, "total": time.perf_counter() - start}
  return record

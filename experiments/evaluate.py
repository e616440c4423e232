"""One metrics record every ``eval_every`` iterations: target and prior task, drift, KL.

Every score is of the current, unperturbed weights: target-task accuracy and
reward on held-out prompts (greedy), each prior task's accuracy under the
configured protocol (with each item's correctness and log-prob margin), the
drift of ``theta_t - theta_0`` (global norm, sparsity at tau = 1e-6, and both
per group), and the mean per-token ``KL(pi_theta || pi_0)`` on the current
model's own greedy completions.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np

from es_jax.evaluation import drift_report, evaluate_generation, evaluate_loglik
from es_jax.models import generate_text, token_logprobs
from experiments import policy_kl, rollouts
from experiments.components import Components
from experiments.config import ExperimentConfig

TAU = 1e-6  # the forgetting paper's sparsity threshold
Record = dict[str, Any]


def completion_kl(parts: Components, params, indices, tokens: np.ndarray, lengths: np.ndarray,
                  *, batch_size: int) -> float:
  """Mean per-token KL to the base model over the completion tokens of ``held_out[indices]``."""
  total, count = 0.0, 0
  for start in range(0, len(indices), batch_size):
    rows = np.asarray(indices[start:start + batch_size])
    ids, mask, counted = policy_kl.completion_rows(
        parts.held_out.input_ids[rows], parts.held_out.attention_mask[rows],
        tokens[start:start + batch_size], lengths[start:start + batch_size])
    kl_sum, n_counted = policy_kl.kl_sum(parts.model, params, parts.params0, ids, mask, counted)
    total += float(kl_sum)
    count += int(n_counted)
  return total / count if count else 0.0


def prior_scores(parts: Components, config: ExperimentConfig, params, *,
                 progress: bool = False) -> dict[str, dict[str, Any]]:
  """Each prior task's accuracy of the current weights, with what a paired comparison of two
  records needs: each item's 0/1 ``correct`` and, under ``loglik``, its ``margin`` (the gold
  choice's log-prob over the best other's, normalised as the task's accuracy is: the
  continuous form of that accuracy)."""
  scores = {}
  for prior in parts.priors:
    if config.task.prior_protocol == "loglik":
      result = evaluate_loglik(prior.task, prior.examples, None, parts.tokenizer,
                               batch_size=config.prompt_batch, progress=progress,
                               logprobs_fn=functools.partial(_token_logprobs, parts.model, params))
      margin = "margin_norm" if prior.task.headline == "acc_norm" else "margin"
      margins = [float(r.metrics[margin]) for r in result.records]
    else:
      def generate(prompts):
        return generate_text(parts.model, params, parts.tokenizer, prompts, max_new_tokens=8,
                             eos_ids=parts.eos_ids)
      result = evaluate_generation(prior.task, prior.examples, generate,
                                   tokenizer=parts.tokenizer if config.model.chat_template else None,
                                   batch_size=config.prompt_batch, progress=progress)
      margins = None
    scores[prior.name] = {"accuracy": float(result.summary.metrics["accuracy"]),
                          "correct": [int(r.metrics["accuracy"]) for r in result.records],
                          "margin": margins}
  return scores


_token_logprobs = jax.jit(token_logprobs, static_argnums=0)


def snapshot(parts: Components, config: ExperimentConfig, params, iteration: int, *,
             progress: bool = False, with_prior: bool = True) -> Record:
  """The metrics record of ``params`` at ``iteration`` (the prior task only ``with_prior``).

  ``seconds`` holds what the record cost (``prior``: the prior tasks' evaluation,
  ``total``: all of it), so a user can plan a run's evaluations.
  """
  start = time.perf_counter()
  eval_indices = np.arange(len(parts.held_out))
  texts, tokens, lengths = rollouts.greedy(parts, params, parts.held_out, eval_indices,
                                           prompt_batch=config.prompt_batch,
                                           max_new_tokens=config.task.max_new_tokens)
  scored = [parts.target_task.score(text, ex).metrics
            for text, ex in zip(texts, parts.held_out.examples)]
  kl_rows = eval_indices[:config.task.kl_prompts]
  drift = drift_report(params, parts.params0, tau=TAU)
  prior_start = time.perf_counter()
  prior = prior_scores(parts, config, params, progress=progress) if with_prior else None
  prior_seconds = time.perf_counter() - prior_start
  record = {
      "iteration": iteration,
      "target_accuracy": float(np.mean([m["accuracy"] for m in scored])),
      "target_reward": float(np.mean([m["reward"] for m in scored])),
      # The suite's accuracy: the mean of its tasks' (each task weighs the same).
      "prior_accuracy": (float(np.mean([v["accuracy"] for v in prior.values()]))
                         if prior else None),
      "prior_tasks": prior or None,
      "kl_to_base": completion_kl(parts, params, kl_rows, tokens[:len(kl_rows)],
                                  lengths[:len(kl_rows)], batch_size=config.prompt_batch),
      "update_norm": drift.global_norm,
      "sparsity": drift.sparsity,
      "group_norms": {name: g.norm for name, g in drift.groups.items()},
      "group_sparsity": {name: g.sparsity for name, g in drift.groups.items()},
  }
  record["seconds"] = {"prior": prior_seconds, "total": time.perf_counter() - start}
  return record

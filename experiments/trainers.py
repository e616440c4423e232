"""One training iteration of each algorithm, over a state ``{"params", "opt_state"}``.

``EsTrainer``: the papers' ES as ``optax.chain(es_step, sgd(alpha)[, anchored_weight_decay])``
with the population's rewards computed by decoding (Python scoring), minus
``es.kl_beta`` times each member's KL to the base model when that is on, and
passed as ``fitness=``. ``GrpoTrainer``: the GRPO baseline of :mod:`experiments.grpo`
on the same model and task. Everything random is a function of the config's
seed and the iteration, so a state restored from a checkpoint continues
exactly as the uninterrupted run would. Each step reports ``params_finite``:
whether the updated params are all finite (the runner stops when they are not).

theta_0 lives once: the AWD and norm-cap states' anchors are the base params'
own arrays (``init`` does not copy them), and the ES step keeps them so (a
jitted function returns new buffers even for an input it passes through, so
the anchors go in but do not come out). :func:`anchor_paths` names them, for
the checkpoints to leave out.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

import es_jax
from es_jax.models import SCANNED_LAYERS
from es_jax.replay import all_finite
from experiments import checkpointing, components, grpo, likelihood, rollouts
from experiments.components import Components
from experiments.config import ExperimentConfig

PyTree = Any
State = dict[str, PyTree]


_all_finite = jax.jit(all_finite)
_ANCHORED = (es_jax.AnchoredWeightDecayState, es_jax.AnchoredNormCapState)


def _is_anchored(node: Any) -> bool:
  return isinstance(node, _ANCHORED)


def anchor_paths(state: State) -> tuple[str, ...]:
  """Where ``state`` holds theta_0: its AWD and norm-cap anchors, as checkpoint paths.

  What :meth:`~experiments.checkpointing.RunCheckpointer.save` leaves out and
  :meth:`~experiments.checkpointing.RunCheckpointer.restore` rebuilds from the
  base (``anchors=``). Found by the states' types, wherever the chain puts them.
  """
  nodes, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_anchored)
  return tuple(checkpointing.path_name((*path, jax.tree_util.GetAttrKey("anchor")))
               for path, node in nodes if _is_anchored(node))


def _without_anchors(opt_state: PyTree) -> PyTree:
  return jax.tree.map(lambda node: node._replace(anchor=None) if _is_anchored(node) else node,
                      opt_state, is_leaf=_is_anchored)


def _with_anchors_of(opt_state: PyTree, source: PyTree) -> PyTree:
  """``opt_state`` with the anchors of ``source`` (the same state before the step) put back."""
  return jax.tree.map(
      lambda node, old: node._replace(anchor=old.anchor) if _is_anchored(node) else node,
      opt_state, source, is_leaf=_is_anchored)


def es_recipe(config: ExperimentConfig) -> es_jax.EsRecipe:
  """ES direction (Qiu et al.'s estimator), ``sgd(alpha)``, then the mitigations and AWD (the
  published post-step rule) in :class:`~experiments.config.MitigationSpec`'s order, as the
  recipe an ES patch of the run stores."""
  es, awd, mitigation = config.es, config.awd, config.mitigation
  post = []
  if mitigation.sparsify_fraction:
    post.append(es_jax.SparsifyRecipe(mitigation.sparsify_fraction,
                                      scope=mitigation.sparsify_scope,
                                      residual=mitigation.sparsify_residual))
  if awd.kind != "none":
    post.append(es_jax.AwdRecipe(awd.strength, kind=awd.kind))
  if mitigation.norm_cap:
    post.append(es_jax.NormCapRecipe(mitigation.norm_cap, scope=mitigation.norm_cap_scope))
  return es_jax.EsRecipe(
      es_jax.EsStepRecipe(population=es.population, sigma=es.sigma, seed=config.seed,
                          rank=es.rank, antithetic=es.antithetic, shaping=es.shaping,
                          estimator="qiu", freeze=es.frozen,
                          scanned=SCANNED_LAYERS if config.model.scan_layers else ()),
      es_jax.OptimizerRecipe("sgd", es.learning_rate), tuple(post))


class EsTrainer:
  """ES fine-tuning: score every member on the iteration's prompts (greedy decoding and the
  task's reward, or the gold answer's likelihood), shape, step."""

  def __init__(self, parts: Components, config: ExperimentConfig):
    self.parts, self.config = parts, config
    self.recipe = es_recipe(config)
    self.tx = self.recipe.build()
    self.answers = None
    if config.es.fitness == "answer_logprob":
      self.answers = likelihood.encode_answers(parts.target_task, parts.train.examples,
                                               parts.tokenizer,
                                               chat_template=config.model.chat_template)

    @jax.jit
    def apply(params, opt_state, fitness):
      updates, opt_state = self.tx.update(None, opt_state, params, fitness=fitness)
      params = optax.apply_updates(params, updates)
      # The anchors are not returned: they would come back as a copy of theta_0 per transform.
      # Nothing is donated, so the caller's anchors stay valid to be put back.
      # all_finite is checked inside the update: no extra pass.
      return params, _without_anchors(opt_state), all_finite(params)

    self._apply = apply

  def init(self, params: PyTree) -> State:
    return {"params": params, "opt_state": self.tx.init(params)}

  def step(self, state: State, iteration: int) -> tuple[State, dict[str, Any]]:
    config = self.config
    indices, position = components.prompt_indices(config, iteration)
    kl_to_base = config.es.kl_beta > 0
    if self.answers is None or kl_to_base:
      # With the likelihood fitness the decode is run for the KL alone: it is measured on
      # each member's own greedy completions either way.
      scores = rollouts.score_population(
          self.parts, state["opt_state"], state["params"], indices,
          population=config.es.population, chunk_size=config.es.effective_chunk_size,
          prompt_batch=config.prompt_batch, max_new_tokens=config.task.max_new_tokens,
          kl_to_base=kl_to_base)
    if self.answers is not None:
      scores = rollouts.PopulationScores(likelihood.population_answer_logprob(
          self.parts.model, state["opt_state"], state["params"], self.answers, indices,
          population=config.es.population, chunk_size=config.es.effective_chunk_size),
          scores.kl if kl_to_base else None)
    rewards = np.asarray(scores.rewards, np.float32)
    fitness = scores.rewards
    if config.es.prompt_centering != "none":
      fitness = np.asarray(es_jax.per_prompt_centering(
          scores.by_prompt, normalize=config.es.prompt_centering == "normalize"), np.float64)
    if scores.kl is not None:
      fitness = fitness - config.es.kl_beta * scores.kl
    fitness = np.asarray(fitness, np.float32)
    # ``fitness`` is what the update sees, and the patch stores.
    params, opt_state, finite = self._apply(state["params"], state["opt_state"], fitness)
    opt_state = _with_anchors_of(opt_state, state["opt_state"])
    info = {"fitness": fitness, "train_reward": float(np.nanmean(rewards)),
            "train_reward_max": float(np.nanmax(rewards)),
            "failed_members": int(np.sum(~np.isfinite(fitness))), "data_position": position,
            "params_finite": bool(finite)}
    if scores.kl is not None:
      info["train_kl"] = float(np.nanmean(scores.kl))  # mean over members; penalty = beta * it
    return {"params": params, "opt_state": opt_state}, info


class GrpoTrainer:
  """The GRPO baseline: sample ``group_size`` completions per prompt, score, one Adam step."""

  def __init__(self, parts: Components, config: ExperimentConfig):
    self.parts, self.config = parts, config
    self.optimizer = config.grpo.optimizer()
    self.update = grpo.make_update(config.grpo, parts.model, self.optimizer)

  def init(self, params: PyTree) -> State:
    return {"params": params, "opt_state": self.optimizer.init(params)}

  def step(self, state: State, iteration: int) -> tuple[State, dict[str, Any]]:
    parts = self.parts
    indices, position = components.prompt_indices(self.config, iteration)
    examples = [parts.train.examples[i] for i in indices]

    def reward_fn(texts, prompt_of_row):
      return rollouts.score(parts.target_task, [examples[p] for p in prompt_of_row], texts)

    out = grpo.grpo_iteration(
        parts.model, self.update, self.config.grpo, state["params"], state["opt_state"],
        parts.params0, parts.train.input_ids[indices], parts.train.attention_mask[indices],
        max_new_tokens=self.config.task.max_new_tokens, tokenizer=parts.tokenizer,
        reward_fn=reward_fn, eos_ids=parts.eos_ids,
        key=jax.random.fold_in(jax.random.key(self.config.seed), iteration))
    info = {"train_reward": out.metrics["reward_mean"], "data_position": position,
            "kl": out.metrics.get("kl"), "zero_std_groups": out.metrics["zero_std_groups"],
            "params_finite": bool(_all_finite(out.params))}
    return {"params": out.params, "opt_state": out.opt_state}, info


def make_trainer(parts: Components, config: ExperimentConfig) -> EsTrainer | GrpoTrainer:
  """The trainer of ``config.algorithm``."""
  return EsTrainer(parts, config) if config.algorithm == "es" else GrpoTrainer(parts, config)

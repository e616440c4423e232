"""GRPO (Group Relative Policy Optimization) in JAX + optax: the gradient baseline for ES.

The forgetting paper compares ES with GRPO run at N=30 rollouts per prompt
and a KL penalty beta=1e-3 to the reference model. This module is that
baseline's model side and iteration, on es_jax's own model code
(:mod:`es_jax.models`) and task rewards, so both methods see the same decoder,
tokenizer, prompts and reward functions. The objective itself (advantages,
clipped surrogate, k3 KL) is :mod:`experiments.grpo_objective`; the settings
are :class:`experiments.grpo_config.GrpoConfig`.

One GRPO iteration (Shao et al. 2024, DeepSeekMath, eq. 3 with the k3 KL of
eq. 4):

1. :func:`sample_group`: every prompt is decoded ``G`` times with sampling
   (KV-cache :func:`es_jax.models.decode`); prompt ``p``'s completions are
   rows ``p*G ... p*G + G - 1``.
2. Rewards are Python functions of the completion texts (e.g.
   :func:`es_jax.evaluation.countdown.countdown_reward`), computed on the host.
3. :func:`~experiments.grpo_objective.group_advantages`: ``A = (r - mean_group)
   / (std_group + eps)``, one advantage per completion, shared by all of its tokens.
4. :func:`make_grpo_update`: one optax step on the clipped surrogate minus
   ``beta * KL``, with per-token log-probs from :func:`completion_logprobs`.

:func:`grpo_iteration` chains the four; the pieces are public so a runner can
change any one of them (batching, reward aggregation, logging).

Conventions (each documented where it is implemented; the objective's are in
:mod:`experiments.grpo_objective`):

* The EOS token is part of the completion (decode's ``lengths`` count it): its
  log-prob is trained, so the policy learns when to stop.
* Log-probs are of the sampling distribution ``softmax(logits / temperature)``
  (as TRL computes them), for the policy, the old policy and the reference.
* NaN / inf rewards raise in :func:`grpo_iteration`, naming the completion: a
  reward function that fails silently would otherwise look like a bad policy.
  A caller that wants "failed = worst reward" maps them before returning.
* With one optimisation step per batch (``num_inner_steps=1``, the common
  setting) the old policy is the current one: ``old_logp`` is left ``None`` and
  the ratio is exactly 1 (its gradient is the policy gradient). For more steps
  on the same rollouts, record ``old_logp`` once and call the update again.

Example (one iteration; :func:`grpo_iteration` has a runnable version)::

  config = GrpoConfig(group_size=30, learning_rate=1e-6)
  update = make_update(config, model)                 # jitted; build once
  opt_state = config.optimizer().init(params)
  ref_params = params                                 # the KL anchor: the initial model
  for step, (prompt_ids, prompt_mask) in enumerate(batches):
    out = grpo_iteration(model, update, config, params, opt_state, ref_params,
                         prompt_ids, prompt_mask, max_new_tokens=1024, tokenizer=tok,
                         reward_fn=reward_fn, key=jax.random.fold_in(key, step),
                         eos_ids=eos_ids)
    params, opt_state = out.params, out.opt_state
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_jax.models import DecodeOutput, Transformer, completion_texts, decode, logits_fn
from experiments.grpo_config import GrpoConfig
from experiments.grpo_objective import group_advantages, grpo_objective

PyTree = Any
RewardFn = Callable[[list[str], np.ndarray], Any]


# ---------------------------------------------------------------------------------------------
# Model side: log-probs of sampled completions, sampling groups.


def completion_logprobs(model: Transformer, params: PyTree, prompt_ids: jax.Array,
                        prompt_mask: jax.Array, completion_tokens: jax.Array,
                        completion_lengths: jax.Array, *,
                        temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs of sampled completions, from one forward over ``[prompt; completion]``.

  Prompts are left-padded (as :func:`es_jax.models.encode_prompts` makes them)
  and completions right-padded (as :func:`es_jax.models.decode` returns them),
  so their concatenation has real tokens in one run per row; positions come
  from the attention mask, exactly as decode assigned them. Token ``j`` of a
  completion is scored by the logits at the position before it (the last
  prompt token for ``j = 0``, so every prompt needs at least one real token).
  Tokens at ``j >= completion_lengths`` are masked out; decode's lengths count
  the EOS token, so a completion's EOS is scored and trained.

  Args:
    model: the decoder.
    params: its params (policy, old policy or reference).
    prompt_ids: ``(B, T_p)`` int, left-padded.
    prompt_mask: ``(B, T_p)``, 1 at real prompt tokens.
    completion_tokens: ``(B, T_c)`` int, e.g. ``DecodeOutput.tokens``.
    completion_lengths: ``(B,)`` int, e.g. ``DecodeOutput.lengths``.
    temperature: log-probs of ``softmax(logits / temperature)``, the
      distribution decode sampled from.

  Returns:
    ``(logp (B, T_c) float32, mask (B, T_c) float32)``; ``logp`` is 0 where
    ``mask`` is 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_jax.models import ModelConfig, Transformer, init_params
    >>> model = Transformer(ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1,
    ...     vocab_size=11, hidden_size=10, intermediate_size=13, num_heads=2, head_dim=4))
    >>> params = init_params(model, jax.random.key(0))
    >>> logp, mask = completion_logprobs(model, params, jnp.array([[0, 3, 4]]),
    ...     jnp.array([[0, 1, 1]]), jnp.array([[5, 6, 0]]), jnp.array([2]))
    >>> mask.tolist(), bool(logp[0, 2] == 0)
    ([[1.0, 1.0, 0.0]], True)
  """
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
  completion_tokens = jnp.asarray(completion_tokens, jnp.int32)
  t_p, t_c = prompt_ids.shape[1], completion_tokens.shape[1]
  completion_mask = (jnp.arange(t_c)[None, :]
                     < jnp.asarray(completion_lengths)[:, None]).astype(jnp.int32)
  ids = jnp.concatenate([prompt_ids, completion_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
  logits_btv = logits_fn(model, params, ids, mask)
  # Only the T_c positions that predict completion tokens: the log-softmax over the
  # vocabulary is the memory peak, so it is not taken over prompt positions.
  logits_btv = logits_btv[:, t_p - 1:t_p + t_c - 1].astype(jnp.float32) / temperature
  logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  logp_bt = jnp.take_along_axis(logp_btv, completion_tokens[..., None], axis=-1)[..., 0]
  mask_bt = completion_mask.astype(jnp.float32)
  return jnp.where(mask_bt > 0, logp_bt, 0.0), mask_bt


class Rollouts(NamedTuple):
  """Sampled completions with their (repeated) prompts; row ``p*G + g`` is prompt ``p``'s ``g``-th.

  Attributes:
    prompt_ids: ``(P*G, T_p)`` int32, left-padded.
    prompt_mask: ``(P*G, T_p)`` int32.
    completion_tokens: ``(P*G, T_c)`` int32, ``pad_id`` after each row's end.
    completion_lengths: ``(P*G,)`` int32, tokens per completion including EOS.
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_lengths: jax.Array


class GrpoBatch(NamedTuple):
  """What one GRPO update consumes (a pytree: passes through ``jax.jit``).

  Build it as ``GrpoBatch(*rollouts, advantages)``.

  Attributes:
    prompt_ids, prompt_mask, completion_tokens, completion_lengths: see :class:`Rollouts`.
    advantages: ``(B,)`` float32, from :func:`group_advantages` flattened.
    old_logp: ``(B, T_c)`` log-probs under the sampling policy, or None: the
      current params are the sampling policy (one step per batch, ratio 1).
    ref_logp: ``(B, T_c)`` reference log-probs, or None: computed from
      ``ref_params`` in the update (record them once for several inner steps).
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  completion_tokens: jax.Array
  completion_lengths: jax.Array
  advantages: jax.Array
  old_logp: jax.Array | None = None
  ref_logp: jax.Array | None = None


def sample_group(model: Transformer, params: PyTree, prompt_ids, prompt_mask, *, group_size: int,
                 key: jax.Array, max_new_tokens: int, temperature: float = 1.0,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None) -> Rollouts:
  """Samples ``group_size`` completions of every prompt in one KV-cache decode.

  Each prompt is repeated ``group_size`` times (rows ``p*G ... p*G + G - 1``
  belong to prompt ``p``) and decoded with independent draws at
  ``temperature`` (no top-p: the log-probs the update uses are of the plain
  tempered softmax, so sampling must be from it too). The decode compiles once
  per ``(P*G, T_p, max_new_tokens)``.

  Args:
    model: the decoder.
    params: the current policy.
    prompt_ids: ``(P, T_p)`` left-padded prompts (e.g. from ``encode_prompts``).
    prompt_mask: ``(P, T_p)`` their attention mask.
    group_size: ``G``.
    key: PRNG key for the draws.
    max_new_tokens: completion length cap.
    temperature: sampling temperature, > 0.
    eos_ids: ids that end a completion (default the model config's).
    pad_id: filler after the end (default the config's pad id).

  Returns:
    :class:`Rollouts` with ``P*G`` rows.

  Example (rows ``p*G ... p*G + G - 1`` repeat prompt ``p``):
    >>> from es_jax.models import ModelConfig, Transformer, init_params
    >>> import jax, jax.numpy as jnp
    >>> model = Transformer(ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1,
    ...     vocab_size=11, hidden_size=10, intermediate_size=13, num_heads=2, head_dim=4))
    >>> params = init_params(model, jax.random.key(0))
    >>> r = sample_group(model, params, jnp.array([[0, 3, 4], [5, 6, 7]]),
    ...     jnp.array([[0, 1, 1], [1, 1, 1]]), group_size=3, key=jax.random.key(1),
    ...     max_new_tokens=4, eos_ids=())
    >>> r.prompt_ids[:, -1].tolist(), r.completion_tokens.shape
    ([4, 4, 4, 7, 7, 7], (6, 4))
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0 for GRPO sampling, got {temperature!r}.")
  prompt_ids = jnp.repeat(jnp.asarray(prompt_ids, jnp.int32), group_size, axis=0)
  prompt_mask = jnp.repeat(jnp.asarray(prompt_mask, jnp.int32), group_size, axis=0)
  out: DecodeOutput = decode(model, params, prompt_ids, prompt_mask,
                             max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                             eos_ids=eos_ids, pad_id=pad_id)
  return Rollouts(prompt_ids, prompt_mask, out.tokens, out.lengths)


# ---------------------------------------------------------------------------------------------
# The update.


def make_grpo_update(model: Transformer, optimizer: optax.GradientTransformation, *,
                     clip_eps: float = 0.2, kl_beta: float = 1e-3, temperature: float = 1.0):
  """A jitted GRPO step ``(params, opt_state, ref_params, batch) -> (params, opt_state, metrics)``.

  The loss is :func:`grpo_objective` on :func:`completion_logprobs` of
  ``batch``. Without ``batch.old_logp`` the old policy is ``params`` itself
  (``stop_gradient``), the on-policy case: the ratio is 1 and the gradient is
  ``-1/B sum_i A_i/|o_i| sum_t grad log pi(o_it)`` plus the KL term. For
  ``mu > 1`` steps on one batch, fill ``old_logp`` (and ``ref_logp``) once with
  :func:`completion_logprobs` and call the step ``mu`` times.

  Args:
    model: the decoder (static: one compiled program per batch shape).
    optimizer: any optax transformation (e.g. ``GrpoConfig.optimizer()``).
    clip_eps: clip range.
    kl_beta: KL weight; 0 skips the reference forward (``ref_params`` may be None).
    temperature: the sampling temperature (log-probs are of the tempered softmax).

  Returns:
    The jitted step. ``metrics``: ``loss``, ``kl``, ``ratio``,
    ``clip_fraction``, ``num_tokens``, ``grad_norm`` (before the optimizer's
    own clipping), ``completion_length`` (mean tokens per completion).

  When a batch's activations do not fit (``P*G`` long completions, a large
  vocabulary), split it into ``k`` equal micro-batches of whole rows and wrap
  the optimizer in ``optax.MultiSteps(optimizer, every_k_schedule=k)``: the
  loss is a mean of per-completion terms, so the mean of the micro-batch
  gradients is the whole batch's gradient, and params stay fixed until the
  ``k``-th call (the ratio stays 1 in the on-policy case).
  ``GrpoConfig(micro_batches=k)`` does both in :func:`grpo_iteration`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from es_jax.models import ModelConfig, Transformer, init_params
    >>> model = Transformer(ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1,
    ...     vocab_size=11, hidden_size=10, intermediate_size=13, num_heads=2, head_dim=4))
    >>> params = init_params(model, jax.random.key(0))
    >>> optimizer = optax.adam(1e-3)
    >>> update = make_grpo_update(model, optimizer)
    >>> batch = GrpoBatch(jnp.array([[3, 4], [3, 4]]), jnp.ones((2, 2), jnp.int32),
    ...     jnp.array([[5, 6], [7, 0]]), jnp.array([2, 1]), jnp.array([1.0, -1.0]))
    >>> new_params, opt_state, metrics = update(params, optimizer.init(params), params, batch)
    >>> float(metrics["ratio"]), float(metrics["kl"])
    (1.0, 0.0)
  """
  if not 0 < clip_eps < 1:
    raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}.")
  if not kl_beta >= 0:
    raise ValueError(f"kl_beta must be >= 0, got {kl_beta!r}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}.")
  logprobs = functools.partial(completion_logprobs, model, temperature=temperature)

  def loss_fn(params, ref_params, batch: GrpoBatch):
    rollout = (batch.prompt_ids, batch.prompt_mask, batch.completion_tokens,
               batch.completion_lengths)
    logp, mask = logprobs(params, *rollout)
    old_logp = logp if batch.old_logp is None else batch.old_logp
    if kl_beta == 0:
      ref_logp = logp  # k3 is then 0; the reference is never run
    elif batch.ref_logp is not None:
      ref_logp = batch.ref_logp
    else:
      if ref_params is None:
        raise ValueError("kl_beta > 0 needs ref_params (or batch.ref_logp).")
      ref_logp = logprobs(ref_params, *rollout)[0]
    loss, aux = grpo_objective(logp, old_logp, ref_logp, batch.advantages, mask,
                               clip_eps=clip_eps, kl_beta=kl_beta)
    aux["completion_length"] = jnp.mean(jnp.sum(mask, axis=1))
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  @jax.jit
  def update(params, opt_state, ref_params, batch: GrpoBatch):
    (loss, aux), grads = grad_fn(params, ref_params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return params, opt_state, metrics

  return update


def make_update(config: GrpoConfig, model: Transformer,
                optimizer: optax.GradientTransformation | None = None):
  """:func:`make_grpo_update` with ``config``'s objective (and optimizer unless given)."""
  return make_grpo_update(model, config.optimizer() if optimizer is None else optimizer,
                          clip_eps=config.clip_eps, kl_beta=config.kl_beta,
                          temperature=config.temperature)


@functools.partial(jax.jit, static_argnums=0, static_argnames="temperature")
def _jit_logprobs(model, params, *rollout, temperature):
  """Jitted :func:`completion_logprobs` (one program per model, shapes and temperature)."""
  return completion_logprobs(model, params, *rollout, temperature=temperature)


# ---------------------------------------------------------------------------------------------
# One iteration, host side included.


class IterationOutput(NamedTuple):
  """What :func:`grpo_iteration` returns.

  Attributes:
    params, opt_state: after the iteration's update(s).
    metrics: floats: the last inner step's update metrics (merged over
      micro-batches) plus ``reward_mean``, ``reward_std`` and
      ``zero_std_groups`` (share of groups with no signal).
    completions: the ``P*G`` completion texts, row ``p*G + g``.
    rewards: ``(P, G)`` float64 rewards.
  """

  params: PyTree
  opt_state: Any
  metrics: dict[str, float]
  completions: list[str]
  rewards: np.ndarray


def grpo_iteration(model: Transformer, update, config: GrpoConfig, params: PyTree, opt_state: Any,
                   ref_params: PyTree | None, prompt_ids, prompt_mask, *, max_new_tokens: int,
                   tokenizer: Any, reward_fn: RewardFn, key: jax.Array, eos_ids: Sequence[int],
                   pad_id: int | None = None, stop: Sequence[str] = ()) -> IterationOutput:
  """Sample, score, standardise, update: one GRPO iteration on a batch of prompts.

  Args:
    model: the decoder.
    update: from ``make_update(config, model)`` (built once: it is the compiled step;
      its optimizer is ``config.optimizer()``, whose state ``opt_state`` must be).
    config: group size, sampling, number of inner steps and micro-batches.
    params, opt_state: the policy and its optimizer state.
    ref_params: the reference model (None when ``kl_beta == 0``).
    prompt_ids, prompt_mask: ``(P, T_p)`` left-padded prompts.
    max_new_tokens: completion length cap (the runner's ``task.max_new_tokens``).
    tokenizer: turns completion tokens into text (EOS dropped, special tokens skipped).
    reward_fn: ``reward_fn(completions, prompt_indices) -> (P*G,)`` rewards,
      where ``prompt_indices[b] = b // G`` says which prompt row ``b`` answers
      (to look up its numbers / target). Runs on the host, in Python.
    key: PRNG key for sampling.
    eos_ids: ids that end a completion.
    pad_id: filler after a completion's end (default the model config's).
    stop: stop strings cut from the texts before scoring (the tokens are trained as sampled).

  Returns:
    :class:`IterationOutput`.

  Raises:
    ValueError: if ``max_new_tokens`` is not an int >= 1; if ``reward_fn``
      returns the wrong number of rewards or any NaN / inf (the message names
      the first such completion); if
      ``micro_batches`` does not divide ``P*G`` or ``opt_state`` does not
      accumulate micro-batches (no ``optax.MultiSteps``).

  Example (a tiny random model; a real run loads one with ``es_jax.models.load_model``):
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from es_jax.models import (ModelConfig, Transformer, char_tokenizer, encode_prompts,
    ...                            init_params)
    >>> tok = char_tokenizer()
    >>> model = Transformer(ModelConfig(family="qwen2", vocab_size=len(tok), hidden_size=16,
    ...     intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
    ...     rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
    ...     dtype=jnp.float32))
    >>> params = ref_params = init_params(model, jax.random.key(0))  # reference = start
    >>> config = GrpoConfig(group_size=4, learning_rate=1e-3)
    >>> update = make_update(config, model)  # the compiled step: build once, reuse
    >>> opt_state = config.optimizer().init(params)
    >>> ids, mask = encode_prompts(tok, ["1+1=", "2+2="], pad_to_multiple=4)
    >>> answers = ["2", "4"]
    >>> def reward_fn(completions, prompt_indices):
    ...   return np.array([float(c.strip() == answers[p])
    ...                    for c, p in zip(completions, prompt_indices)])
    >>> out = grpo_iteration(model, update, config, params, opt_state, ref_params, ids, mask,
    ...                      max_new_tokens=3, tokenizer=tok, reward_fn=reward_fn,
    ...                      key=jax.random.key(1), eos_ids=(tok.eos_token_id,))
    >>> params, opt_state = out.params, out.opt_state
    >>> out.rewards.shape, len(out.completions), out.metrics["ratio"]
    ((2, 4), 8, 1.0)
  """
  if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
      or max_new_tokens < 1):
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
  g = config.group_size
  rollouts = sample_group(model, params, prompt_ids, prompt_mask, group_size=g, key=key,
                          max_new_tokens=max_new_tokens, temperature=config.temperature,
                          eos_ids=eos_ids, pad_id=pad_id)
  texts = completion_texts(tokenizer, rollouts.completion_tokens, rollouts.completion_lengths,
                           eos_ids, stop)
  prompt_indices = np.arange(len(texts)) // g
  rewards = np.asarray(reward_fn(texts, prompt_indices), np.float64)
  if rewards.shape != (len(texts),):
    raise ValueError(f"reward_fn must return one reward per completion, shape ({len(texts)},), "
                     f"got {rewards.shape}.")
  bad = np.flatnonzero(~np.isfinite(rewards))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"reward_fn returned {bad.size} non-finite reward(s); first: "
                     f"{rewards[i]} for completion {i} (prompt {i // g}): {texts[i]!r}. "
                     "Return a finite value (e.g. the task's minimum) for failed completions.")
  rewards_pg = rewards.reshape(-1, g)
  advantages = group_advantages(rewards_pg, eps=config.adv_eps).reshape(-1)
  batch = GrpoBatch(*rollouts, advantages)
  micro_batches = _split_rows(batch, config.micro_batches, opt_state)
  if config.num_inner_steps > 1:
    # The sampling policy and the reference, recorded once for all inner steps.
    logprobs = functools.partial(_jit_logprobs, model, temperature=config.temperature)
    record_ref = config.kl_beta > 0 and ref_params is not None
    micro_batches = [mb._replace(old_logp=logprobs(params, *mb[:4])[0],
                                 ref_logp=logprobs(ref_params, *mb[:4])[0] if record_ref else None)
                     for mb in micro_batches]
  for _ in range(config.num_inner_steps):
    step_metrics = []
    for mb in micro_batches:
      params, opt_state, m = update(params, opt_state, ref_params, mb)
      step_metrics.append(m)
  metrics = _merge_metrics(step_metrics)
  metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                 zero_std_groups=float(np.mean(rewards_pg.std(axis=1) == 0)))
  return IterationOutput(params, opt_state, metrics, texts, rewards_pg)


def _split_rows(batch: GrpoBatch, parts: int, opt_state: Any) -> list[GrpoBatch]:
  """``parts`` equal slices of the batch's rows (whole completions); checks the optimizer."""
  if parts == 1:
    return [batch]
  rows = batch.advantages.shape[0]
  if rows % parts:
    raise ValueError(f"micro_batches={parts} must divide the {rows} rows (prompts x group_size); "
                     "change micro_batches or the number of prompts per iteration.")
  is_multi_steps = lambda x: isinstance(x, optax.MultiStepsState)
  if not any(map(is_multi_steps, jax.tree.leaves(opt_state, is_leaf=is_multi_steps))):
    raise ValueError(f"micro_batches={parts} needs an optimizer that accumulates them into one "
                     "step: use GrpoConfig.optimizer(), or wrap yours in optax.MultiSteps("
                     f"optimizer, every_k_schedule={parts}).")
  size = rows // parts
  return [jax.tree.map(lambda x: x[i * size:(i + 1) * size], batch) for i in range(parts)]


def _merge_metrics(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  """One inner step's metrics from its micro-batches' (token means re-weighted by tokens).

  ``loss`` and ``completion_length`` are means over equal micro-batches, hence
  exact; ``grad_norm`` is the mean of the micro-batches' norms, an upper bound
  of the accumulated gradient's norm.
  """
  metrics = [{k: float(v) for k, v in m.items()} for m in metrics]
  tokens = sum(m["num_tokens"] for m in metrics)
  merged = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
  for k in ("kl", "ratio", "clip_fraction"):
    merged[k] = sum(m[k] * m["num_tokens"] for m in metrics) / max(tokens, 1.0)
  merged["num_tokens"] = tokens
  return merged

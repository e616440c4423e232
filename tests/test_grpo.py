"""GRPO baseline (experiments/grpo*.py) against float64 numpy references and a learning toy task.

Every expected value is computed independently of the code under test: the
objective and its pieces by a numpy float64 re-implementation of the
published formulas, gradients analytically, completion log-probs by a
separate forward over each unpadded sequence, learning by the exact
probability of the rewarded answer under the policy.

One tiny model (prime-ish widths, float32) is shared by every test so the
compiled programs are shared too. Compiling the model's update dominates the
runtime; the two tests marked ``slow`` each need one more update program
(inner steps, micro-batches): ``-m "not slow"`` skips them.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from es_jax.models import ModelConfig, Transformer, char_tokenizer, encode_prompts, init_params
from es_jax.models import logits_fn
from experiments import grpo, grpo_config, grpo_objective

TOK = char_tokenizer()
EOS = TOK.eos_token_id
PAD = TOK.pad_token_id
MODEL = Transformer(ModelConfig(
    family="qwen2", vocab_size=len(TOK), hidden_size=23, intermediate_size=29, num_layers=1,
    num_heads=2, num_kv_heads=1, head_dim=6, rope_theta=1e4, rms_norm_eps=1e-6,
    tie_word_embeddings=True, qkv_bias=True, eos_token_ids=(EOS,), pad_token_id=PAD,
    dtype=jnp.float32))
jit_logits = jax.jit(functools.partial(logits_fn, MODEL))
# Every argument traced (clip_eps and kl_beta too): one compiled program for all cases.
jit_objective = jax.jit(grpo_objective.grpo_objective)


@functools.lru_cache(maxsize=None)
def model_params(seed: int = 0, scale: float = 0.02):
  """Random params with numpy: shapes by tracing ``init_params`` (compiling it costs seconds).

  ``scale`` 0.02 (the usual init) gives a near-uniform next-token distribution;
  larger scales give O(1) logits, so a misplaced position or token shows.
  """
  shapes = jax.eval_shape(lambda key: init_params(MODEL, key), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
    return jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------- references


def np_advantages(rewards_pg, eps, ddof):
  r = np.asarray(rewards_pg, np.float64)
  return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=ddof, keepdims=True) + eps)


def np_k3(logp, ref):
  d = np.asarray(ref, np.float64) - np.asarray(logp, np.float64)
  return np.exp(d) - d - 1


def np_objective(logp, old, ref, adv, mask, clip_eps, beta):
  """DeepSeekMath eq. 3, row by row with Python loops over the valid tokens."""
  per_seq, kls, ratios, clipped = [], [], [], []
  for i in range(logp.shape[0]):
    terms = []
    for t in np.flatnonzero(mask[i]):
      ratio = np.exp(np.float64(logp[i, t]) - np.float64(old[i, t]))
      a = np.float64(adv[i])
      surrogate = min(ratio * a, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a)
      kl = np_k3(logp[i, t], ref[i, t])
      terms.append(surrogate - beta * kl)
      kls.append(kl)
      ratios.append(ratio)
      clipped.append((ratio > 1 + clip_eps and a > 0) or (ratio < 1 - clip_eps and a < 0))
    per_seq.append(np.mean(terms) if terms else 0.0)
  return -np.mean(per_seq), np.mean(kls), np.mean(ratios), np.mean(clipped)


# ----------------------------------------------------------------------------- objective


def test_group_advantages_match_numpy_float64_and_equal_groups_get_zero():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(5, 7)) * 3 + 1
  rewards[2] = 0.7                       # all equal: no preference, zero advantage
  rewards[3] = [0, 0, 0, 0, 0, 0, 1.1]   # one success in the group
  for ddof in (0, 1):
    got = np.asarray(grpo_objective.group_advantages(rewards, eps=1e-4, ddof=ddof))
    np.testing.assert_allclose(got, np_advantages(rewards, 1e-4, ddof), rtol=1e-5, atol=1e-5)
  got = np.asarray(grpo_objective.group_advantages(rewards))
  assert np.all(got[2] == 0.0)
  # Population std by default: the lone success of 7 gets (1 - 1/7) / sqrt(6/49).
  assert got[3, 6] == pytest.approx((6 / 7) / np.sqrt(6 / 49), rel=1e-3)
  with pytest.raises(ValueError, match="prompts, group_size"):
    grpo_objective.group_advantages(rewards.reshape(-1))


def test_kl_k3_matches_numpy_is_nonnegative_and_zero_only_where_equal():
  rng = np.random.default_rng(1)
  logp = -rng.exponential(2.0, size=(4, 9))
  ref = logp + rng.normal(scale=1.5, size=logp.shape)
  ref[0] = logp[0]
  got = np.asarray(grpo_objective.kl_k3(jnp.asarray(logp, jnp.float32),
                                        jnp.asarray(ref, jnp.float32)))
  np.testing.assert_allclose(got, np_k3(logp, ref), rtol=1e-4, atol=1e-6)
  assert np.all(got >= 0)
  assert np.all(got[0] == 0) and np.all(got[1:] > 0)


def _random_objective_inputs(seed=2, b=6, t=8):
  """Ratios inside and outside [0.8, 1.2], both advantage signs, ragged masks with garbage."""
  rng = np.random.default_rng(seed)
  logp = -rng.exponential(1.5, size=(b, t)).astype(np.float32)
  old = (logp - rng.normal(scale=0.4, size=(b, t))).astype(np.float32)
  ref = (logp + rng.normal(scale=0.8, size=(b, t))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  adv[:2] = [1.3, -0.9]
  lengths = np.array([t, 1, 3, 5, t - 1, 2])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  # Masked entries must not matter, not even as inf / NaN.
  logp[mask == 0] = -np.inf
  old[mask == 0] = np.nan
  return logp, old, ref, adv, mask


@pytest.mark.parametrize("clip_eps,beta", [(0.2, 1e-3), (0.1, 0.5), (0.3, 0.0)])
def test_objective_matches_numpy_reimplementation_of_the_published_formula(clip_eps, beta):
  logp, old, ref, adv, mask = _random_objective_inputs()
  ratio = np.exp(logp - old)[mask > 0]
  assert np.any(ratio > 1 + clip_eps) and np.any(ratio < 1 - clip_eps)
  assert np.any(np.abs(ratio - 1) < clip_eps)
  loss, aux = jit_objective(logp, old, ref, adv, mask, clip_eps=clip_eps, kl_beta=beta)
  want_loss, want_kl, want_ratio, want_clip = np_objective(logp, old, ref, adv, mask, clip_eps,
                                                           beta)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  assert float(aux["kl"]) == pytest.approx(want_kl, rel=1e-5)
  assert float(aux["ratio"]) == pytest.approx(want_ratio, rel=1e-5)
  assert float(aux["clip_fraction"]) == pytest.approx(want_clip, abs=1e-7)
  assert 0 < want_clip < 1
  assert float(aux["num_tokens"]) == mask.sum()


def test_gradient_at_ratio_one_is_advantage_over_completion_length():
  logp, _, ref, adv, mask = _random_objective_inputs(seed=3)
  logp = np.where(mask > 0, logp, 0.0).astype(np.float32)
  b = logp.shape[0]
  # Old == current log-probs (ratio 1), no KL: d loss / d logp_it = -A_i / (B |o_i|).
  grad = jax.jit(jax.grad(lambda lp: grpo_objective.grpo_objective(lp, logp, ref, adv, mask,
                                                         kl_beta=0.0)[0]))(logp)
  want = -adv[:, None] / (b * mask.sum(1, keepdims=True)) * mask
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-8)


def test_gradient_vanishes_exactly_where_the_clip_is_active():
  # Four tokens of one completion each, B = 4; logp = 0 everywhere, old sets the ratio.
  ratios = np.array([1.5, 0.5, 1.5, 0.5, 1.1], np.float32)
  adv = np.array([1.0, -1.0, -1.0, 1.0, 1.0], np.float32)
  logp = np.zeros((5, 1), np.float32)
  old = -np.log(ratios)[:, None]
  mask = np.ones((5, 1), np.float32)
  grad = jax.jit(jax.grad(lambda lp: grpo_objective.grpo_objective(
      lp, old, lp, adv, mask, clip_eps=0.2, kl_beta=0.0)[0]))(logp)
  grad = np.asarray(grad)[:, 0]
  # Clip active (ratio beyond the range in the direction A pushes it): no gradient.
  assert grad[0] == 0 and grad[1] == 0
  # Clip inactive (the unclipped term is the min) or ratio inside: -ratio * A / B.
  np.testing.assert_allclose(grad[2:], -ratios[2:] * adv[2:] / 5, rtol=1e-6)
  _, aux = jit_objective(logp, old, logp, adv, mask, clip_eps=0.2, kl_beta=1e-3)
  assert float(aux["clip_fraction"]) == pytest.approx(2 / 5)


# ----------------------------------------------------------------------------- model side


def test_completion_logprobs_equal_a_forward_over_each_unpadded_sequence():
  params = model_params(0, scale=0.3)
  rng = np.random.default_rng(4)
  prompt_lengths = [5, 2, 3, 1]
  completion_lengths = np.array([4, 1, 2, 3])   # rows 1-2 ended early by EOS
  t_p, t_c = 7, 4
  prompts = [rng.integers(3, len(TOK), n) for n in prompt_lengths]
  prompt_ids = np.full((4, t_p), PAD, np.int32)
  prompt_mask = np.zeros((4, t_p), np.int32)
  completions = np.full((4, t_c), PAD, np.int32)
  for i, (p, n) in enumerate(zip(prompts, completion_lengths)):
    prompt_ids[i, t_p - len(p):], prompt_mask[i, t_p - len(p):] = p, 1
    completions[i, :n] = rng.integers(3, len(TOK), n)
  completions[1, 0] = completions[2, 1] = EOS  # as decode emits it: EOS counted in the length

  # temperature is traced: both calls share one compiled program.
  logprobs = jax.jit(grpo.completion_logprobs, static_argnums=0)
  args = (MODEL, params, prompt_ids, prompt_mask, completions, completion_lengths)
  got = {temperature: logprobs(*args, temperature=temperature) for temperature in (1.0, 0.7)}
  for _, mask in got.values():
    np.testing.assert_array_equal(
        np.asarray(mask), np.arange(t_c)[None] < completion_lengths[:, None])

  # Reference: each row alone, starting at position 0 with no left padding; a filler tail
  # is invisible to a causal model, so one common length (one compile) serves every row.
  length = t_p + t_c
  for temperature, (logp, _) in got.items():
    want = np.zeros((4, t_c))
    for i, (p, n) in enumerate(zip(prompts, completion_lengths)):
      seq = np.concatenate([p, completions[i, :n]])
      padded = np.concatenate([seq, np.full(length - len(seq), 7)])[None].astype(np.int32)
      logits = np.asarray(jit_logits(params, padded, np.ones_like(padded)), np.float64)[0]
      logits /= temperature
      top = logits.max(-1, keepdims=True)
      log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      for j in range(n):
        want[i, j] = log_softmax[len(p) + j - 1, seq[len(p) + j]]
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    assert want[1, 0] != 0 and want[2, 1] != 0  # the EOS tokens are scored


# ----------------------------------------------------------------------------- end to end

PROMPTS = ["a=", "bc=", "def=", "g=", "hi=", "j=", "kl=", "mno="]
TARGET = "7"
GROUP = 16


@functools.lru_cache(maxsize=None)
def toy_setup():
  ids, mask = encode_prompts(TOK, PROMPTS, pad_to_multiple=4)
  config = grpo_config.GrpoConfig(group_size=GROUP, learning_rate=2e-2)
  return ids, mask, config, grpo.make_update(config, MODEL)


def exact_answer_distribution(params, ids, mask):
  """float64 softmax of the next-token logits after each prompt: the policy's one-token answer."""
  logits = np.asarray(jit_logits(params, ids, mask), np.float64)[:, -1]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def exact_reward(texts, prompt_indices):
  del prompt_indices  # the same answer is right for every prompt
  return np.array([float(text == TARGET) for text in texts])


def test_grpo_learns_a_one_token_task_with_near_least_kl_to_the_reference():
  ids, mask, config, update = toy_setup()
  params = ref_params = model_params(1)
  opt_state = config.optimizer().init(params)
  target = TOK.convert_tokens_to_ids(TARGET)
  p0 = exact_answer_distribution(params, ids, mask)[:, target].mean()
  assert p0 < 0.03  # random init: about 1/103
  rewards, key = [], jax.random.key(5)
  for i in range(12):
    previous = params
    out = grpo.grpo_iteration(MODEL, update, config, params, opt_state, ref_params, ids, mask,
                              max_new_tokens=1, tokenizer=TOK, reward_fn=exact_reward,
                              key=jax.random.fold_in(key, i), eos_ids=(EOS,))
    params, opt_state = out.params, out.opt_state
    rewards.append(out.metrics["reward_mean"])
    assert out.rewards.shape == (len(PROMPTS), GROUP) and len(out.completions) == 128
  pi = exact_answer_distribution(params, ids, mask)
  assert pi[:, target].mean() > 0.5, pi[:, target]
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards
  # The last update's KL metric is the k3 sample mean over completions drawn from the
  # params it started from: compare with the exact KL of that one-token policy.
  before, ref = (exact_answer_distribution(p, ids, mask) for p in (previous, ref_params))
  exact_kl = np.mean(np.sum(before * np.log(before / ref), axis=-1))
  assert np.isfinite(out.metrics["kl"])
  assert out.metrics["kl"] == pytest.approx(exact_kl, rel=0.25), (out.metrics["kl"], exact_kl)
  # Small KL: no policy with the same probability q of the rewarded answer is closer to the
  # reference than the one moving mass only between it and the rest, proportionally:
  # q log(q / r) + (1 - q) log((1 - q) / (1 - r)). GRPO's drift stays within 5% of that.
  q, r = pi[:, target], ref[:, target]
  least_kl = q * np.log(q / r) + (1 - q) * np.log((1 - q) / (1 - r))
  final_kl = np.sum(pi * np.log(pi / ref), axis=-1)
  assert np.all(final_kl <= 1.05 * least_kl), (final_kl, least_kl)


def test_sample_group_rows_are_prompt_major_and_draw_independently():
  ids, mask, config, _ = toy_setup()
  rollouts = grpo.sample_group(MODEL, model_params(1), ids, mask, group_size=GROUP,
                               key=jax.random.key(6), max_new_tokens=1, eos_ids=(EOS,))
  np.testing.assert_array_equal(np.asarray(rollouts.prompt_ids), np.repeat(ids, GROUP, axis=0))
  np.testing.assert_array_equal(np.asarray(rollouts.prompt_mask), np.repeat(mask, GROUP, axis=0))
  tokens = np.asarray(rollouts.completion_tokens)[:, 0].reshape(len(PROMPTS), GROUP)
  # A near-uniform policy over 103 tokens: 16 independent draws are mostly distinct.
  assert all(len(set(row)) > GROUP // 2 for row in tokens.tolist())
  np.testing.assert_array_equal(np.asarray(rollouts.completion_lengths), 1)


@pytest.mark.slow  # one more compiled update program (~10 s on 2 CPU cores)
def test_second_inner_step_measures_the_ratio_to_the_sampling_policy():
  ids, mask, config, update = toy_setup()
  params, key = model_params(1), jax.random.key(8)
  opt_state = config.optimizer().init(params)
  run = lambda steps: grpo.grpo_iteration(
      MODEL, update, dataclasses.replace(config, num_inner_steps=steps), params, opt_state,
      params, ids, mask, max_new_tokens=1, tokenizer=TOK, reward_fn=exact_reward, key=key,
      eos_ids=(EOS,))
  one, two = run(1), run(2)
  assert one.metrics["ratio"] == 1.0 and one.completions == two.completions
  # Step 2 scores the same samples under the params after step 1 against those that drew
  # them: expected ratio = mean over rows of pi_1(token) / pi_0(token), computed exactly.
  tokens = np.asarray(grpo.sample_group(MODEL, params, ids, mask, group_size=GROUP, key=key,
                                        max_new_tokens=1, eos_ids=(EOS,)).completion_tokens)[:, 0]
  rows = np.arange(len(tokens)) // GROUP
  pi_0, pi_1 = (exact_answer_distribution(p, ids, mask)[rows, tokens] for p in (params,
                                                                                 one.params))
  assert np.max(np.abs(pi_1 / pi_0 - 1)) > 0.05  # the first step moved the policy
  assert two.metrics["ratio"] == pytest.approx(np.mean(pi_1 / pi_0), rel=1e-4)
  adv = np_advantages(two.rewards, 1e-4, 0).reshape(-1)
  ratio = pi_1 / pi_0
  assert two.metrics["clip_fraction"] == pytest.approx(
      np.mean(((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))), abs=1e-6)


@pytest.mark.slow  # one more compiled update program (~10 s on 2 CPU cores)
def test_micro_batches_take_the_same_step_as_the_whole_batch():
  ids, mask, config, update = toy_setup()
  params, key = model_params(1), jax.random.key(9)
  ref_params = model_params(2)  # not the policy: the KL term and its gradient are not zero

  def run(cfg, update):
    return grpo.grpo_iteration(
        MODEL, update, cfg, params, cfg.optimizer().init(params), ref_params, ids, mask,
        max_new_tokens=1, tokenizer=TOK, reward_fn=exact_reward, key=key, eos_ids=(EOS,))

  micro_config = dataclasses.replace(config, micro_batches=2)
  micro_update = grpo.make_update(micro_config, MODEL)  # its optimizer accumulates (MultiSteps)
  whole, micro = run(config, update), run(micro_config, micro_update)
  assert whole.completions == micro.completions
  assert 0 < whole.metrics["reward_mean"] < 1  # some groups carry signal
  # Adam's moments after the step are linear in the gradient it was given (mu = 0.1 g,
  # nu = 0.001 g^2; the clip is inactive): the accumulated gradient is the whole batch's.
  adam_state = lambda opt_state: next(s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                                      if isinstance(s, optax.ScaleByAdamState))
  assert whole.metrics["grad_norm"] < config.max_grad_norm
  chex.assert_trees_all_close(adam_state(micro.opt_state).mu, adam_state(whole.opt_state).mu,
                              rtol=1e-4, atol=1e-9)
  chex.assert_trees_all_close(adam_state(micro.opt_state).nu, adam_state(whole.opt_state).nu,
                              rtol=1e-3, atol=1e-13)
  # The params: Adam's first step is lr * g / (|g| + 1e-8), so float noise in a gradient
  # that cancels to ~1e-8 (rows of tokens nobody sampled) moves it by a fraction of
  # lr = 2e-2; two separate steps would move most weights by about 2 lr.
  chex.assert_trees_all_close(micro.params, whole.params, rtol=0, atol=1e-3)
  for name in ("loss", "kl", "ratio", "clip_fraction", "num_tokens", "completion_length"):
    assert micro.metrics[name] == pytest.approx(whole.metrics[name], rel=1e-5), name
  # The mean of the micro-batch gradient norms bounds the whole batch's (triangle inequality).
  assert micro.metrics["grad_norm"] >= whole.metrics["grad_norm"] * (1 - 1e-6)

  with pytest.raises(ValueError, match="micro_batches=3 must divide the 128 rows"):
    run(dataclasses.replace(config, micro_batches=3), micro_update)
  with pytest.raises(ValueError, match="optax.MultiSteps"):
    grpo.grpo_iteration(
        MODEL, update, dataclasses.replace(config, micro_batches=2), params,
        config.optimizer().init(params), ref_params, ids, mask, max_new_tokens=1, tokenizer=TOK,
        reward_fn=exact_reward, key=key, eos_ids=(EOS,))


def test_non_finite_rewards_raise_and_name_the_completion():
  ids, mask, config, update = toy_setup()
  params = model_params(0)

  def broken(texts, prompt_indices):
    rewards = np.zeros(len(texts))
    rewards[prompt_indices == 3] = np.nan
    return rewards

  with pytest.raises(ValueError, match=r"non-finite reward.*completion 48 \(prompt 3\)"):
    grpo.grpo_iteration(MODEL, update, config, params, config.optimizer().init(params), params,
                        ids, mask, max_new_tokens=1, tokenizer=TOK, reward_fn=broken,
                        key=jax.random.key(0), eos_ids=(EOS,))
  with pytest.raises(ValueError, match="one reward per completion"):
    grpo.grpo_iteration(MODEL, update, config, params, config.optimizer().init(params), params,
                        ids, mask, max_new_tokens=1, tokenizer=TOK,
                        reward_fn=lambda t, i: np.zeros(3), key=jax.random.key(0), eos_ids=(EOS,))
  # The decode budget is the task's, passed beside the config (a bad one is named too).
  with pytest.raises(ValueError, match="^max_new_tokens must be"):
    grpo.grpo_iteration(MODEL, update, config, params, config.optimizer().init(params), params,
                        ids, mask, max_new_tokens=0, tokenizer=TOK, reward_fn=broken,
                        key=jax.random.key(0), eos_ids=(EOS,))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [
    ("group_size", 1), ("group_size", 2.5), ("clip_eps", 0.0), ("clip_eps", 1.0),
    ("kl_beta", -1e-3), ("kl_beta", float("nan")), ("learning_rate", 0.0),
    ("temperature", 0.0), ("prompts_per_iteration", 0), ("num_inner_steps", 0),
    ("max_grad_norm", -1.0), ("adv_eps", 0.0), ("micro_batches", 0)])
def test_bad_config_values_raise_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"^{field} must be"):
    grpo_config.GrpoConfig(**{field: value})


def test_defaults_are_the_published_baseline():
  config = grpo_config.GrpoConfig()
  assert (config.group_size, config.clip_eps, config.kl_beta, config.num_inner_steps) == (
      30, 0.2, 1e-3, 1)

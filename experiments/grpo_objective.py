"""The GRPO objective: pure functions of arrays, model-agnostic.

DeepSeekMath's (Shao et al. 2024) eq. 3 with the k3 KL of eq. 4:
:func:`group_advantages` standardises each prompt's rewards,
:func:`grpo_objective` is the clipped surrogate minus ``beta * KL`` per token.
:mod:`experiments.grpo` feeds them log-probs of sampled completions.

Conventions (each documented where it is implemented):

* Advantages use the population std (``ddof=0``) and ``eps=1e-4``. TRL's
  ``GRPOTrainer`` uses ``torch.std``, the Bessel-corrected sample std
  (``ddof=1``): pass ``ddof=1`` to match it; at ``G=30`` the two differ by
  1.7%. A group whose rewards are all equal has zero advantage (no signal).
* Token averaging is DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``: a mean over
  each completion's tokens, then a mean over completions (TRL's
  ``loss_type="grpo"``). Logged KL, ratio and clip fraction are means over all
  valid tokens (as TRL logs them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames="ddof")  # one program instead of a dozen eager ops
def group_advantages(rewards_pg: jax.Array, *, eps: float = 1e-4, ddof: int = 0) -> jax.Array:
  """GRPO advantages: each reward standardised within its prompt's group.

  ``A[p, g] = (r[p, g] - mean_g r[p]) / (std_g r[p] + eps)`` (DeepSeekMath's
  outcome supervision). ``std`` is the population std (``ddof=0``) by default;
  TRL uses the sample std (``ddof=1``). A group whose rewards are all equal
  gets zero advantage: it carries no preference between its completions.
  ``es_jax.shaping.group_z_score`` is the same shaping for ES fitness (eps 1e-8,
  flat input, NaN-tolerant); this one takes ``(P, G)`` and rejects nothing.

  Args:
    rewards_pg: ``(P, G)`` rewards, row ``p`` the ``G`` completions of prompt ``p``.
    eps: added to the std (keeps a near-constant group from blowing up).
    ddof: delta degrees of freedom of the std (0 population, 1 sample).

  Returns:
    ``(P, G)`` float32 advantages.

  Example:
    >>> import jax.numpy as jnp
    >>> group_advantages(jnp.array([[0.0, 1.0], [2.0, 2.0]])).round(3).tolist()
    [[-1.0, 1.0], [0.0, 0.0]]
  """
  rewards_pg = jnp.asarray(rewards_pg, jnp.float32)
  if rewards_pg.ndim != 2:
    raise ValueError(f"rewards_pg must be (prompts, group_size), got shape {rewards_pg.shape}.")
  mean_p1 = jnp.mean(rewards_pg, axis=1, keepdims=True)
  std_p1 = jnp.std(rewards_pg, axis=1, keepdims=True, ddof=ddof)
  return (rewards_pg - mean_p1) / (std_p1 + eps)


def kl_k3(logp_bt: jax.Array, ref_logp_bt: jax.Array) -> jax.Array:
  """Per-token k3 estimate of ``KL(policy || reference)``: ``exp(d) - d - 1``, ``d = ref - logp``.

  Evaluated at tokens sampled from the policy, its mean is the KL (unbiased,
  since ``E_pi[exp(d)] = 1``), and every term is ``>= 0``, zero iff the two
  log-probs are equal (Schulman's "k3"; DeepSeekMath eq. 4).

  Example:
    >>> import jax.numpy as jnp
    >>> [round(k, 4) for k in kl_k3(jnp.array([-1.0, -2.0]), jnp.array([-1.0, -1.0])).tolist()]
    [0.0, 0.7183]
  """
  log_ratio = ref_logp_bt - logp_bt
  return jnp.exp(log_ratio) - log_ratio - 1.0


def grpo_objective(logp_bt: jax.Array, old_logp_bt: jax.Array, ref_logp_bt: jax.Array,
                   advantages_b: jax.Array, mask_bt: jax.Array, *, clip_eps: float = 0.2,
                   kl_beta: float = 1e-3) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss: negative clipped surrogate plus ``kl_beta`` times the k3 KL.

  Per token ``t`` of completion ``i`` with ``ratio = exp(logp - old_logp)``::

    J_it = min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) - beta * k3(logp, ref_logp)
    J    = 1/B sum_i 1/|o_i| sum_t J_it         (DeepSeekMath eq. 3)
    loss = -J

  ``old_logp`` and ``ref_logp`` are constants (no gradient flows into them).
  Masked entries may hold anything, even inf or NaN: they are zeroed first.

  Args:
    logp_bt: ``(B, T)`` log-probs of the sampled tokens under the policy being trained.
    old_logp_bt: ``(B, T)`` the same under the policy that sampled them.
    ref_logp_bt: ``(B, T)`` the same under the reference model.
    advantages_b: ``(B,)`` one advantage per completion.
    mask_bt: ``(B, T)`` 1 at completion tokens (EOS included).
    clip_eps: clip range.
    kl_beta: KL weight.

  Returns:
    ``(loss, aux)``; ``aux`` holds token means over valid tokens: ``kl`` (k3),
    ``ratio``, ``clip_fraction`` (tokens whose clip is active: ratio above
    ``1 + eps`` with ``A > 0`` or below ``1 - eps`` with ``A < 0``), and
    ``num_tokens``.

  Example:
    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([[0.5, 0.5], [0.25, 1.0]]))
    >>> loss, aux = grpo_objective(lp, lp, lp, jnp.array([1.0, 0.5]),
    ...                            jnp.array([[1, 1], [1, 0]]))
    >>> float(aux["kl"]), float(aux["ratio"]), float(aux["clip_fraction"])
    (0.0, 1.0, 0.0)
    >>> float(loss)  # at ratio 1 and zero KL: -(mean of per-completion advantages)
    -0.75
  """
  valid_bt = mask_bt > 0
  zero = lambda x: jnp.where(valid_bt, x, 0.0)  # before exp: keeps garbage out of gradients
  logp_bt = zero(logp_bt)
  old_logp_bt = jax.lax.stop_gradient(zero(old_logp_bt))
  ref_logp_bt = jax.lax.stop_gradient(zero(ref_logp_bt))
  adv_b1 = jax.lax.stop_gradient(advantages_b.astype(jnp.float32))[:, None]

  ratio_bt = jnp.exp(logp_bt - old_logp_bt)
  clipped_bt = jnp.clip(ratio_bt, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate_bt = jnp.minimum(ratio_bt * adv_b1, clipped_bt * adv_b1)
  kl_bt = kl_k3(logp_bt, ref_logp_bt)
  per_token_bt = surrogate_bt - kl_beta * kl_bt

  weights_bt = valid_bt.astype(jnp.float32)
  tokens_b = jnp.sum(weights_bt, axis=1)
  # max(., 1): a row with no tokens (batch padding) contributes 0 instead of NaN.
  per_sequence_b = jnp.sum(per_token_bt * weights_bt, axis=1) / jnp.maximum(tokens_b, 1.0)
  loss = -jnp.mean(per_sequence_b)

  num_tokens = jnp.sum(weights_bt)
  token_mean = lambda x: jnp.sum(x * weights_bt) / jnp.maximum(num_tokens, 1.0)
  is_clipped_bt = (((ratio_bt > 1.0 + clip_eps) & (adv_b1 > 0))
                   | ((ratio_bt < 1.0 - clip_eps) & (adv_b1 < 0)))
  aux = {
      "kl": token_mean(kl_bt),
      "ratio": token_mean(ratio_bt),
      "clip_fraction": token_mean(is_clipped_bt.astype(jnp.float32)),
      "num_tokens": num_tokens,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, aux)

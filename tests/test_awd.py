"""Anchored weight decay against a NumPy re-implementation of the published rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax

RNG = np.random.default_rng(0)
THETA0 = {"w": RNG.normal(size=(7, 3)).astype(np.float32), "b": RNG.normal(size=(3,)).astype(np.float32)}
GRADS = [{k: RNG.normal(size=v.shape).astype(np.float32) for k, v in THETA0.items()} for _ in range(6)]
LR = 0.05


def published_awd(theta, step, theta0, kind, strength):
  """Schweighofer et al.: decay the post-step delta toward theta_0, scaled by the lr."""
  delta = theta + step - theta0
  if kind == "l2":
    delta = (1 - LR * strength) * delta
  else:
    delta = np.sign(delta) * np.maximum(np.abs(delta) - LR * strength, 0.0)
  return theta0 + delta


@pytest.mark.parametrize("kind,strength", [("l2", 3.0), ("l1", 0.3)])
@pytest.mark.parametrize("optimizer", [optax.sgd, optax.adam])
def test_matches_published_rule_after_the_optimizer(kind, strength, optimizer):
  tx = optax.chain(optimizer(LR), es_jax.anchored_weight_decay(strength, kind=kind, learning_rate=LR))
  params = jax.tree.map(jnp.asarray, THETA0)
  state = tx.init(params)
  # The optimizer's own steps do not depend on params (given gradients), so a
  # plain optimizer run provides the per-step updates the rule is applied to.
  opt = optimizer(LR)
  opt_state = opt.init(params)
  expected = {k: v.astype(np.float64) for k, v in THETA0.items()}
  for grads in GRADS:
    step, opt_state = opt.update(grads, opt_state, params)
    expected = {k: published_awd(expected[k], np.asarray(step[k], np.float64), THETA0[k], kind, strength)
                for k in expected}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for k in expected:
    np.testing.assert_allclose(params[k], expected[k], atol=1e-5)
  if kind == "l1":  # soft-thresholding really zeroes some deltas
    assert np.any(np.asarray(params["w"]) == THETA0["w"])


def test_before_sgd_is_decoupled_decay_of_the_pre_step_weights():
  strength = 2.0
  tx = optax.chain(es_jax.anchored_weight_decay(strength), optax.sgd(LR))
  params = jax.tree.map(jnp.asarray, THETA0)
  state = tx.init(params)
  expected = {k: v.astype(np.float64) for k, v in THETA0.items()}
  for grads in GRADS:
    expected = {k: expected[k] - LR * (grads[k] + strength * (expected[k] - THETA0[k])) for k in expected}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for k in expected:
    np.testing.assert_allclose(params[k], expected[k], atol=1e-5)


def test_given_anchor_is_used():
  anchor = jax.tree.map(jnp.zeros_like, THETA0)
  tx = es_jax.anchored_weight_decay(1.0, learning_rate=0.5, anchor=anchor)
  params = jax.tree.map(jnp.asarray, THETA0)
  zero_step = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_step, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], 0.5 * THETA0["w"], rtol=1e-6)


def test_invalid_settings_are_rejected():
  with pytest.raises(ValueError, match="learning_rate \\* strength < 1"):
    es_jax.anchored_weight_decay(10.0, learning_rate=0.1)
  with pytest.raises(ValueError, match="needs the step size"):
    es_jax.anchored_weight_decay(0.01, kind="l1")
  with pytest.raises(ValueError, match="strength"):
    es_jax.anchored_weight_decay(-1.0)
  with pytest.raises(ValueError, match="kind"):
    es_jax.anchored_weight_decay(1.0, kind="l3")

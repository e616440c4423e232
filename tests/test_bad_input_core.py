"""Issue 13, defects 1, 2, 12, 13: hostile input to the core library, against float64 NumPy.

Each test failed before its fix: a wrong or non-finite result, or an unclear error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from es_jax import shaping

THETA = {"w": jnp.zeros((5, 7)), "b": jnp.zeros(3)}
F32_MAX = float(np.finfo(np.float32).max)


def numpy_z(r):
  return (r - r.mean()) / (r.std() + 1e-8)


def numpy_antithetic(r):
  """±d / (2 rms(d)) with d = R+ - R- (zeros if every d is 0), in float64."""
  d = r[0::2] - r[1::2]
  rms = np.sqrt(np.mean(d ** 2))
  half = d / (2 * rms) if rms > 0 else np.zeros_like(d)
  return np.stack([half, -half], 1).reshape(-1)


def member_eps(state, params, sigma, n):
  """Each member's unit noise, read back from member_params (params are 0, sigma a power of 2)."""
  members = jax.vmap(lambda i: es_jax.member_params(state, params, i))(jnp.arange(n))
  return [{k: np.asarray(members[k][i], np.float64) / sigma for k in params} for i in range(n)]


def numpy_update(weights, eps, sigma):
  """-1/(N sigma) sum_i f_i eps_i, the es_step estimate, in float64."""
  return {k: -sum(w * e[k] for w, e in zip(weights, eps)) / (len(weights) * sigma) for k in eps[0]}


# Defect 1: antithetic_difference divided equal differences by std + 1e-8 = 1e-8.

@pytest.mark.parametrize("rewards", [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0], [3.0, 1.0, 3.0, 1.0, 3.0, 1.0],
                                     [2.0, 2.0, 5.0, 5.0], [3.0, -1.0, 2.0, 2.0, 7.5, 0.25]])
def test_antithetic_difference_gives_unit_scale_weights_for_equal_differences(rewards):
  r = np.array(rewards)
  got = np.asarray(shaping.antithetic_difference(jnp.asarray(r)))
  np.testing.assert_allclose(got, numpy_antithetic(r), rtol=1e-6, atol=1e-7)
  assert np.abs(got).max() <= 0.5 * np.sqrt(len(r) / 2) + 1e-6  # bounded by the rms


def test_antithetic_difference_update_with_binary_rewards_is_unit_scale():
  sigma, rewards = 0.5, np.array([1.0, 0.0, 1.0, 0.0])
  es = es_jax.es_step(None, population=4, sigma=sigma, key=jax.random.key(0), rank=None,
                      fitness_shaping=shaping.antithetic_difference)
  state = es.init(THETA)
  updates, _ = jax.jit(es.update)(None, state, THETA, fitness=jnp.asarray(rewards))
  expected = numpy_update(numpy_antithetic(rewards), member_eps(state, THETA, sigma, 4), sigma)
  for k in THETA:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-6)


# Defect 2: NumPy / JAX scalars as hyperparameters.

def test_numpy_and_jax_scalars_are_accepted_as_python_numbers():
  for population, sigma, rank in [(np.int64(8), np.float32(0.5), np.int64(2)),
                                  (jnp.int32(8), jnp.float32(0.5), jnp.int32(2))]:
    es = es_jax.es_step(None, population=population, sigma=sigma, rank=rank,
                        key=jax.random.key(0), chunk_size=np.int64(4))
    spec = es.init(THETA).config.noise
    assert (spec.population, spec.sigma, spec.rank) == (8, 0.5, 2)
    assert type(spec.population) is int and type(spec.sigma) is float and type(spec.rank) is int
    hash(spec)  # lives in jit caches
  np.testing.assert_allclose(shaping.group_z_score(jnp.arange(6.0), np.int64(3)),
                             numpy_z(np.arange(3.0)).tolist() * 2, rtol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(population=np.int64(1)), ValueError, "population must be an integer >= 2, got 1"),
    (dict(population=True), TypeError, "population must be an integer"),
    (dict(population=8.0), TypeError, "population must be an integer"),
    (dict(sigma=np.float32(-0.1)), ValueError, "sigma must be a finite number > 0"),
    (dict(sigma=np.float64(np.nan)), ValueError, "sigma must be a finite number > 0"),
    (dict(sigma=jnp.float32(jnp.inf)), ValueError, "sigma must be a finite number > 0"),
    (dict(sigma="0.1"), TypeError, "sigma must be a real number"),
    (dict(rank=np.int64(0)), ValueError, "rank"),
    (dict(chunk_size=np.int64(0)), ValueError, "chunk_size"),
])
def test_invalid_numpy_hyperparameters_are_refused_clearly(kwargs, error, match):
  settings = dict(population=8, sigma=0.1, key=jax.random.key(0)) | kwargs
  with pytest.raises(error, match=match):
    es_jax.es_step(None, **settings)


def test_traced_sigma_is_refused_clearly():
  with pytest.raises(TypeError, match="sigma must be a concrete number"):
    jax.jit(lambda s: es_jax.es_step(None, population=4, sigma=s, key=jax.random.key(0)))(0.1)


@pytest.mark.parametrize("lr", [np.float32(0.1), jnp.float32(0.1), np.float64(0.2)])
def test_awd_checks_lr_times_strength_for_any_scalar_type(lr):
  with pytest.raises(ValueError, match=r"learning_rate \* strength < 1"):
    es_jax.anchored_weight_decay(10.0, learning_rate=lr)
  with pytest.raises(ValueError, match=r"learning_rate \* strength < 1"):
    es_jax.anchored_weight_decay(np.float32(10.0), learning_rate=lr)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=1.0, learning_rate=np.float32(-0.1)), "learning_rate must be a finite number > 0"),
    (dict(strength=1.0, learning_rate=np.float64(np.nan)), "learning_rate must be a finite number > 0"),
    (dict(strength=np.float32(-1.0)), "strength must be a finite number >= 0, got -1.0"),
    (dict(strength=jnp.float32(jnp.nan)), "strength must be a finite number >= 0, got nan"),
])
def test_awd_refuses_bad_numpy_scalars(kwargs, match):
  with pytest.raises(ValueError, match=match):
    es_jax.anchored_weight_decay(**kwargs)


def awd_after_sgd(tx_awd, lr, steps=3):
  """Params after ``steps`` sgd(lr) steps on a unit gradient followed by ``tx_awd``."""
  tx = optax.chain(optax.sgd(lr), tx_awd)
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update({"w": jnp.ones(3)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"], np.float64)


def test_awd_numpy_strength_follows_the_published_rule():
  theta0 = np.array([1.0, -2.0, 0.5])
  delta = np.zeros(3)
  for _ in range(3):
    delta = (1 - 0.05 * 4.0) * (delta - 0.05)
  got = awd_after_sgd(es_jax.anchored_weight_decay(np.float64(4.0), learning_rate=np.float32(0.05)),
                      0.05)
  np.testing.assert_allclose(got, theta0 + delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_awd_schedule_beyond_one_is_clipped_not_sign_flipped(kind):
  # lr 0.1 for the sgd step, but the schedule hands AWD alpha 0.5, 0.5, -0.1: alpha * 4 = 2, 2, -0.4.
  alphas = [0.5, 0.5, -0.1]
  schedule = lambda count: jnp.asarray(alphas)[count]
  got = awd_after_sgd(es_jax.anchored_weight_decay(4.0, kind=kind, learning_rate=schedule), 0.1)
  theta0, delta = np.array([1.0, -2.0, 0.5]), np.zeros(3)
  for alpha in alphas:
    post = delta - 0.1
    shrink = alpha * 4.0
    if kind == "l2":
      delta = np.clip(1 - shrink, 0, 1) * post  # the documented rule: factor clipped into [0, 1]
    else:
      delta = np.sign(post) * np.maximum(np.abs(post) - max(shrink, 0.0), 0.0)
  np.testing.assert_allclose(got, theta0 + delta, rtol=1e-5, atol=1e-6)


def test_awd_under_inject_hyperparams_follows_the_published_rule():
  tx = optax.inject_hyperparams(es_jax.anchored_weight_decay)(strength=4.0, learning_rate=0.05)
  theta0, delta = np.array([1.0, -2.0, 0.5]), np.zeros(3)
  for _ in range(3):
    delta = (1 - 0.05 * 4.0) * (delta - 0.05)
  np.testing.assert_allclose(awd_after_sgd(tx, 0.05), theta0 + delta, rtol=1e-5, atol=1e-6)


# Defect 12: extreme rewards and sigma.

@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30])
def test_statistics_are_scale_safe(scale):
  r = np.array([3.0, -1.0, 2.0, 2.0, 7.5, 0.25]) * scale
  np.testing.assert_allclose(shaping.z_score(jnp.asarray(r)), numpy_z(r), rtol=1e-5, atol=1e-6)
  expected = np.concatenate([numpy_z(r[:3]), numpy_z(r[3:])])
  np.testing.assert_allclose(shaping.group_z_score(jnp.asarray(r), 3), expected, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(shaping.antithetic_difference(jnp.asarray(r)), numpy_antithetic(r),
                             rtol=1e-5, atol=1e-6)


def test_antithetic_difference_near_float32_max():
  r = np.array([3e38, -3e38, 1e38, 0.0])
  np.testing.assert_allclose(shaping.antithetic_difference(jnp.asarray(r, jnp.float32)),
                             numpy_antithetic(r.astype(np.float32).astype(np.float64)), rtol=1e-5)


def test_z_score_update_with_huge_rewards_is_not_silently_zero():
  sigma, rewards = 0.5, np.array([1.0, 3.0, -2.0, 0.5]) * 1e20
  es = es_jax.es_step(None, population=4, sigma=sigma, key=jax.random.key(1), rank=None)
  state = es.init(THETA)
  updates, new_state = jax.jit(es.update)(None, state, THETA, fitness=jnp.asarray(rewards))
  assert int(new_state.num_failed) == 0
  expected = numpy_update(numpy_z(rewards), member_eps(state, THETA, sigma, 4), sigma)
  for k in THETA:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-4, atol=1e-5)


def test_identity_update_near_float32_max_is_finite_when_representable():
  # Pair 0 differs by 4e38 (beyond float32) but its weight 4e38 / (N sigma) = 5e37 is not.
  sigma, rewards = 2.0, np.array([2e38, -2e38, 1e38, 1e38])
  es = es_jax.es_step(None, population=4, sigma=sigma, key=jax.random.key(2), rank=None,
                      fitness_shaping=shaping.identity)
  state = es.init(THETA)
  updates, _ = jax.jit(es.update)(None, state, THETA, fitness=jnp.asarray(rewards, jnp.float32))
  expected = numpy_update(rewards.astype(np.float32).astype(np.float64),
                          member_eps(state, THETA, sigma, 4), sigma)
  for k in THETA:
    assert np.all(np.isfinite(updates[k]))
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-4, atol=1e-6 * 5e37)


def test_identity_update_beyond_float32_is_loud_not_zero():
  # The documented limit: 6e38 / (N sigma) cannot be represented, so the update is inf/NaN.
  es = es_jax.es_step(None, population=4, sigma=1e-3, key=jax.random.key(2), rank=None,
                      fitness_shaping=shaping.identity)
  updates, _ = es.update(None, es.init(THETA), THETA, fitness=jnp.array([3e38, -3e38, 0.0, 1.0]))
  assert not np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("sigma", [1e-38, 1e-45, 1e39, float("inf")])
def test_sigma_outside_float32_normal_range_is_refused(sigma):
  with pytest.raises(ValueError, match="sigma"):
    es_jax.es_step(None, population=4, sigma=sigma, key=jax.random.key(0))


# Defect 13: wrong shapes and dtypes.

@pytest.mark.parametrize("bad", [lambda r: shaping.z_score(r)[:2], lambda r: shaping.z_score(r)[None],
                                 lambda r: jnp.mean(r)])
def test_custom_shaping_with_wrong_shape_is_refused(bad):
  es = es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0), fitness_shaping=bad)
  with pytest.raises(ValueError, match=r"fitness_shaping .* returned shape .* \(population,\)=\(4,\)"):
    es.update(None, es.init(THETA), THETA, fitness=jnp.arange(4.0))


@pytest.mark.parametrize("leaf,error,match", [
    (jnp.zeros((), jnp.int32), TypeError, "params leaf 'step' has dtype int32"),
    (jnp.zeros((3,), bool), TypeError, "params leaf 'step' has dtype bool"),
    (None, ValueError, "params leaf 'step' is None"),
    (1.5, TypeError, "params leaf 'step' is a float, not an array"),
])
def test_non_float_param_leaves_are_refused_by_name(leaf, error, match):
  params = {"w": jnp.zeros((5, 7)), "step": leaf}
  es = es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0))
  with pytest.raises(error, match=match):
    es.init(params)
  state = es.init(THETA)
  with pytest.raises(error, match=match):
    es.update(None, state, params, fitness=jnp.arange(4.0))
  with pytest.raises(error, match=match):
    es_jax.member_params(state, params, 0)


def test_frozen_integer_leaf_is_kept_bit_exact():
  big = 2 ** 24 + 1  # not a float32: a round trip through float32 changes it
  params = {"w": jnp.zeros((5, 7)), "step": jnp.array(big, jnp.int32)}
  es = es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0), freeze="step")
  state = es.init(params)
  assert int(es_jax.member_params(state, params, 1)["step"]) == big
  updates, _ = es.update(None, state, params, fitness=jnp.arange(4.0))
  assert int(updates["step"]) == 0 and np.any(np.asarray(updates["w"]) != 0)


@pytest.mark.parametrize("anchor,match", [
    ({"w": jnp.zeros((5, 6)), "b": jnp.zeros(3)}, r"anchor leaf 'w' has shape \(5, 6\) .* \(5, 7\)"),
    ({"w": jnp.zeros((5, 7))}, "anchor has no leaf 'b'"),
    ({"w": jnp.zeros((5, 7)), "b": jnp.zeros(3), "c": jnp.zeros(1)}, "anchor leaf 'c' is not in"),
    ({"w": jnp.zeros((5, 7)), "b": jnp.zeros(3, jnp.int32)}, "anchor leaf 'b' has dtype int32"),
    ({"w": jnp.zeros((5, 7)), "b": None}, "anchor has no leaf 'b'"),
])
def test_awd_anchor_must_match_params_leaf_by_leaf(anchor, match):
  tx = es_jax.anchored_weight_decay(1.0, learning_rate=0.1, anchor=anchor)
  with pytest.raises((ValueError, TypeError), match=match):
    tx.init(THETA)


def test_awd_refuses_integer_param_leaves_by_name():
  tx = es_jax.anchored_weight_decay(1.0, learning_rate=0.1)
  with pytest.raises(TypeError, match="params leaf 'n' has dtype int32"):
    tx.init({"w": jnp.zeros(3), "n": jnp.zeros(2, jnp.int32)})
  with pytest.raises(TypeError, match="params leaf 'x' is a float"):
    tx.init({"w": jnp.zeros(3), "x": 2.0})


@pytest.mark.parametrize("group_size,error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                              (4, ValueError)])
def test_group_z_score_bad_group_size(group_size, error):
  with pytest.raises(error, match="group_size"):
    shaping.group_z_score(jnp.arange(6.0), group_size)


def test_shaping_refuses_non_vector_rewards():
  with pytest.raises(ValueError, match=r"rewards must have shape \(N,\), got shape \(2, 3\)"):
    shaping.z_score(jnp.zeros((2, 3)))


# Issue "No silent wrong result and nothing lost, again", item 15: smaller leniencies.

@pytest.mark.parametrize("fitness,match", [
    (jnp.array([1.0, 2.0j, 3.0, 4.0]), "fitness must be real numbers, got dtype complex64"),
    (np.array([1.0, 2.0, 3.0, 4.0 + 1e-3j]), "fitness must be real numbers, got dtype complex128"),
    (np.array(["1", "2", "3", "4"]), "fitness must be an array of real numbers"),
])
def test_complex_or_non_numeric_fitness_is_refused(fitness, match):
  es = es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0))
  with pytest.raises(TypeError, match=match):
    es.update(None, es.init(THETA), THETA, fitness=fitness)


def test_complex_reward_or_shaping_output_is_refused():
  reward = lambda p, batch: jnp.sum(p["w"]) * (1.0 + 1.0j)
  es = es_jax.es_step(reward, population=4, sigma=0.1, key=jax.random.key(0))
  with pytest.raises(TypeError, match="reward_fn's reward must be real numbers, got dtype complex"):
    es.update(None, es.init(THETA), THETA)
  es = es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0),
                      fitness_shaping=lambda r: shaping.z_score(r) * 1j)
  with pytest.raises(TypeError, match="fitness_shaping .* must be real numbers, got dtype complex"):
    es.update(None, es.init(THETA), THETA, fitness=jnp.arange(4.0))
  with pytest.raises(TypeError, match="rewards must be real numbers, got dtype complex64"):
    shaping.z_score(jnp.array([1.0, 2.0j]))
  with pytest.raises(TypeError, match="rewards_by_prompt must be real numbers, got dtype complex"):
    shaping.per_prompt_centering(jnp.ones((2, 2)) * 1j)


def test_boolean_and_integer_fitness_are_numbers():
  es = es_jax.es_step(None, population=4, sigma=0.5, key=jax.random.key(0), rank=None)
  state = es.init(THETA)
  for fitness in (np.array([True, False, False, True]), np.array([1, 0, 0, 1], np.int8)):
    updates, _ = es.update(None, state, THETA, fitness=fitness)
    expected = numpy_update(numpy_z(np.array([1.0, 0.0, 0.0, 1.0])),
                            member_eps(state, THETA, 0.5, 4), 0.5)
    for k in THETA:
      np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", ["no", "False", 0, 1, None, np.array([True])])
def test_per_prompt_centering_normalize_must_be_a_bool(normalize):
  with pytest.raises(TypeError, match="normalize must be True or False, got"):
    shaping.per_prompt_centering(jnp.ones((3, 2)), normalize=normalize)


def test_per_prompt_centering_accepts_numpy_bools():
  r = np.array([[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]])
  got = shaping.per_prompt_centering(jnp.asarray(r), normalize=np.bool_(True))
  np.testing.assert_allclose(got, np.mean([numpy_z(r[:, 0]), numpy_z(r[:, 1])], axis=0), rtol=1e-5)


@pytest.mark.parametrize("on_failure", ["exclude", "worst"])
def test_non_finite_shaped_weight_fails_its_member(on_failure):
  """A member whose shaped weight is NaN/inf is failed: excluded from the sum and N, and counted."""
  sigma, rewards = 0.5, np.array([1.0, 3.0, -2.0, 0.5, 2.0, -1.0])
  poisoned = lambda r: shaping.z_score(r).at[1].set(jnp.nan).at[4].set(jnp.inf)
  es = es_jax.es_step(None, population=6, sigma=sigma, key=jax.random.key(3), rank=None,
                      fitness_shaping=poisoned, on_failure=on_failure)
  state = es.init(THETA)
  updates, new_state = jax.jit(es.update)(None, state, THETA, fitness=jnp.asarray(rewards))
  assert int(new_state.num_failed) == 2
  eps = member_eps(state, THETA, sigma, 6)
  keep = [0, 2, 3, 5]
  weights = numpy_z(rewards)[keep]  # the shaping's own weights of the members that did not fail
  expected = numpy_update(weights, [eps[i] for i in keep], sigma)
  for k in THETA:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5, atol=1e-6)
  # A shaping that fails everyone: a zero step, but every member is counted as failed.
  es = es_jax.es_step(None, population=6, sigma=sigma, key=jax.random.key(3), rank=None,
                      fitness_shaping=lambda r: r * jnp.nan, on_failure=on_failure)
  updates, new_state = es.update(None, state, THETA, fitness=jnp.asarray(rewards))
  assert int(new_state.num_failed) == 6
  for k in THETA:
    np.testing.assert_array_equal(updates[k], 0.0)

"""es_step against analytic gradients, NumPy re-implementations and itself across paths."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from es_jax import shaping

TARGET = {"w": jnp.linspace(-1.0, 1.0, 35).reshape(5, 7), "b": jnp.arange(3.0)}
THETA = {"w": jnp.zeros((5, 7)), "b": jnp.ones(3)}


def quadratic(params, batch=None):
  return -sum(jnp.sum((params[k] - TARGET[k]) ** 2) for k in params)


def true_gradient(params):
  return {k: -2.0 * (params[k] - TARGET[k]) for k in params}


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def flat_jnp(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def estimate(key, *, rank, population, shaping_fn=shaping.z_score, **kw):
  es = es_jax.es_step(quadratic, population=population, sigma=1e-2, rank=rank, key=key,
                      fitness_shaping=shaping_fn, **kw)
  updates, _ = jax.jit(es.update)(None, es.init(THETA), THETA)
  return jax.tree.map(jnp.negative, updates)  # es_step returns a descent direction


@pytest.mark.parametrize("rank, min_cos", [(None, 0.88), (1, 0.8)])
def test_estimate_is_aligned_with_the_true_gradient(rank, min_cos):
  # 38 parameters, 256 antithetic pairs: for this quadratic the estimate is, up to a
  # positive scale, sum_k (grad . eps_k) eps_k. A NumPy simulation of that sum (4,000
  # draws) puts the cosine's 1st percentile at 0.894 for Gaussian noise (mean 0.934)
  # and at 0.842 for rank-1 noise (mean 0.908): the product of two normals has
  # heavier tails, so the bounds sit below those percentiles.
  g = estimate(jax.random.key(0), rank=rank, population=512)
  cos = flat(g) @ flat(true_gradient(THETA)) / np.linalg.norm(flat(g)) / np.linalg.norm(
      flat(true_gradient(THETA)))
  assert cos >= min_cos


@pytest.mark.parametrize("rank", [None, 2])
def test_mean_estimate_over_keys_is_the_analytic_gradient(rank):
  # Raw rewards with antithetic pairs: E[(1/(N sigma)) sum R_i eps_i] = grad f exactly for a quadratic.
  keys = jax.random.split(jax.random.key(1), 300)
  run = jax.jit(jax.vmap(lambda k: flat_jnp(estimate(k, rank=rank, population=16,
                                                     shaping_fn=shaping.identity))))
  samples = np.asarray(run(keys), np.float64)
  mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(len(keys))
  expected = flat(true_gradient(THETA))
  assert np.all(np.abs(mean - expected) < 5 * stderr + 1e-3)


def test_constant_reward_cancels_exactly():
  es = es_jax.es_step(lambda p, b: jnp.float32(3.7), population=8, sigma=0.1,
                      key=jax.random.key(0), fitness_shaping=shaping.identity, rank=None)
  updates, _ = jax.jit(es.update)(None, es.init(THETA), THETA)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0.0)


def all_members(state, params, n):
  return jax.jit(jax.vmap(lambda i: es_jax.member_params(state, params, i)))(jnp.arange(n))


def test_qiu_setting_reproduces_the_published_update():
  alpha, sigma, n = 5e-4, 1e-3, 6
  es = es_jax.es_step(None, population=n, sigma=sigma, key=jax.random.key(4), rank=None,
                      antithetic=False, estimator="qiu")
  tx = optax.chain(es, optax.sgd(alpha))
  state = tx.init(THETA)
  params = THETA
  expected = {k: np.asarray(v, np.float64) for k, v in THETA.items()}
  for _ in range(3):
    stacked = all_members(state, params, n)
    members = [jax.tree.map(lambda x: x[i], stacked) for i in range(n)]
    eps = [{k: (np.asarray(m[k], np.float64) - np.asarray(params[k], np.float64)) / sigma
            for k in m} for m in members]
    rewards = np.array([float(quadratic(m)) for m in members])
    z = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    expected = {k: expected[k] + alpha / n * sum(z[i] * eps[i][k] for i in range(n))
                for k in expected}
    updates, state = tx.update(None, state, params, fitness=jnp.asarray(rewards))
    params = optax.apply_updates(params, updates)
  for k in expected:
    np.testing.assert_allclose(params[k], expected[k], atol=1e-6)


def test_precomputed_fitness_matches_reward_fn_path():
  kw = dict(population=8, sigma=0.05, key=jax.random.key(2), rank=1)
  with_fn = es_jax.es_step(quadratic, **kw)
  external = es_jax.es_step(None, **kw)
  state = external.init(THETA)
  members = all_members(state, THETA, 8)
  rewards = jnp.stack([quadratic(jax.tree.map(lambda x: x[i], members)) for i in range(8)])
  got, _ = jax.jit(external.update)(None, state, THETA, fitness=rewards)
  want, _ = jax.jit(with_fn.update)(None, with_fn.init(THETA), THETA)
  # External rewards are computed eagerly, one member at a time: float32 rounding differs.
  chex.assert_trees_all_close(got, want, rtol=1e-3, atol=1e-4)


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(es_jax.Dense(11, use_bias=True, name="hidden")(x))
    return es_jax.Dense(3, name="out")(x)


X = jax.random.normal(jax.random.key(5), (9, 7))
MLP_PARAMS = Mlp().init(jax.random.key(6), X)["params"]


def test_fast_layer_equals_materialised_weights_in_float64():
  spec = es_jax.NoiseSpec(population=4, sigma=0.3, rank=2)
  noise = es_jax.noise.member_noise(spec, jax.random.key(0), 0, MLP_PARAMS, 1)
  got = es_jax.Dense(11, use_bias=True).apply(
      {"params": MLP_PARAMS["hidden"], "perturbation": noise["hidden"]}, X)
  lr = noise["hidden"]["kernel"]
  w = np.asarray(MLP_PARAMS["hidden"]["kernel"], np.float64) + float(lr.scale) * (
      np.asarray(lr.a, np.float64) @ np.asarray(lr.b, np.float64).T)
  b = np.asarray(MLP_PARAMS["hidden"]["bias"], np.float64) + np.asarray(noise["hidden"]["bias"])
  np.testing.assert_allclose(got, np.asarray(X, np.float64) @ w + b, atol=1e-5)


def mlp_reward(params, batch):
  return -jnp.mean((Mlp().apply({"params": params}, batch) - 1.0) ** 2)


def mlp_reward_fast(params, noise, batch):
  out = Mlp().apply({"params": params, "perturbation": noise}, batch)
  return -jnp.mean((out - 1.0) ** 2)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fast_path_update_equals_generic_path(chunk_size):
  kw = dict(population=8, sigma=0.05, key=jax.random.key(3), rank=2, chunk_size=chunk_size)
  generic = es_jax.es_step(mlp_reward, **kw)
  fast = es_jax.es_step(mlp_reward_fast, reward_input="noise", **kw)
  want, s1 = jax.jit(generic.update)(None, generic.init(MLP_PARAMS), MLP_PARAMS, batch=X)
  got, s2 = jax.jit(fast.update)(None, fast.init(MLP_PARAMS), MLP_PARAMS, batch=X)
  chex.assert_trees_all_close(s1.rewards, s2.rewards, rtol=1e-5)
  # Entries reach ~12 and are sums of member terms of that size: float32 rounding
  # leaves ~1e-6 of the scale, so atol is set relative to it, not to each entry.
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=3e-6 * scale)


def test_population_forward_never_forms_member_weights():
  n, m, k = 6, 13, 17
  params = {"kernel": jnp.zeros((m, k))}
  x = jnp.ones((5, m))

  def population_forward(spec):
    def member(i):
      noise = es_jax.noise.member_noise(spec, jax.random.key(0), 0, params, i)
      return es_jax.Dense(k).apply({"params": params, "perturbation": noise}, x)
    return jax.jit(lambda: jax.vmap(member)(jnp.arange(n))).lower().compile().as_text()

  dense_shape = f"[{n},{m},{k}]"
  assert dense_shape not in population_forward(es_jax.NoiseSpec(population=n, sigma=0.1, rank=1))
  # The check can fail: full-rank noise does form every member's weights.
  assert dense_shape in population_forward(es_jax.NoiseSpec(population=n, sigma=0.1, rank=None))


def test_nan_members_are_excluded_and_counted():
  rewards = jnp.array([1.0, jnp.nan, 3.0, -2.0, jnp.inf, 0.5])
  es = es_jax.es_step(None, population=6, sigma=0.1, key=jax.random.key(0), rank=None,
                      antithetic=False)
  state = es.init(THETA)
  update = jax.jit(es.update)
  updates, new_state = update(None, state, THETA, fitness=rewards)
  assert int(new_state.num_failed) == 2
  keep = [0, 2, 3, 5]
  z = np.asarray(shaping.z_score(rewards[np.array(keep)]), np.float64)
  members = all_members(state, THETA, 6)
  eps = [{k: (np.asarray(members[k][i]) - np.asarray(THETA[k])) / 0.1 for k in THETA}
         for i in keep]
  for k in THETA:
    expected = -sum(z[j] * eps[j][k] for j in range(4)) / (4 * 0.1)
    np.testing.assert_allclose(updates[k], expected, rtol=1e-4, atol=1e-5)
  all_failed, _ = update(None, state, THETA, fitness=jnp.full(6, jnp.nan))
  for leaf in jax.tree.leaves(all_failed):
    np.testing.assert_array_equal(leaf, 0.0)
  worst = es_jax.es_step(None, population=6, sigma=0.1, key=jax.random.key(0), rank=None,
                         antithetic=False, on_failure="worst")
  updates, _ = jax.jit(worst.update)(None, worst.init(THETA), THETA, fitness=rewards)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(updates))


def test_es_awd_adam_fits_a_regression_problem():
  w_true = jax.random.normal(jax.random.key(7), (6, 1))
  xs = jax.random.normal(jax.random.key(8), (64, 6))
  data = (xs, xs @ w_true + 0.5)

  def neg_mse(params, batch):
    x, y = batch
    return -jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  params = {"w": jnp.zeros((6, 1)), "b": jnp.zeros((1,))}
  tx = optax.chain(
      es_jax.es_step(neg_mse, population=32, sigma=0.05, rank=1, key=jax.random.key(9)),
      es_jax.anchored_weight_decay(1e-3),
      optax.adam(0.05))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(300):
    updates, state = update(None, state, params, batch=data)
    params = optax.apply_updates(params, updates)
  assert -float(neg_mse(params, data)) < 0.01  # from 2.1 at theta_0


def test_second_update_does_not_retrace():
  traces = []

  def reward(params, batch):
    traces.append(1)
    return quadratic(params)

  tx = optax.chain(es_jax.es_step(reward, population=4, sigma=0.1, key=jax.random.key(0)),
                   optax.sgd(0.1))
  update = jax.jit(tx.update)
  state, params = tx.init(THETA), THETA
  for _ in range(3):
    updates, state = update(None, state, params)
    params = optax.apply_updates(params, updates)
  assert len(traces) == 1


def test_init_works_on_shape_structs():
  tx = optax.chain(es_jax.es_step(quadratic, population=4, sigma=0.1, key=jax.random.key(0)),
                   es_jax.anchored_weight_decay(1.0), optax.sgd(0.1))
  shapes = jax.eval_shape(tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                THETA))
  assert shapes[0].count.shape == () and shapes[1].anchor["w"].shape == (5, 7)


def test_validation_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="population"):
    es_jax.es_step(quadratic, population=1, sigma=0.1, key=key)
  with pytest.raises(ValueError, match="odd"):
    es_jax.es_step(quadratic, population=5, sigma=0.1, key=key)
  with pytest.raises(ValueError, match="sigma"):
    es_jax.es_step(quadratic, population=4, sigma=-1.0, key=key)
  with pytest.raises(ValueError, match="rank"):
    es_jax.es_step(quadratic, population=4, sigma=0.1, rank=0, key=key)
  with pytest.raises(ValueError, match="rank=6 exceeds"):
    es_jax.es_step(quadratic, population=4, sigma=0.1, rank=6, key=key).init(THETA)
  es = es_jax.es_step(None, population=4, sigma=0.1, key=key)
  with pytest.raises(ValueError, match="No reward"):
    es.update(None, es.init(THETA), THETA)
  with pytest.raises(ValueError, match=r"shape \(population,\)"):
    es.update(None, es.init(THETA), THETA, fitness=jnp.zeros(5))
  with pytest.raises(ValueError, match="threefry"):
    es_jax.es_step(quadratic, population=4, sigma=0.1, key=jax.random.key(0, impl="rbg"))
  with pytest.raises(TypeError, match="typed PRNG key"):
    es_jax.es_step(quadratic, population=4, sigma=0.1, key=jax.random.PRNGKey(0))
  vector_reward = es_jax.es_step(lambda p, b: p["b"], population=4, sigma=0.1, key=key)
  with pytest.raises(ValueError, match="scalar"):
    vector_reward.update(None, vector_reward.init(THETA), THETA)


def test_dense_with_feature_axes_and_bias_takes_lowrank_noise():
  layer = es_jax.Dense((3, 5), use_bias=True)
  params = layer.init(jax.random.key(0), X)["params"]
  assert params["bias"].shape == (15,)
  spec = es_jax.NoiseSpec(population=2, sigma=0.2, rank=1)
  noise = es_jax.noise.member_noise(spec, jax.random.key(1), 0, params, 0)
  got = layer.apply({"params": params, "perturbation": noise}, X)
  dense = es_jax.perturb(params, noise)
  want = (np.asarray(X) @ np.asarray(dense["kernel"]).reshape(7, 15) + np.asarray(dense["bias"]))
  np.testing.assert_allclose(got.reshape(9, 15), want, atol=1e-5)


def test_population_rewards_are_each_members_reward_in_member_order():
  """The public routine es_step evaluates with, against each member's params formed in float64."""
  spec = es_jax.NoiseSpec(population=6, sigma=0.1, rank=2)
  key, generation = jax.random.key(3), 4
  rewards = np.asarray(jax.jit(lambda p: es_jax.population_rewards(
      quadratic, spec, key, generation, p, chunk_size=2))(THETA))
  expected = []
  for member in range(spec.population):
    noise = es_jax.noise.member_noise(spec, key, generation, THETA, member)
    member_params = {k: np.float64(THETA[k]) + np.asarray(
        es_jax.materialize(noise[k], THETA[k].shape), np.float64) for k in THETA}
    expected.append(-sum(np.sum((member_params[k] - np.float64(TARGET[k])) ** 2) for k in THETA))
  np.testing.assert_allclose(rewards, expected, rtol=1e-5)
  # The fast path (reward of params and noise) gives the same rewards.
  fast = es_jax.population_rewards(lambda p, n, batch: quadratic(es_jax.perturb(p, n)), spec, key,
                                   generation, THETA, reward_input="noise")
  np.testing.assert_allclose(np.asarray(fast), rewards, rtol=1e-6)
  with pytest.raises(ValueError, match="chunk_size=4 must be >= 1 and divide population=6"):
    es_jax.population_rewards(quadratic, spec, key, generation, THETA, chunk_size=4)

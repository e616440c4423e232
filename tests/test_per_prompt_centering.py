"""Per-prompt fitness centring against a float64 NumPy loop over prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from es_jax import shaping


def np_per_prompt(r, normalize):
  r = np.asarray(r, np.float64)
  valid = np.isfinite(r).all(axis=1)
  out = np.full(r.shape[0], np.nan)
  if not valid.any():
    return out
  columns = []
  for p in range(r.shape[1]):
    col = r[valid, p]
    centred = col - col.mean()
    if normalize:
      centred = centred / (col.std() + 1e-8)
    columns.append(centred)
  out[valid] = np.mean(columns, axis=0)
  return out


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_numpy_with_failed_members(normalize):
  rng = np.random.default_rng(0)
  r = rng.normal(size=(12, 5)) * np.array([1.0, 10.0, 0.1, 3.0, 1.0]) + np.arange(5)
  r[:, 4] = 2.5  # a prompt every member scores the same
  r[3, 1] = np.nan  # one failed rollout fails the member
  r[7, :] = np.inf
  got = shaping.per_prompt_centering(jnp.asarray(r, jnp.float32), normalize=normalize)
  want = np_per_prompt(r, normalize)
  assert got.shape == (12,) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.isnan(got), [i in (3, 7) for i in range(12)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Centred per prompt, so the valid members' fitness sums to 0.
  assert abs(float(jnp.nansum(got))) < 1e-5


def test_unnormalised_is_the_centred_row_mean():
  r = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 0.0]])
  # Without normalising, the mean of centred columns is the centred row mean.
  row_means = r.mean(axis=1)
  np.testing.assert_allclose(shaping.per_prompt_centering(r), row_means - row_means.mean(),
                             rtol=1e-6)
  # Normalised, the small-spread prompt 0 weighs as much as prompt 1.
  np.testing.assert_allclose(shaping.per_prompt_centering(r, normalize=True),
                             np_per_prompt(r, True), rtol=1e-5, atol=1e-6)


def test_all_failed_and_bad_shapes():
  assert np.isnan(shaping.per_prompt_centering(jnp.full((4, 2), jnp.nan))).all()
  with pytest.raises(ValueError, match="members, prompts"):
    shaping.per_prompt_centering(jnp.ones(4))
  with pytest.raises(ValueError, match="members, prompts"):
    shaping.per_prompt_centering(jnp.ones((4, 0)))


def test_feeds_es_step_which_excludes_and_counts_the_failed_member():
  params = {"w": jnp.zeros((3, 2))}
  tx = optax.chain(es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0),
                                  fitness_shaping=shaping.identity, estimator="qiu"),
                   optax.sgd(1.0))
  state = tx.init(params)
  r = jnp.array([[1.0, 0.0], [0.0, 1.0], [jnp.nan, 1.0], [1.0, 1.0]])
  fitness = shaping.per_prompt_centering(r)
  updates, new_state = jax.jit(tx.update)(None, state, params, fitness=fitness)
  assert int(new_state[0].num_failed) == 1
  # Qiu's rule with the 3 valid members: theta += 1/3 sum_i f_i * (sigma eps_i) / sigma.
  want = sum(float(fitness[i]) * es_jax.noise.materialize(
      es_jax.member_noise(state, params, i)["w"], (3, 2)) / 0.1 for i in (0, 1, 3)) / 3
  np.testing.assert_allclose(updates["w"], want, rtol=1e-5, atol=1e-6)

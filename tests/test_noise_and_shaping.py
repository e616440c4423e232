"""Noise generation and fitness shaping against NumPy float64 references."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from es_jax import noise as nl
from es_jax import shaping
from es_fixtures import assert_weighted_sum_matches_members

# "dense" and "twin" share a shape, hence one noise group and one draw per pair.
PARAMS = {"dense": {"kernel": jnp.zeros((13, 17)), "bias": jnp.zeros((17,))},
          "twin": {"kernel": jnp.zeros((13, 17))},
          "einsum": {"kernel": jnp.zeros((5, 3, 7))},
          "embed": {"embedding": jnp.zeros((11, 5))}}


def _dense_member(spec, key, gen, member):
  noise = nl.member_noise(spec, key, gen, PARAMS, member)
  return jax.tree.map(lambda n, p: np.asarray(nl.materialize(n, p.shape), np.float64),
                      noise, PARAMS, is_leaf=lambda x: x is None or isinstance(x, nl.LowRank))


def test_lowrank_noise_has_rank_r_unit_variance_and_axis_rule():
  spec = nl.NoiseSpec(population=4, sigma=1.0, rank=2, antithetic=False)
  samples = [_dense_member(spec, jax.random.key(0), 0, i) for i in range(4)]
  for s in samples:
    assert np.linalg.matrix_rank(s["dense"]["kernel"], tol=1e-4) == 2
    # Axis rule: (5, 3, 7) is a 5 x 21 matrix of rank 2.
    assert np.linalg.matrix_rank(s["einsum"]["kernel"].reshape(5, 21), tol=1e-4) == 2
  many = np.stack([_dense_member(spec, jax.random.key(0), g, 0)["dense"]["kernel"]
                   for g in range(60)])
  assert abs(many.var() - 1.0) < 0.1  # A B^T / sqrt(r) has unit-variance elements.
  # Leaves drawn in one call are still independent: a twin's noise is uncorrelated.
  twins = np.stack([_dense_member(spec, jax.random.key(0), g, 0)["twin"]["kernel"]
                    for g in range(60)])
  assert abs(np.corrcoef(many.ravel(), twins.ravel())[0, 1]) < 0.05


def _count_primitive(jaxpr, name) -> int:
  """Equations of primitive ``name`` in ``jaxpr``, inside nested jits and loops too."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _count_primitive(sub, name)
  return total


def _toy_decoder(num_layers):
  layer = {"q": jnp.zeros((8, 8)), "up": jnp.zeros((8, 12)), "down": jnp.zeros((12, 8)),
           "norm": jnp.zeros((8,))}
  return {"embed": jnp.zeros((50, 8)), **{f"layers_{i}": layer for i in range(num_layers)}}


@pytest.mark.parametrize("rank", [None, 2])
def test_random_draws_do_not_grow_with_depth(rank):
  # Compile time on CPU grows with the number of threefry calls; a deeper model
  # of the same shapes must draw with the same calls (and reduce with the same
  # einsums), whatever its number of leaves.
  spec = nl.NoiseSpec(population=4, sigma=1.0, rank=rank, freeze=("embed",))

  def count(fn, num_layers, primitive):
    return _count_primitive(jax.make_jaxpr(fn)(_toy_decoder(num_layers)).jaxpr, primitive)

  draw = lambda p: jax.vmap(lambda i: nl.member_noise(spec, jax.random.key(0), 0, p, i))(
      jnp.arange(4))
  reduce = lambda p: nl.weighted_sum(spec, jax.random.key(0), 0, p, jnp.ones(2))
  for fn, primitive in ((draw, "random_bits"), (reduce, "random_bits"),
                        (reduce, "dot_general")):
    shallow, deep = count(fn, 2, primitive), count(fn, 12, primitive)
    assert 0 < shallow == deep, (primitive, shallow, deep)


def test_noise_is_pure_fresh_per_generation_and_antithetic():
  spec = nl.NoiseSpec(population=6, sigma=0.5, rank=1)
  key = jax.random.key(3)
  alone = _dense_member(spec, key, 7, 3)
  batched = jax.vmap(lambda m: nl.member_noise(spec, key, 7, PARAMS, m))(jnp.arange(6))
  batched_3 = jax.tree.map(lambda x: x[3], batched)
  np.testing.assert_allclose(
      nl.materialize(batched_3["dense"]["kernel"], (13, 17)), alone["dense"]["kernel"], rtol=1e-6)
  partner = _dense_member(spec, key, 7, 2)
  for leaf_a, leaf_b in zip(jax.tree.leaves(alone), jax.tree.leaves(partner)):
    np.testing.assert_array_equal(leaf_a, -leaf_b)
  next_gen = _dense_member(spec, key, 8, 3)
  assert not np.allclose(next_gen["dense"]["kernel"], alone["dense"]["kernel"])
  np.testing.assert_allclose(np.abs(alone["dense"]["bias"]).mean(), 0.5 * 0.8, rtol=0.5)


def test_freeze_and_vector_policy():
  spec = nl.NoiseSpec(population=2, sigma=1.0, freeze=("embed",), vector_noise="frozen")
  noise = nl.member_noise(spec, jax.random.key(0), 0, PARAMS, 0)
  assert noise["embed"]["embedding"] is None and noise["dense"]["bias"] is None
  assert isinstance(noise["dense"]["kernel"], nl.LowRank)


@pytest.mark.parametrize("rank", [None, 1, 3])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("full_rank_pair_by_pair", [False, True])
def test_weighted_sum_equals_dense_sum_over_members(rank, antithetic, full_rank_pair_by_pair,
                                                    monkeypatch):
  if full_rank_pair_by_pair:  # As for a large model: full-rank groups reduced one pair at a time.
    monkeypatch.setattr(nl, "_FULL_RANK_BYTES_AT_ONCE", 0)
  spec = nl.NoiseSpec(population=8, sigma=0.3, rank=rank, antithetic=antithetic)
  assert_weighted_sum_matches_members(
      spec, PARAMS, lambda key, generation, i: _dense_member(spec, key, generation, i))


def test_spec_validation():
  with pytest.raises(ValueError, match="population"):
    nl.NoiseSpec(population=1, sigma=1.0)
  with pytest.raises(ValueError, match="odd"):
    nl.NoiseSpec(population=5, sigma=1.0)
  with pytest.raises(ValueError, match="sigma"):
    nl.NoiseSpec(population=4, sigma=0.0)
  with pytest.raises(ValueError, match="rank"):
    nl.NoiseSpec(population=4, sigma=1.0, rank=0)
  spec = nl.NoiseSpec(population=4, sigma=1.0, rank=6)
  with pytest.raises(ValueError, match="einsum/kernel"):
    nl.member_noise(spec, jax.random.key(0), 0, PARAMS, 0)


REWARDS = np.array([3.0, -1.0, 2.0, 2.0, 7.5, 0.25])


def test_z_score_matches_numpy():
  expected = (REWARDS - REWARDS.mean()) / (REWARDS.std() + 1e-8)
  np.testing.assert_allclose(shaping.z_score(jnp.asarray(REWARDS)), expected, rtol=1e-5)


def test_centered_rank_matches_numpy_with_ties():
  order = np.argsort(np.argsort(REWARDS, kind="stable"), kind="stable").astype(float)
  order[[2, 3]] = order[[2, 3]].mean()  # the tied pair shares its mean rank
  expected = order / (len(REWARDS) - 1) - 0.5
  np.testing.assert_allclose(shaping.centered_rank(jnp.asarray(REWARDS)), expected, atol=1e-6)


def test_group_z_score_uses_each_groups_own_std():
  groups = REWARDS.reshape(2, 3)
  expected = ((groups - groups.mean(1, keepdims=True))
              / (groups.std(1, keepdims=True) + 1e-8)).reshape(-1)
  np.testing.assert_allclose(shaping.group_z_score(jnp.asarray(REWARDS), 3), expected, rtol=1e-5)


def test_antithetic_difference_matches_numpy():
  diff = REWARDS[0::2] - REWARDS[1::2]
  half = diff / (2 * np.sqrt(np.mean(diff ** 2)))  # differences over their root mean square
  expected = np.stack([half, -half], 1).reshape(-1)
  np.testing.assert_allclose(shaping.antithetic_difference(jnp.asarray(REWARDS)), expected, rtol=1e-5)


@pytest.mark.parametrize("fn", [shaping.z_score, shaping.centered_rank, shaping.identity,
                                shaping.antithetic_difference,
                                lambda r: shaping.group_z_score(r, 3)])
def test_failed_members_get_zero_and_the_rest_is_finite(fn):
  rewards = REWARDS.copy()
  rewards[1], rewards[4] = np.nan, np.inf
  shaped = np.asarray(fn(jnp.asarray(rewards)))
  assert np.all(np.isfinite(shaped)) and shaped[1] == 0 and shaped[4] == 0
  keep = np.array([0, 2, 3, 5])
  np.testing.assert_allclose(np.asarray(shaping.z_score(jnp.asarray(rewards)))[keep],
                             shaping.z_score(jnp.asarray(REWARDS[keep])), rtol=1e-5)


def test_replace_failed_with_worst():
  got = shaping.replace_failed_with_worst(jnp.array([1.0, jnp.nan, -2.0, -jnp.inf]))
  np.testing.assert_array_equal(got, [1.0, -2.0, -2.0, -2.0])

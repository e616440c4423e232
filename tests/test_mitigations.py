"""Anchored norm cap and sparsified updates against float64 NumPy re-implementations of their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from es_jax.mitigations import kept_count

RNG = np.random.default_rng(0)
THETA0 = {"b": RNG.normal(size=(5,)).astype(np.float32),
          "w": RNG.normal(size=(7, 3)).astype(np.float32)}
STEPS = [{k: RNG.normal(size=v.shape).astype(np.float32) for k, v in THETA0.items()}
         for _ in range(6)]


def np_project(theta, theta0, radius, scope):
  """Euclidean projection onto the ball(s) of radius R around theta_0, in float64."""
  delta = {k: theta[k] - theta0[k] for k in theta}
  if scope == "global":
    norm = np.sqrt(sum(np.sum(d ** 2) for d in delta.values()))
    norms = {k: norm for k in delta}
  else:
    norms = {k: np.linalg.norm(d) for k, d in delta.items()}
  return {k: theta0[k] + delta[k] * min(1.0, radius / norms[k]) if norms[k] > 0 else theta[k]
          for k in delta}


def f64(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_norm_cap_is_the_projection_onto_the_ball(scope):
  radius = 1.5
  tx = optax.chain(optax.sgd(0.4), es_jax.anchored_norm_cap(radius, scope=scope))
  params = jax.tree.map(jnp.asarray, THETA0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = f64(THETA0)
  projected_once = False
  for step in STEPS:
    proposal = {k: expected[k] - 0.4 * step[k] for k in expected}
    expected = np_project(proposal, f64(THETA0), radius, scope)
    projected_once |= any(not np.allclose(expected[k], proposal[k]) for k in expected)
    updates, state = update(step, state, params)
    params = optax.apply_updates(params, updates)
    for k in expected:
      np.testing.assert_allclose(params[k], expected[k], atol=2e-6)
  assert projected_once  # the test exercises the projection, not only the identity
  norms = [np.linalg.norm(np.asarray(params[k], np.float64) - THETA0[k]) for k in params]
  if scope == "global":
    assert np.sqrt(sum(n ** 2 for n in norms)) == pytest.approx(radius, rel=1e-6)
  else:
    assert max(norms) == pytest.approx(radius, rel=1e-6)


def test_norm_cap_leaves_steps_inside_the_ball_alone_and_uses_the_given_anchor():
  params = jax.tree.map(jnp.asarray, THETA0)
  small = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  tx = es_jax.anchored_norm_cap(10.0)
  out, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_array_equal(out["w"], small["w"])
  anchor = jax.tree.map(jnp.zeros_like, params)
  tx = es_jax.anchored_norm_cap(1.0, scope="per_tensor", anchor=anchor)
  zero = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(zero, tx.init(params), params)
  got = optax.apply_updates(params, out)["w"]
  np.testing.assert_allclose(got, THETA0["w"] / np.linalg.norm(THETA0["w"]), rtol=1e-6)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(zero, tx.init(params))


def np_top_k_mask(magnitudes, k):
  """The k largest, ties to the lower index: a stable sort of the negated magnitudes."""
  mask = np.zeros(magnitudes.size, bool)
  mask[np.argsort(-magnitudes, kind="stable")[:k]] = True
  return mask


def np_sparsify(step, fraction, scope):
  if scope == "per_tensor":
    return {k: np_top_k_mask(np.abs(v).ravel(), kept_count(fraction, v.size)).reshape(v.shape)
            for k, v in step.items()}
  keys = sorted(step)  # jax.tree.leaves order of a dict
  flat = np.concatenate([np.abs(step[k]).ravel() for k in keys])
  mask = np_top_k_mask(flat, kept_count(fraction, flat.size))
  out, offset = {}, 0
  for k in keys:
    out[k] = mask[offset:offset + step[k].size].reshape(step[k].shape)
    offset += step[k].size
  return out


def test_kept_count_rounds_to_nearest_and_keeps_at_least_one():
  assert [kept_count(f, n) for f, n in [(0.1, 30), (0.25, 10), (0.35, 10), (1e-9, 100), (1.0, 7),
                                        (0.5, 1), (np.float32(0.1), 30)]] == [3, 3, 4, 1, 7, 1, 3]


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("residual", ["drop", "carry"])
def test_sparsified_updates_match_numpy_over_several_steps(scope, residual):
  fraction = 0.2
  tx = es_jax.sparsified_updates(fraction, scope=scope, residual=residual)
  params = jax.tree.map(jnp.asarray, THETA0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  carried = {k: np.zeros(v.shape) for k, v in THETA0.items()}
  applied_total = {k: np.zeros(v.shape) for k, v in THETA0.items()}
  for step in STEPS:
    acc = {k: step[k] + carried[k] for k in step} if residual == "carry" else f64(step)
    mask = np_sparsify(acc, fraction, scope)
    want = {k: np.where(mask[k], acc[k], 0.0) for k in acc}
    if residual == "carry":
      carried = {k: np.where(mask[k], 0.0, acc[k]) for k in acc}
    out, state = update(step, state, params)
    for k in want:
      np.testing.assert_allclose(out[k], want[k], rtol=1e-6, atol=1e-6)
      applied_total[k] += np.asarray(out[k], np.float64)
    if residual == "carry":
      for k in carried:
        np.testing.assert_allclose(state.residual[k], carried[k], rtol=1e-6, atol=1e-6)
    else:
      assert state.residual is None
  kept = sum(int(np.count_nonzero(np.asarray(out[k]))) for k in out)
  sizes = [v.size for v in THETA0.values()]
  assert kept == (sum(kept_count(fraction, n) for n in sizes) if scope == "per_tensor"
                  else kept_count(fraction, sum(sizes)))
  if residual == "carry":  # nothing is lost: applied + still carried = every step's sum
    for k in THETA0:
      np.testing.assert_allclose(applied_total[k] + carried[k],
                                 sum(np.asarray(s[k], np.float64) for s in STEPS), atol=1e-5)


def test_sparsified_updates_break_ties_by_flat_order():
  tx = es_jax.sparsified_updates(0.5, scope="global")
  step = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[2.0, 0.5], [-2.0, 1.0]])}
  out, _ = tx.update(step, tx.init(step))
  # |2| three times for k = 3: "a"[1] then "b"[0, 0] and "b"[1, 0], in leaves order.
  np.testing.assert_array_equal(out["a"], [0.0, -2.0])
  np.testing.assert_array_equal(out["b"], [[2.0, 0.0], [-2.0, 0.0]])
  tx = es_jax.sparsified_updates(0.25)
  out, _ = tx.update({"w": jnp.ones(8)}, tx.init({"w": jnp.ones(8)}))
  np.testing.assert_array_equal(out["w"], [1, 1, 0, 0, 0, 0, 0, 0])


def test_chained_after_es_step_and_sgd():
  """es_step -> sgd -> sparsify (carry) -> norm cap, jitted, against the plain ES step plus NumPy."""
  target = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  reward = lambda p, batch: -jnp.sum((p["w"] - target) ** 2) - jnp.sum(p["b"] ** 2)
  es = lambda: es_jax.es_step(reward, population=8, sigma=0.1, key=jax.random.key(0), rank=1)
  lr, fraction, radius = 0.3, 0.25, 0.8
  plain = optax.chain(es(), optax.sgd(lr))
  tx = optax.chain(es(), optax.sgd(lr),
                   es_jax.sparsified_updates(fraction, residual="carry"),
                   es_jax.anchored_norm_cap(radius))
  theta0 = {"b": jnp.full((4,), 0.5), "w": jnp.zeros((3, 4))}
  params, state, plain_state = theta0, tx.init(theta0), plain.init(theta0)
  update, plain_update = jax.jit(tx.update), jax.jit(plain.update)
  expected, carried = f64(theta0), {k: np.zeros(v.shape) for k, v in theta0.items()}
  for _ in range(5):
    # Same generation count and params: the plain chain gives the step sparsify sees.
    step, plain_state = plain_update(None, plain_state, params)
    acc = {k: np.asarray(step[k], np.float64) + carried[k] for k in step}
    mask = np_sparsify(acc, fraction, "per_tensor")
    carried = {k: np.where(mask[k], 0.0, acc[k]) for k in acc}
    proposal = {k: np.asarray(params[k], np.float64) + np.where(mask[k], acc[k], 0.0) for k in acc}
    expected = np_project(proposal, f64(theta0), radius, "global")
    updates, state = update(None, state, params)
    params = optax.apply_updates(params, updates)
    for k in expected:
      np.testing.assert_allclose(params[k], expected[k], atol=1e-5)
  delta = np.sqrt(sum(np.sum((np.asarray(params[k], np.float64) - theta0[k]) ** 2) for k in params))
  assert delta == pytest.approx(radius, rel=1e-5)  # the cap was active


@pytest.mark.parametrize("make,match,error", [
    (lambda: es_jax.anchored_norm_cap(0.0), r"radius must be a finite number in \(0", ValueError),
    (lambda: es_jax.anchored_norm_cap(float("nan")), "radius", ValueError),
    (lambda: es_jax.anchored_norm_cap(np.inf), "radius", ValueError),
    (lambda: es_jax.anchored_norm_cap(True), "radius must be a real number", TypeError),
    (lambda: es_jax.anchored_norm_cap("1.0"), "radius must be a real number", TypeError),
    (lambda: es_jax.anchored_norm_cap(1.0, scope="layer"), "scope must be one of", ValueError),
    (lambda: es_jax.sparsified_updates(0.0), r"fraction must be a finite number in \(0, 1\]",
     ValueError),
    (lambda: es_jax.sparsified_updates(1.5), "fraction", ValueError),
    (lambda: es_jax.sparsified_updates(0.1, residual="keep"), "residual must be one of", ValueError),
    (lambda: es_jax.sparsified_updates(0.1, scope="row"), "scope", ValueError),
])
def test_invalid_settings_are_rejected(make, match, error):
  with pytest.raises(error, match=match):
    make()


def test_numeric_types_are_accepted():
  for value in (1, np.float32(0.5), np.int64(1), np.array(0.5), jnp.float32(0.5)):
    es_jax.anchored_norm_cap(value)
    es_jax.sparsified_updates(value)

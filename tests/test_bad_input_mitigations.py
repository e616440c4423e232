"""Issue "No silent wrong result and nothing lost, again", items 9, 11, 14: hostile input to
the anchored norm cap, anchored weight decay and sparsified updates, against float64 NumPy.

Each test failed before its fix: a silently wrong result, or a loss the docstring rules out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_mitigations import STEPS, THETA0, f64, np_project, np_sparsify

import es_jax

PARAMS = {"w": jnp.zeros((5, 7)), "b": jnp.zeros(3)}
ANCHORED = {
    "norm_cap": lambda anchor=None: es_jax.anchored_norm_cap(1.0, anchor=anchor),
    "awd": lambda anchor=None: es_jax.anchored_weight_decay(1.0, learning_rate=0.1, anchor=anchor),
}


# Item 9: the norm cap checked only the anchor's tree structure.

@pytest.mark.parametrize("transform", sorted(ANCHORED))
@pytest.mark.parametrize("anchor,error,match", [
    # Broadcastable: before, the cap measured every row against the one anchor row.
    ({"w": jnp.zeros((1, 7)), "b": jnp.zeros(3)}, ValueError,
     r"anchor leaf 'w' has shape \(1, 7\) but shape \(5, 7\) in params"),
    ({"w": jnp.zeros((5, 7)), "b": jnp.zeros(3, jnp.int32)}, TypeError,
     "anchor leaf 'b' has dtype int32; .* needs floating-point leaves"),
    ({"w": jnp.zeros((5, 7)), "b": 0.5}, TypeError, "anchor leaf 'b' is a float, not an array"),
    ({"w": jnp.zeros((5, 7))}, ValueError, "anchor has no leaf 'b' of params"),
    ({"w": jnp.zeros((5, 7)), "b": jnp.zeros(3), "c": jnp.zeros(1)}, ValueError,
     "anchor leaf 'c' is not in params"),
])
def test_anchor_checks_are_shared_by_norm_cap_and_awd(transform, anchor, error, match):
  with pytest.raises(error, match=match):
    ANCHORED[transform](anchor).init(PARAMS)


@pytest.mark.parametrize("transform", sorted(ANCHORED))
def test_anchor_with_other_containers_and_integer_params_are_refused(transform):
  with pytest.raises(ValueError, match="anchor's tree structure .* differs from"):
    ANCHORED[transform]((jnp.zeros(2),)).init([jnp.zeros(2)])  # same leaf path '0'
  with pytest.raises(TypeError, match="params leaf 'n' has dtype int32"):
    ANCHORED[transform]().init({"w": jnp.zeros(3), "n": jnp.zeros(2, jnp.int32)})


def test_norm_cap_anchor_of_a_wider_dtype_projects_like_numpy():
  """An accepted anchor (float64 values rounded to bfloat16 on purpose) gives the projection."""
  anchor = {k: jnp.asarray(v, jnp.bfloat16) for k, v in THETA0.items()}
  params = jax.tree.map(jnp.asarray, THETA0)
  tx = es_jax.anchored_norm_cap(0.5, anchor=anchor)
  out, _ = tx.update(jax.tree.map(jnp.asarray, STEPS[0]), tx.init(params), params)
  got = optax.apply_updates(params, out)
  want = np_project({k: f64(THETA0)[k] + STEPS[0][k] for k in THETA0}, f64(anchor), 0.5, "global")
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=2e-6)


# Item 11: the sum of squares overflowed (4e20 steps landed on theta_0) or underflowed (1e-25).

@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("anchor_scale,step_scale,radius", [
    (1.0, 4e20, 1.5),  # sum of squares inf in float32: the weights landed on theta_0
    (0.0, 4e20, 1e19),
    (1.0, 4e20, 1e30),  # inside the ball: the step must pass unchanged
    (0.0, 1e-25, 1e-26),  # sum of squares 0 in float32: nothing was projected
    (0.0, 1e-25, 1e-20),
])
def test_norm_cap_is_scale_safe(scope, anchor_scale, step_scale, radius):
  theta0 = {k: anchor_scale * v for k, v in THETA0.items()}
  step = {k: step_scale * v for k, v in STEPS[1].items()}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in theta0.items()}
  tx = es_jax.anchored_norm_cap(radius, scope=scope)
  out, _ = jax.jit(tx.update)({k: jnp.asarray(v, jnp.float32) for k, v in step.items()},
                              tx.init(params), params)
  got = optax.apply_updates(params, out)
  theta0_f32 = f64({k: np.float32(v) for k, v in theta0.items()})
  proposal = {k: theta0_f32[k] + np.float32(step[k]) for k in step}
  want = np_project(proposal, theta0_f32, radius, scope)
  for k in want:
    assert np.all(np.isfinite(got[k]))
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5,
                               atol=2e-6 * anchor_scale + 1e-6 * min(radius, step_scale))


# Item 14: error feedback lost the bfloat16 rounding of the applied entries.

@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_carried_residual_loses_nothing_in_bfloat16(scope):
  fraction = 0.25
  params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in THETA0.items()}
  tx = es_jax.sparsified_updates(fraction, scope=scope, residual="carry")
  state = tx.init(params)
  update = jax.jit(tx.update)
  carried = {k: np.zeros(v.shape) for k, v in THETA0.items()}
  applied, total = dict(carried), dict(carried)
  for step in STEPS:
    step = {k: jnp.asarray(3.0 * v, jnp.bfloat16) for k, v in step.items()}
    acc = {k: np.asarray(step[k], np.float64) + carried[k] for k in step}
    mask = np_sparsify(acc, fraction, scope)
    # The applied entries are rounded to the step's dtype; their rounding error is carried.
    want = {k: np.where(mask[k], acc[k], 0.0).astype(jnp.bfloat16).astype(np.float64) for k in acc}
    carried = {k: acc[k] - want[k] for k in acc}
    out, state = update(step, state, params)
    for k in want:
      assert out[k].dtype == jnp.bfloat16 and state.residual[k].dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(out[k], np.float64), want[k])
      np.testing.assert_allclose(state.residual[k], carried[k], rtol=1e-6, atol=1e-6)
      applied[k] = applied[k] + want[k]
      total[k] = total[k] + np.asarray(step[k], np.float64)
  for k in total:  # every entry of every step is applied eventually: nothing is lost
    np.testing.assert_allclose(applied[k] + np.asarray(state.residual[k], np.float64), total[k],
                               atol=1e-5)


TRANSFORMS = {
    "sparsify_carry": lambda: es_jax.sparsified_updates(0.5, residual="carry"),
    "sparsify_carry_global": lambda: es_jax.sparsified_updates(0.5, scope="global",
                                                               residual="carry"),
    "norm_cap": lambda: es_jax.anchored_norm_cap(1.0),
    "awd_exact": lambda: es_jax.anchored_weight_decay(1.0, learning_rate=0.1),
    "awd_before_sgd": lambda: es_jax.anchored_weight_decay(1.0),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_step_of_another_shape_is_refused_not_broadcast(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  step = {"w": jnp.ones((1, 7)), "b": jnp.ones(3)}  # broadcasts against (5, 7)
  with pytest.raises(ValueError, match=r"updates leaf 'w' has shape \(1, 7\) but .* \(5, 7\)"):
    tx.update(step, state, PARAMS)
  if "sparsify" not in name:  # the params are compared with the anchor too
    with pytest.raises(ValueError, match=r"params leaf 'b' has shape \(1,\) but .* \(3,\)"):
      tx.update(PARAMS, state, {"w": PARAMS["w"], "b": jnp.zeros(1)})

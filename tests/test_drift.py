"""Drift metrics against NumPy float64, group assignment by path, and per-token KL."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from es_jax.evaluation import drift

# Hand-written paths and the group each must land in.
EXPECTED_GROUPS = {
    "layers_0/attn/wq_dnh/kernel": "q",
    "layers_0/attn/wk_dnh/kernel": "k",
    "layers_0/attn/wv_dnh/kernel": "v",
    "layers_0/attn/wo_hnd/kernel": "o",
    "layers_0/mlp/gate/kernel": "mlp",
    "layers_0/mlp/wo/kernel": "mlp",
    "layers_0/attn_norm/scale": "norm",
    "model/layers/1/self_attn/q_proj/weight": "q",
    "model/layers/1/self_attn/q_proj/bias": "q",
    "model/layers/1/self_attn/k_proj/weight": "k",
    "model/layers/1/self_attn/v_proj/weight": "v",
    "model/layers/1/self_attn/o_proj/weight": "o",
    "model/layers/1/self_attn/q_norm/weight": "norm",
    "model/layers/1/mlp/gate_proj/weight": "mlp",
    "model/layers/1/mlp/up_proj/weight": "mlp",
    "model/layers/1/mlp/down_proj/weight": "mlp",
    "model/layers/1/input_layernorm/weight": "norm",
    "model/layers/1/post_attention_layernorm/weight": "norm",
    "model/norm/weight": "norm",
    "model/embed_tokens/weight": "embed",
    "lm_head/weight": "embed",
    "rotary/inv_freq": "other",
    "proj_qkv/kernel": "other",
}


def _tree_from_paths(paths, make):
  tree: dict = {}
  for path in paths:
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = make(path)
  return tree


def test_group_assignment_by_path():
  tree = _tree_from_paths(EXPECTED_GROUPS, lambda p: np.zeros(2))
  assert drift.group_paths(tree) == EXPECTED_GROUPS


def test_custom_rules_first_match_wins():
  rules = (("attention", r"attn"), ("query", r"wq"), ("everything_else_named_kernel", r"kernel$"))
  assert drift.assign_group("layers_0/attn/wq_dnh/kernel", rules) == "attention"
  assert drift.assign_group("layers_0/wq/kernel", rules) == "query"
  assert drift.assign_group("layers_0/mlp/kernel", rules) == "everything_else_named_kernel"
  assert drift.assign_group("layers_0/mlp/bias", rules) == "other"


def _random_pair(seed):
  # A few shapes, the same for every seed, so the per-shape kernels compile only once.
  shapes = {path: [(4, 8), (8,), (3, 5)][i % 3] for i, path in enumerate(EXPECTED_GROUPS)}
  rng = np.random.default_rng(seed)
  theta0 = _tree_from_paths(
      shapes, lambda p: rng.standard_normal(shapes[p]).astype(np.float32))

  def perturbed(path, value):
    kind = rng.integers(0, 3, size=value.shape)  # unchanged / tiny (< tau) / large
    delta = np.where(kind == 0, 0.0, np.where(kind == 1, 3e-7, rng.standard_normal(value.shape)))
    return (value + delta.astype(np.float32) * (kind > 0)).astype(np.float32)

  flat0 = drift.flatten_with_paths(theta0)
  theta = _tree_from_paths(shapes, lambda p: perturbed(p, flat0[p]))
  return theta, theta0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_numpy_float64(seed):
  theta, theta0 = _random_pair(seed)
  tau = 1e-6
  report = drift.drift_report(theta, theta0, tau=tau)
  flat, flat0 = drift.flatten_with_paths(theta), drift.flatten_with_paths(theta0)
  deltas = {p: flat[p].astype(np.float64) - flat0[p].astype(np.float64) for p in flat}

  expected_global = np.sqrt(sum(np.sum(d ** 2) for d in deltas.values()))
  assert report.global_norm == pytest.approx(expected_global, rel=1e-5)
  assert drift.global_drift_norm(theta, theta0) == pytest.approx(expected_global, rel=1e-5)
  total_small = sum(np.sum(np.abs(d) <= tau) for d in deltas.values())
  assert report.sparsity == pytest.approx(total_small / sum(d.size for d in deltas.values()))

  for tensor in report.tensors:
    d = deltas[tensor.path]
    assert tensor.group == EXPECTED_GROUPS[tensor.path]
    assert tensor.size == d.size
    assert tensor.norm == pytest.approx(np.linalg.norm(d.ravel()), rel=1e-5, abs=1e-12)
    assert tensor.sparsity == pytest.approx(np.mean(np.abs(d) <= tau))

  for group in set(EXPECTED_GROUPS.values()):
    members = [deltas[p] for p, g in EXPECTED_GROUPS.items() if g == group]
    got = report.groups[group]
    assert got.num_tensors == len(members)
    assert got.norm == pytest.approx(np.sqrt(sum(np.sum(d ** 2) for d in members)), rel=1e-5)
    assert got.sparsity == pytest.approx(
        sum(np.sum(np.abs(d) <= tau) for d in members) / sum(d.size for d in members))
  json.dumps(report.to_dict())  # serialisable


def test_identical_trees_have_zero_norm_and_full_sparsity():
  theta, _ = _random_pair(4)
  report = drift.drift_report(theta, theta)
  assert report.global_norm == 0.0 and report.sparsity == 1.0
  assert all(t.norm == 0.0 and t.sparsity == 1.0 for t in report.tensors)
  assert all(g.norm == 0.0 and g.sparsity == 1.0 for g in report.groups.values())


def test_bfloat16_differences_are_taken_in_float32():
  theta0 = {"w": jnp.ones((4,), jnp.bfloat16)}
  theta = {"w": jnp.ones((4,), jnp.bfloat16) + jnp.bfloat16(2 ** -7)}
  assert drift.global_drift_norm(theta, theta0) == pytest.approx(2 * 2 ** -7)


def test_lists_and_nnx_state_paths():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  assert sorted(drift.flatten_with_paths(nnx.state(model, nnx.Param))) == ["bias", "kernel"]
  assert list(drift.flatten_with_paths({"layers": [np.ones(1), np.ones(1)]})) == [
      "layers/0", "layers/1"]


def test_mismatched_trees_are_reported():
  with pytest.raises(ValueError, match=r"only in params: \['b'\]"):
    drift.drift_report({"a": np.ones(2), "b": np.ones(2)}, {"a": np.ones(2)})
  with pytest.raises(ValueError, match=r"'x/w' has shape \(2,\) in params but \(3,\)"):
    drift.drift_report({"x": {"w": np.ones(2)}}, {"x": {"w": np.ones(3)}})


def _log_softmax64(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mean_token_kl_matches_numpy():
  rng = np.random.default_rng(0)
  logp = _log_softmax64(rng.standard_normal((3, 5, 11)) * 2)
  logq = _log_softmax64(rng.standard_normal((3, 5, 11)) * 2)
  mask = rng.integers(0, 2, size=(3, 5))
  mask[0, 0] = 1
  per_token = np.sum(np.exp(logp) * (logp - logq), axis=-1)
  expected = np.sum(per_token * mask) / mask.sum()
  got = drift.mean_token_kl(logp.astype(np.float32), logq.astype(np.float32), mask)
  assert got == pytest.approx(expected, rel=1e-4)
  assert drift.mean_token_kl(logp, logp, mask) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(np.asarray(drift.per_token_kl(logp, logq)), per_token, rtol=1e-4)


def test_mean_token_kl_ignores_masked_nans_and_zero_probabilities():
  with np.errstate(divide="ignore"):
    logp = np.log(np.array([[[1.0, 0.0], [0.5, 0.5]]]))  # log 0 = -inf
  logq = np.log(np.array([[[0.5, 0.5], [0.5, 0.5]]]))
  logq_bad = logq.copy()
  logq_bad[0, 1] = np.nan
  # Only the first position counts: KL = 1 * log(1 / 0.5) = log 2.
  assert drift.mean_token_kl(logp, logq_bad, np.array([[1, 0]])) == pytest.approx(np.log(2))


def test_mean_token_kl_bad_input():
  x = np.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="same shape"):
    drift.mean_token_kl(x, np.zeros((1, 2, 4)), np.ones((1, 2)))
  with pytest.raises(ValueError, match="mask has shape"):
    drift.mean_token_kl(x, x, np.ones((2, 1)))
  with pytest.raises(ValueError, match="selects no token"):
    drift.mean_token_kl(x, x, np.zeros((1, 2)))

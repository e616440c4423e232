"""theta_0 lives once: the anchored transforms share the params' arrays, and run checkpoints leave
the anchors out (rebuilt from the run's base on restore, verified by its sha256)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from experiments.checkpointing import RunCheckpointError, RunCheckpointer

POPULATION, SIGMA, LR, STRENGTH, RADIUS = 4, 0.1, 0.05, 2.0, 0.3
FINGERPRINT = {"run": "anchors"}
RNG = np.random.default_rng(0)
# Big enough (128 KiB of float32) that a stored copy of it dwarfs the checkpoint's metadata.
THETA0 = {"dense": {"kernel": RNG.normal(size=(256, 128)).astype(np.float32),
                    "bias": RNG.normal(size=(128,)).astype(np.float32)},
          "norm": {"scale": np.linspace(0.5, 1.5, 128).astype(np.float32)}}
PARAMS_BYTES = sum(x.nbytes for x in jax.tree.leaves(THETA0))
ANCHORS = ("opt_state/2/anchor", "opt_state/3/anchor")  # where ``anchored_chain`` keeps theta_0


def es_direction():
  return es_jax.es_step(None, population=POPULATION, sigma=SIGMA, key=jax.random.key(0))


def anchored_chain():
  return optax.chain(es_direction(), optax.sgd(LR),
                     es_jax.anchored_weight_decay(STRENGTH, learning_rate=LR),
                     es_jax.anchored_norm_cap(RADIUS))


def device_params(theta0=THETA0):
  return jax.tree.map(jnp.asarray, theta0)


def leaves_with_names(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


FITNESS = [np.asarray(RNG.normal(size=POPULATION), np.float32) for _ in range(5)]


# ----------------------------------------------------------------------------- one copy in memory


def test_awd_and_norm_cap_share_the_params_as_their_anchor():
  params = device_params()
  state = anchored_chain().init(params)
  awd_anchor, cap_anchor = leaves_with_names(state[2].anchor), leaves_with_names(state[3].anchor)
  for name, leaf in leaves_with_names(params).items():
    assert awd_anchor[name] is leaf and cap_anchor[name] is leaf, name
    assert awd_anchor[name].unsafe_buffer_pointer() == leaf.unsafe_buffer_pointer(), name
    assert cap_anchor[name].unsafe_buffer_pointer() == leaf.unsafe_buffer_pointer(), name


def test_shared_given_anchor_is_not_copied_either():
  theta0 = device_params()
  params = jax.tree.map(lambda x: x + 1.0, theta0)
  tx = optax.chain(optax.sgd(LR), es_jax.anchored_weight_decay(STRENGTH, learning_rate=LR,
                                                               anchor=theta0),
                   es_jax.anchored_norm_cap(RADIUS, anchor=theta0))
  state = tx.init(params)
  for name, leaf in leaves_with_names(theta0).items():
    assert leaves_with_names(state[1].anchor)[name] is leaf
    assert leaves_with_names(state[2].anchor)[name] is leaf


def test_host_params_are_copied_so_editing_them_later_moves_no_anchor():
  host = jax.tree.map(np.copy, THETA0)
  state = anchored_chain().init(host)
  host["dense"]["kernel"][0, 0] += 1.0  # a NumPy array is mutable: the anchor must not alias it
  for anchor in (state[2].anchor, state[3].anchor):
    np.testing.assert_array_equal(np.asarray(anchor["dense"]["kernel"]), THETA0["dense"]["kernel"])


def reference_awd_then_cap(theta, step, theta0):
  """float64 NumPy: the published L2 AWD of the post-step weights, then the global projection."""
  delta = {k: (1 - LR * STRENGTH) * (theta[k] + step[k] - theta0[k]) for k in theta}
  norm = np.sqrt(sum(np.sum(d ** 2) for d in delta.values()))
  scale = min(1.0, RADIUS / norm)
  return {k: theta0[k] + scale * delta[k] for k in theta}


def test_updates_with_a_shared_anchor_match_float64_awd_then_cap():
  flat0 = {k: np.asarray(v, np.float64) for k, v in leaves_with_names(THETA0).items()}
  tx, direction = anchored_chain(), optax.chain(es_direction(), optax.sgd(LR))
  params = device_params()
  state, direction_state = tx.init(params), direction.init(params)
  expected, capped = dict(flat0), 0
  for fitness in FITNESS:
    # The ES direction does not depend on the params' values: a chain without the anchored
    # transforms gives the steps that the float64 rule is applied to.
    step, direction_state = direction.update(None, direction_state, params, fitness=fitness)
    step = {k: np.asarray(v, np.float64) for k, v in leaves_with_names(step).items()}
    before_cap = {k: (1 - LR * STRENGTH) * (expected[k] + step[k] - flat0[k]) for k in flat0}
    capped += np.sqrt(sum(np.sum(d ** 2) for d in before_cap.values())) > RADIUS
    expected = reference_awd_then_cap(expected, step, flat0)
    updates, state = tx.update(None, state, params, fitness=fitness)
    params = optax.apply_updates(params, updates)
  assert capped >= 2  # the cap is really binding, not only the decay
  for name, leaf in leaves_with_names(params).items():
    np.testing.assert_allclose(np.asarray(leaf, np.float64), expected[name], rtol=0, atol=2e-6,
                               err_msg=name)


# ----------------------------------------------------------------------------- checkpoints


@jax.jit
def train_step(state, fitness):
  tx = anchored_chain()
  updates, opt_state = tx.update(None, state["opt_state"], state["params"], fitness=fitness)
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}


def fresh_state(theta0=THETA0, tx=None):
  """What the runner builds before resuming: ``init`` on the freshly loaded base."""
  params = jax.device_put(device_params(theta0), jax.devices()[0])
  return {"params": params, "opt_state": (tx or anchored_chain()).init(params)}


def trained_state():
  state = fresh_state()
  for fitness in FITNESS[:2]:
    state = train_step(state, fitness)
  return state


def nudged_theta0():
  """The base with one weight one ulp away: a different base checkpoint."""
  nudged = jax.tree.map(np.copy, THETA0)
  nudged["dense"]["kernel"][3, 5] = np.nextafter(nudged["dense"]["kernel"][3, 5], np.float32(9))
  return nudged


def read_manifest(step_dir: pathlib.Path) -> dict:
  return json.loads((step_dir / "manifest" / "metadata").read_text())


def directory_bytes(directory: pathlib.Path) -> int:
  return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def assert_same_bits(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(), \
        jax.tree_util.keystr(path)


def assert_anchors_are_the_base(state, base_params):
  base = leaves_with_names(base_params)
  for anchor in (state["opt_state"][2].anchor, state["opt_state"][3].anchor):
    for name, leaf in leaves_with_names(anchor).items():
      assert leaf is base[name], name


def test_anchors_are_left_out_of_the_checkpoint_and_resume_is_bit_identical(tmp_path):
  trained = trained_state()
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(2, trained, {"iteration": 2}, anchors=ANCHORS)
  manifest = read_manifest(tmp_path / "2")
  saved = [entry["path"] for entry in manifest["leaves"]]
  assert "params/dense/kernel" in saved
  assert not [path for path in saved if "anchor" in path], saved
  # The digest of the base the anchors were, the one an .espatch of the run records.
  assert manifest["anchors"] == {path: es_jax.params_sha256(device_params()) for path in ANCHORS}

  like = fresh_state()  # a new process: the base loaded afresh
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    restored, meta = checkpointer.restore(like)  # the manifest says what was left out
  assert meta == {"iteration": 2}
  expected = {"params": trained["params"], "opt_state": trained["opt_state"]}
  assert_same_bits(restored, expected)
  for name, leaf in leaves_with_names(restored["opt_state"][2].anchor).items():  # theta_0's bits
    np.testing.assert_array_equal(np.asarray(leaf), leaves_with_names(THETA0)[name])
  assert_anchors_are_the_base(restored, like["params"])  # rebuilt as the base itself: no copy
  for fitness in FITNESS[2:]:
    restored, trained = train_step(restored, fitness), train_step(trained, fitness)
  assert_same_bits(restored, trained)


def test_a_checkpoint_with_awd_is_not_larger_by_the_params(tmp_path):
  plain_tx = optax.chain(es_direction(), optax.sgd(LR))
  plain = fresh_state(tx=plain_tx)
  anchored = fresh_state()
  with RunCheckpointer(tmp_path / "plain", fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, plain, {})
  with RunCheckpointer(tmp_path / "anchored", fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, anchored, {}, anchors=ANCHORS)
  with RunCheckpointer(tmp_path / "stored", fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, anchored, {})  # what earlier versions wrote: both anchors stored
  sizes = {name: directory_bytes(tmp_path / name / "1") for name in ("plain", "anchored", "stored")}
  assert abs(sizes["anchored"] - sizes["plain"]) < 0.05 * PARAMS_BYTES, sizes
  assert sizes["stored"] - sizes["anchored"] > 1.5 * PARAMS_BYTES, sizes  # two copies of theta_0


def test_a_changed_base_is_refused_naming_both_digests(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(2, trained_state(), {"iteration": 2}, anchors=ANCHORS)
    with pytest.raises(RunCheckpointError) as error:
      checkpointer.restore(fresh_state(nudged_theta0()), anchors=ANCHORS)
  message = str(error.value)
  assert "the base checkpoint changed since this run started" in message
  assert es_jax.params_sha256(device_params()) in message
  assert es_jax.params_sha256(device_params(nudged_theta0())) in message


def save_as_earlier_versions_did(directory, state, meta):
  """A checkpoint in the layout of the versions that stored the anchors (manifest format 2)."""
  with RunCheckpointer(directory, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(2, state, meta)  # no anchors named: every leaf stored, as before
  manifest = read_manifest(directory / "2")
  assert set(manifest) == {"format", "fingerprint", "meta_sha256", "leaves"}
  assert manifest["format"] == 2
  assert "opt_state/2/anchor/dense/kernel" in [entry["path"] for entry in manifest["leaves"]]


def test_a_checkpoint_that_holds_the_anchors_still_restores(tmp_path):
  trained = trained_state()
  save_as_earlier_versions_did(tmp_path, trained, {"iteration": 2})
  like = fresh_state()
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    restored, meta = checkpointer.restore(like, anchors=ANCHORS)
  assert meta == {"iteration": 2}
  assert_same_bits(restored, trained)
  assert_anchors_are_the_base(restored, like["params"])  # the stored copies are not kept
  assert_same_bits(train_step(restored, FITNESS[2]), train_step(trained, FITNESS[2]))


def test_a_stored_anchor_that_is_not_the_base_is_refused(tmp_path):
  save_as_earlier_versions_did(tmp_path, trained_state(), {"iteration": 2})
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    with pytest.raises(RunCheckpointError) as error:
      checkpointer.restore(fresh_state(nudged_theta0()), anchors=ANCHORS)
  message = str(error.value)
  assert "the base checkpoint changed since this run started" in message
  assert "opt_state/2/anchor/dense/kernel" in message


def test_anchor_paths_that_name_no_subtree_are_refused(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    with pytest.raises(ValueError, match="no subtree of state is at .*opt_state/9/anchor"):
      checkpointer.save(1, fresh_state(), {}, anchors=("opt_state/9/anchor",))
    assert checkpointer.all_steps() == []


def test_restore_onto_a_state_without_the_left_out_anchors_is_refused(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, fresh_state(), {}, anchors=ANCHORS)
    plain = fresh_state(tx=optax.chain(es_direction(), optax.sgd(LR)))
    with pytest.raises(RunCheckpointError, match="opt_state/2/anchor"):
      checkpointer.restore(plain)

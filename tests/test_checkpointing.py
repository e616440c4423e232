"""RunCheckpointer: bit-identical resume, keep-last-n, atomic saves, clear errors on bad steps."""

from __future__ import annotations

import functools
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from experiments.checkpointing import RunCheckpointError, RunCheckpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
FINGERPRINT = {"model": "tiny-qwen2", "population": 4, "rank": 1}
POPULATION = 4
ES = optax.chain(
    es_jax.es_step(None, population=POPULATION, sigma=0.1, key=jax.random.key(0)),
    es_jax.anchored_weight_decay(1.0, learning_rate=0.1),
    optax.sgd(0.1))
ADAM = optax.adam(1e-2)  # stands in for the GRPO optimizer's state


@functools.cache  # built once: each test then compiles train_step for the same shapes
def _initial_state():
  w_key, b_key = jax.random.split(jax.random.key(1))
  # The kernel is over orbax's 1 KiB inline limit, so its bytes get a data file of their own.
  params = {"dense": {"kernel": jax.random.normal(w_key, (64, 32)),
                      "bias": jax.random.normal(b_key, (32,))},
            "norm": {"scale": jnp.linspace(0.5, 1.5, 32, dtype=jnp.bfloat16)}}
  state = {"params": params, "opt_state": ES.init(params), "adam_state": ADAM.init(params),
           "rng": jax.random.key(2)}
  # Committed to a device like restored arrays are, so train_step compiles once for both.
  return jax.device_put(state, jax.devices()[0])


def fresh_state():
  """What the runner builds before resuming: the ``like`` of every restore."""
  return dict(_initial_state())


@jax.jit
def train_step(state):
  """One ES generation with rewards computed outside es_step, plus one Adam update."""
  rng, reward_key = jax.random.split(state["rng"])
  # The ES update regenerates its noise from the ES key and count, and the rewards come
  # from the run rng, so a restore that got any of them wrong would continue differently.
  fitness = jax.random.normal(reward_key, (POPULATION,))
  updates, opt_state = ES.update(None, state["opt_state"], state["params"], fitness=fitness)
  _, adam_state = ADAM.update(state["params"], state["adam_state"])
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
          "adam_state": adam_state, "rng": rng}


def small_state(scale=1.0):
  return {"w": jnp.arange(6.0).reshape(2, 3) * scale, "half": jnp.ones(4, jnp.bfloat16) * scale,
          "rng": jax.random.key(7)}


def assert_identical(actual, expected):
  """Same tree (node types, static fields), and per leaf the same type, dtype, sharding and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    name = jax.tree_util.keystr(path)
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, name
    assert a.sharding == b.sharding, name
    if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(a) == jax.random.key_impl(b), name
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name


def snapshot(directory):
  return {path.relative_to(directory): path.read_bytes()
          for path in sorted(pathlib.Path(directory).rglob("*")) if path.is_file()}


def step_dirs(directory):
  return sorted(path.name for path in pathlib.Path(directory).iterdir())


def test_resume_is_bit_identical_and_continues_identically(tmp_path):
  trained = train_step(fresh_state())
  meta = {"iteration": 1, "data_position": 2400, "config": {"sigma": 0.1, "layers": [1, 2]},
          "metrics": [{"reward": float("nan"), "best": float("inf"), "note": None,
                       "num_failed": np.int32(0), "rewards": jnp.arange(2.0)}]}
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, trained, meta)
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:  # a new process
    assert checkpointer.latest_step() == 1
    restored, restored_meta = checkpointer.restore(like=fresh_state())

  assert_identical(restored, trained)
  assert isinstance(restored["opt_state"][0], es_jax.EsState)
  assert restored["opt_state"][0].config == trained["opt_state"][0].config
  assert isinstance(restored["opt_state"][1], es_jax.AnchoredWeightDecayState)
  assert isinstance(restored["adam_state"][0], optax.ScaleByAdamState)
  assert restored["params"]["norm"]["scale"].dtype == jnp.bfloat16
  assert restored["opt_state"][1].anchor["norm"]["scale"].dtype == jnp.bfloat16
  assert_identical(train_step(restored), train_step(trained))
  # Meta goes through JSON: NaN/inf survive, NumPy/JAX values become Python numbers/lists.
  metrics = restored_meta["metrics"][0]
  assert np.isnan(metrics["reward"]) and metrics["best"] == float("inf") and metrics["note"] is None
  assert metrics["num_failed"] == 0 and metrics["rewards"] == [0.0, 1.0]
  assert restored_meta["data_position"] == 2400 and restored_meta["config"]["layers"] == [1, 2]


def test_keep_last_n_keeps_exactly_the_newest_steps(tmp_path):
  with RunCheckpointer(tmp_path, keep_last_n=2, fingerprint=FINGERPRINT) as checkpointer:
    for step in (1, 2, 5, 9):
      checkpointer.save(step, small_state(step), {"iteration": step})
    assert checkpointer.all_steps() == [5, 9]
    restored, meta = checkpointer.restore(small_state(), step=5)
  assert step_dirs(tmp_path) == ["5", "9"]
  assert meta == {"iteration": 5}
  assert_identical(restored, small_state(5))


def test_saving_an_existing_or_older_step_is_refused_and_overwrites_nothing(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(5, small_state(), {})
    before = snapshot(tmp_path)
    for step in (5, 4):
      with pytest.raises(RunCheckpointError, match="never overwritten"):
        checkpointer.save(step, small_state(2.0), {})
    with pytest.raises(TypeError, match="meta must be JSON-able"):
      checkpointer.save(6, small_state(), {"when": object()})
    assert snapshot(tmp_path) == before and checkpointer.all_steps() == [5]


def _garble_largest_array_file(step_dir):
  # The biggest file holds the 8 KiB kernels' zstd frames, which carry no checksum: tensorstore
  # decodes flipped bytes there into wrong values without complaint.
  files = [path for path in (step_dir / "arrays").rglob("*") if path.is_file()]
  target = max(files, key=lambda path: path.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4] = bytes(byte ^ 0xFF for byte in data[middle:middle + 4])
  target.write_bytes(bytes(data))


def _truncate_array_files(step_dir):
  for path in (step_dir / "arrays").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove_manifest(step_dir):
  for path in (step_dir / "manifest").iterdir():
    path.unlink()


def _replace_with_junk(step_dir):
  for path in sorted(step_dir.rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  (step_dir / "notes.txt").write_text("not a checkpoint")


# When tensorstore fails one read, orbax closes its event loop while other reads are still
# finishing, and they complain from a thread; that noise is orbax's, not a failure here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_garble_largest_array_file, _truncate_array_files,
                                     _remove_manifest, _replace_with_junk])
def test_corrupt_latest_step_is_reported_and_nothing_is_touched(tmp_path, corrupt):
  with RunCheckpointer(tmp_path, keep_last_n=3, fingerprint=FINGERPRINT) as checkpointer:
    states = {step: train_step(fresh_state()) if step == 3 else fresh_state() for step in (1, 2, 3)}
    for step, state in states.items():
      checkpointer.save(step, state, {"iteration": step})
  corrupt(tmp_path / "3")
  before = snapshot(tmp_path)

  with RunCheckpointer(tmp_path, keep_last_n=3, fingerprint=FINGERPRINT) as checkpointer:
    with pytest.raises(RunCheckpointError) as error:
      checkpointer.restore(fresh_state())
    message = str(error.value)
    assert f"Checkpoint {tmp_path / '3'} is corrupt" in message
    assert "fall back to step 2" in message and "--out" in message
    if corrupt is _garble_largest_array_file:
      assert re.search(r"the bits of \S+/dense/kernel differ", message)  # the checksum found it
    assert snapshot(tmp_path) == before
    restored, meta = checkpointer.restore(fresh_state(), step=2)  # the earlier one still works
    assert_identical(restored, states[2]) and meta == {"iteration": 2}

    # Corruption is not looked for when saving: step 3 counts toward keep_last_n and only
    # the oldest step goes; step 2 stays byte-identical.
    checkpointer.save(4, restored, {"iteration": 4})
    assert checkpointer.all_steps() == [2, 3, 4]
  after = snapshot(tmp_path)
  assert {p: b for p, b in after.items() if p.parts[0] in ("2", "3")} == {
      p: b for p, b in before.items() if p.parts[0] in ("2", "3")}


def test_leftover_tmp_dir_of_an_unfinished_save_is_ignored(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, small_state(1.0), {"iteration": 1})
  # What a kill mid-save leaves (this orbax's name, and the older timestamped one).
  for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1700000000000"):
    (tmp_path / name / "arrays").mkdir(parents=True)
    (tmp_path / name / "arrays" / "half_written").write_bytes(b"\0" * 100)
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
    restored, meta = checkpointer.restore(small_state())
    assert_identical(restored, small_state(1.0)) and meta == {"iteration": 1}
    checkpointer.save(2, small_state(2.0), {"iteration": 2})  # replaces its own leftover
    assert_identical(checkpointer.restore(small_state())[0], small_state(2.0))
  assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()


def test_a_process_killed_just_before_the_commit_leaves_no_new_step(tmp_path):
  # SIGKILL at the worst moment: every file of step 2 written and its items committed inside
  # the step's tmp directory, only the final rename (the step's commit) not done.
  script = textwrap.dedent(f"""
      import os, signal, jax.numpy as jnp
      from orbax.checkpoint._src.path import async_path
      from experiments.checkpointing import RunCheckpointer
      checkpointer = RunCheckpointer({str(tmp_path)!r}, fingerprint={FINGERPRINT!r})
      checkpointer.save(1, {{"w": jnp.ones(3)}}, {{"iteration": 1}})
      rename = async_path.rename
      async def rename_or_die(source, destination):
        if destination.name == "2":  # the step's own commit; its items' renames go through
          os.kill(os.getpid(), signal.SIGKILL)
        return await rename(source, destination)
      async_path.rename = rename_or_die
      checkpointer.save(2, {{"w": jnp.zeros(3)}}, {{"iteration": 2}})
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
  assert step_dirs(tmp_path) == ["1", "2.orbax-checkpoint-tmp"]
  # Complete, with its commit file, yet not a step: only the rename makes it one.
  assert (tmp_path / "2.orbax-checkpoint-tmp" / "commit_success.txt").exists()
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    assert checkpointer.all_steps() == [1]
    restored, meta = checkpointer.restore({"w": jnp.zeros(3)})
  np.testing.assert_array_equal(restored["w"], np.ones(3))
  assert meta == {"iteration": 1}


def test_fingerprint_mismatch_names_the_differing_keys(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, small_state(), {})
  before = snapshot(tmp_path)
  other = {**FINGERPRINT, "population": 8, "preset": "fast"}
  with RunCheckpointer(tmp_path, fingerprint=other) as checkpointer:
    for attempt in (lambda: checkpointer.restore(small_state()),
                    lambda: checkpointer.save(2, small_state(), {})):
      with pytest.raises(RunCheckpointError) as error:
        attempt()
      message = str(error.value)
      assert "population: checkpoint 4, this run 8" in message
      assert "preset: checkpoint '<missing>', this run 'fast'" in message
      assert "model" not in message.split("configuration")[1] and str(tmp_path / "1") in message
  assert snapshot(tmp_path) == before


def test_state_that_does_not_fit_names_the_leaf_path_and_both_shapes(tmp_path):
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, small_state(), {})
    wider = {**small_state(), "w": jnp.zeros((2, 4))}
    with pytest.raises(RunCheckpointError,
                       match=r"leaf w: checkpoint float32\[2, 3\], `like` float32\[2, 4\]"):
      checkpointer.restore(wider)
    full_precision = {**small_state(), "half": jnp.ones(4)}
    with pytest.raises(RunCheckpointError,
                       match=r"leaf half: checkpoint bfloat16\[4\], `like` float32\[4\]"):
      checkpointer.restore(full_precision)
    renamed = {"v": small_state()["w"], "half": small_state()["half"], "rng": jax.random.key(0)}
    with pytest.raises(RunCheckpointError, match="in `like` but not in the checkpoint: v.*"
                                              "in the checkpoint but not in `like`: w"):
      checkpointer.restore(renamed)
    with pytest.raises(RunCheckpointError, match="No step 7 .* the steps there are \\[1\\]"):
      checkpointer.restore(small_state(), step=7)


def test_restore_onto_a_sharded_like_gives_its_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ("pop",))
  rows = jax.sharding.NamedSharding(mesh, jax.P("pop"))
  state = {"w": jnp.arange(64.0).reshape(16, 4), "half": jnp.arange(8, dtype=jnp.bfloat16),
           "keys": jax.random.split(jax.random.key(3), 8)}  # saved unsharded, on one device
  with RunCheckpointer(tmp_path, fingerprint=FINGERPRINT) as checkpointer:
    checkpointer.save(1, {**state, "rng": jax.device_put(jax.random.key(4), jax.devices()[1])}, {})
    like = jax.device_put({"w": jnp.zeros((16, 4)), "half": jnp.zeros(8, jnp.bfloat16),
                           "keys": jax.random.split(jax.random.key(0), 8)}, rows)
    # A run's own key stays on one device beside the sharded params.
    like["rng"] = jax.device_put(jax.random.key(0), jax.devices()[2])
    restored, _ = checkpointer.restore(like)
    checkpointer.save(2, restored, {})  # and the mixed placement saves too
  for name in state:
    assert restored[name].sharding == rows, name
    assert len(restored[name].addressable_shards) == 8
  assert restored["rng"].sharding == like["rng"].sharding
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(jax.random.key(4)))
  np.testing.assert_array_equal(restored["w"], state["w"])
  np.testing.assert_array_equal(restored["half"], state["half"])
  np.testing.assert_array_equal(jax.random.key_data(restored["keys"]),
                                jax.random.key_data(state["keys"]))

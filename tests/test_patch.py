"""ES patches: a run rebuilt from theta_0, its recipe and its fitness history.

The reference is the run itself: a short ES loop that records the fitness it
feeds to each generation. Replay must land on its final params bit for bit on
the same device layout, and within float32 round-off on another.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import es_jax
from es_jax.recipe import (AwdRecipe, EsRecipe, EsStepRecipe, NormCapRecipe, OptimizerRecipe,
                           SparsifyRecipe)

X = jax.random.normal(jax.random.key(5), (9, 7))
THETA0 = {"hidden": {"bias": jnp.zeros(11), "kernel": 0.3 * jax.random.normal(jax.random.key(6), (7, 11))},
          "out": {"kernel": 0.3 * jax.random.normal(jax.random.key(7), (11, 3))}}

# The experiments runner's chain (Qiu's estimator, full-rank noise, sgd, exact AWD) ...
QIU_AWD = EsRecipe(EsStepRecipe(population=16, sigma=0.05, seed=3, rank=None, antithetic=False,
                                estimator="qiu"),
                   OptimizerRecipe("sgd", 0.05), (AwdRecipe(2.0),))
# ... and everything else a recipe can hold.
ADAM_MITIGATED = EsRecipe(
    EsStepRecipe(population=16, sigma=0.05, seed=4, rank=2, shaping="centered_rank", chunk_size=8),
    OptimizerRecipe("adam", 0.02),
    (SparsifyRecipe(0.3, residual="carry"), AwdRecipe(0.01, kind="l1"), NormCapRecipe(0.5)))


def reward(params):
  hidden = jnp.tanh(X @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return -jnp.mean((hidden @ params["out"]["kernel"] - 1.0) ** 2)


def runner_chain():
  """QIU_AWD as experiments.trainers.es_optimizer builds it, by hand."""
  return optax.chain(
      es_jax.es_step(None, population=16, sigma=0.05, key=jax.random.key(3), rank=None,
                     antithetic=False, fitness_shaping=es_jax.z_score, estimator="qiu"),
      optax.sgd(0.05), es_jax.anchored_weight_decay(2.0, learning_rate=0.05))


def run(recipe, generations=5, fail=None, tx=None):
  """The training loop being replayed: score members, record the fitness, take the jitted step."""
  tx = recipe.build() if tx is None else tx
  params, state = THETA0, tx.init(THETA0)

  @jax.jit
  def step(params, state, fitness):  # what experiments.trainers.EsTrainer jits
    updates, state = tx.update(None, state, params, fitness=fitness)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def fitness_of(params, state):
    members = jnp.arange(recipe.es.population)
    return jax.vmap(lambda i: reward(es_jax.member_params(state, params, i)))(members)

  history = []
  for g in range(generations):
    fitness = np.array(fitness_of(params, state), np.float32)
    if fail is not None and g == fail:
      fitness[1] = np.nan  # a failed member is recorded as such
    history.append(fitness)
    params, state = step(params, state, fitness)
  return params, np.stack(history)


def assert_bitwise_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("recipe,tx", [(QIU_AWD, runner_chain), (ADAM_MITIGATED, None)],
                         ids=["runner_chain_by_hand", "adam_mitigated"])
def test_replay_equals_the_run_bit_for_bit(recipe, tx):
  # The first run builds its chain by hand, as the runner does: the recipe rebuilds it exactly.
  final, history = run(recipe, fail=2, tx=tx and tx())
  replayed, state = es_jax.replay(recipe, THETA0, history)
  assert_bitwise_equal(replayed, final)
  assert int(state[0].count) == len(history)
  moved = sum(float(jnp.sum((final[k]["kernel"] - THETA0[k]["kernel"]) ** 2)) for k in final)
  assert moved > 1e-6  # the run went somewhere
  # The history is what determines it: one changed fitness value changes the result.
  history[3, 0] += 1.0
  changed, _ = es_jax.replay(recipe, THETA0, history)
  assert not np.array_equal(changed["out"]["kernel"], final["out"]["kernel"])


def test_replay_on_another_number_of_devices():
  recipe = EsRecipe(EsStepRecipe(population=16, sigma=0.05, seed=4, rank=2),
                    OptimizerRecipe("sgd", 0.05), (AwdRecipe(1.0),))
  mesh = jax.make_mesh((8,), ("pop",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):  # the run: 8 antithetic pairs over 8 devices
    final, history = run(recipe)
    same_layout, _ = es_jax.replay(recipe, THETA0, history)
  assert_bitwise_equal(same_layout, final)
  one_device, _ = es_jax.replay(recipe, THETA0, history)
  for x, y in zip(jax.tree.leaves(one_device), jax.tree.leaves(final)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_patch_round_trip_and_size(tmp_path):
  final, history = run(ADAM_MITIGATED, fail=1)
  patch = es_jax.make_patch(ADAM_MITIGATED, THETA0, history, metadata={"task": "toy"})
  path = es_jax.save_patch(tmp_path / "run.espatch", patch)
  loaded = es_jax.load_patch(path)
  assert loaded.recipe == ADAM_MITIGATED and loaded.metadata == {"task": "toy"}
  np.testing.assert_array_equal(loaded.fitness_history, history)  # NaN included
  assert np.isnan(loaded.fitness_history[1, 1])
  header = json.dumps(patch.header(), sort_keys=True, separators=(",", ":")).encode()
  assert path.stat().st_size == 8 + 4 + 8 + len(header) + 4 * history.size + 32
  assert_bitwise_equal(es_jax.apply_patch(loaded, THETA0), final)


def test_wrong_base_is_refused():
  _, history = run(QIU_AWD, generations=2)
  patch = es_jax.make_patch(QIU_AWD, THETA0, history)
  nudged = jax.tree.map(lambda x: x, THETA0)
  nudged["out"] = {"kernel": THETA0["out"]["kernel"].at[4, 1].add(1e-6)}
  with pytest.raises(es_jax.PatchError, match="wrong base model: the params' sha256"):
    es_jax.apply_patch(patch, nudged)
  resized = {**THETA0, "out": {"kernel": jnp.zeros((11, 4))}}
  with pytest.raises(es_jax.PatchError, match=r"tensor 'out/kernel' is float32\[11, 4\] here"):
    es_jax.apply_patch(patch, resized)
  with pytest.raises(es_jax.PatchError, match="bfloat16"):
    es_jax.apply_patch(patch, jax.tree.map(lambda x: x.astype(jnp.bfloat16), THETA0))
  with pytest.raises(es_jax.PatchError, match="lacks"):
    es_jax.apply_patch(patch, {**THETA0, "extra": jnp.zeros(2)})


def test_patch_from_another_noise_convention_is_refused(monkeypatch):
  # A history only means something under the noise rule it was recorded with.
  patch = es_jax.make_patch(QIU_AWD, THETA0, np.zeros((1, 16), np.float32))
  monkeypatch.setattr(es_jax.noise, "NOISE_CONVENTION", es_jax.noise.NOISE_CONVENTION - 1)
  older = patch.to_bytes()
  monkeypatch.undo()
  with pytest.raises(es_jax.PatchError, match="noise convention 1; this es_jax draws"):
    es_jax.Patch.from_bytes(older)
  es_jax.Patch.from_bytes(patch.to_bytes())


@pytest.fixture(scope="module")
def patch_bytes():
  history = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
  return es_jax.make_patch(QIU_AWD, THETA0, history).to_bytes()


@pytest.mark.parametrize("cut", [0, 7, 19, 40, -33, -32, -1])
def test_truncated_patch_is_refused(patch_bytes, cut, tmp_path):
  data = patch_bytes[:cut]
  with pytest.raises(es_jax.PatchError, match="truncated"):
    es_jax.Patch.from_bytes(data)
  (tmp_path / "cut.espatch").write_bytes(data)
  with pytest.raises(es_jax.PatchError, match="cut.espatch"):
    es_jax.load_patch(tmp_path / "cut.espatch")


def test_extended_patch_is_refused(patch_bytes):
  with pytest.raises(es_jax.PatchError, match="truncated or corrupted"):
    es_jax.Patch.from_bytes(patch_bytes + b"\x00")


@pytest.mark.parametrize("where", ["magic", "version", "header_length", "header", "history",
                                   "last_value", "digest"])
def test_bit_flipped_patch_is_refused(patch_bytes, where):
  header_len = int.from_bytes(patch_bytes[12:20], "little")
  offset = {"magic": 2, "version": 8, "header_length": 12, "header": 20 + header_len // 2,
            "history": 20 + header_len + 5, "last_value": len(patch_bytes) - 33,
            "digest": len(patch_bytes) - 1}[where]
  for bit in (0, 7):
    data = bytearray(patch_bytes)
    data[offset] ^= 1 << bit
    with pytest.raises(es_jax.PatchError):
      es_jax.Patch.from_bytes(bytes(data))
  es_jax.Patch.from_bytes(patch_bytes)  # the unflipped bytes are fine


def test_recipe_json_fingerprint_and_validation():
  for recipe in (QIU_AWD, ADAM_MITIGATED):
    assert EsRecipe.from_json(recipe.to_json()) == recipe
    assert EsRecipe.from_json(recipe.to_json()).fingerprint() == recipe.fingerprint()
  # Canonical: an int sigma and a list freeze give the same recipe and fingerprint.
  a = EsRecipe(EsStepRecipe(population=4, sigma=1, seed=0, freeze=["embed"]),
               OptimizerRecipe("sgd", 1))
  b = EsRecipe(EsStepRecipe(population=4, sigma=1.0, seed=0, freeze=("embed",)),
               OptimizerRecipe("sgd", 1.0))
  assert a == b and a.fingerprint() == b.fingerprint()
  c = dataclasses.replace(b, es=dataclasses.replace(b.es, seed=1))
  assert c.fingerprint() != b.fingerprint()
  data = json.loads(QIU_AWD.to_json())
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['sigmaa'\] in recipe.es"):
    EsRecipe.from_dict({**data, "es": {**data["es"], "sigmaa": 1.0}})
  with pytest.raises(TypeError, match="EsStepRecipe.population must be an int"):
    EsRecipe.from_dict({**data, "es": {**data["es"], "population": "16"}})
  with pytest.raises(ValueError, match="sigma"):
    EsStepRecipe(population=4, sigma=float("nan"), seed=0)
  with pytest.raises(ValueError, match="sigma must be a finite number > 0"):  # es_step's check
    EsRecipe(EsStepRecipe(population=4, sigma=-1.0, seed=0), OptimizerRecipe("sgd", 0.1))
  with pytest.raises(ValueError, match="learning_rate \\* strength < 1"):  # AWD's check
    EsRecipe(EsStepRecipe(population=4, sigma=1.0, seed=0), OptimizerRecipe("sgd", 0.1),
             (AwdRecipe(20.0),))
  with pytest.raises(ValueError, match="must name a transform"):
    EsRecipe.from_dict({**data, "post": [{"transform": "dropout"}]})
  with pytest.raises(ValueError, match="version"):
    EsRecipe.from_dict({**data, "version": 2})
  with pytest.raises(ValueError, match="shaping must be one of"):
    EsStepRecipe(population=4, sigma=1.0, seed=0, shaping="rank")

"""Scanned layers (``ModelConfig(scan_layers=True)``): the stacked port against transformers,
its per-layer noise against float64 NumPy, checkpoints, decoding, and a whole experiment
replayed from its patch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import es_jax
from es_jax import models
from es_jax import noise as nl
from es_jax.models import checkpoint
from es_jax.models.transformer import Transformer, stack_layers, unstack_layers
from es_fixtures import assert_weighted_sum_matches_members
from experiment_fixtures import (digit_share_reward, make_tiny_checkpoint, short_run_overrides,
                                 write_short_gsm8k, write_short_hellaswag)
from experiments import components, rollouts
from experiments.checkpointing import RunCheckpointer
from experiments.config import apply_overrides, preset
from experiments.run import fingerprint, run
from experiments.trainers import make_trainer
from model_fixtures import jit_logits, left_padded_batch, perturb, ported, torch_logits
from es_jax.models import patch_cli

# A scanned leaf (3 layers of 13 x 17), an unscanned leaf of the same slice shape (one group),
# a scanned vector and a scanned 3-D kernel under the axis rule.
PARAMS = {"layers": {"w": jnp.zeros((3, 13, 17)), "norm": jnp.zeros((3, 17)),
                     "einsum": jnp.zeros((3, 5, 2, 7))},
          "head": jnp.zeros((13, 17))}
SCANNED = ("^layers/",)


def _dense_member(spec, key, generation, member):
  noise = nl.member_noise(spec, key, generation, PARAMS, member)
  return jax.tree.map(lambda n, p: np.asarray(nl.materialize(n, p.shape), np.float64),
                      noise, PARAMS, is_leaf=nl.is_noise_leaf)


def _np_lowrank(noise: nl.LowRank) -> np.ndarray:
  """Dense noise from factors, in float64: ``scale_l a_l b_l^T`` per layer if scanned."""
  a, b, scale = (np.asarray(x, np.float64) for x in noise)
  if scale.ndim == 0:
    return scale * a @ b.T
  return np.stack([s * ai @ bi.T for s, ai, bi in zip(scale, a, b)])


def test_each_layer_of_a_scanned_leaf_is_its_own_rank_r_unit_variance_draw():
  spec = nl.NoiseSpec(population=4, sigma=1.0, rank=2, antithetic=False, scanned=SCANNED)
  noise = nl.member_noise(spec, jax.random.key(0), 0, PARAMS, 1)
  assert noise["layers"]["w"].a.shape == (3, 13, 2) and noise["layers"]["w"].scale.shape == (3,)
  dense = _dense_member(spec, jax.random.key(0), 0, 1)
  np.testing.assert_allclose(dense["layers"]["w"], _np_lowrank(noise["layers"]["w"]), rtol=1e-5,
                             atol=1e-6)
  for layer in range(3):
    assert np.linalg.matrix_rank(dense["layers"]["w"][layer], tol=1e-4) == 2
    # The axis rule holds per layer: (5, 2, 7) is a 5 x 14 matrix of rank 2.
    assert np.linalg.matrix_rank(dense["layers"]["einsum"][layer].reshape(5, 14), tol=1e-4) == 2
  samples = np.stack([_dense_member(spec, jax.random.key(0), g, 0)["layers"]["w"]
                      for g in range(40)])  # (generation, layer, 13, 17)
  assert abs(samples.var() - 1.0) < 0.1
  for layer in range(3):
    assert abs(samples[:, layer].var() - 1.0) < 0.15
  # Layers are independent draws, and independent of the unscanned leaf that shares their group.
  head = np.stack([_dense_member(spec, jax.random.key(0), g, 0)["head"] for g in range(40)])
  for x, y in ((samples[:, 0], samples[:, 1]), (samples[:, 2], head)):
    assert abs(np.corrcoef(x.ravel(), y.ravel())[0, 1]) < 0.05
  vectors = np.stack([_dense_member(spec, jax.random.key(0), g, 0)["layers"]["norm"]
                      for g in range(200)])
  assert abs(vectors.var() - 1.0) < 0.1


def test_scanned_noise_is_antithetic_pure_and_the_same_batched():
  spec = nl.NoiseSpec(population=6, sigma=0.5, rank=1, scanned=SCANNED)
  key = jax.random.key(3)
  alone, partner = _dense_member(spec, key, 7, 3), _dense_member(spec, key, 7, 2)
  for x, y in zip(jax.tree.leaves(alone), jax.tree.leaves(partner)):
    np.testing.assert_array_equal(x, -y)
  batched = jax.vmap(lambda m: nl.member_noise(spec, key, 7, PARAMS, m))(jnp.arange(6))
  third = jax.tree.map(lambda x: x[3], batched)
  np.testing.assert_allclose(_np_lowrank(third["layers"]["w"]), alone["layers"]["w"], rtol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
def test_scanned_weighted_sum_equals_the_float64_sum_over_members(rank):
  spec = nl.NoiseSpec(population=8, sigma=0.3, rank=rank, scanned=SCANNED)

  def dense_member(key, generation, i):  # the factors multiplied out in NumPy, layer by layer
    return jax.tree.map(
        lambda n, p: (_np_lowrank(n).reshape(p.shape) if isinstance(n, nl.LowRank)
                      else np.asarray(n, np.float64)),
        nl.member_noise(spec, key, generation, PARAMS, i), PARAMS, is_leaf=nl.is_noise_leaf)

  assert_weighted_sum_matches_members(spec, PARAMS, dense_member)


def test_scanned_programs_compile_to_as_many_kernels_whatever_the_depth():
  # XLA:CPU compiles one kernel per fusion, and a program needs one per array it outputs:
  # with scanned layers the noise and update programs must not grow with depth (unrolled
  # ones do, which the last line checks).
  def decoder(num_layers, scanned):
    layer = {"q": jnp.zeros((8, 8)), "down": jnp.zeros((12, 8)), "norm": jnp.zeros((8,))}
    if scanned:
      return {"embed": jnp.zeros((50, 8)), "layers": jax.tree.map(
          lambda x: jnp.zeros((num_layers, *x.shape)), layer)}
    return {"embed": jnp.zeros((50, 8)), **{f"layers_{i}": layer for i in range(num_layers)}}

  def kernels(num_layers, scanned):
    spec = nl.NoiseSpec(population=4, sigma=1.0, rank=1, freeze=("embed",),
                        scanned=SCANNED if scanned else ())
    params = decoder(num_layers, scanned)
    noise = lambda: jax.vmap(lambda i: nl.member_noise(spec, jax.random.key(0), 0, params, i))(
        jnp.arange(4))
    update = lambda: nl.weighted_sum(spec, jax.random.key(0), 0, params, jnp.ones(2))
    return [jax.jit(fn).lower().compile().as_text().count(" fusion(") for fn in (noise, update)]

  assert kernels(2, scanned=True) == kernels(12, scanned=True)
  assert all(a < b for a, b in zip(kernels(2, scanned=False), kernels(12, scanned=False)))


def test_scanned_port_matches_transformers_with_and_without_a_member_perturbation(tmp_path):
  """The stacked model's logits against transformers: the base weights, and one member's
  perturbation applied by the scanned fast path against transformers running that member's
  materialised weights, written by save_pretrained from the scanned tree."""
  torch_model, path, _, _ = ported("llama_untied_bias")
  config = checkpoint.load_config(path, dtype=jnp.float32, scan_layers=True)
  model, params = Transformer(config), checkpoint.load_params(path, config)
  assert params["layers"]["attn"]["q"]["kernel"].shape[0] == config.num_layers == 2
  ids, mask = left_padded_batch()
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(jit_logits(model, params, ids, mask))[valid],
                             torch_logits(torch_model, ids, mask)[valid], atol=2e-4, rtol=2e-4)

  spec = es_jax.NoiseSpec(population=4, sigma=0.05, rank=2, freeze=("embed",),
                          scanned=config.scanned)
  noise = nl.member_noise(spec, jax.random.key(5), 0, params, 3)
  fast = np.asarray(jit_logits(model, params, ids, mask, noise))
  checkpoint.save_pretrained(tmp_path / "member", config, perturb(params, noise))
  member = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "member", torch_dtype=torch.float32, attn_implementation="eager").eval()
  reference = torch_logits(member, ids, mask)
  np.testing.assert_allclose(fast[valid], reference[valid], atol=3e-4, rtol=3e-4)
  assert np.abs(fast - np.asarray(jit_logits(model, params, ids, mask))).max() > 1e-3


def test_scanned_population_decode_matches_each_members_materialised_weights():
  _, path, unrolled_model, unrolled = ported("qwen_tied")
  model = Transformer(unrolled_model.config.replace(scan_layers=True))
  params = stack_layers(unrolled)
  spec = es_jax.NoiseSpec(population=4, sigma=0.3, rank=1, freeze=("embed",),
                          scanned=model.config.scanned)
  noise = jax.vmap(lambda i: nl.member_noise(spec, jax.random.key(2), 0, params, i))(
      jnp.arange(4))
  ids, mask = left_padded_batch(batch=2, length=6)
  population = models.decode_population(model, params, noise, ids, mask, max_new_tokens=6,
                                        eos_ids=())
  for i in (0, 3):
    alone = models.decode(model, perturb(params, jax.tree.map(lambda x: x[i], noise)), ids, mask,
                          max_new_tokens=6, eos_ids=())
    np.testing.assert_array_equal(population.tokens[i], alone.tokens)
  # The unperturbed scanned decode is the unrolled one's.
  np.testing.assert_array_equal(
      models.decode(model, params, ids, mask, max_new_tokens=6, eos_ids=()).tokens,
      models.decode(unrolled_model, unrolled, ids, mask, max_new_tokens=6, eos_ids=()).tokens)


def test_stack_layers_round_trips_and_refuses_other_trees():
  unrolled = ported("qwen_tied")[3]
  stacked = stack_layers(unrolled)
  assert "layers_0" not in stacked and stacked["layers"]["mlp"]["up"]["kernel"].shape[0] == 2
  back = unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(unrolled)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="layers_0 ... layers_"):
    stack_layers({"layers_1": {"w": jnp.zeros(2)}})
  with pytest.raises(ValueError, match="cannot be stacked"):
    stack_layers({"layers_0": {"w": jnp.zeros(2)}, "layers_1": {"w": jnp.zeros(3)}})
  with pytest.raises(ValueError, match="needs scanned params"):
    unstack_layers(unrolled)


def test_unscanned_noise_on_a_scanned_model_is_a_clear_error():
  _, _, unrolled_model, unrolled = ported("qwen_tied")
  model = Transformer(unrolled_model.config.replace(scan_layers=True))
  params = stack_layers(unrolled)
  wrong = nl.member_noise(es_jax.NoiseSpec(population=2, sigma=0.1, freeze=("embed",)),
                          jax.random.key(0), 0, params, 0)
  ids, mask = left_padded_batch(batch=1, length=4)
  with pytest.raises(ValueError, match=r"scans its layers.*scanned=model.config.scanned"):
    models.logits_fn(model, params, ids, mask, wrong)


def test_scanned_settings_are_checked():
  with pytest.raises(ValueError, match="is a scalar"):
    nl.layout(nl.NoiseSpec(population=2, sigma=1.0, scanned=("^s$",)), {"s": jnp.zeros(())})
  with pytest.raises(TypeError, match="scanned must be a tuple of regex strings"):
    nl.NoiseSpec(population=2, sigma=1.0, scanned=(1,))
  with pytest.raises(ValueError, match=r"rank=3 exceeds min\(m, n\)=2 of leaf 'layers/w\[layer\]'"):
    nl.layout(nl.NoiseSpec(population=2, sigma=1.0, rank=3, scanned=SCANNED),
              {"layers": {"w": jnp.zeros((9, 2, 5))}})
  with pytest.raises(ValueError, match="stack different numbers of layers"):
    # "layers" (no slash) also catches an unrolled model's leaves: (6, 5) and (5, 6) kernels.
    nl.layout(nl.NoiseSpec(population=2, sigma=1.0, scanned=("layers",)),
              {"layers_0": {"up": jnp.zeros((6, 5)), "down": jnp.zeros((5, 6))}})
  with pytest.raises(TypeError, match="scan_layers must be a bool"):
    models.ModelConfig.preset("qwen2.5-0.5b-instruct", scan_layers="yes")


def test_recipe_keeps_scanned_and_older_recipes_their_fingerprint():
  plain = es_jax.EsStepRecipe(population=4, sigma=0.1, seed=0)
  recipe = es_jax.EsRecipe(plain, es_jax.OptimizerRecipe("sgd", 0.1))
  # Written only when set: recipes (and ES patches) from before scanned layers hash as before.
  assert "scanned" not in recipe.to_dict()["es"]
  scanned = es_jax.EsRecipe(es_jax.EsStepRecipe(population=4, sigma=0.1, seed=0,
                                                scanned=["^layers/"]),
                            es_jax.OptimizerRecipe("sgd", 0.1))
  again = es_jax.EsRecipe.from_json(scanned.to_json())
  assert again == scanned and again.es.scanned == ("^layers/",)
  assert again.fingerprint() != recipe.fingerprint()


def test_an_experiment_on_a_scanned_model_replays_from_its_patch(tmp_path, monkeypatch):
  """``--set model.scan_layers=true``: the run trains the stacked model, and the patch CLI
  replays its ES patch onto the unrolled checkpoint on disk to the run's final weights."""
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  base = make_tiny_checkpoint(tmp_path / "ckpt")
  overrides = short_run_overrides(base, write_short_gsm8k(tmp_path / "gsm8k.jsonl"),
                                  write_short_hellaswag(tmp_path / "hellaswag.jsonl"))
  config = apply_overrides(preset("countdown_es"),
                           overrides + ["iterations=2", "model.scan_layers=true"])
  records = run(config, tmp_path / "run", progress=False)
  assert records[-1]["update_norm"] > 0
  assert set(records[-1]["group_sparsity"]) >= {"q", "k", "v", "o", "mlp", "norm"}
  parts = components.build(config)
  assert "layers" in parts.params0 and "layers_0" not in parts.params0
  with RunCheckpointer(tmp_path / "run" / "checkpoints",
                       fingerprint=fingerprint(config)) as checkpointer:
    final, _ = checkpointer.restore(make_trainer(parts, config).init(parts.params0))

  out = tmp_path / "fine-tuned"
  patch_cli.main(["apply", "--base", str(base), "--patch", str(tmp_path / "run" / "run.espatch"),
                  "--out", str(out)])
  got = checkpoint.load_params(out, checkpoint.load_config(out, dtype=jnp.float32))
  want = unstack_layers(final["params"])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_layout_mismatches_are_clear_errors(tmp_path):
  _, _, unrolled_model, unrolled = ported("qwen_tied")
  config = unrolled_model.config.replace(scan_layers=True)
  params = stack_layers(unrolled)
  ids, mask = left_padded_batch(batch=1, length=4)
  per_layer = models.init_cache(unrolled_model.config, 1, 4)
  with pytest.raises(ValueError, match="needs one stacked KVCache, got tuple"):
    Transformer(config).apply({"params": params}, ids, ids, mask, cache=per_layer)
  with pytest.raises(checkpoint.CheckpointError,
                     match="stack 2 layers, the config has num_layers=3"):
    checkpoint.save_pretrained(tmp_path / "out", config.replace(num_layers=3), params)


def test_per_tensor_mitigations_refuse_scanned_layers():
  with pytest.raises(ValueError, match="per_tensor with model.scan_layers=true"):
    apply_overrides(preset("countdown_es"),
                    ["model.scan_layers=true", "mitigation.sparsify_fraction=0.1"])
  config = apply_overrides(preset("countdown_es"), [
      "model.scan_layers=true", "mitigation.norm_cap=5", "mitigation.norm_cap_scope=global"])
  assert config.model.scan_layers and config.mitigation.norm_cap == 5

"""Safetensors loading (single, sharded, hub cache), key validation, export to transformers."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from es_jax.models import checkpoint
from es_jax.models.checkpoint import CheckpointError
from model_fixtures import left_padded_batch, ported, save_hf_model, torch_logits


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_param_mapping_is_a_lossless_key_and_transpose_map():
  _, path, model, params = ported("llama_untied_bias")
  hf = load_file(str(path / "model.safetensors"))
  for key, m in checkpoint.param_mapping(model.config).items():
    flax = m.to_flax(hf[key])
    assert flax.shape == m.shape
    np.testing.assert_array_equal(m.to_hf(flax), hf[key])
  # A torch Linear (out, in) becomes an (in, out) kernel.
  q = checkpoint.param_mapping(model.config)["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(np.asarray(params["layers_1"]["attn"]["q"]["kernel"]),
                                hf[q.hf_key].T)


def test_sharded_index_checkpoint_loads_like_the_single_file(tmp_path):
  _, _, model, params = ported("llama_tied")
  save_hf_model("llama_tied", tmp_path, max_shard_size="20KB")  # same seed, same weights
  index = json.loads((tmp_path / checkpoint.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) >= 2
  assert not (tmp_path / checkpoint.SINGLE_FILE).exists()
  _assert_trees_equal(checkpoint.load_params(tmp_path, model.config), params)


def _corrupted_copy(tmp_path, edit):
  _, path, model, _ = ported("qwen_tied")
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  shutil.copy(path / "config.json", tmp_path / "config.json")
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  return model.config


def test_missing_unexpected_and_misshaped_keys_are_all_named(tmp_path):
  def edit(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.7.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 28), np.float32)
  config = _corrupted_copy(tmp_path, edit)
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_params(tmp_path, config)
  message = str(error.value)
  assert "missing keys (1): ['model.layers.1.mlp.up_proj.weight']" in message
  assert "unexpected keys (1): ['model.layers.7.self_attn.rotary.weight']" in message
  assert ("mis-shaped keys (1): ['model.layers.0.self_attn.k_proj.weight: checkpoint (5, 28), "
          "expected (6, 28)']") in message


@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight"])
def test_each_kind_of_bad_key_fails_alone(tmp_path, key):
  config = _corrupted_copy(tmp_path, lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): \\['{key}'\\]"):
    checkpoint.load_params(tmp_path, config)


def test_untied_config_on_a_tied_checkpoint_says_lm_head_is_missing(tmp_path):
  config = _corrupted_copy(tmp_path, lambda t: None).replace(tie_word_embeddings=False)
  with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['lm_head.weight'\]"):
    checkpoint.validate_checkpoint(tmp_path, config)
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    checkpoint.load_params(tmp_path / "nowhere", config)


@pytest.mark.parametrize("name", ["qwen_tied", "qwen_untied", "llama_tied", "llama_untied_bias"])
def test_export_loads_in_transformers_with_identical_weights_and_logits(tmp_path, name):
  torch_model, _, model, params = ported(name)
  checkpoint.save_pretrained(tmp_path, model.config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  assert reloaded.dtype == torch.float32
  assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
  assert reloaded.config.rope_parameters == torch_model.config.rope_parameters
  ref_state, state = torch_model.state_dict(), reloaded.state_dict()
  assert ref_state.keys() == state.keys()
  for key in ref_state:
    assert torch.equal(ref_state[key], state[key]), key
  ids, mask = left_padded_batch(seed=9)
  np.testing.assert_array_equal(torch_logits(reloaded, ids, mask),
                                torch_logits(torch_model, ids, mask))
  generation = json.loads((tmp_path / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [2]


def test_bfloat16_sharded_export_round_trips(tmp_path):
  _, _, model, params = ported("qwen_untied")
  checkpoint.save_pretrained(tmp_path, model.config, params, dtype=jnp.bfloat16,
                             max_shard_bytes=20_000)
  assert (tmp_path / checkpoint.INDEX_FILE).exists()
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  config = checkpoint.load_config(tmp_path)
  assert config.param_dtype == jnp.float32 and config.dtype == jnp.bfloat16
  _assert_trees_equal(checkpoint.load_params(tmp_path, config, dtype=jnp.bfloat16), rounded)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert reloaded.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      reloaded.model.layers[1].mlp.down_proj.weight.detach().float().numpy(),
      np.asarray(rounded["layers_1"]["mlp"]["down"]["kernel"], np.float32).T)


def test_loading_onto_a_mesh_places_tensor_parallel_shards():
  _, path, model, params = ported("qwen_untied")
  mesh = jax.make_mesh((2, 4), ("pop", "model"))
  sharded = checkpoint.load_params(path, model.config, mesh=mesh)
  assert sharded["layers_0"]["attn"]["o"]["kernel"].sharding.spec == jax.P("model", None)
  assert sharded["layers_0"]["mlp"]["up"]["kernel"].sharding.spec == jax.P(None, "model")
  _assert_trees_equal(sharded, params)


def test_hub_ids_go_through_the_huggingface_cache(monkeypatch):
  _, path, _, params = ported("qwen_tied")
  calls = []

  def fake_snapshot_download(repo_id, **kwargs):
    calls.append(repo_id)
    if repo_id != "tiny-org/tiny-qwen":
      raise OSError(f"{repo_id} not found (offline)")
    return str(path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  model, loaded = checkpoint.load_model("tiny-org/tiny-qwen")
  assert calls == ["tiny-org/tiny-qwen"]
  assert model.config.dtype == jnp.bfloat16 and model.config.param_dtype == jnp.float32
  _assert_trees_equal(loaded, params)
  with pytest.raises(CheckpointError, match="not a local directory"):
    checkpoint.load_model("tiny-org/absent")

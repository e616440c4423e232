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

from es_jax.models import checkpoint, hf_checkpoint
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
  index = json.loads((tmp_path / hf_checkpoint.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) >= 2
  assert not (tmp_path / hf_checkpoint.SINGLE_FILE).exists()
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
  assert (tmp_path / hf_checkpoint.INDEX_FILE).exists()
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


# ---- sharded index (issue 13 #3): the index decides, shards must agree with it ----

@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
  """qwen_tied saved by transformers in 4 shards + index (same seed: ported()'s weights)."""
  path = tmp_path_factory.mktemp("qwen_tied_sharded")
  save_hf_model("qwen_tied", path, max_shard_size="20KB")
  return path


def _sharded_copy(sharded_dir, tmp_path):
  shutil.copytree(sharded_dir, tmp_path, dirs_exist_ok=True)
  index = json.loads((tmp_path / hf_checkpoint.INDEX_FILE).read_text())
  return index["weight_map"]


def _edit_shard(path, edit):
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def _write_index(tmp_path, weight_map):
  (tmp_path / hf_checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))


EMBED = "model.embed_tokens.weight"


def test_a_stale_copy_in_another_shard_is_refused_not_loaded(sharded_dir, tmp_path):
  weight_map = _sharded_copy(sharded_dir, tmp_path)
  owner, last = weight_map[EMBED], sorted(set(weight_map.values()))[-1]
  assert owner != last  # read in file order, the stale copy would win
  _edit_shard(tmp_path / last,
              lambda t: t.update({EMBED: np.zeros((103, 28), np.float32)}))
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_params(tmp_path, ported("qwen_tied")[2].config)
  assert (f"{last} holds a copy of '{EMBED}', which the index maps to {owner}"
          in str(error.value))
  assert str(tmp_path / hf_checkpoint.INDEX_FILE) in str(error.value)


def _move_embed(tmp_path, weight_map):
  owner = weight_map[EMBED]
  other = next(name for name in sorted(set(weight_map.values())) if name != owner)
  moved = load_file(str(tmp_path / owner))[EMBED]
  _edit_shard(tmp_path / owner, lambda t: t.pop(EMBED))
  _edit_shard(tmp_path / other, lambda t: t.update({EMBED: moved}))
  return [f"'{EMBED}' is mapped to {owner}, which does not contain it",
          f"{other} holds a copy of '{EMBED}', which the index maps to {owner}"]


def _unlist_embed(tmp_path, weight_map):
  owner = weight_map.pop(EMBED)
  _write_index(tmp_path, weight_map)
  return [f"{owner} holds '{EMBED}', which the index does not list"]


def _map_embed_to_a_missing_file(tmp_path, weight_map):
  _write_index(tmp_path, {**weight_map, EMBED: "model-00009-of-00009.safetensors"})
  return [f"shard files that are missing from {tmp_path}: "
          f"model-00009-of-00009.safetensors (1 keys, e.g. '{EMBED}')"]


def _delete_a_shard(tmp_path, weight_map):
  name = weight_map[EMBED]
  (tmp_path / name).unlink()
  count = sum(v == name for v in weight_map.values())
  return [f"{name} ({count} keys, e.g. '{EMBED}')"]


@pytest.mark.parametrize("corrupt", [_move_embed, _unlist_embed, _map_embed_to_a_missing_file,
                                     _delete_a_shard])
def test_index_entries_and_shards_that_disagree_are_named(sharded_dir, tmp_path, corrupt):
  expected = corrupt(tmp_path, _sharded_copy(sharded_dir, tmp_path))
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_model(tmp_path)
  for text in expected:
    assert text in str(error.value)
  assert str(tmp_path / hf_checkpoint.INDEX_FILE) in str(error.value)


# ---- shard names (issue "again" #15e): the index names files in its directory, nothing else ----

def _outside_copy(tmp_path, name):
  """A valid copy of shard ``name`` in a sibling of the checkpoint directory ``tmp_path/ckpt``."""
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.copy(tmp_path / "ckpt" / name, outside / name)
  return outside / name


def _absolute(tmp_path, name):
  return str(_outside_copy(tmp_path, name))


def _parent(tmp_path, name):
  _outside_copy(tmp_path, name)
  return f"../outside/{name}"


def _subfolder(tmp_path, name):
  (tmp_path / "ckpt" / "sub").mkdir()
  shutil.copy(tmp_path / "ckpt" / name, tmp_path / "ckpt" / "sub" / name)
  return f"sub/{name}"


def _escaping_link(tmp_path, name):
  target = _outside_copy(tmp_path, name)
  (tmp_path / "ckpt" / name).unlink()
  (tmp_path / "ckpt" / name).symlink_to(target)
  return name


@pytest.mark.parametrize("shard_name", [_absolute, _parent, _subfolder, _escaping_link,
                                        lambda tmp_path, name: "/etc/passwd"])
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(sharded_dir, tmp_path,
                                                                  shard_name):
  # Every case but /etc/passwd is a valid shard: before the fix it loaded from outside.
  weight_map = _sharded_copy(sharded_dir, tmp_path / "ckpt")
  name = weight_map[EMBED]
  bad = shard_name(tmp_path, name)
  _write_index(tmp_path / "ckpt", {k: bad if v == name else v for k, v in weight_map.items()})
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_model(tmp_path / "ckpt")
  message = str(error.value)
  assert f"{tmp_path / 'ckpt' / hf_checkpoint.INDEX_FILE} names shard files outside" in message
  assert repr(bad) in message and "plain file names" in message


def test_a_huggingface_cache_snapshot_of_links_to_its_blobs_loads(sharded_dir, tmp_path):
  # huggingface_hub's cache: snapshots/<rev>/<file> links to ../../blobs/<hash>.
  repo = tmp_path / "models--tiny-org--tiny-qwen"
  snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
  snapshot.mkdir(parents=True)
  blobs.mkdir()
  for i, file in enumerate(sorted(sharded_dir.iterdir())):
    shutil.copy(file, blobs / f"blob{i}")
    (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
  _assert_trees_equal(checkpoint.load_params(snapshot, ported("qwen_tied")[2].config),
                      checkpoint.load_params(sharded_dir, ported("qwen_tied")[2].config))


# ---- config vs headers (issue 13 #9): no mapping for layers the checkpoint lacks ----

@pytest.mark.parametrize("layers", [3, 10**9])
def test_more_layers_than_the_checkpoint_has_is_refused_from_the_headers(tmp_path, monkeypatch,
                                                                          layers):
  _corrupted_copy(tmp_path, lambda t: None)
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": layers}))
  real_mapping = checkpoint.param_mapping

  def guarded_mapping(config):  # 1e9 layers would take hours and tens of GB
    assert config.num_layers <= 2, "mapping built before checking the headers"
    return real_mapping(config)

  monkeypatch.setattr(hf_checkpoint, "param_mapping", guarded_mapping)
  with pytest.raises(CheckpointError, match=(
      rf"the config has num_layers={layers} \(config.json: num_hidden_layers\), but the "
      r"checkpoint holds tensors of only 2 layers, indices \[0, 1\]")):
    checkpoint.load_model(tmp_path)


def test_error_messages_list_the_first_20_keys_of_each_kind(tmp_path):
  extras = [f"model.extra_{i:02d}.weight" for i in range(25)]
  removed = []

  def edit(t):
    for key in list(t):  # keep one key per layer: the layer count stays right
      if key.startswith("model.layers.") and not key.endswith("input_layernorm.weight"):
        removed.append(key)
        del t[key]
    t.update({key: np.zeros(2, np.float32) for key in extras})

  config = _corrupted_copy(tmp_path, edit)
  missing = [k for k in checkpoint.param_mapping(config) if k in removed]
  assert len(missing) == 22
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_params(tmp_path, config)
  message = str(error.value)
  assert f"missing keys (22): first 20: {missing[:20]} ... and 2 more" in message
  assert f"unexpected keys (25): first 20: {extras[:20]} ... and 5 more" in message
  assert missing[20] not in message and extras[20] not in message


# ---- malformed files (issue 13 #10): CheckpointError naming the file and the field ----

def _truncate(file):
  data = file.read_bytes()
  file.write_bytes(data[:len(data) - 100])


def _garbage_header(file):
  file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64)


@pytest.mark.parametrize("damage", [_truncate, _garbage_header])
def test_unreadable_safetensors_files_are_named(tmp_path, sharded_dir, damage):
  single, sharded = tmp_path / "single", tmp_path / "sharded"
  single.mkdir()
  _corrupted_copy(single, lambda t: None)
  weight_map = _sharded_copy(sharded_dir, sharded)
  for file in (single / hf_checkpoint.SINGLE_FILE, sharded / weight_map[EMBED]):
    damage(file)
    with pytest.raises(CheckpointError, match="truncated or corrupt: re-download") as error:
      checkpoint.load_model(file.parent)
    assert f"{file} cannot be read as safetensors (SafetensorError" in str(error.value)


@pytest.mark.parametrize("index, expected", [
    ({"metadata": {"total_size": 1}}, "has no 'weight_map' object"),
    ({"weight_map": ["model.safetensors"]}, "has no 'weight_map' object"),
    ([1, 2], "must hold a JSON object, got a list"),
    ("{not json", "is not readable JSON (JSONDecodeError"),
])
def test_a_malformed_index_is_named(sharded_dir, tmp_path, index, expected):
  _sharded_copy(sharded_dir, tmp_path)
  file = tmp_path / hf_checkpoint.INDEX_FILE
  file.write_text(index if isinstance(index, str) else json.dumps(index))
  with pytest.raises(CheckpointError, match="re-download or re-export") as error:
    checkpoint.load_model(tmp_path)
  assert f"{file} {expected}" in str(error.value)


def _without(*keys):
  return lambda hf: {k: v for k, v in hf.items() if k not in keys}


@pytest.mark.parametrize("edit, expected", [
    (_without("hidden_size"), "field 'hidden_size' is missing"),
    (lambda hf: {**hf, "num_attention_heads": 0},
     "field 'num_attention_heads' must be an integer >= 1, got 0"),
    (lambda hf: _without("head_dim")({**hf, "num_attention_heads": 0}),
     "field 'num_attention_heads' must be an integer >= 1, got 0"),
    (lambda hf: {**hf, "num_hidden_layers": 2.0}, "field 'num_hidden_layers' must be an integer"),
    (lambda hf: {**hf, "eos_token_id": "2"}, "field 'eos_token_id' must be a token id"),
    (lambda hf: {**hf, "eos_token_id": 2.5}, "field 'eos_token_id' must be a token id"),
    (lambda hf: {**hf, "eos_token_id": [2, True]}, "field 'eos_token_id' must be a token id"),
    (lambda hf: {**hf, "tie_word_embeddings": "false"},
     "field 'tie_word_embeddings' must be true or false, got 'false'"),
    (lambda hf: [hf], "must hold a JSON object, got a list"),
])
def test_a_malformed_config_json_is_named(tmp_path, edit, expected):
  _corrupted_copy(tmp_path, lambda t: None)
  file = tmp_path / "config.json"
  file.write_text(json.dumps(edit(json.loads(file.read_text()))))
  with pytest.raises(CheckpointError, match=r"(Fix config.json|re-download)") as error:
    checkpoint.load_model(tmp_path)
  assert str(file) in str(error.value) and expected in str(error.value)


def test_a_non_integer_eos_id_in_generation_config_is_named(tmp_path):
  _corrupted_copy(tmp_path, lambda t: None)
  file = tmp_path / "generation_config.json"
  file.write_text(json.dumps({"eos_token_id": [2, 2.5]}))
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_config(tmp_path)
  assert (f"{file}: field 'eos_token_id' must be a token id (an integer >= 0) or a list of "
          "them, got [2, 2.5]") in str(error.value)
  # With a valid file the ids of both files are merged, generation_config.json's first.
  file.write_text(json.dumps({"eos_token_id": [5, 2]}))
  assert checkpoint.load_config(tmp_path).eos_token_ids == (5, 2)

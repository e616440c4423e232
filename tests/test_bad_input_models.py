"""Issue "No silent wrong result and nothing lost, again": hostile checkpoints for the model loaders.

RoPE settings are checked against what transformers' own config object resolves from the same
``config.json``; GGUF metadata is written with ``gguf.GGUFWriter`` (the fields of one valid tiny
file replaced), and every bad value must be a ``GGUFError`` naming the file and the GGUF key.
Each test failed before its fix: a wrong RoPE, a bare Python error, or a silently wrong token.
"""

from __future__ import annotations

import json
import math
import shutil

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from es_jax import models
from es_jax.models import checkpoint, hf_checkpoint
from es_jax.models import gguf as es_gguf
from es_jax.models.checkpoint import CheckpointError
from es_jax.models.config import RopeScaling
from es_jax.models.gguf import GGUFError
from model_fixtures import jit_logits, left_padded_batch, make_hf_model, ported, torch_logits
from test_gguf import write_gguf

# ---- item 2: conflicting RoPE keys resolve as transformers 5 resolves them, or are refused ----

_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 2048}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
DEFAULT_1E6 = {"rope_type": "default", "rope_theta": 1e6}


def _write_rope_config(path, rope):
  """llama_tied's config.json with its RoPE keys replaced by ``rope``; the checkpoint beside it."""
  source = ported("llama_tied")[1]
  hf = json.loads((source / "config.json").read_text())
  hf = {k: v for k, v in hf.items() if k not in _ROPE_KEYS}
  (path / "config.json").write_text(json.dumps({**hf, **rope}))
  shutil.copy(source / hf_checkpoint.SINGLE_FILE, path / hf_checkpoint.SINGLE_FILE)
  return path


def _transformers_rope(path):
  """(rope_type, theta, RopeScaling or None) as transformers' config object reports them."""
  rope = transformers.AutoConfig.from_pretrained(path).rope_parameters
  scaling = None
  if rope["rope_type"] == "llama3":
    scaling = RopeScaling(**{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings")})
  return rope["rope_type"], rope["rope_theta"], scaling


@pytest.mark.parametrize("rope", [
    # The classic key beside the transformers 5 one: transformers reads rope_scaling, whole.
    dict(rope_parameters=DEFAULT_1E6, rope_scaling=LLAMA3),
    dict(rope_parameters=DEFAULT_1E6, rope_scaling=LLAMA3, rope_theta=5e5),
    dict(rope_parameters={**LLAMA3, "rope_theta": 5e5}, rope_scaling={"rope_type": "default"}),
    dict(rope_parameters={"rope_theta": 1e6}, rope_scaling={"type": "llama3", **LLAMA3},
         rope_theta=3e5),
    # rope_scaling's own theta before the top-level one.
    dict(rope_scaling={**LLAMA3, "rope_theta": 7e5}, rope_theta=3e5),
    # No conflict: an empty or null rope_scaling leaves rope_parameters in charge.
    dict(rope_parameters=DEFAULT_1E6, rope_scaling={}, rope_theta=3e5),
    dict(rope_parameters={"rope_type": "default"}, rope_scaling=None, rope_theta=3e5),
])
def test_rope_keys_resolve_as_transformers_resolves_them(tmp_path, rope):
  path = _write_rope_config(tmp_path, rope)
  rope_type, theta, scaling = _transformers_rope(path)
  assert rope_type in ("default", "llama3")
  config = checkpoint.load_config(path)
  assert (config.rope_theta, config.rope_scaling) == (theta, scaling)


def test_a_yarn_rope_scaling_beside_default_rope_parameters_is_refused(tmp_path):
  path = _write_rope_config(tmp_path, dict(rope_parameters=DEFAULT_1E6, rope_scaling=YARN))
  assert _transformers_rope(path)[0] == "yarn"  # what transformers would apply
  for load in (checkpoint.load_config, models.load_model):
    with pytest.raises(CheckpointError) as error:
      load(path)
    message = str(error.value)
    assert "rope_type 'yarn'" in message and "is not supported" in message
    assert "'rope_scaling'" in message and "'rope_parameters'" in message
    assert str(path / "config.json") in message


def test_per_layer_type_rope_parameters_are_refused(tmp_path):
  # transformers' Qwen2 reads {"full_attention": {...}} as RoPE per layer type, its Llama as a
  # flat dict with an unknown key: read flat here, theta 1e6 would silently become 10000.
  path = _write_rope_config(tmp_path, dict(rope_parameters={"full_attention": DEFAULT_1E6}))
  with pytest.raises(CheckpointError, match=r"'rope_parameters' holds RoPE parameters per layer type \(\['full_attention'\]\)"):
    checkpoint.load_config(path)


def test_a_conflicting_rope_checkpoint_loads_to_transformers_logits(tmp_path):
  path = _write_rope_config(tmp_path, dict(rope_parameters=DEFAULT_1E6, rope_scaling=LLAMA3,
                                           rope_theta=5e5))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()
  model, params = models.load_model(path, dtype=jnp.float32)
  ids, mask = left_padded_batch()
  real = mask == 1
  np.testing.assert_allclose(np.asarray(jit_logits(model, params, ids, mask))[real],
                             torch_logits(reference, ids, mask)[real], atol=1e-4, rtol=1e-4)


# ---- item 4: GGUF metadata, every problem a GGUFError naming the file and the key ----

V = gguf.GGUFValueType


def _gguf_with(path, monkeypatch, overrides):
  """The llama_gguf test file with metadata ``{key: (value, type)}`` written in place of its own."""
  add_key_value = gguf.GGUFWriter.add_key_value

  def replaced(self, key, val, vtype, sub_type=None):
    if key in overrides:
      val, vtype = overrides[key]
    add_key_value(self, key, val, vtype, sub_type)

  with monkeypatch.context() as patch:
    patch.setattr(gguf.GGUFWriter, "add_key_value", replaced)
    return write_gguf(path, make_hf_model("llama_gguf"))


@pytest.mark.parametrize("key, value, vtype, expected", [
    ("llama.attention.head_count", 0, V.UINT32, "must be an integer >= 1, got 0"),
    ("llama.attention.head_count_kv", 0, V.UINT32, "must be an integer >= 1, got 0"),
    ("llama.vocab_size", 0, V.UINT32, "must be an integer >= 1, got 0"),
    ("llama.embedding_length", [28, 28], V.ARRAY, "must be an integer, got [28, 28]"),
    ("llama.feed_forward_length", 43.5, V.FLOAT32, "must be an integer, got 43.5"),  # not 43
    ("llama.attention.layer_norm_rms_epsilon", 0.0, V.FLOAT32, "must be a finite number > 0"),
    ("llama.attention.layer_norm_rms_epsilon", math.inf, V.FLOAT32,
     "must be a finite number > 0"),
    ("llama.rope.freq_base", math.nan, V.FLOAT32, "must be a finite number > 0"),
    # Valid alone, not together: ModelConfig's grouped-query check, in GGUF terms.
    ("llama.attention.head_count_kv", 3, V.UINT32, "must be a multiple of num_kv_heads=3"),
    ("tokenizer.ggml.eos_token_id", 103, V.UINT32, "must be a token id: an integer >= 0 and < 103"),
])
def test_bad_gguf_metadata_is_a_gguf_error_naming_file_and_key(tmp_path, monkeypatch, key,
                                                                value, vtype, expected):
  path = _gguf_with(tmp_path / "m.gguf", monkeypatch, {key: (value, vtype)})
  with pytest.raises(GGUFError) as error:
    models.load_model(path)
  message = str(error.value)
  assert str(path) in message and key in message and expected in message


def test_a_huge_gguf_block_count_is_refused_before_the_mapping(tmp_path, monkeypatch):
  path = _gguf_with(tmp_path / "m.gguf", monkeypatch, {"llama.block_count": (10**9, V.UINT32)})
  real_mapping = es_gguf.param_mapping

  def guarded_mapping(config):  # 1e9 layers: 5 GB of names, then a bare MemoryError
    assert config.num_layers <= 2, "mapping built before checking the tensors"
    return real_mapping(config)

  monkeypatch.setattr(es_gguf, "param_mapping", guarded_mapping)
  with pytest.raises(GGUFError) as error:
    models.load_model(path)
  message = str(error.value)
  assert str(path) in message and "llama.block_count" in message
  assert "num_layers=1000000000" in message and "only 2 layers, indices [0, 1]" in message


def _tokenizer_gguf(path, monkeypatch, overrides=None):
  """A byte-level BPE vocabulary alone: <|endoftext|> (control), a, b, ab; bos = eos = 0."""
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["<|endoftext|>", "a", "b", "ab"])
  w.add_token_types([3, 1, 1, 1])
  w.add_token_merges(["a b"])
  with monkeypatch.context() as patch:
    add_key_value = gguf.GGUFWriter.add_key_value

    def replaced(self, key, val, vtype, sub_type=None):
      val, vtype = (overrides or {}).get(key, (val, vtype))
      add_key_value(self, key, val, vtype, sub_type)

    patch.setattr(gguf.GGUFWriter, "add_key_value", replaced)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("key, value, vtype", [
    ("tokenizer.ggml.bos_token_id", 4, V.UINT32),          # IndexError before
    ("tokenizer.ggml.padding_token_id", 10**6, V.UINT32),  # IndexError before
    ("tokenizer.ggml.eos_token_id", -1, V.INT32),          # silently 'ab' before
])
def test_an_out_of_range_special_token_id_is_a_gguf_error(tmp_path, monkeypatch, key, value,
                                                          vtype):
  good = models.load_tokenizer(_tokenizer_gguf(tmp_path / "good.gguf", monkeypatch))
  assert (good.bos_token, good.eos_token, good.pad_token) == ("<|endoftext|>",) * 3
  path = _tokenizer_gguf(tmp_path / "t.gguf", monkeypatch, {key: (value, vtype)})
  with pytest.raises(GGUFError) as error:
    models.load_tokenizer(path)
  message = str(error.value)
  assert path in message and key in message
  assert "must be a token id: an integer >= 0 and < 4" in message

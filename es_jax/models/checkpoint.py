"""Hugging Face safetensors checkpoints <-> Flax params, one tensor at a time.

The conversion is a pure mapping (:func:`param_mapping`): each Hugging Face
key has one Flax path, and a tensor moves by at most a transpose and a
reshape (``(out, in)`` torch Linear weights become ``(in, *features)``
kernels). Loading validates every key and shape from the safetensors headers
before reading any tensor, then reads, converts, casts and places tensors one
by one, so host memory never holds two copies of the model. Export writes
safetensors shards + ``config.json`` + ``generation_config.json`` that
transformers and vLLM load.

Example::

  model, params = load_model("Qwen/Qwen2.5-0.5B-Instruct")   # or a local directory
  ...                                                         # ES fine-tuning
  save_pretrained("out/", model.config, params, dtype=jnp.bfloat16, tokenizer=tokenizer)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from es_jax.models import sharding
from es_jax.models.config import ModelConfig
from es_jax.models.transformer import Transformer

PyTree = Any
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write; never params.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint does not match the config: lists every missing, unexpected and mis-shaped key."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """Where one Hugging Face tensor goes.

  Attributes:
    hf_key: e.g. ``"model.layers.0.self_attn.q_proj.weight"``.
    path: Flax param path, e.g. ``("layers_0", "attn", "q", "kernel")``.
    hf_shape: shape in the checkpoint.
    shape: shape in the Flax params.
    transpose: a torch Linear weight ``(out, in)``: Flax is ``hf.T`` reshaped.
  """

  hf_key: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transpose: bool

  def to_flax(self, hf_array: np.ndarray) -> np.ndarray:
    """Checkpoint tensor -> Flax param (a view when possible)."""
    return (hf_array.T if self.transpose else hf_array).reshape(self.shape)

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    """Flax param -> checkpoint tensor (contiguous, ready to save)."""
    if self.transpose:
      array = array.reshape(self.shape[0], -1).T
    return np.ascontiguousarray(array.reshape(self.hf_shape))


def param_mapping(config: ModelConfig) -> dict[str, TensorMapping]:
  """Every Hugging Face key of ``config``'s checkpoint and its Flax destination (pure).

  Example:
    >>> from es_jax.models.config import ModelConfig
    >>> m = param_mapping(ModelConfig.preset("qwen2.5-0.5b-instruct"))
    >>> t = m["model.layers.0.self_attn.k_proj.weight"]
    >>> t.path, t.hf_shape, t.shape
    (('layers_0', 'attn', 'k', 'kernel'), (128, 896), (896, 128))
  """
  c = config
  d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
  out: dict[str, TensorMapping] = {}

  def add(hf_key, path, hf_shape, shape, transpose):
    out[hf_key] = TensorMapping(hf_key, tuple(path), tuple(hf_shape), tuple(shape), transpose)

  def linear(hf_prefix, path, d_in, features, bias):
    add(f"{hf_prefix}.weight", (*path, "kernel"), (math.prod(features), d_in), (d_in, *features),
        True)
    if bias:
      add(f"{hf_prefix}.bias", (*path, "bias"), (math.prod(features),), features, False)

  add("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, d), (c.vocab_size, d),
      False)
  for i in range(c.num_layers):
    hf, fx = f"model.layers.{i}", f"layers_{i}"
    add(f"{hf}.input_layernorm.weight", (fx, "attn_norm", "scale"), (d,), (d,), False)
    linear(f"{hf}.self_attn.q_proj", (fx, "attn", "q"), d, (c.num_heads * h,), c.qkv_bias)
    linear(f"{hf}.self_attn.k_proj", (fx, "attn", "k"), d, (c.num_kv_heads * h,), c.qkv_bias)
    linear(f"{hf}.self_attn.v_proj", (fx, "attn", "v"), d, (c.num_kv_heads * h,), c.qkv_bias)
    linear(f"{hf}.self_attn.o_proj", (fx, "attn", "o"), c.num_heads * h, (d,), c.o_bias)
    add(f"{hf}.post_attention_layernorm.weight", (fx, "mlp_norm", "scale"), (d,), (d,), False)
    linear(f"{hf}.mlp.gate_proj", (fx, "mlp", "gate"), d, (f,), c.mlp_bias)
    linear(f"{hf}.mlp.up_proj", (fx, "mlp", "up"), d, (f,), c.mlp_bias)
    linear(f"{hf}.mlp.down_proj", (fx, "mlp", "down"), f, (d,), c.mlp_bias)
  add("model.norm.weight", ("final_norm", "scale"), (d,), (d,), False)
  if not c.tie_word_embeddings:
    linear("lm_head", ("lm_head",), d, (c.vocab_size,), False)
  return out


def resolve_checkpoint(name_or_path: str | os.PathLike, *,
                       revision: str | None = None) -> pathlib.Path:
  """A local checkpoint directory, downloading a hub id into huggingface_hub's cache if needed.

  Example::

    path = resolve_checkpoint("Qwen/Qwen2.5-0.5B-Instruct")  # cached snapshot directory
  """
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointError(f"{path} is a file; pass the checkpoint directory that contains it.")
  from huggingface_hub import snapshot_download  # only needed for hub ids
  try:
    local = snapshot_download(
        str(name_or_path), revision=revision,
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
  except Exception as e:  # network, auth or unknown repo: say which and what to do
    raise CheckpointError(
        f"{name_or_path!r} is not a local directory and could not be fetched from the hub "
        f"({type(e).__name__}: {e}). Pass a local checkpoint directory, or log in / go online "
        "and retry.") from e
  return pathlib.Path(local)


def _shard_files(path: pathlib.Path) -> list[pathlib.Path]:
  if (path / INDEX_FILE).exists():
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).exists()]
    if missing:
      raise CheckpointError(f"{path / INDEX_FILE} names shard files that are missing: {missing}.")
    return [path / f for f in files]
  if (path / SINGLE_FILE).exists():
    return [path / SINGLE_FILE]
  raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; only safetensors "
                        "checkpoints are supported (convert .bin files with transformers first).")


def _skippable(key: str, config: ModelConfig) -> bool:
  # A tied model may still carry the aliased head; its values are the embedding's.
  return key.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and key == "lm_head.weight")


def validate_checkpoint(path: str | os.PathLike, config: ModelConfig) -> dict[str, pathlib.Path]:
  """Checks every key and shape against ``config`` from the headers alone; returns key -> file.

  Raises:
    CheckpointError: naming every missing, unexpected and mis-shaped key.
  """
  path = pathlib.Path(path)
  mapping = param_mapping(config)
  where: dict[str, pathlib.Path] = {}
  unexpected, misshaped = [], []
  for file in _shard_files(path):
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        if key not in mapping:
          if not _skippable(key, config):
            unexpected.append(key)
          continue
        shape = tuple(f.get_slice(key).get_shape())
        if shape != mapping[key].hf_shape:
          misshaped.append(f"{key}: checkpoint {shape}, expected {mapping[key].hf_shape}")
        where[key] = file
  missing = [k for k in mapping if k not in where]
  if missing or unexpected or misshaped:
    lines = [f"checkpoint {path} does not match the {config.family} config:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {missing}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
    if misshaped:
      lines.append(f"  mis-shaped keys ({len(misshaped)}): {misshaped}")
    lines.append("Check that config.json belongs to these weights (tie_word_embeddings, "
                 "num_key_value_heads, head_dim, biases).")
    raise CheckpointError("\n".join(lines))
  return where


def load_params(path: str | os.PathLike, config: ModelConfig, *, dtype: Any = None,
                mesh: jax.sharding.Mesh | None = None) -> PyTree:
  """Reads a local safetensors checkpoint into Flax params, tensor by tensor.

  Args:
    path: directory with ``model.safetensors`` or ``model.safetensors.index.json``.
    config: the model's config (e.g. from :func:`load_config`).
    dtype: param dtype; default ``config.param_dtype`` (float32 for ES).
    mesh: place each tensor straight into its tensor-parallel sharding
      (:mod:`es_jax.models.sharding`) instead of onto the default device.

  Raises:
    CheckpointError: for missing, unexpected or mis-shaped keys (all named).

  Example::

    config = load_config("ckpt/", dtype=jnp.float32)
    params = load_params("ckpt/", config)
  """
  path = pathlib.Path(path)
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  mapping = param_mapping(config)
  where = validate_checkpoint(path, config)
  size = None
  if mesh is not None:
    size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(sharding.MODEL_AXIS, 1)
  params: dict[str, Any] = {}
  for file in sorted(set(where.values())):
    with safe_open(file, framework="numpy") as f:
      for key in (k for k, v in where.items() if v == file):
        m = mapping[key]
        host = m.to_flax(f.get_tensor(key)).astype(dtype)
        target = None
        if mesh is not None:
          spec = sharding.spec_for("/".join(m.path), m.shape, axis_size=size)
          target = jax.sharding.NamedSharding(mesh, spec)
        node = params
        for part in m.path[:-1]:
          node = node.setdefault(part, {})
        node[m.path[-1]] = jax.device_put(host, target)
        del host  # the device copy is the only one kept
  return params


def load_config(path: str | os.PathLike, **changes) -> ModelConfig:
  """The :class:`ModelConfig` of a checkpoint directory's ``config.json`` (+ eos ids of
  ``generation_config.json``), with ``changes`` such as ``dtype=`` applied.

  Example::

    config = load_config("ckpt/", dtype=jnp.float32)
  """
  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise CheckpointError(f"no config.json in {path}; is this a Hugging Face checkpoint directory?")
  hf = json.loads((path / "config.json").read_text())
  gen_path = path / "generation_config.json"
  if gen_path.exists() and "eos_token_ids" not in changes:
    eos = json.loads(gen_path.read_text()).get("eos_token_id")
    if eos is not None:  # instruct checkpoints list the end-of-turn ids only here
      eos = [eos] if isinstance(eos, int) else list(eos)
      base = hf.get("eos_token_id")
      base = [] if base is None else [base] if isinstance(base, int) else list(base)
      hf["eos_token_id"] = list(dict.fromkeys(eos + base))
  return ModelConfig.from_hf_config(hf, **changes)


def load_model(name_or_path: str | os.PathLike, *, dtype: Any = jnp.bfloat16,
               param_dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
               revision: str | None = None) -> tuple[Transformer, PyTree]:
  """``(model, params)`` from a local directory or a hub id (downloaded through the HF cache).

  Args:
    name_or_path: checkpoint directory or hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``;
      a ``.gguf`` file or a packaged short name loads through :mod:`es_jax.models.gguf`.
    dtype: computation dtype (bfloat16 default; float32 for exact comparisons).
    param_dtype: param dtype (float32 default: the ES master copy).
    mesh: shard the params over this mesh's ``'model'`` axis while loading.
    revision: hub revision.

  Example::

    model, params = load_model("Qwen/Qwen2.5-0.5B-Instruct")
    model, params = load_model("smollm2-135m-instruct")   # GGUF: see es_jax.models.gguf
  """
  from es_jax.models import gguf  # imports this module: a top-level import would be circular
  if gguf.is_gguf(name_or_path):
    return gguf.load_model(name_or_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
  path = resolve_checkpoint(name_or_path, revision=revision)
  config = load_config(path, dtype=dtype, param_dtype=param_dtype)
  return Transformer(config), load_params(path, config, mesh=mesh)


def _leaf(params: PyTree, path: tuple[str, ...]):
  node = params
  for i, part in enumerate(path):
    if part not in node:
      raise CheckpointError(f"params have no '{'/'.join(path[:i + 1])}'; were they built "
                            "for this config?")
    node = node[part]
  return node


def save_pretrained(path: str | os.PathLike, config: ModelConfig, params: PyTree, *,
                    dtype: Any = None, max_shard_bytes: int = 4 << 30,
                    tokenizer: Any = None) -> pathlib.Path:
  """Exports params as a Hugging Face checkpoint (safetensors + config + generation config).

  Tensors are fetched, converted and written shard by shard, so host memory
  holds at most one shard. The directory loads with
  ``transformers.AutoModelForCausalLM.from_pretrained`` and in vLLM.

  Args:
    path: output directory (created).
    config: the model's config.
    params: Flax params (any sharding).
    dtype: dtype of the written tensors; default the params' own (lossless).
      ``jnp.bfloat16`` halves the files for serving.
    max_shard_bytes: shard size limit; more than one shard writes an index.
    tokenizer: optional tokenizer to save alongside (for vLLM / chat templates).

  Returns:
    The output directory.

  Example::

    save_pretrained("out/", model.config, params, dtype=jnp.bfloat16, tokenizer=tokenizer)
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  mapping = list(param_mapping(config).values())
  leaves = {m.hf_key: _leaf(params, m.path) for m in mapping}
  for m in mapping:
    if tuple(leaves[m.hf_key].shape) != m.shape:
      raise CheckpointError(f"param {'/'.join(m.path)} has shape {leaves[m.hf_key].shape}, "
                            f"the config expects {m.shape}.")
  out_dtype = lambda leaf: jnp.dtype(leaf.dtype if dtype is None else dtype)

  shards: list[list[TensorMapping]] = [[]]
  shard_bytes = 0
  for m in mapping:
    nbytes = math.prod(m.shape) * out_dtype(leaves[m.hf_key]).itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(m)
    shard_bytes += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    tensors = {}
    for m in shard:
      leaf = leaves[m.hf_key]
      tensors[m.hf_key] = m.to_hf(np.asarray(jax.device_get(leaf)).astype(out_dtype(leaf)))
      weight_map[m.hf_key] = name
      total += tensors[m.hf_key].nbytes
    save_file(tensors, str(path / name), metadata={"format": "pt"})
    del tensors
  if len(shards) > 1:
    (path / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

  dtypes = {out_dtype(leaf) for leaf in leaves.values()}
  hf_config = config.to_hf_config()
  dtype_name = str(dtypes.pop()) if len(dtypes) == 1 else "float32"
  hf_config["torch_dtype"] = hf_config["dtype"] = dtype_name  # transformers 4 and 5 names
  (path / "config.json").write_text(json.dumps(hf_config, indent=2))
  generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                "eos_token_id": list(config.eos_token_ids) or None}
  (path / "generation_config.json").write_text(
      json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return path

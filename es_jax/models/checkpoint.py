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
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from es_jax.models import sharding
from es_jax.models.config import ModelConfig
from es_jax.models.transformer import Transformer, stack_layers

PyTree = Any
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write; never params.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
# Error messages list at most this many keys: a wrong config can miss millions.
_MAX_LISTED = 20


class CheckpointError(ValueError):
  """A model checkpoint (Hugging Face weights, config or GGUF file) is unreadable, inconsistent
  or does not match its config (names file and key)."""


def _listing(items, *, sep: str | None = None) -> str:
  """A list capped at ``_MAX_LISTED`` items (``first 20: [...] ... and N more``); ``repr`` form,
  or the items joined by ``sep``."""
  items = list(items)
  shown = items[:_MAX_LISTED]
  text = repr(shown) if sep is None else sep.join(map(str, shown))
  if len(items) <= _MAX_LISTED:
    return text
  return f"first {_MAX_LISTED}: {text} ... and {len(items) - _MAX_LISTED} more"


def mismatch_lines(header: str, *, missing, unexpected, misshaped, noun: str = "keys") -> list[str]:
  """An error's lines for names missing, unexpected or mis-shaped (each list capped); [] if none."""
  if not (missing or unexpected or misshaped):
    return []
  lines = [header]
  for what, items in (("missing", missing), ("unexpected", unexpected),
                      ("mis-shaped", misshaped)):
    if items:
      lines.append(f"  {what} {noun} ({len(items)}): {_listing(items)}")
  return lines


def _read_json_object(file: pathlib.Path) -> dict[str, Any]:
  """A JSON file that must hold an object; any other content is a CheckpointError naming it."""
  try:
    value = json.loads(file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file} is not readable JSON ({type(e).__name__}: {e}); re-download "
                          "or re-export the checkpoint.") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{file} must hold a JSON object, got a {type(value).__name__}; "
                          "re-download or re-export the checkpoint.")
  return value


def _unreadable(file: pathlib.Path, error: Exception, key: str | None = None) -> CheckpointError:
  what = f"tensor {key!r} of {file}" if key else str(file)
  return CheckpointError(f"{what} cannot be read as safetensors ({type(error).__name__}: "
                         f"{error}); the file is truncated or corrupt: re-download or re-export "
                         "it.")


def _header_shapes(file: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """Every key of one safetensors file and its shape, from the header alone."""
  try:
    with safe_open(file, framework="numpy") as f:
      return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
  except (SafetensorError, OSError) as e:
    raise _unreadable(file, e) from e


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


def _checkpoint_tensors(path: pathlib.Path) -> dict[str, tuple[pathlib.Path, tuple[int, ...]]]:
  """key -> (file, shape) of a checkpoint directory, from the headers; each key from one file.

  With an index, each key comes from the file its ``weight_map`` names, and
  the index and the shards must agree exactly: a shard that lacks a key mapped
  to it, or holds a key mapped elsewhere (a stale duplicate) or nowhere, is
  refused rather than resolved by reading order.
  """
  index_file = path / INDEX_FILE
  if not index_file.exists():
    if (path / SINGLE_FILE).exists():
      return {key: (path / SINGLE_FILE, shape)
              for key, shape in _header_shapes(path / SINGLE_FILE).items()}
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; only safetensors "
                          "checkpoints are supported (convert .bin files with transformers "
                          "first).")
  weight_map = _read_json_object(index_file).get("weight_map")
  if (not isinstance(weight_map, dict) or not weight_map
      or not all(isinstance(v, str) and v for v in weight_map.values())):
    raise CheckpointError(
        f"{index_file} has no 'weight_map' object mapping each tensor name to its shard file "
        f"(got {weight_map!r:.200}); re-download or re-export the checkpoint.")
  keys_of: dict[str, list[str]] = {}
  for key, name in weight_map.items():
    keys_of.setdefault(name, []).append(key)
  _check_shard_names(path, index_file, keys_of)
  absent = [f"{name} ({len(keys_of[name])} keys, e.g. {keys_of[name][0]!r})"
            for name in keys_of if not (path / name).is_file()]
  if absent:
    raise CheckpointError(f"{index_file} maps tensors to shard files that are missing from "
                          f"{path}: {_listing(absent, sep='; ')}. Download the missing shards "
                          "or re-export the checkpoint.")
  tensors, problems = {}, []
  for name, keys in keys_of.items():
    shapes = _header_shapes(path / name)
    for key in keys:
      if key in shapes:
        tensors[key] = (path / name, shapes[key])
      else:
        problems.append(f"{key!r} is mapped to {name}, which does not contain it")
    for key in shapes:
      owner = weight_map.get(key)
      if owner is None and not key.endswith(_IGNORED_SUFFIXES):
        problems.append(f"{name} holds {key!r}, which the index does not list")
      elif owner is not None and owner != name:
        problems.append(f"{name} holds a copy of {key!r}, which the index maps to {owner}")
  if problems:
    raise CheckpointError(
        f"{index_file} and its shards disagree ({len(problems)} problems): "
        f"{_listing(problems, sep='; ')}. Re-download or re-export the checkpoint; the index "
        "decides which file each tensor is read from.")
  return tensors


def _inside(path: pathlib.Path, name: str) -> bool:
  """Whether shard ``name`` is a plain file name whose file stays in directory ``path``.

  A link may lead out of the directory only into huggingface_hub's cache layout
  (``snapshots/<rev>/<name>`` -> ``../../blobs/<hash>``), where every file is one.
  """
  if name == ".." or pathlib.PurePath(name).name != name:  # also ".", "a/b", "/etc/x"
    return False
  root, target = path.resolve(), (path / name).resolve()
  if target.parent == root:
    return True
  return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def _check_shard_names(path: pathlib.Path, index_file: pathlib.Path,
                       keys_of: dict[str, list[str]]) -> None:
  """Refuses an index whose weight_map names files outside ``path`` (before any is opened)."""
  outside = [f"{name!r} ({len(keys)} keys, e.g. {keys[0]!r})"
             for name, keys in keys_of.items() if not _inside(path, name)]
  if outside:
    raise CheckpointError(
        f"{index_file} names shard files outside {path}: {_listing(outside, sep='; ')}. The "
        "weight_map may only hold plain file names of files in the checkpoint directory (no "
        "'/', '..', absolute paths or links leading out); fix the index or re-export the "
        "checkpoint.")


def check_layer_count(path: str | os.PathLike, keys, config: ModelConfig, *,
                      field: str = "config.json: num_hidden_layers",
                      error: type[CheckpointError] = CheckpointError) -> None:
  """Refuses a config with more layers than the checkpoint has tensors for, before the mapping.

  The mapping has ~10 keys per layer, so a wrong layer count of 1e9 would
  otherwise exhaust memory before any key is compared. Fewer layers than the
  checkpoint's leave a small mapping: the key comparison names them.

  Args:
    path: the checkpoint, for the message.
    keys: its Hugging Face tensor names.
    config: the config to check.
    field: where the layer count came from, for the message.
    error: the error type to raise (GGUFError for a GGUF file).
  """
  layers = sorted({int(m.group(1)) for key in keys if (m := _LAYER_KEY.match(key))})
  if config.num_layers <= len(layers):
    return
  raise error(
      f"checkpoint {path} does not match the config: the config has num_layers="
      f"{config.num_layers} ({field}), but the checkpoint holds tensors of only {len(layers)} "
      f"layers, indices {_listing(layers)}. Check that the config belongs to these weights.")


def _skippable(key: str, config: ModelConfig) -> bool:
  # A tied model may still carry the aliased head; its values are the embedding's.
  return key.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and key == "lm_head.weight")


def validate_checkpoint(path: str | os.PathLike, config: ModelConfig) -> dict[str, pathlib.Path]:
  """Checks every key and shape against ``config`` from the headers alone; returns key -> file.

  Raises:
    CheckpointError: naming every missing, unexpected and mis-shaped key (the
      first 20 of each kind), an index that disagrees with its shards, or an
      unreadable file.
  """
  path = pathlib.Path(path)
  tensors = _checkpoint_tensors(path)
  check_layer_count(path, tensors, config)
  mapping = param_mapping(config)
  where: dict[str, pathlib.Path] = {}
  unexpected, misshaped = [], []
  for key, (file, shape) in tensors.items():
    if key not in mapping:
      if not _skippable(key, config):
        unexpected.append(key)
      continue
    if shape != mapping[key].hf_shape:
      misshaped.append(f"{key}: checkpoint {shape}, expected {mapping[key].hf_shape}")
    where[key] = file
  missing = [k for k in mapping if k not in where]
  lines = mismatch_lines(f"checkpoint {path} does not match the {config.family} config:",
                         missing=missing, unexpected=unexpected, misshaped=misshaped)
  if lines:
    lines.append("Check that config.json belongs to these weights (tie_word_embeddings, "
                 "num_key_value_heads, head_dim, biases).")
    raise CheckpointError("\n".join(lines))
  return where


def place_tensor(params: dict, m: Any, host: np.ndarray, *, mesh: jax.sharding.Mesh | None,
                 axis_size: int) -> None:
  """Puts one converted tensor at ``m.path`` in ``params``, sharded by its rule on ``mesh``."""
  target = None
  if mesh is not None:
    spec = sharding.spec_for("/".join(m.path), m.shape, axis_size=axis_size)
    target = jax.sharding.NamedSharding(mesh, spec)
  node = params
  for part in m.path[:-1]:
    node = node.setdefault(part, {})
  node[m.path[-1]] = jax.device_put(host, target)


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
    CheckpointError: for missing, unexpected or mis-shaped keys (named), an
      index that disagrees with its shards, or an unreadable file.

  Example::

    config = load_config("ckpt/", dtype=jnp.float32)
    params = load_params("ckpt/", config)
  """
  path = pathlib.Path(path)
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  where = validate_checkpoint(path, config)  # before the mapping: it checks the layer count
  mapping = param_mapping(config)
  size = None
  if mesh is not None:
    size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(sharding.MODEL_AXIS, 1)
  params: dict[str, Any] = {}
  keys_of: dict[pathlib.Path, list[str]] = {}
  for key, file in where.items():
    keys_of.setdefault(file, []).append(key)
  for file, keys in sorted(keys_of.items()):
    with safe_open(file, framework="numpy") as f:
      for key in keys:
        m = mapping[key]
        try:
          tensor = f.get_tensor(key)
        except (SafetensorError, OSError) as e:  # e.g. the file changed since validation
          raise _unreadable(file, e, key) from e
        host = m.to_flax(tensor).astype(dtype)
        del tensor
        place_tensor(params, m, host, mesh=mesh, axis_size=size)
        del host  # the device copy is the only one kept
  return in_layout(config, params, mesh)


def in_layout(config: ModelConfig, params: PyTree, mesh: jax.sharding.Mesh | None) -> PyTree:
  """Unrolled params as loaded, in ``config``'s layout: stacked (and resharded) if scanned.

  Stacking copies the layers once, so loading a scanned model briefly holds its
  layers twice.
  """
  if not config.scan_layers:
    return params
  params = stack_layers(params)
  return params if mesh is None else sharding.shard_params(params, mesh)


def load_config(path: str | os.PathLike, **changes) -> ModelConfig:
  """The :class:`ModelConfig` of a checkpoint directory's ``config.json`` (+ eos ids of
  ``generation_config.json``), with ``changes`` such as ``dtype=`` applied.

  Example::

    config = load_config("ckpt/", dtype=jnp.float32)
  """
  path = pathlib.Path(path)
  config_file, gen_file = path / "config.json", path / "generation_config.json"
  if not config_file.exists():
    raise CheckpointError(f"no config.json in {path}; is this a Hugging Face checkpoint directory?")
  hf = _read_json_object(config_file)
  if gen_file.exists() and "eos_token_ids" not in changes:
    raw = _read_json_object(gen_file).get("eos_token_id")
    if raw is not None:  # instruct checkpoints list the end-of-turn ids only here
      eos = _id_list(raw)
      if eos is None:
        raise CheckpointError(
            f"{gen_file}: field 'eos_token_id' must be a token id (an integer >= 0) or a list "
            f"of them, got {raw!r:.200}; fix the file, or delete it to use config.json's ids.")
      base = hf.get("eos_token_id")
      base = [] if base is None else _id_list(base)
      if base is not None:  # an invalid one is reported below, naming config.json
        hf["eos_token_id"] = list(dict.fromkeys(eos + base))
  try:
    return ModelConfig.from_hf_config(hf, **changes)
  except ValueError as e:
    raise CheckpointError(f"{config_file}: {e} Fix config.json (it must be the transformers "
                          "config of these weights) or re-download the checkpoint.") from e


def _id_list(value: Any) -> list[int] | None:
  """A token id or list of ids as a list; None when it is neither."""
  ids = value if isinstance(value, list) else [value]
  ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
  return list(ids) if ok else None


def load_model(name_or_path: str | os.PathLike, *, dtype: Any = jnp.bfloat16,
               param_dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
               revision: str | None = None,
               scan_layers: bool = False) -> tuple[Transformer, PyTree]:
  """``(model, params)`` from a local directory or a hub id (downloaded through the HF cache).

  Args:
    name_or_path: checkpoint directory or hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"``;
      a ``.gguf`` file or a packaged short name loads through :mod:`es_jax.models.gguf`.
    dtype: computation dtype (bfloat16 default; float32 for exact comparisons).
    param_dtype: param dtype (float32 default: the ES master copy).
    mesh: shard the params over this mesh's ``'model'`` axis while loading.
    revision: hub revision.
    scan_layers: stack the layers for ``nn.scan`` (:class:`ModelConfig`):
      compile time that does not grow with depth.

  Example::

    model, params = load_model("Qwen/Qwen2.5-0.5B-Instruct")
    model, params = load_model("smollm2-135m-instruct")   # GGUF: see es_jax.models.gguf
  """
  from es_jax.models import gguf  # imports this module: a top-level import would be circular
  if gguf.is_gguf(name_or_path):
    return gguf.load_model(name_or_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                           scan_layers=scan_layers)
  path = resolve_checkpoint(name_or_path, revision=revision)
  config = load_config(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return Transformer(config), load_params(path, config, mesh=mesh)


def _leaf(params: PyTree, path: tuple[str, ...], config: ModelConfig):
  """The param at an unrolled ``path``: a layer's slice of the stacked leaf, if scanned."""
  layer = re.fullmatch(r"layers_(\d+)", path[0]) if config.scan_layers else None
  if layer:
    path = ("layers", *path[1:])
  node = params
  for i, part in enumerate(path):
    if part not in node:
      raise CheckpointError(f"params have no '{'/'.join(path[:i + 1])}'; were they built "
                            f"for this config (scan_layers={config.scan_layers})?")
    node = node[part]
  if layer is None:
    return node
  if node.shape[0] != config.num_layers:
    raise CheckpointError(f"params 'layers/{'/'.join(path[1:])}' stack {node.shape[0]} layers, "
                          f"the config has num_layers={config.num_layers}.")
  return _LayerSlice(node, int(layer.group(1)))


@dataclasses.dataclass(frozen=True)
class _LayerSlice:
  """Layer ``index`` of a stacked leaf, fetched only when written (no device copy of all layers)."""

  stacked: Any
  index: int

  @property
  def shape(self):
    return self.stacked.shape[1:]

  @property
  def dtype(self):
    return self.stacked.dtype

  def __array__(self, dtype=None, copy=None):
    return np.asarray(jax.device_get(self.stacked[self.index]), dtype)


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
  leaves = {m.hf_key: _leaf(params, m.path, config) for m in mapping}
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
      tensors[m.hf_key] = m.to_hf(np.asarray(leaf).astype(out_dtype(leaf)))
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

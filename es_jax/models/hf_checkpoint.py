"""Reading a Hugging Face checkpoint directory (config.json, safetensors shards) as Flax params.

Loading validates every key and shape from the safetensors headers (and the
shard index against its shards) before reading any tensor, then reads,
converts (:func:`es_jax.models.mapping.param_mapping`), casts and places
tensors one by one, so host memory never holds two copies of the model.

Example::

  config = load_config("ckpt/", dtype=jnp.float32)
  params = load_params("ckpt/", config)
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import SafetensorError, safe_open

from es_jax.models import sharding
from es_jax.models.config import ModelConfig
from es_jax.models.mapping import (CheckpointError, check_layer_count, in_layout, listing,
                                   mismatch_lines, param_mapping, place_tensor)

PyTree = Any
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write; never params.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
                          f"{path}: {listing(absent, sep='; ')}. Download the missing shards "
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
        f"{listing(problems, sep='; ')}. Re-download or re-export the checkpoint; the index "
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
        f"{index_file} names shard files outside {path}: {listing(outside, sep='; ')}. The "
        "weight_map may only hold plain file names of files in the checkpoint directory (no "
        "'/', '..', absolute paths or links leading out); fix the index or re-export the "
        "checkpoint.")


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

"""Exporting Flax params as a Hugging Face checkpoint that transformers and vLLM load.

Export writes safetensors shards + ``config.json`` + ``generation_config.json``,
converting each param back through :func:`es_jax.models.mapping.param_mapping`.

Example::

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
from safetensors.numpy import save_file

from es_jax.models.config import ModelConfig
from es_jax.models.hf_checkpoint import INDEX_FILE, SINGLE_FILE
from es_jax.models.mapping import CheckpointError, TensorMapping, param_mapping

PyTree = Any


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

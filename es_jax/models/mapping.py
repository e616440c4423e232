"""Hugging Face tensor names <-> the Flax param tree: the mapping both weight readers share.

The conversion is a pure mapping (:func:`param_mapping`): each Hugging Face
key has one Flax path, and a tensor moves by at most a transpose and a
reshape (``(out, in)`` torch Linear weights become ``(in, *features)``
kernels). The safetensors reader (:mod:`es_jax.models.hf_checkpoint`), the
GGUF reader (:mod:`es_jax.models.gguf`) and the exporter
(:mod:`es_jax.models.export`) all go through it; this module also holds what
the two readers share around it: their error type, the layer-count check made
before the mapping is built, the capped lists of their error messages, and
placing each converted tensor into the params.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np

from es_jax.models import sharding
from es_jax.models.config import ModelConfig
from es_jax.models.transformer import stack_layers

PyTree = Any
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
# Error messages list at most this many keys: a wrong config can miss millions.
_MAX_LISTED = 20


class CheckpointError(ValueError):
  """A model checkpoint (Hugging Face weights, config or GGUF file) is unreadable, inconsistent
  or does not match its config (names file and key)."""


def listing(items, *, sep: str | None = None) -> str:
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
      lines.append(f"  {what} {noun} ({len(items)}): {listing(items)}")
  return lines


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
      f"layers, indices {listing(layers)}. Check that the config belongs to these weights.")


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


def in_layout(config: ModelConfig, params: PyTree, mesh: jax.sharding.Mesh | None) -> PyTree:
  """Unrolled params as loaded, in ``config``'s layout: stacked (and resharded) if scanned.

  Stacking copies the layers once, so loading a scanned model briefly holds its
  layers twice.
  """
  if not config.scan_layers:
    return params
  params = stack_layers(params)
  return params if mesh is None else sharding.shard_params(params, mesh)

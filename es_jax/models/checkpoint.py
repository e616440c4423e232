"""The front door of the weight formats: a checkpoint name or path -> ``(model, params)``.

:func:`load_model` chooses the format by the path: a ``.gguf`` file or a
packaged short name goes to :mod:`es_jax.models.gguf`; anything else is a
Hugging Face checkpoint directory or hub id (:mod:`es_jax.models.hf_checkpoint`).
Both readers convert names through :mod:`es_jax.models.mapping`;
:mod:`es_jax.models.export` writes the Hugging Face format back.

Example::

  model, params = load_model("Qwen/Qwen2.5-0.5B-Instruct")   # or a local directory
  ...                                                         # ES fine-tuning
  save_pretrained("out/", model.config, params, dtype=jnp.bfloat16, tokenizer=tokenizer)
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from es_jax.models import gguf
from es_jax.models.export import save_pretrained
from es_jax.models.hf_checkpoint import load_config, load_params, validate_checkpoint
from es_jax.models.mapping import CheckpointError, param_mapping
from es_jax.models.transformer import Transformer

# The front door's own names, and the format modules' public names that callers import from here.
__all__ = ["CheckpointError", "load_config", "load_model", "load_params", "param_mapping",
           "resolve_checkpoint", "save_pretrained", "validate_checkpoint"]

PyTree = Any


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
  if gguf.is_gguf(name_or_path):
    return gguf.load_model(name_or_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                           scan_layers=scan_layers)
  path = resolve_checkpoint(name_or_path, revision=revision)
  config = load_config(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
  return Transformer(config), load_params(path, config, mesh=mesh)

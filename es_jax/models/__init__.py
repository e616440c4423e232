"""Flax ports of Qwen2 / Qwen2.5 and Llama 3.x: checkpoints, population decoding, sharding.

Needs the ``models`` extra (``pip install 'es_jax[models]'``).

Example::

  from es_jax import models
  model, params = models.load_model("Qwen/Qwen2.5-0.5B-Instruct")   # bf16 compute, fp32 params
  tok = models.load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
  models.generate_text(model, params, tok, ["Hi!"], chat_template=True, max_new_tokens=32)

GGUF files and the packaged SmolLM2-135M-Instruct load the same way
(``models.load_model("smollm2-135m-instruct")``, see :mod:`es_jax.models.gguf`).
"""

from __future__ import annotations

from es_jax import _extras

# Before the submodules: without the extra, say which one to install.
_extras.require("models", "es_jax.models", ("transformers", "tokenizers", "safetensors", "gguf"))

from es_jax.models.checkpoint import load_model
from es_jax.models.checkpoint import resolve_checkpoint
from es_jax.models.config import PRESETS
from es_jax.models.config import ModelConfig
from es_jax.models.config import SCANNED_LAYERS
from es_jax.models.config import RopeScaling
from es_jax.models.decoding import DecodeOutput
from es_jax.models.decoding import DecodeSettings
from es_jax.models.decoding import decode
from es_jax.models.decoding import decode_population
from es_jax.models.decoding import sample_token
from es_jax.models.export import save_pretrained
from es_jax.models.generate import completion_texts
from es_jax.models.generate import encode_prompts
from es_jax.models.generate import eos_ids_of
from es_jax.models.generate import generate_text
from es_jax.models.generate import generate_text_population
from es_jax.models.gguf import GGUFError
from es_jax.models.gguf import PACKAGED_MODELS
from es_jax.models.hf_checkpoint import load_config
from es_jax.models.hf_checkpoint import load_params
from es_jax.models.hf_checkpoint import validate_checkpoint
from es_jax.models.mapping import CheckpointError
from es_jax.models.mapping import TensorMapping
from es_jax.models.mapping import param_mapping
from es_jax.models.sharding import PARTITION_RULES
from es_jax.models.sharding import auto_sharded
from es_jax.models.sharding import param_specs
from es_jax.models.sharding import shard_params
from es_jax.models.tokenizer import char_tokenizer
from es_jax.models.tokenizer import load_tokenizer
from es_jax.models.transformer import KVCache
from es_jax.models.transformer import Transformer
from es_jax.models.transformer import init_cache
from es_jax.models.transformer import init_params
from es_jax.models.transformer import logits_fn
from es_jax.models.transformer import stack_layers
from es_jax.models.transformer import token_logprobs
from es_jax.models.transformer import unstack_layers

__all__ = [
    "CheckpointError",
    "DecodeOutput",
    "DecodeSettings",
    "GGUFError",
    "KVCache",
    "ModelConfig",
    "PACKAGED_MODELS",
    "PARTITION_RULES",
    "PRESETS",
    "RopeScaling",
    "SCANNED_LAYERS",
    "TensorMapping",
    "Transformer",
    "auto_sharded",
    "char_tokenizer",
    "completion_texts",
    "decode",
    "decode_population",
    "encode_prompts",
    "eos_ids_of",
    "generate_text",
    "generate_text_population",
    "init_cache",
    "init_params",
    "load_config",
    "load_model",
    "load_params",
    "load_tokenizer",
    "logits_fn",
    "param_mapping",
    "param_specs",
    "resolve_checkpoint",
    "sample_token",
    "save_pretrained",
    "shard_params",
    "stack_layers",
    "token_logprobs",
    "unstack_layers",
    "validate_checkpoint",
]

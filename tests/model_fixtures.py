"""Tiny random transformers checkpoints (the numerical reference) for the model-port tests.

Sizes are small and mostly prime or odd so that a swapped axis cannot go
unnoticed; ``initializer_range`` is large and norms/biases are randomised so
logits are O(1) and every parameter matters.
"""

from __future__ import annotations

import atexit
import functools
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import es_jax
from es_jax import noise as noise_lib
from es_jax.models import checkpoint
from es_jax.models.transformer import Transformer, logits_fn

VOCAB = 103  # == char_tokenizer's vocabulary, so text tests can use these models

HF_CONFIGS = {
    # GQA with one KV head for seven query heads; N * H = 42 != D = 28.
    "qwen_tied": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=28, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=7, num_key_value_heads=1, head_dim=6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True, initializer_range=0.2, eos_token_id=2, pad_token_id=0),
    "qwen_untied": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=30, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=10,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        tie_word_embeddings=False, initializer_range=0.2, eos_token_id=2, pad_token_id=0),
    # Llama 3.2-style: tied, llama3 scaling. original_max 2048 puts the head_dim-10
    # frequencies in all three bands (kept, interpolated, divided by the factor).
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=28, intermediate_size=43, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=4096,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 2048},
        tie_word_embeddings=True, initializer_range=0.2, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # What llama.cpp writes to GGUF: tied, plain RoPE (its llama3 scaling is a rope_freqs table).
    "llama_gguf": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=28, intermediate_size=43, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=10,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        tie_word_embeddings=True, initializer_range=0.2, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Untied, with attention and MLP biases (Llama's optional flags).
    "llama_untied_bias": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=22, intermediate_size=31, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def make_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A float32 eval-mode transformers model with random weights, norms and biases."""
  config = HF_CONFIGS[name]()
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif key.endswith("bias"):
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def save_hf_model(name: str, path: pathlib.Path, *, seed: int = 0, max_shard_size=None):
  """Saves ``make_hf_model(name)`` as safetensors into ``path``; returns the torch model."""
  model = make_hf_model(name, seed)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return model


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 9):
  """Random ids with rows of different lengths, left-padded with id 0; numpy int64."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for row in range(1, batch):
    mask[row, : min(length - 1, 3 * row + 1)] = 0
  return np.where(mask == 1, ids, 0), mask


def torch_logits(model, ids, mask) -> np.ndarray:
  """Reference logits with positions counted from the mask (as in decoding)."""
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


_ROOT = pathlib.Path(tempfile.mkdtemp(prefix="es_jax_models_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def ported(name: str):
  """``(torch model, checkpoint dir, Flax model (float32), params)``, built once per session.

  Cached at module level (not a fixture) so every test file shares the same
  checkpoints, params and therefore compiled programs.
  """
  path = _ROOT / name
  torch_model = save_hf_model(name, path)
  config = checkpoint.load_config(path, dtype=jnp.float32)
  return torch_model, path, Transformer(config), checkpoint.load_params(path, config)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _stacked_noise(spec, params, members):
  # threefry, as es_step requires: its noise does not depend on how members are batched.
  key = jax.random.key(7)
  member = lambda i: noise_lib.member_noise(spec, key, 3, params, i)
  return jax.vmap(member)(jnp.arange(members))


@functools.lru_cache(maxsize=None)
def population_noise(name: str, sigma: float = 0.05, members: int = 4):
  """Members' stacked EGGROLL noise (rank 2, embedding frozen) from es_jax's own member_noise.

  One compiled noise program per model: generating noise compiles slowly on CPU.
  """
  spec = es_jax.NoiseSpec(population=members, sigma=sigma, rank=2, freeze=("embed",))
  return _stacked_noise(spec, ported(name)[3], members)


def member(noise, i: int):
  """Member ``i``'s tree out of stacked noise."""
  return jax.tree.map(lambda x: x[i], noise)


# Shared jitted functions: every test file reuses the same compiled programs.
perturb = jax.jit(noise_lib.perturb)
jit_logits = jax.jit(logits_fn, static_argnums=0)

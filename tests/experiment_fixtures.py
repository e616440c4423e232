"""Tiny Hugging Face checkpoints and short task files for the experiment-runner tests."""

from __future__ import annotations

import json
import pathlib
import types

import numpy as np
import torch
import transformers

from es_jax.models import char_tokenizer


def make_tiny_checkpoint(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A random Qwen2 (prime-ish sizes) with the character tokenizer, saved by transformers."""
  tok = char_tokenizer()
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=28, intermediate_size=44, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, head_dim=14, max_position_embeddings=1024,
      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
      bos_token_id=None, initializer_range=0.2)
  transformers.Qwen2ForCausalLM(config).save_pretrained(path)
  tok.save_pretrained(path)
  return path


def write_short_gsm8k(path: pathlib.Path, n: int = 7) -> pathlib.Path:
  """GSM8K-format rows with short questions, so prompts (and tests) stay short."""
  rows = [{"question": f"{a}+{a + 1}?", "answer": f"{a}+{a + 1}={2 * a + 1}\n#### {2 * a + 1}"}
          for a in range(1, n + 1)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def digit_share_reward(task, examples, texts):
  """A stand-in training reward that a random model's members score differently on:
  the share of digits in each completion (so the ES updates of a test run are not zero)."""
  return np.array([sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts], np.float64)


def short_run_overrides(checkpoint: pathlib.Path, data: pathlib.Path, hellaswag: pathlib.Path) -> list[str]:
  """A few-second ES run on the tiny checkpoint: GSM8K format, short prompts, 8 members."""
  return [f"model.checkpoint={checkpoint}", "model.dtype=float32", "task.target=gsm8k",
          f"task.train_source={data}", f"task.eval_source={data}", "task.num_train=4",
          "task.num_eval=3", "task.max_new_tokens=6", f"task.prior_source={hellaswag}",
          "task.num_prior=2", "task.kl_prompts=2", "es.population=8", "es.chunk_size=8",
          "es.sigma=0.2", "es.learning_rate=0.02", "prompt_batch=4", "eval_every=2", "checkpoint_every=2",
          "keep_checkpoints=2", "pop_devices=1"]


def write_short_hellaswag(path: pathlib.Path, n: int = 3) -> pathlib.Path:
  """HellaSwag-format items (``activity_label``, ``ctx``, 4 ``endings``, ``label``)."""
  rows = [{"ind": i, "activity_label": "Cooking", "ctx": f"He cracks egg {i} and",
           "endings": ["fries it.", "sings.", "flies away.", "eats the pan."], "label": 0}
          for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def make_short_run_assets(root: pathlib.Path) -> types.SimpleNamespace:
  """The tiny checkpoint, GSM8K rows and HellaSwag items that short_run_overrides names."""
  return types.SimpleNamespace(
      root=root,
      checkpoint=make_tiny_checkpoint(root / "ckpt"),
      gsm8k=write_short_gsm8k(root / "gsm8k.jsonl"),
      hellaswag=write_short_hellaswag(root / "hellaswag.jsonl"))

"""What a run is made of: the model, its tokenizer, the tasks and their encoded prompts.

Prompts are tokenized once, left-padded to one length per split, so every
decode call of a run has the same shapes and compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from es_jax.evaluation import get_task
from es_jax.models import Transformer, encode_prompts, load_model, load_tokenizer
from experiments.config import ExperimentConfig

PyTree = Any
# Countdown has no public split to hold out: a disjoint generator seed makes the eval set.
EVAL_SEED_OFFSET = 10_000


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """A task's examples with their prompts tokenized and left-padded to one length."""
  examples: tuple[Any, ...]
  input_ids: np.ndarray      # (n, T) int32
  attention_mask: np.ndarray  # (n, T) int32

  def __len__(self) -> int:
    return len(self.examples)

  def batches(self, indices: Sequence[int], batch_size: int):
    """``(indices, ids, mask)`` batches of exactly ``batch_size`` rows (the last one
    filled by repeating its first row, so a jitted decode never sees a new shape)."""
    indices = np.asarray(indices)
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      filled = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])
      yield chunk, self.input_ids[filled], self.attention_mask[filled]


@dataclasses.dataclass(frozen=True)
class Components:
  """Everything a run needs besides its training state."""
  model: Transformer
  params0: PyTree
  tokenizer: Any
  target_task: Any
  train: PromptSet
  eval: PromptSet
  prior_task: Any | None
  prior_examples: tuple[Any, ...]

  @property
  def eos_ids(self) -> tuple[int, ...]:
    ids = tuple(self.model.config.eos_token_ids)
    return ids or (self.tokenizer.eos_token_id,)


def encode(task: Any, examples: Sequence[Any], tokenizer: Any, chat_template: bool) -> PromptSet:
  prompts = [task.build_prompt(ex, tokenizer if chat_template else None) for ex in examples]
  # The chat prompt is already formatted by build_prompt: no second template here.
  ids, mask = encode_prompts(tokenizer, prompts, pad_to_multiple=16)
  return PromptSet(tuple(examples), ids, mask)


def load_examples(config: ExperimentConfig) -> tuple[list[Any], list[Any]]:
  """Training and held-out examples of the target task."""
  t = config.task
  task = get_task(t.target)
  if t.target == "countdown":
    train = task.load(t.train_source, limit=t.num_train, seed=config.seed)
    held_out = task.load(t.eval_source, limit=t.num_eval, seed=config.seed + EVAL_SEED_OFFSET)
  else:
    train = task.load(t.train_source, split="train", limit=t.num_train, seed=config.seed)
    held_out = task.load(t.eval_source, split="test", limit=t.num_eval, seed=config.seed)
  return train, held_out


def build(config: ExperimentConfig) -> Components:
  """Loads the checkpoint and tokenizer, and the target and prior tasks' data."""
  model, params = load_model(config.model.checkpoint, dtype=jnp.dtype(config.model.dtype),
                             param_dtype=jnp.dtype(config.model.param_dtype))
  tokenizer = load_tokenizer(config.model.checkpoint)
  target_task = get_task(config.task.target)
  train, held_out = load_examples(config)
  chat = config.model.chat_template
  prior_task, prior_examples = None, ()
  if config.task.prior == "hellaswag":
    prior_task = get_task("hellaswag", protocol=config.task.prior_protocol)
    prior_examples = tuple(prior_task.load(config.task.prior_source, limit=config.task.num_prior))
  return Components(model, params, tokenizer, target_task, encode(target_task, train, tokenizer, chat),
                    encode(target_task, held_out, tokenizer, chat), prior_task, prior_examples)


def prompt_indices(config: ExperimentConfig, iteration: int) -> tuple[np.ndarray, int]:
  """The training prompts of ``iteration`` (1-based) and the data position after it.

  All prompts every iteration by default (the papers' ES); with
  ``prompts_per_iteration`` a fresh seeded permutation per epoch, consumed in
  order, so the position alone says where the data stream is.
  """
  n = config.task.num_train
  k = config.task.prompts_per_iteration or n
  if config.algorithm == "grpo":
    k = min(config.grpo.prompts_per_iteration, n)
  start = (iteration - 1) * k
  if k == n and config.algorithm == "es":
    return np.arange(n), start + k
  positions = np.arange(start, start + k)
  epochs = positions // n
  order = {int(e): np.random.default_rng([config.seed, int(e)]).permutation(n)
           for e in np.unique(epochs)}
  return np.array([order[int(e)][p % n] for e, p in zip(epochs, positions)]), start + k

"""What a run is made of: the model, its tokenizer, the tasks and their encoded prompts.

Prompts are tokenized once, left-padded to one length per split, so every
decode call of a run has the same shapes and compiles once.
"""

from __future__ import annotations

import dataclasses
import pathlib
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
# task.prior_source=shipped: the HellaSwag subset shipped for machines without a hub.
SHIPPED_HELLASWAG = pathlib.Path(__file__).parent / "data" / "hellaswag_validation_1000.jsonl.gz"
GENERATED_TARGETS = ("countdown", "arithmetic")


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """A task's examples with their prompts tokenized and left-padded to one length."""
  examples: tuple[Any, ...]
  input_ids: np.ndarray      # (n, T) int32
  attention_mask: np.ndarray  # (n, T) int32

  def __len__(self) -> int:
    return len(self.examples)

  def batches(self, indices: Sequence[int], batch_size: int):
    """``(indices, ids, mask)`` batches of one size (the last one filled by repeating its
    first row, so a jitted decode never sees a new shape).

    The size is the smallest that needs as many batches as ``batch_size`` does: 16
    prompts with ``batch_size=64`` are one batch of 16, not 64 rows of which 48 are
    filler, and 100 prompts are two batches of 50.
    """
    indices = np.asarray(indices)
    if not len(indices):
      return
    num_batches = -(-len(indices) // batch_size)
    batch_size = -(-len(indices) // max(num_batches, 1))
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
  held_out: PromptSet
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


def target_task(config: ExperimentConfig) -> Any:
  """The target task with its options from the config."""
  options = {"shots": config.task.shots} if config.task.target == "arithmetic" else {}
  return get_task(config.task.target, **options)


def prior_source(config: ExperimentConfig) -> str | None:
  """``task.prior_source`` with ``shipped`` resolved to the subset's path."""
  source = config.task.prior_source
  return str(SHIPPED_HELLASWAG) if source == "shipped" else source


def load_examples(config: ExperimentConfig) -> tuple[list[Any], list[Any]]:
  """Training and held-out examples of the target task (arithmetic: its disjoint splits)."""
  t = config.task
  task = target_task(config)
  if t.target == "countdown":
    train = task.load(t.train_source, limit=t.num_train, seed=config.seed)
    held_out = task.load(t.eval_source, limit=t.num_eval, seed=config.seed + EVAL_SEED_OFFSET)
  else:
    train = task.load(t.train_source, split="train", limit=t.num_train, seed=config.seed)
    held_out = task.load(t.eval_source, split="test", limit=t.num_eval, seed=config.seed)
  return train, held_out


def check_sizes(config: ExperimentConfig, train: Sequence[Any], held_out: Sequence[Any],
                prior_examples: Sequence[Any]) -> None:
  """Refuses data with fewer examples than the config asks for, naming the field and the file.

  The loaders keep at most ``num_*`` rows, so a short file would otherwise give
  an ``IndexError`` mid-run (training indexes ``num_train`` prompts) or metrics
  over fewer examples than the config says.

  Example:
    >>> from experiments.config import preset
    >>> check_sizes(preset("countdown_es"), [0] * 200, [], [0] * 500)
    Traceback (most recent call last):
    ValueError: task.num_eval=200 but the eval data (generated countdown problems) is empty; give task.eval_source with at least 200 examples, or lower task.num_eval
  """
  t = config.task
  checks = [("num_train", "train_source", "train", train),
            ("num_eval", "eval_source", "eval", held_out)]
  if t.prior != "none":
    checks.append(("num_prior", "prior_source", "prior", prior_examples))
  for field, source_field, what, examples in checks:
    wanted, source = getattr(t, field), getattr(t, source_field)
    if len(examples) >= wanted:
      continue
    if source is None:
      source = (f"generated {t.target} problems"
                if what != "prior" and t.target in GENERATED_TARGETS
                else f"the hub's default {t.prior if what == 'prior' else t.target} data")
    found = "is empty" if not examples else f"has only {len(examples)}"
    raise ValueError(
        f"task.{field}={wanted} but the {what} data ({source}) {found}"
        f"{'' if not examples else ' examples'}; give task.{source_field} with at least "
        f"{wanted} examples, or lower task.{field}"
        f"{'' if not examples else f' to at most {len(examples)}'}")


def build(config: ExperimentConfig) -> Components:
  """Loads the target and prior tasks' data, checks its size, then the checkpoint and tokenizer.

  Raises:
    ValueError: the data has fewer examples than ``task.num_*`` (before the
      model is loaded).
  """
  target = target_task(config)
  train, held_out = load_examples(config)
  prior_task, prior_examples = None, ()
  if config.task.prior == "hellaswag":
    prior_task = get_task("hellaswag", protocol=config.task.prior_protocol)
    prior_examples = tuple(prior_task.load(prior_source(config), limit=config.task.num_prior))
  check_sizes(config, train, held_out, prior_examples)
  model, params = load_model(config.model.checkpoint, dtype=jnp.dtype(config.model.dtype),
                             param_dtype=jnp.dtype(config.model.param_dtype),
                             scan_layers=config.model.scan_layers)
  tokenizer = load_tokenizer(config.model.checkpoint)
  chat = config.model.chat_template
  return Components(model, params, tokenizer, target, encode(target, train, tokenizer, chat),
                    encode(target, held_out, tokenizer, chat), prior_task, prior_examples)


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

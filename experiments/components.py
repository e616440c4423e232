"""What a run is made of: the model, its tokenizer, the tasks and their encoded prompts.

Prompts are tokenized once, left-padded to one length per split, so every
decode call of a run has the same shapes and compiles once.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from es_jax.evaluation import get_task
from es_jax.models import (Transformer, encode_prompts, eos_ids_of, load_model,
                           load_tokenizer)
from experiments import prior_suite
from experiments.config import ExperimentConfig

PyTree = Any
# Countdown has no public split to hold out: a disjoint generator seed makes the eval set.
EVAL_SEED_OFFSET = 10_000
# task.prior_source=shipped: the subsets shipped for machines without a hub (see data/README.md).
SHIPPED_PRIOR = {name: pathlib.Path(__file__).parent / "data" / file for name, file in (
    ("hellaswag", "hellaswag_validation_1000.jsonl.gz"), ("piqa", "piqa_validation_500.jsonl.gz"),
    ("arc_easy", "arc_easy_test_500.jsonl.gz"))}
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


class Prior(NamedTuple):
  """One prior task (watched for forgetting) and the items it is scored on."""
  name: str
  task: Any
  examples: tuple[Any, ...]
  source: str  # for messages: where the items came from


@dataclasses.dataclass(frozen=True)
class Components:
  """Everything a run needs besides its training state."""
  model: Transformer
  params0: PyTree
  tokenizer: Any
  target_task: Any
  train: PromptSet
  held_out: PromptSet
  priors: tuple[Prior, ...]

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return eos_ids_of(self.model, self.tokenizer)


def encode(task: Any, examples: Sequence[Any], tokenizer: Any, chat_template: bool) -> PromptSet:
  prompts = [task.build_prompt(ex, tokenizer if chat_template else None) for ex in examples]
  # The chat prompt is already formatted by build_prompt: no second template here.
  ids, mask = encode_prompts(tokenizer, prompts, pad_to_multiple=16)
  return PromptSet(tuple(examples), ids, mask)


def target_task(config: ExperimentConfig) -> Any:
  """The target task with its options from the config."""
  options = {"shots": config.task.shots} if config.task.target == "arithmetic" else {}
  return get_task(config.task.target, **options)


def load_priors(config: ExperimentConfig) -> tuple[Prior, ...]:
  """The prior tasks of ``task.prior`` with their items (see ``TaskSpec.prior_source``).

  Raises:
    ValueError: a file given for several tasks, or ``shipped`` for a task with
      no shipped subset.
  """
  t = config.task
  names, source = t.prior_tasks, t.prior_source
  is_root = source not in (None, "shipped") and pathlib.Path(source).is_dir()
  if source not in (None, "shipped") and not is_root and len(names) > 1:
    raise ValueError(f"task.prior_source={source!r} is one file, but task.prior={t.prior!r} "
                     "names several tasks; give a data root directory in the layout of "
                     "../shared/data (or shipped, or none for the hub)")
  priors = []
  for name in names:
    task = get_task(name, protocol=t.prior_protocol)
    options: dict[str, Any] = {"seed": t.prior_seed}
    if source == "shipped":
      if name not in SHIPPED_PRIOR:
        raise ValueError(f"task.prior_source=shipped, but no subset of {name} is shipped (only "
                         f"{', '.join(SHIPPED_PRIOR)}); give a data root directory instead")
      where = str(SHIPPED_PRIOR[name])
    elif is_root:
      where = str(pathlib.Path(source) / prior_suite.LOCAL_FILES[name])
      if name == "mmlu_pro" and t.prior_protocol == "generative":
        options["fewshot_source"] = str(pathlib.Path(source) / prior_suite.MMLU_PRO_FEWSHOT)
    else:
      where = source
    examples = tuple(task.load(where, limit=t.num_prior, **options))
    priors.append(Prior(name, task, examples, where or f"the hub's {name}"))
  return tuple(priors)


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
                priors: Sequence[Prior] = ()) -> None:
  """Refuses data with fewer examples than the config asks for, naming the field and the file.

  The loaders keep at most ``num_*`` rows, so a short file would otherwise give
  an ``IndexError`` mid-run (training indexes ``num_train`` prompts) or metrics
  over fewer examples than the config says.

  Example:
    >>> from experiments.config import preset
    >>> check_sizes(preset("countdown_es"), [0] * 200, [])
    Traceback (most recent call last):
    ValueError: task.num_eval=200 but the eval data (generated countdown problems) is empty; give task.eval_source with at least 200 examples, or lower task.num_eval
  """
  t = config.task
  checks = [("num_train", "train_source", "train", train, t.train_source),
            ("num_eval", "eval_source", "eval", held_out, t.eval_source)]
  checks += [("num_prior", "prior_source", f"{p.name} prior", p.examples, p.source)
             for p in priors]
  for field, source_field, what, examples, source in checks:
    wanted = getattr(t, field)
    if len(examples) >= wanted:
      continue
    if source is None:
      source = (f"generated {t.target} problems" if t.target in GENERATED_TARGETS
                else f"the hub's default {t.target} data")
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
  priors = load_priors(config)
  check_sizes(config, train, held_out, priors)
  model, params = load_model(config.model.checkpoint, dtype=jnp.dtype(config.model.dtype),
                             param_dtype=jnp.dtype(config.model.param_dtype),
                             scan_layers=config.model.scan_layers)
  tokenizer = load_tokenizer(config.model.checkpoint)
  chat = config.model.chat_template
  return Components(model, params, tokenizer, target, encode(target, train, tokenizer, chat),
                    encode(target, held_out, tokenizer, chat), priors)


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

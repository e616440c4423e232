"""The prior-task suite on one model: where each task's data lives, and its base accuracy.

Forgetting can only show on a task the base model is better than chance at, so
a study first measures the base model on every task of
:data:`es_jax.evaluation.PRIOR_SUITE`::

  python -m experiments.prior_suite --model smollm2-135m-instruct --data ../shared/data \\
      --num 200 --out results/prior_baseline.md

It prints, per task, the log-likelihood protocol's headline accuracy (lm-eval's
``acc_norm``, or ``acc`` where lm-eval reports only that) with its binomial
standard error, the chance level of the same items (the mean of ``1 / options``)
and how many standard errors above chance the model is.

A data root (``--data``) holds each task in the layout of ``../shared/data``
(:data:`LOCAL_FILES`); without one, tasks load from the hub by their default names.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from es_jax.evaluation import PRIOR_SUITE, evaluate_loglik, get_task
from es_jax.models import load_model, load_tokenizer, token_logprobs

# Each task's evaluation split in ../shared/data's layout (a root directory holds them all).
LOCAL_FILES = {
    "hellaswag": "hellaswag/validation.jsonl.gz",
    "piqa": "piqa/valid.jsonl",
    "arc_easy": "arc_easy/test.jsonl",
    "arc_challenge": "arc_challenge/test.parquet",
    "mmlu": "mmlu/test",
    "mmlu_pro": "mmlu_pro/test.parquet",
    "winogrande": "winogrande/dev.jsonl",
}
# MMLU-Pro's generative protocol shows worked examples from the validation split (es-awd).
MMLU_PRO_FEWSHOT = "mmlu_pro/validation.parquet"


def load_task_examples(name: str, root: str | pathlib.Path | None, *, limit: int | None,
                       seed: int | None) -> tuple[Any, list[Any]]:
  """The log-likelihood task ``name`` and ``limit`` of its items (a seeded subset if ``seed``).

  Args:
    name: one of :data:`es_jax.evaluation.PRIOR_SUITE`.
    root: a directory in :data:`LOCAL_FILES`' layout, or None for the hub.
    limit: how many items (None: all).
    seed: seed of the random subset; None takes the first ``limit``.
  """
  if name not in LOCAL_FILES:
    raise ValueError(f"unknown prior task {name!r}; the suite is {', '.join(PRIOR_SUITE)}")
  task = get_task(name, protocol="loglik")
  source = None if root is None else pathlib.Path(root) / LOCAL_FILES[name]
  if source is not None and not source.exists():
    raise FileNotFoundError(f"{name}: {source} does not exist; --data must be a directory in "
                            "the layout of ../shared/data (see experiments.prior_suite.LOCAL_FILES)")
  return task, task.load(source, limit=limit, seed=seed)


def chance(examples: Sequence[Any]) -> float:
  """The accuracy of a uniform guess on these items: the mean of ``1 / options``."""
  counts = [len(ex.endings) if hasattr(ex, "endings") else len(ex.options) for ex in examples]
  return sum(1 / k for k in counts) / len(counts)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="a checkpoint directory, a .gguf file or a packaged model name")
  parser.add_argument("--data", type=pathlib.Path, default=None,
                      help="a data root in ../shared/data's layout (default: the hub)")
  parser.add_argument("--tasks", default=",".join(PRIOR_SUITE), help="comma-separated")
  parser.add_argument("--num", type=int, default=200, help="items per task")
  parser.add_argument("--seed", type=int, default=0, help="seed of each task's item subset")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the table here")
  args = parser.parse_args(argv)
  if args.num < 1:
    parser.error(f"--num must be >= 1, got {args.num}")
  model, params = load_model(args.model, dtype="float32")
  tokenizer = load_tokenizer(args.model)
  logprobs_fn = functools.partial(jax.jit(token_logprobs, static_argnums=0), model, params)
  lines = ["| task | items | accuracy (metric) | SE | chance | z above chance | s |",
           "|---|---|---|---|---|---|---|"]
  for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
    start = time.perf_counter()
    try:
      task, examples = load_task_examples(name, args.data, limit=args.num, seed=args.seed)
    except (ValueError, OSError) as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
    result = evaluate_loglik(task, examples, None, tokenizer, batch_size=args.batch_size,
                             logprobs_fn=logprobs_fn, progress=False)
    metric = task.headline  # the metric that "accuracy" is
    p, n = float(result.summary.metrics["accuracy"]), len(examples)
    se = math.sqrt(p * (1 - p) / n)
    base = chance(examples)
    z = (p - base) / se if se > 0 else math.inf
    lines.append(f"| {name} | {n} | {p:.3f} ({metric}) | {se:.3f} | {base:.3f} | {z:+.1f} "
                 f"| {time.perf_counter() - start:.0f} |")
    print(lines[-1], flush=True)
  table = "\n".join(lines)
  print(table)
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

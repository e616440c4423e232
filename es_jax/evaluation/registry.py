"""Tasks by name: ``get_task("countdown")``, ``get_task("hellaswag", protocol="generative")``,
``get_task("mmlu_pro")``; :data:`~es_jax.evaluation.suite.PRIOR_SUITE` names the prior tasks."""

from __future__ import annotations

from typing import Any

from es_jax.evaluation.arithmetic import ArithmeticTask
from es_jax.evaluation.countdown import CountdownTask
from es_jax.evaluation.gsm8k import GSM8KTask
from es_jax.evaluation.hellaswag import HellaSwagTask
from es_jax.evaluation.suite import (ARCChallengeTask, ARCEasyTask, MMLUProTask, MMLUTask, PIQATask,
                                     WinoGrandeTask)

TASKS: dict[str, type] = {
    "arc_challenge": ARCChallengeTask,
    "arc_easy": ARCEasyTask,
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "gsm8k": GSM8KTask,
    "hellaswag": HellaSwagTask,
    "mmlu": MMLUTask,
    "mmlu_pro": MMLUProTask,
    "piqa": PIQATask,
    "winogrande": WinoGrandeTask,
}


def get_task(name: str, **kwargs: Any) -> Any:
  """Makes a task by name, passing ``kwargs`` to its constructor.

  Args:
    name: a key of :data:`TASKS`, e.g. ``"gsm8k"`` or ``"arc_challenge"``
      (case-insensitive; ``-`` reads as ``_``, so es-awd's ``"mmlu-pro"`` works).
    **kwargs: task options, e.g. ``protocol="generative"`` for HellaSwag and the
      prior-task suite, or ``mode="strict"`` for GSM8K.

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or an
      option the task does not have.

  Example:
    >>> get_task("hellaswag", protocol="generative").protocol
    'generative'
    >>> get_task("ARC-Challenge").name
    'arc_challenge'
  """
  key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
  if key not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  try:
    return TASKS[key](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad options for task '{key}': {e}") from e

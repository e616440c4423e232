"""Tasks by name: ``get_task("countdown")``, ``get_task("hellaswag", protocol="generative")``."""

from __future__ import annotations

from typing import Any

from es_jax.evaluation.arithmetic import ArithmeticTask
from es_jax.evaluation.countdown import CountdownTask
from es_jax.evaluation.gsm8k import GSM8KTask
from es_jax.evaluation.hellaswag import HellaSwagTask

TASKS: dict[str, type] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "gsm8k": GSM8KTask,
    "hellaswag": HellaSwagTask,
}


def get_task(name: str, **kwargs: Any) -> Any:
  """Makes a task by name, passing ``kwargs`` to its constructor.

  Args:
    name: one of ``"arithmetic"``, ``"countdown"``, ``"gsm8k"``, ``"hellaswag"`` (case-insensitive).
    **kwargs: task options, e.g. ``protocol="generative"`` for HellaSwag or
      ``mode="strict"`` for GSM8K.

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or an
      option the task does not have.

  Example:
    >>> get_task("hellaswag", protocol="generative").protocol
    'generative'
  """
  key = name.strip().lower() if isinstance(name, str) else name
  if key not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  try:
    return TASKS[key](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad options for task '{key}': {e}") from e

"""Checks shared by the config sections: a ``ValueError`` naming the field, never a silent fix."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def check(ok: bool, message: str) -> None:
  """Raises ``ValueError(message)`` unless ``ok``."""
  if not ok:
    raise ValueError(message)


def check_finite(spec: Any, section: str) -> None:
  """Every float field of the dataclass ``spec`` is finite.

  ``inf``/``nan`` parse as floats and would pass range checks (``inf > 0``),
  then train NaN weights to the end without an error.

  Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Spec:
    ...   rate: float = 1.0
    >>> check_finite(Spec(float("inf")), "es.")
    Traceback (most recent call last):
    ValueError: es.rate=inf must be a finite number
  """
  for field in dataclasses.fields(spec):
    value = getattr(spec, field.name)
    check(not (isinstance(value, float) and not math.isfinite(value)),
          f"{section}{field.name}={value} must be a finite number")

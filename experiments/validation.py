"""Checks shared by the config sections: a ``ValueError`` naming the field, never a silent fix."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

F32 = np.finfo(np.float32)
# Counts become JAX array dimensions and int32 indices; a larger one crashes late and raw.
INT32_MAX = int(np.iinfo(np.int32).max)


def check(ok: bool, message: str) -> None:
  """Raises ``ValueError(message)`` unless ``ok``."""
  if not ok:
    raise ValueError(message)


def check_numbers(spec: Any, section: str, limits: Mapping[str, int] | None = None) -> None:
  """Every float field of the dataclass ``spec`` is finite and in float32's range; every int
  field is at most its limit in ``limits`` (default: the int32 maximum) in magnitude.

  ``inf``/``nan`` parse as floats and would pass range checks (``inf > 0``),
  then train NaN weights to the end without an error. The run computes in
  float32, where ``1e-300`` is 0 (a norm cap of 1e-300 pins the weights to
  theta_0) and ``1e39`` is inf; so a nonzero magnitude must lie in
  ``[1.2e-38, 3.4e38]``, float32's normal range.

  Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Spec:
    ...   rate: float = 1.0
    ...   size: int = 1
    >>> check_numbers(Spec(float("inf")), "es.")
    Traceback (most recent call last):
    ValueError: es.rate=inf must be a finite number
    >>> check_numbers(Spec(1e-300), "es.")
    Traceback (most recent call last):
    ValueError: es.rate=1e-300 is outside float32's range (0, or a magnitude in [1.18e-38, 3.4e+38]), which the run computes in: it would act as 0 or inf
    >>> check_numbers(Spec(size=10**6), "es.", {"size": 1000})
    Traceback (most recent call last):
    ValueError: es.size=1000000 is too large: at most 1000
  """
  limits = limits or {}
  for field in dataclasses.fields(spec):
    name, value = field.name, getattr(spec, field.name)
    where = f"{section}{name}={value!r}"
    if isinstance(value, float):
      check(math.isfinite(value), f"{section}{name}={value} must be a finite number")
      check(value == 0 or float(F32.tiny) <= abs(value) <= float(F32.max),
            f"{where} is outside float32's range (0, or a magnitude in "
            f"[{float(F32.tiny):.3g}, {float(F32.max):.3g}]), which the run computes in: it "
            "would act as 0 or inf")
    elif isinstance(value, int) and not isinstance(value, bool):
      limit = limits.get(name, INT32_MAX)
      check(abs(value) <= limit, f"{where} is too large: at most {limit}")

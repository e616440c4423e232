"""Argument checks shared by the core factories: hyperparameters of any numeric type.

Python, NumPy and concrete JAX scalars are all accepted and returned as Python
numbers (so that static configs stay hashable); bools are refused where a
number is meant, and so are traced values unless the caller allows them.

Example:
  >>> import numpy as np
  >>> integer("population", np.int64(8), minimum=2)
  8
  >>> real("sigma", np.float32(0.5))
  0.5
  >>> integer("population", True, minimum=2)
  Traceback (most recent call last):
  ...
  TypeError: population must be an integer, got True of type bool.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import jax
import numpy as np


def is_traced(value: Any) -> bool:
  """Whether ``value`` is an abstract JAX value (inside jit/vmap), whose number is unknown."""
  return isinstance(value, jax.core.Tracer)


def _scalar(name: str, value: Any, what: str, kinds: tuple[type, ...], dtype_kinds: str):
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}.")
  if isinstance(value, kinds):
    return value
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    shape, kind = np.shape(value), np.dtype(value.dtype).kind
    if shape == () and kind in dtype_kinds:
      if is_traced(value):
        raise TypeError(f"{name} must be a concrete number, got a traced value; pass a Python "
                        "or NumPy number, not one computed inside jit/vmap.")
      return value.item()
    raise TypeError(f"{name} must be {what}, got an array of shape {shape} and dtype "
                    f"{value.dtype}.")
  raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}.")


def integer(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
  """``value`` as a Python int in ``[minimum, maximum]`` (int, NumPy or 0-d JAX integer).

  Example:
    >>> integer("seed", 2**32, minimum=0, maximum=2**32 - 1)
    Traceback (most recent call last):
    ...
    ValueError: seed must be an integer in [0, 4294967295], got 4294967296.
  """
  value = int(_scalar(name, value, "an integer", (numbers.Integral,), "iu"))
  if maximum is not None and not minimum <= value <= maximum:
    raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value}.")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}.")
  return value


def real(name: str, value: Any) -> float:
  """``value`` as a Python float (int, float, NumPy or 0-d JAX number); range is the caller's."""
  return float(_scalar(name, value, "a real number", (numbers.Real,), "iuf"))


def finite_real(name: str, value: Any, *, positive: bool) -> float:
  """A finite real number, ``> 0`` if ``positive`` else ``>= 0``."""
  value = real(name, value)
  if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
    raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value}.")
  return value


def real_in(name: str, value: Any, *, low: float, high: float = math.inf,
            low_open: bool = False) -> float:
  """A finite real number in ``[low, high]`` (``(low, high]`` if ``low_open``).

  Example:
    >>> real_in("fraction", np.float32(0.25), low=0.0, high=1.0, low_open=True)
    0.25
  """
  value = real(name, value)
  below = value <= low if low_open else value < low
  if not math.isfinite(value) or below or value > high:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}.")
  return value


def choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Refuses ``value`` unless it is one of ``choices``, listing them."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def regexes(name: str, value: Any) -> tuple[str, ...]:
  """A regex, or a tuple or list of them, as a tuple of strings that compile (else refused).

  Example:
    >>> regexes("freeze", ("embed", "("))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: freeze holds an invalid regex '(': missing ), unterminated subpattern at ...
  """
  patterns = (value,) if isinstance(value, str) else value
  if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
    raise TypeError(f"{name} must be a tuple of regex strings, got {value!r}.")
  for pattern in patterns:
    # Compiled now, not at the first match: re.error is no ValueError, a huge repeat
    # count overflows and deep nesting recurses.
    try:
      re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
      raise ValueError(f"{name} holds an invalid regex {pattern!r}: {e}. Fix it, or escape a "
                       "literal name with re.escape.") from None
  return tuple(patterns)

"""Lengths padded to buckets, so that jit compiles once per bucket rather than once per length.

Shared by the text API (:mod:`es_jax.models.generate`) and log-likelihood scoring
(:mod:`es_jax.evaluation.loglik`), which must not import each other.
"""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
  """``n`` rounded up to a multiple of ``multiple`` (at least one multiple).

  Example:
    >>> round_up(17, 16), round_up(0, 16), round_up(32, 16)
    (32, 16, 32)
  """
  return max(1, -(-n // multiple)) * multiple

"""A safe evaluator for integer arithmetic: no eval, exact fractions, hard bounds.

The published Countdown reward runs Python ``eval`` on model output, so a
completion such as ``9**9**9**9`` hangs the process. This module parses with a
small recursive-descent parser instead and evaluates with
:class:`fractions.Fraction`, so ``7 / 2`` is exactly ``7/2``.

Grammar (spaces allowed between tokens)::

  expr    := term (('+' | '-') term)*
  term    := unary (('*' | '/') unary)*
  unary   := ('+' | '-') unary | primary
  primary := INTEGER | '(' expr ')'

Anything else is rejected, in particular ``**`` and ``//`` (the Countdown prompt
allows only ``+ - * /``), unicode digits, decimals and Python's leading-zero
literals such as ``07`` (a syntax error for ``eval`` too). Every failure,
including division by zero, raises :class:`UnsafeExpressionError`.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

_ASCII_DIGITS = frozenset("0123456789")
_OPERATORS = frozenset("+-*/()")


@dataclasses.dataclass(frozen=True)
class ArithLimits:
  """Bounds that keep evaluation cheap whatever the input.

  Attributes:
    max_chars: longest accepted expression, in characters.
    max_depth: deepest nesting of parentheses and unary signs together.
    max_digits: most digits in one integer literal.
    max_bits: largest bit length of the numerator or denominator of any
      intermediate result; with no ``**`` the other bounds already keep
      values small, this is the last line of defence.
  """
  max_chars: int = 512
  max_depth: int = 64
  max_digits: int = 32
  max_bits: int = 1024


DEFAULT_LIMITS = ArithLimits()


class UnsafeExpressionError(ValueError):
  """The expression is malformed, out of bounds, or divides by zero."""


def tokenize(expression: str, limits: ArithLimits = DEFAULT_LIMITS) -> list[str]:
  """Splits an expression into integer literals and single-character operators.

  Args:
    expression: text made only of ASCII digits, ``+ - * / ( )`` and spaces.
    limits: bounds on length and literal size.

  Returns:
    The tokens, e.g. ``['(', '1', '+', '2', ')']``.

  Raises:
    UnsafeExpressionError: on any other character, an over-long expression or
      literal, or a literal with a leading zero.

  Example:
    >>> tokenize("(1 + 23)*4")
    ['(', '1', '+', '23', ')', '*', '4']
  """
  if not isinstance(expression, str):
    raise UnsafeExpressionError(f"expected a str, got {type(expression).__name__}")
  if len(expression) > limits.max_chars:
    raise UnsafeExpressionError(
        f"expression has {len(expression)} characters; the limit is {limits.max_chars}")
  tokens: list[str] = []
  i = 0
  n = len(expression)
  while i < n:
    ch = expression[i]
    if ch == " ":
      i += 1
    elif ch in _OPERATORS:
      tokens.append(ch)
      i += 1
    elif ch in _ASCII_DIGITS:
      j = i
      while j < n and expression[j] in _ASCII_DIGITS:
        j += 1
      literal = expression[i:j]
      if len(literal) > limits.max_digits:
        raise UnsafeExpressionError(
            f"integer literal of {len(literal)} digits; the limit is {limits.max_digits}")
      # Python rejects '07' but accepts '00'; match eval so scores agree with the reference.
      if len(literal) > 1 and literal[0] == "0" and literal.strip("0"):
        raise UnsafeExpressionError(f"integer literal {literal!r} has a leading zero")
      tokens.append(literal)
      i = j
    else:
      raise UnsafeExpressionError(f"character {ch!r} at position {i} is not allowed")
  return tokens


class _Parser:
  """Recursive-descent evaluator over a token list (see the module grammar)."""

  def __init__(self, tokens: list[str], limits: ArithLimits):
    self._tokens = tokens
    self._pos = 0
    self._depth = 0
    self._limits = limits

  def parse(self) -> Fraction:
    if not self._tokens:
      raise UnsafeExpressionError("empty expression")
    value = self._expr()
    if self._pos != len(self._tokens):
      raise UnsafeExpressionError(
          f"unexpected token {self._tokens[self._pos]!r} at token {self._pos}")
    return value

  def _peek(self) -> str | None:
    return self._tokens[self._pos] if self._pos < len(self._tokens) else None

  def _take(self) -> str:
    token = self._peek()
    if token is None:
      raise UnsafeExpressionError("expression ends too early")
    self._pos += 1
    return token

  def _checked(self, value: Fraction) -> Fraction:
    if (value.numerator.bit_length() > self._limits.max_bits
        or value.denominator.bit_length() > self._limits.max_bits):
      raise UnsafeExpressionError(
          f"intermediate result exceeds {self._limits.max_bits} bits")
    return value

  def _enter(self) -> None:
    self._depth += 1
    if self._depth > self._limits.max_depth:
      raise UnsafeExpressionError(f"nesting deeper than {self._limits.max_depth}")

  def _expr(self) -> Fraction:
    value = self._term()
    while self._peek() in ("+", "-"):
      op = self._take()
      rhs = self._term()
      value = self._checked(value + rhs if op == "+" else value - rhs)
    return value

  def _term(self) -> Fraction:
    value = self._unary()
    while self._peek() in ("*", "/"):
      op = self._take()
      rhs = self._unary()
      if op == "*":
        value = self._checked(value * rhs)
      elif rhs == 0:
        raise UnsafeExpressionError("division by zero")
      else:
        value = self._checked(value / rhs)
    return value

  def _unary(self) -> Fraction:
    if self._peek() in ("+", "-"):
      op = self._take()
      self._enter()
      operand = self._unary()
      self._depth -= 1
      return -operand if op == "-" else operand
    return self._primary()

  def _primary(self) -> Fraction:
    token = self._take()
    if token == "(":
      self._enter()
      value = self._expr()
      if self._take() != ")":
        raise UnsafeExpressionError("missing ')'")
      self._depth -= 1
      return value
    if token[0] in _ASCII_DIGITS:
      return Fraction(int(token))
    raise UnsafeExpressionError(f"unexpected token {token!r} at token {self._pos - 1}")


def evaluate(expression: str, limits: ArithLimits = DEFAULT_LIMITS) -> Fraction:
  """Evaluates an integer arithmetic expression exactly.

  Args:
    expression: e.g. ``"(1 + 2) / 3"``; see the module docstring for the grammar.
    limits: bounds on length, nesting, literal size and intermediate magnitude.

  Returns:
    The exact value as a Fraction.

  Raises:
    UnsafeExpressionError: if the expression is not in the grammar, breaks a
      bound, or divides by zero.

  Example:
    >>> evaluate("(1 + 2) / 4")
    Fraction(3, 4)
  """
  return _Parser(tokenize(expression, limits), limits).parse()


def try_evaluate(expression: str, limits: ArithLimits = DEFAULT_LIMITS) -> Fraction | None:
  """Like :func:`evaluate` but returns None instead of raising on bad input.

  Example:
    >>> try_evaluate("9**9**9**9") is None
    True
  """
  try:
    return evaluate(expression, limits)
  except UnsafeExpressionError:
    return None

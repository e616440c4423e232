"""Log-likelihood of continuations given contexts, for any model exposed as a logits function.

The model is a plain callable (see :class:`LogitsFn`), so a Flax port, a jitted
population member or a PyTorch reference all plug in the same way.
Tokenization follows lm-eval's ``_encode_pair``: trailing spaces of the
context move onto the continuation; the continuation's tokens are those of
``context + continuation`` after the context's tokens; an empty context is
replaced by one prefix token (BOS, else EOS). Batches are right-padded to a
length rounded up to a multiple of ``bucket`` and filled to exactly
``batch_size`` rows (repeating a real row), so a jitted model compiles once
per bucket, not once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from tqdm.auto import tqdm

from es_jax._buckets import round_up


class LogitsFn(Protocol):
  """``logits_fn(input_ids, attention_mask) -> logits``.

  ``input_ids`` is int32 ``[B, T]``, ``attention_mask`` is int32 ``[B, T]``
  (1 = real token, right padding), and the result is ``[B, T, V]`` next-token
  logits (any float dtype; converted to float32 here). Position ``t`` predicts
  token ``t + 1``.
  """

  def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Any:
    ...


class TokenLogprobsFn(Protocol):
  """``logprobs_fn(input_ids, attention_mask) -> log_probs``: ``[B, T]`` float,
  ``log p(input_ids[:, t] | input_ids[:, :t])`` (any value in column 0 and at padding),
  e.g. ``functools.partial(es_jax.models.token_logprobs, model, params)`` jitted.

  The alternative to a :class:`LogitsFn` that keeps the ``[B, T, V]`` logits on
  the device: with a 49k-token vocabulary they are ~200 KB per token to copy
  to the host and normalise there, which dominated HellaSwag's scoring time.
  """

  def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Any:
    ...


class ChoiceLoglik(NamedTuple):
  """The score of one (context, continuation) request.

  Attributes:
    sum_logprob: sum of the continuation tokens' log-probabilities.
    num_tokens: number of continuation tokens.
    num_chars: ``len(continuation)`` in characters, as passed in.
  """
  sum_logprob: float
  num_tokens: int
  num_chars: int


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
  """Tokenizes a request the lm-eval way; returns (context ids, continuation ids).

  Example:
    >>> from es_jax.models.tokenizer import char_tokenizer
    >>> ctx, cont = encode_pair(char_tokenizer(), "ab ", "c")
    >>> len(ctx), len(cont)  # the space moved onto the continuation
    (2, 2)
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens).input_ids
  context_ids = tokenizer(context, add_special_tokens=add_special_tokens).input_ids
  return list(context_ids), list(whole[len(context_ids):])


def _prefix_token_id(tokenizer: Any) -> int:
  for token_id in (getattr(tokenizer, "bos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
    if token_id is not None:
      return int(token_id)
  raise ValueError("an empty context needs a prefix token, but the tokenizer has neither "
                   "bos_token_id nor eos_token_id")


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float32)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score_continuations(logits_fn: LogitsFn | None, tokenizer: Any,
                        requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                        bucket: int = 16, max_length: int | None = None,
                        add_special_tokens: bool = False,
                        progress: bool | None = None,
                        logprobs_fn: TokenLogprobsFn | None = None) -> list[ChoiceLoglik]:
  """Scores ``log p(continuation | context)`` for each request, batched and padded.

  Args:
    logits_fn: the model, see :class:`LogitsFn`; None when ``logprobs_fn`` is given.
    tokenizer: a Hugging Face tokenizer.
    requests: (context, continuation) pairs.
    batch_size: rows per call of ``logits_fn`` (every call gets exactly this many).
    bucket: sequence lengths are rounded up to a multiple of this.
    max_length: the model's context size; longer inputs lose tokens on the
      left, as in lm-eval. None means no limit.
    add_special_tokens: passed to the tokenizer (lm-eval passes False for
      causal models unless the model needs a BOS token).
    progress: show a tqdm bar; None shows it when there are more than 50 batches.
    logprobs_fn: the model as per-token log-probabilities (see
      :class:`TokenLogprobsFn`), instead of ``logits_fn``. It reads the whole
      ``context + continuation`` (one token more than ``logits_fn``), so under
      ``max_length`` truncation it sees one context token less.

  Returns:
    One :class:`ChoiceLoglik` per request, in the input order.

  Example:
    >>> import numpy as np
    >>> from es_jax.models.tokenizer import char_tokenizer
    >>> uniform = lambda ids, mask: np.zeros(ids.shape + (103,), np.float32)
    >>> out = score_continuations(uniform, char_tokenizer(), [("ab", " cd")])
    >>> round(float(out[0].sum_logprob / np.log(1 / 103)), 6), out[0].num_tokens, out[0].num_chars
    (3.0, 3, 3)
  """
  if batch_size < 1 or bucket < 1:
    raise ValueError(f"batch_size and bucket must be >= 1, got {batch_size} and {bucket}")
  if (logits_fn is None) == (logprobs_fn is None):
    raise ValueError("give the model as exactly one of logits_fn and logprobs_fn")
  # A logits function predicts token t + 1 at t, so it reads all but the last token; a
  # log-prob function scores token t at t, so it reads them all.
  drop_last = logprobs_fn is None
  encoded = []
  for i, request in enumerate(requests):
    if (not isinstance(request, (tuple, list)) or len(request) != 2
        or not all(isinstance(part, str) for part in request)):
      raise ValueError(f"request {i} should be a (context, continuation) pair of strings, "
                       f"got {request!r:.120}")
    context_ids, continuation_ids = encode_pair(tokenizer, request[0], request[1],
                                                add_special_tokens=add_special_tokens)
    if not context_ids:
      context_ids = [_prefix_token_id(tokenizer)]
    if max_length is not None and len(continuation_ids) > max_length - (not drop_last):
      raise ValueError(f"request {i}: continuation has {len(continuation_ids)} tokens, more "
                       f"than max_length={max_length} allows")
    # Keep at most max_length of the tokens the model reads.
    inputs = context_ids + continuation_ids
    inputs = inputs[:-1] if drop_last else inputs
    if max_length is not None:
      inputs = inputs[-max_length:]
    encoded.append((inputs, continuation_ids))

  # Longest first, so each batch holds similar lengths (as lm-eval does).
  order = sorted(range(len(encoded)), key=lambda k: -len(encoded[k][0]))
  results: list[ChoiceLoglik | None] = [None] * len(encoded)
  batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
  show = len(batches) > 50 if progress is None else progress
  for batch in tqdm(batches, desc="loglik", disable=not show):
    length = round_up(max(len(encoded[k][0]) for k in batch), bucket)
    if max_length is not None:
      length = min(length, max(max_length, 1))
    input_ids = np.zeros((batch_size, length), np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is not None:
      input_ids[:] = pad_id
    rows = batch + [batch[0]] * (batch_size - len(batch))  # filler rows are discarded
    for r, k in enumerate(rows):
      inputs = encoded[k][0]
      input_ids[r, :len(inputs)] = inputs
      attention_mask[r, :len(inputs)] = 1
    if drop_last:
      logits = np.asarray(logits_fn(input_ids, attention_mask))
      if logits.ndim != 3 or logits.shape[:2] != (batch_size, length):
        raise ValueError(f"logits_fn returned shape {logits.shape}; expected "
                         f"({batch_size}, {length}, vocab)")
    else:
      token_logprobs = np.asarray(logprobs_fn(input_ids, attention_mask), np.float32)
      if token_logprobs.shape != (batch_size, length):
        raise ValueError(f"logprobs_fn returned shape {token_logprobs.shape}; expected "
                         f"({batch_size}, {length})")
    for r, k in enumerate(batch):
      inputs, continuation_ids = encoded[k]
      n = len(continuation_ids)
      if n == 0:
        results[k] = ChoiceLoglik(0.0, 0, len(requests[k][1]))
        continue
      end = len(inputs)
      if drop_last:
        logprobs = _log_softmax_rows(logits[r, end - n:end])[np.arange(n), continuation_ids]
      else:
        logprobs = token_logprobs[r, end - n:end]
      results[k] = ChoiceLoglik(float(logprobs.sum(dtype=np.float64)), n, len(requests[k][1]))
  return results  # type: ignore[return-value]

"""Text in, text out: prompts tokenized into buckets, decoded, completions cut at stop strings.

The token-level decoding (:func:`decode`, :func:`decode_population`) is
:mod:`es_jax.models.decoding`'s; its names are re-exported here. Prompt lengths
are rounded up to a multiple of ``pad_to_multiple`` so a training loop
compiles once per bucket. Stop strings are applied on the host after decoding
(truncation); EOS ids end rows early on device.

Example::

  model, params = load_model("Qwen/Qwen2.5-0.5B-Instruct")
  tok = load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
  generate_text(model, params, tok, ["What is 2+3?"], chat_template=True, max_new_tokens=32)

  noise = jax.vmap(lambda i: es_jax.member_noise(state, params, i))(jnp.arange(N))
  generate_text_population(model, params, tok, prompts, noise, max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from es_jax._buckets import round_up
from es_jax.models.decoding import DecodeOutput
from es_jax.models.decoding import DecodeSettings
from es_jax.models.decoding import decode
from es_jax.models.decoding import decode_population
from es_jax.models.decoding import sample_token
from es_jax.models.transformer import Transformer

__all__ = [
    "completion_texts",
    "encode_prompts",
    "generate_text",
    "generate_text_population",
    # re-exported from es_jax.models.decoding
    "DecodeOutput",
    "DecodeSettings",
    "decode",
    "decode_population",
    "sample_token",
]

PyTree = Any


def encode_prompts(tokenizer: Any, prompts: Sequence[Any], *, chat_template: bool = False,
                   pad_to_multiple: int = 32, pad_id: int | None = None):
  """Tokenizes and left-pads prompts to a bucketed length.

  Args:
    tokenizer: a Hugging Face tokenizer.
    prompts: strings, or (with ``chat_template``) strings or message lists
      ``[{"role": ..., "content": ...}, ...]``; a string becomes one user turn.
    chat_template: format with ``tokenizer.apply_chat_template`` and the
      generation prompt (its special tokens come from the template).
    pad_to_multiple: the padded length is a multiple of this.
    pad_id: filler id (default the tokenizer's pad, else EOS, else 0).

  Returns:
    ``(input_ids, attention_mask)`` int32 numpy arrays ``(B, T)``.

  Example:
    >>> from es_jax.models.tokenizer import char_tokenizer
    >>> ids, mask = encode_prompts(char_tokenizer(), ["ab", "abc"], pad_to_multiple=4)
    >>> mask.tolist()
    [[0, 0, 1, 1], [0, 1, 1, 1]]
  """
  rows = []
  for prompt in prompts:
    if chat_template:
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
      text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
      if not isinstance(prompt, str):
        raise TypeError("prompts must be strings without chat_template, got "
                        f"{type(prompt).__name__}.")
      rows.append(tokenizer(prompt)["input_ids"])
  if pad_id is None:
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  length = round_up(max(len(r) for r in rows), pad_to_multiple)
  input_ids = np.full((len(rows), length), pad_id, np.int32)
  attention_mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if row:
      input_ids[i, -len(row):] = row
      attention_mask[i, -len(row):] = 1
  return input_ids, attention_mask


def completion_texts(tokenizer: Any, tokens, lengths, eos_ids: Sequence[int] = (),
                     stop: Sequence[str] = ()) -> list[str]:
  """Text of each row: tokens up to (not including) EOS, cut before the first stop string.

  Example:
    >>> import numpy as np
    >>> from es_jax.models.tokenizer import char_tokenizer
    >>> tok = char_tokenizer()
    >>> ids = np.array([tok("12+3=15").input_ids])
    >>> completion_texts(tok, ids, np.array([7]), stop=["="])
    ['12+3']
  """
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  eos = set(int(i) for i in eos_ids)
  texts = []
  for row, n in zip(tokens, lengths):
    row = [int(t) for t in row[:n]]
    if row and row[-1] in eos:
      row = row[:-1]
    text = tokenizer.decode(row, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s and s in text]
    texts.append(text[:min(cuts)] if cuts else text)
  return texts


def eos_ids_of(model: Transformer, tokenizer: Any,
               eos_ids: Sequence[int] | None = None) -> tuple[int, ...]:
  """The tokens that end a completion: ``eos_ids`` if given, else the model config's
  and the tokenizer's end-of-sequence ids together (a chat model may end a turn on either).
  """
  if eos_ids is not None:
    return tuple(eos_ids)
  ids = list(model.config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.append(tokenizer.eos_token_id)
  return tuple(dict.fromkeys(ids))


def generate_text(model: Transformer, params: PyTree, tokenizer: Any, prompts: Sequence[Any], *,
                  max_new_tokens: int, noise: PyTree | None = None, chat_template: bool = False,
                  temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
                  stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None,
                  pad_to_multiple: int = 32) -> list[str]:
  """Completions of ``prompts`` (one string each) from one model or one member.

  Args:
    model, params: the decoder and its params.
    tokenizer: e.g. from :func:`es_jax.models.tokenizer.load_tokenizer`.
    prompts: strings, or message lists with ``chat_template``.
    max_new_tokens: tokens per completion at most.
    noise: one member's perturbation, or None.
    chat_template: apply the tokenizer's chat template with a generation prompt.
    temperature, top_p, key: sampling (``temperature=0`` is greedy).
    stop: stop strings; the text is cut before the first one.
    eos_ids: default the config's EOS ids plus the tokenizer's.
    pad_to_multiple: prompt-length bucket (one compiled program per bucket).

  Example:
    >>> import jax
    >>> from es_jax.models.config import ModelConfig
    >>> from es_jax.models.tokenizer import char_tokenizer
    >>> from es_jax.models.transformer import Transformer, init_params
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1, vocab_size=103,
    ...     hidden_size=16, intermediate_size=8, num_heads=2, head_dim=8, eos_token_ids=(2,))
    >>> model = Transformer(cfg)
    >>> params = init_params(model, jax.random.key(0))
    >>> texts = generate_text(model, params, char_tokenizer(), ["1+1="], max_new_tokens=4)
    >>> len(texts), isinstance(texts[0], str)
    (1, True)
  """
  ids, mask = encode_prompts(tokenizer, prompts, chat_template=chat_template,
                             pad_to_multiple=pad_to_multiple)
  eos = eos_ids_of(model, tokenizer, eos_ids)
  out = decode(model, params, ids, mask, noise=noise, max_new_tokens=max_new_tokens, key=key,
               temperature=temperature, top_p=top_p, eos_ids=eos)
  return completion_texts(tokenizer, out.tokens, out.lengths, eos, stop)


def generate_text_population(model: Transformer, params: PyTree, tokenizer: Any,
                             prompts: Sequence[Any], noise: PyTree, *, max_new_tokens: int,
                             chat_template: bool = False, temperature: float = 0.0,
                             top_p: float = 1.0, key: jax.Array | None = None,
                             stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None,
                             pad_to_multiple: int = 32) -> list[list[str]]:
  """Completions of ``prompts`` for every member: ``result[member][prompt]``.

  Same arguments as :func:`generate_text`, with ``noise`` the members'
  stacked perturbations (see :func:`decode_population`).

  Example::

    noise = jax.vmap(lambda i: es_jax.member_noise(state, params, i))(jnp.arange(N))
    texts = generate_text_population(model, params, tok, prompts, noise, max_new_tokens=64)
  """
  ids, mask = encode_prompts(tokenizer, prompts, chat_template=chat_template,
                             pad_to_multiple=pad_to_multiple)
  eos = eos_ids_of(model, tokenizer, eos_ids)
  out = decode_population(model, params, noise, ids, mask, max_new_tokens=max_new_tokens,
                          key=key, temperature=temperature, top_p=top_p, eos_ids=eos)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [completion_texts(tokenizer, t, n, eos, stop) for t, n in zip(tokens, lengths)]

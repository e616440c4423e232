"""Tokenizers: Hugging Face AutoTokenizer for checkpoints, a character tokenizer for tiny models.

The character tokenizer lets the offline demo and the tests build a complete
model + tokenizer pair from nothing: one token per printable ASCII character,
plus Qwen-style special tokens and a ChatML chat template.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from es_jax.models import gguf

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def char_tokenizer() -> PreTrainedTokenizerFast:
  """A character-level tokenizer over printable ASCII with ChatML special tokens.

  Ids 0-2 are ``<|endoftext|>`` (pad), ``<|im_start|>`` and ``<|im_end|>`` (eos);
  characters follow in ``string.printable`` order (103 tokens in all). Unknown
  characters map to the pad id.

  Example:
    >>> tok = char_tokenizer()
    >>> tok.decode(tok("12+3").input_ids)
    '12+3'
  """
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for ch in string.printable:
    vocab.setdefault(ch, len(vocab))
  core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
  core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  core.decoder = decoders.Fuse()
  tok = PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[2])
  tok.add_special_tokens({"additional_special_tokens": [SPECIAL_TOKENS[1]]})
  tok.chat_template = CHATML_TEMPLATE
  return tok


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
  """Loads a checkpoint's tokenizer (local directory or hub id) with left padding for decoding.

  A ``.gguf`` file or a packaged short name such as ``"smollm2-135m-instruct"``
  builds the tokenizer embedded in the GGUF (:func:`es_jax.models.gguf.load_tokenizer`).
  """
  if gguf.is_gguf(name_or_path):
    return gguf.load_tokenizer(name_or_path)
  tok = AutoTokenizer.from_pretrained(name_or_path)
  tok.padding_side = "left"
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok

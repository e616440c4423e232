"""KV-cache decoding of a batch of prompts, for one model or a whole ES population.

One jit-compiled program prefills the left-padded prompts, then decodes in a
``while_loop`` until every row has produced an EOS id or ``max_new_tokens``.
For a population the model call inside the loop is a ``jax.vmap`` over the
members' noise trees (computed once per generation and passed in, never
regenerated per token) with the params shared: every member has its own KV
cache and samples, and the shared weight GEMMs run once over all members.

Matrices are cast to the compute dtype once per decode call (a bfloat16 copy
lives while decoding float32 master params), so the loop reads bfloat16 weights.

Shapes are fixed by ``(batch, prompt length, max_new_tokens)``: one compiled
program per shape. EOS ids end rows early on device. Strings in and out are
:mod:`es_jax.models.generate`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from es_jax import sharding as pop_sharding
from es_jax.models import sharding
from es_jax.models.transformer import (Transformer, cast_matrices, init_cache, positions_from_mask,
                                       variables)

PyTree = Any


class DecodeOutput(NamedTuple):
  """Generated tokens.

  Attributes:
    tokens: ``(..., B, max_new_tokens)`` int32; ``pad_id`` after a row's EOS.
    lengths: ``(..., B)`` int32, tokens generated per row including the EOS.
  The leading ``...`` is ``(P,)`` for a population, empty otherwise.
  """

  tokens: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Static decoding settings (one compiled program per distinct value).

  EOS and pad ids are not here: they are runtime arrays, so changing them
  does not recompile.

  Attributes:
    max_new_tokens: tokens to generate per row at most.
    temperature: 0 = greedy (argmax); otherwise sampling at this temperature.
    top_p: nucleus sampling mass (1 = off); ignored when greedy.
  """

  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}.")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")


def sample_token(logits_bv: jax.Array, key: jax.Array | None, temperature: float,
                 top_p: float) -> jax.Array:
  """Greedy (``temperature == 0``) or temperature / nucleus sampling of one token per row.

  ``logits_bv`` may have more leading axes (e.g. members); each row draws independently.

  Example:
    >>> import jax.numpy as jnp
    >>> sample_token(jnp.array([[0.0, 2.0, 1.0]]), None, 0.0, 1.0).tolist()
    [1]
  """
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  if top_p < 1:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[..., ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # Keep a token if the mass before it is below top_p (the top token always stays).
    keep_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p
    threshold_b = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1)
    logits_bv = jnp.where(logits_bv >= threshold_b[..., None], logits_bv, -jnp.inf)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _decode(model: Transformer, settings: DecodeSettings, population: bool, params: PyTree,
            noise: PyTree, input_ids_bt: jax.Array, mask_bt: jax.Array, key: jax.Array,
            eos_ids: jax.Array, pad_id: jax.Array):
  """The whole decode; ``population`` vmaps the model over ``noise``'s leading axis."""
  s = settings
  b, t = input_ids_bt.shape
  num_slots = t + s.max_new_tokens
  dtype = model.config.dtype
  # Cast float32 master matrices once per call, not once per step: the loop then streams
  # compute-dtype weights. Vectors (norm scales, biases) stay float32 so their dense
  # noise is added at full precision.
  params = cast_matrices(model.config, params, dtype)
  mask_bt = mask_bt.astype(jnp.int32)
  prompt_pos_bt = positions_from_mask(mask_bt)
  next_pos_b = jnp.sum(mask_bt, axis=-1)  # position of the first generated token
  # Generated slots are always visible; a finished row's later tokens are never read.
  kv_mask_bs = jnp.concatenate([mask_bt, jnp.ones((b, s.max_new_tokens), jnp.int32)], axis=1)

  def prefill(member_noise):
    cache = init_cache(model.config, b, num_slots)
    logits, cache = model.apply(variables(params, member_noise), input_ids_bt, prompt_pos_bt,
                                kv_mask_bs, cache=cache, start=0, last=1)
    return logits[:, 0], cache

  def step(member_noise, token_b, cache, i):
    positions = (next_pos_b + i - 1)[:, None]
    logits, cache = model.apply(variables(params, member_noise), token_b[:, None], positions,
                                kv_mask_bs, cache=cache, start=t + i - 1)
    return logits[:, 0], cache

  # One draw per step over every (member, row): rows and members sample independently.
  sample = lambda logits, i: sample_token(logits, jax.random.fold_in(key, i), s.temperature,
                                          s.top_p)
  constrain = lambda x: x
  if population:
    prefill = jax.vmap(prefill)
    step = jax.vmap(step, in_axes=(0, 0, 0, None))
    constrain = pop_sharding.constrain_population

  logits, cache = prefill(noise)
  token = sample(logits, 0)
  done = jnp.isin(token, eos_ids)
  tokens = jnp.full((*token.shape, s.max_new_tokens), pad_id, jnp.int32).at[..., 0].set(token)
  carry = (jnp.int32(1), token, constrain(cache), done, jnp.ones_like(token), tokens)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < s.max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, cache, done, lengths, tokens = carry
    logits, cache = step(noise, token, cache, i)
    token = jnp.where(done, pad_id, sample(logits, i))
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=-1)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    return i + 1, token, constrain(cache), done, lengths, tokens

  _, _, _, _, lengths, tokens = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(tokens, lengths)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_jit(model, settings, population, params, noise, input_ids, attention_mask, key, eos_ids,
                pad_id):
  run = lambda *args: _decode(model, settings, population, *args)
  return sharding.auto_sharded(run)(params, noise, input_ids, attention_mask, key, eos_ids, pad_id)


def _special_ids(model: Transformer, eos_ids, pad_id):
  """(eos array padded with -1 to a multiple of 8, pad id): fixed shapes, so no recompiles."""
  cfg = model.config
  eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
  if pad_id is None:
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids or (0,))[0]
  padded = np.full(max(8, -(-len(eos_ids) // 8) * 8), -1, np.int32)
  padded[:len(eos_ids)] = eos_ids
  return jnp.asarray(padded), jnp.int32(pad_id)


def _check_prompts(input_ids, attention_mask):
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
    raise ValueError(f"input_ids and attention_mask must both be (batch, length), got "
                     f"{input_ids.shape} and {attention_mask.shape}.")
  return input_ids, attention_mask


def _key(key, temperature):
  if key is None:
    if temperature > 0:
      raise ValueError("sampling (temperature > 0) needs key=jax.random.key(...).")
    return jax.random.key(0)
  return key


def decode(model: Transformer, params: PyTree, input_ids, attention_mask, *,
           max_new_tokens: int, noise: PyTree | None = None, key: jax.Array | None = None,
           temperature: float = 0.0, top_p: float = 1.0,
           eos_ids: Sequence[int] | None = None, pad_id: int | None = None) -> DecodeOutput:
  """Decodes a left-padded batch of prompts with a KV cache (jit-compiled once per shape).

  Args:
    model: the decoder.
    params: its params.
    input_ids: ``(B, T)`` int, left-padded prompts.
    attention_mask: ``(B, T)``, 1 at real tokens.
    max_new_tokens: tokens to generate per row at most.
    noise: one member's perturbation (from :func:`es_jax.member_noise`), or None.
    key: PRNG key, required when ``temperature > 0``.
    temperature: 0 = greedy.
    top_p: nucleus sampling mass.
    eos_ids: end-of-sequence ids (default ``model.config.eos_token_ids``).
    pad_id: filler after EOS (default the config's pad id, else the first EOS id).

  Returns:
    :class:`DecodeOutput` with ``tokens (B, max_new_tokens)`` and ``lengths (B,)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_jax.models.config import ModelConfig
    >>> from es_jax.models.transformer import Transformer, init_params
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1, vocab_size=32,
    ...     hidden_size=16, intermediate_size=8, num_heads=2, head_dim=8, eos_token_ids=())
    >>> model = Transformer(cfg)
    >>> params = init_params(model, jax.random.key(0))
    >>> out = decode(model, params, jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]),
    ...                max_new_tokens=4)
    >>> out.tokens.shape, out.lengths.tolist()
    ((1, 4), [4])
  """
  settings = DecodeSettings(max_new_tokens, float(temperature), float(top_p))
  input_ids, attention_mask = _check_prompts(input_ids, attention_mask)
  return _decode_jit(model, settings, False, params, noise, input_ids, attention_mask,
                     _key(key, settings.temperature), *_special_ids(model, eos_ids, pad_id))


def decode_population(model: Transformer, params: PyTree, noise: PyTree, input_ids,
                      attention_mask, *, max_new_tokens: int, key: jax.Array | None = None,
                      temperature: float = 0.0, top_p: float = 1.0,
                      eos_ids: Sequence[int] | None = None,
                      pad_id: int | None = None) -> DecodeOutput:
  """Decodes the same prompts for every member of a population at once.

  ``noise`` stacks the members' perturbations on a leading axis, e.g.
  ``jax.vmap(lambda i: es_jax.member_noise(state, params, i))(jnp.arange(N))``;
  member ``i`` decodes as if its weights were ``es_jax.perturb(params,
  noise[i])``, but no member's weights are formed. With sampling, every
  member and row draws independently from ``key``. Under ``jax.set_mesh`` with a ``'pop'`` axis
  the members are split over it (see :mod:`es_jax.sharding`).

  Returns:
    :class:`DecodeOutput` with ``tokens (N, B, max_new_tokens)`` and ``lengths (N, B)``.

  Example:
    >>> import jax, jax.numpy as jnp, es_jax
    >>> from es_jax.models.config import ModelConfig
    >>> from es_jax.models.transformer import Transformer, init_params
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1, vocab_size=32,
    ...     hidden_size=16, intermediate_size=8, num_heads=2, head_dim=8, eos_token_ids=())
    >>> model = Transformer(cfg)
    >>> params = init_params(model, jax.random.key(0))
    >>> spec = es_jax.NoiseSpec(population=4, sigma=0.1, freeze=("embed",))
    >>> noise = jax.vmap(lambda i: es_jax.noise.member_noise(
    ...     spec, jax.random.key(1), 0, params, i))(jnp.arange(4))
    >>> out = decode_population(model, params, noise, jnp.array([[5, 6]]),
    ...                           jnp.array([[1, 1]]), max_new_tokens=3)
    >>> out.tokens.shape
    (4, 1, 3)
  """
  settings = DecodeSettings(max_new_tokens, float(temperature), float(top_p))
  input_ids, attention_mask = _check_prompts(input_ids, attention_mask)
  if not jax.tree.leaves(noise):
    raise ValueError("noise has no arrays: pass the members' stacked noise trees "
                     "(every leaf frozen means every member is the same model; use decode).")
  return _decode_jit(model, settings, True, params, noise, input_ids, attention_mask,
                     _key(key, settings.temperature), *_special_ids(model, eos_ids, pad_id))

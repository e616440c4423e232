"""The Qwen2 / Llama 3.x decoder in Flax Linen, perturbation-aware for ES.

One decoder serves both families (they differ only in biases and RoPE
scaling, see :class:`~es_jax.models.config.ModelConfig`). Every projection is
an :class:`es_jax.Dense`, so a member's low-rank perturbation is applied as
``scale * (x a) b^T`` and a population forward is a ``jax.vmap`` over noise
trees with the params shared. RMSNorm scales, biases and the embedding apply
dense perturbations with :func:`es_jax.layers.add_noise`.

Axis letters in names and einsums:
  B batch, T query length, S key length (KV-cache slots), D hidden,
  N query heads, K key/value heads, G query heads per KV head, H head dim,
  F MLP width, V vocabulary.

Param tree (unrolled layers, the default; with ``scan_layers`` the blocks are one
``layers/...`` subtree whose leaves stack the layers along a new first axis,
``layers/attn/q/kernel`` ``(L, D, N*H)``, run by ``nn.scan``, see
:func:`stack_layers`)::

  embed/embedding                (V, D)
  layers_{i}/attn_norm/scale     (D,)
  layers_{i}/attn/q/kernel       (D, N*H)    q/bias (N*H,) when qkv_bias
  layers_{i}/attn/k/kernel       (D, K*H)    k/bias (K*H,)
  layers_{i}/attn/v/kernel       (D, K*H)    v/bias (K*H,)
  layers_{i}/attn/o/kernel       (N*H, D)    o/bias (D,) when o_bias
  layers_{i}/mlp_norm/scale      (D,)
  layers_{i}/mlp/gate/kernel     (D, F)      (and up/kernel)
  layers_{i}/mlp/down/kernel     (F, D)
  final_norm/scale               (D,)
  lm_head/kernel                 (D, V)      only when not tie_word_embeddings

Embeddings: the table is a plain param. Freeze it in the noise
(``freeze=("embed",)``) or give it full-rank noise (``rank=None``); a
low-rank perturbation of the table raises a ``TypeError``.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from es_jax import noise as noise_lib
from es_jax.layers import PERTURBATION, Dense, add_noise, param_noise
from es_jax.models.config import ModelConfig
from es_jax.models import sharding
from es_jax.noise import LowRank

PyTree = Any
# Finite, so a query row with no visible key (a left pad) gives a uniform
# softmax instead of NaN; such rows are never read.
_MASKED = -1e30


class KVCache(NamedTuple):
  """One layer's cache: ``k_bskh`` and ``v_bskh``, shape (B, S, K, H), in the compute dtype.

  With ``scan_layers`` one cache holds every layer, with a leading layer axis.
  """

  k_bskh: jax.Array
  v_bskh: jax.Array


def init_cache(config: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...] | KVCache:
  """Zeroed KV caches: one per layer, or one stacked over layers with ``scan_layers``.

  Example:
    >>> from es_jax.models.config import ModelConfig
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct")
    >>> init_cache(cfg, batch=2, length=8)[0].k_bskh.shape
    (2, 8, 2, 64)
    >>> init_cache(cfg.replace(scan_layers=True), batch=2, length=8).k_bskh.shape
    (24, 2, 8, 2, 64)
  """
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  if config.scan_layers:
    shape = (config.num_layers, *shape)
    return KVCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
  return tuple(KVCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
               for _ in range(config.num_layers))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies ``(H/2,)`` float32, with Llama 3 scaling when configured.

  Example:
    >>> from es_jax.models.config import ModelConfig
    >>> rope_inv_freq(ModelConfig.preset("llama-3.2-1b-instruct")).shape
    (32,)
  """
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = config.rope_scaling
  if scaling is not None:
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((old_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x_btnh: jax.Array, sin_bth: jax.Array, cos_bth: jax.Array) -> jax.Array:
  """Rotates the two halves of the head dim (Hugging Face's ``rotate_half`` layout)."""
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin_bth[:, :, None, :], cos_bth[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
  """Positions ``0, 1, ...`` of the real tokens, for left or right padding (pads: 0 or the last)."""
  return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


class RMSNorm(nn.Module):
  """``x / rms(x) * scale`` in float32, the scale with its member's dense noise."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    scale_d = self.param("scale", nn.initializers.ones_init(), (x_btd.shape[-1],),
                         self.param_dtype)
    scale_d = add_noise(scale_d, param_noise(self, "scale"))
    x = x_btd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    # Hugging Face casts back before the scale; kept so bf16 runs match too.
    return x.astype(self.dtype) * scale_d.astype(self.dtype)


class Embedder(nn.Module):
  """The token table: ``encode`` looks rows up, ``decode`` is the tied output head."""

  vocab_size: int
  features: int
  dtype: Any
  param_dtype: Any

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(0.02),
                                (self.vocab_size, self.features), self.param_dtype)

  def _noise(self):
    noise = param_noise(self, "embedding")
    if isinstance(noise, LowRank):
      raise TypeError(
          "the embedding table 'embed/embedding' got a low-rank perturbation; freeze it "
          "(NoiseSpec/es_step freeze=('embed',)) or use full-rank noise (rank=None).")
    return noise

  def encode(self, ids_bt: jax.Array) -> jax.Array:
    x_btd = jnp.take(self.embedding, ids_bt, axis=0)
    noise_vd = self._noise()
    if noise_vd is not None:  # gather the member's rows instead of adding two tables
      x_btd = x_btd + jnp.take(noise_vd, ids_bt, axis=0).astype(x_btd.dtype)
    return x_btd.astype(self.dtype)

  def decode(self, x_btd: jax.Array) -> jax.Array:
    logits_btv = jnp.einsum("btd,vd->btv", x_btd, self.embedding.astype(self.dtype))
    noise_vd = self._noise()
    if noise_vd is not None:  # separate term keeps the shared GEMM unbatched under vmap
      logits_btv = logits_btv + jnp.einsum("btd,vd->btv", x_btd, noise_vd.astype(self.dtype))
    return logits_btv


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd, sin_bth, cos_bth, mask_bts, cache: KVCache | None, start):
    cfg = self.config
    dense = lambda features, bias, name: Dense(
        features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02), name=name)
    b, t = x_btd.shape[:2]
    # Flat (N*H) features, not (N, H): a 2-D bias would be perturbed as a matrix.
    q_btnh = dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, "q")(x_btd).reshape(
        b, t, cfg.num_heads, cfg.head_dim)
    k_btkh = dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "k")(x_btd).reshape(
        b, t, cfg.num_kv_heads, cfg.head_dim)
    v_btkh = dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "v")(x_btd).reshape(
        b, t, cfg.num_kv_heads, cfg.head_dim)
    q_btnh = apply_rope(q_btnh, sin_bth, cos_bth)
    k_btkh = apply_rope(k_btkh, sin_bth, cos_bth)
    if cache is None:
      k_bskh, v_bskh = k_btkh, v_btkh
    else:
      k_bskh = jax.lax.dynamic_update_slice_in_dim(cache.k_bskh, k_btkh.astype(cfg.dtype), start, 1)
      v_bskh = jax.lax.dynamic_update_slice_in_dim(cache.v_bskh, v_btkh.astype(cfg.dtype), start, 1)
      cache = KVCache(k_bskh, v_bskh)
    q_btkgh = q_btnh.reshape(b, t, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
    scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh.astype(q_btkgh.dtype),
                              preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(cfg.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh.astype(cfg.dtype))
    out_btd = dense(cfg.hidden_size, cfg.o_bias, "o")(
        out_btkgh.reshape(b, t, cfg.num_heads * cfg.head_dim))
    return out_btd, cache


class Mlp(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda features, name: Dense(
        features, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02), name=name)
    gate_btf = dense(cfg.intermediate_size, "gate")(x_btd)
    up_btf = dense(cfg.intermediate_size, "up")(x_btd)
    return dense(cfg.hidden_size, "down")(nn.silu(gate_btf) * up_btf)


class Block(nn.Module):
  """Pre-norm decoder block: attention then MLP, each with a residual."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_btd, sin_bth, cos_bth, mask_bts, cache, start):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    attn_btd, cache = Attention(cfg, name="attn")(
        norm("attn_norm")(x_btd), sin_bth, cos_bth, mask_bts, cache, start)
    x_btd = x_btd + attn_btd
    x_btd = x_btd + Mlp(cfg, name="mlp")(norm("mlp_norm")(x_btd))
    return x_btd, cache


class Transformer(nn.Module):
  """A Qwen2 / Llama 3.x causal LM.

  Call with ``(input_ids_bt, positions_bt, kv_mask_bs)`` and optionally a KV
  cache: without one, ``S == T`` and ``kv_mask_bs`` is the attention mask;
  with one, the call's keys are written at slots ``[start, start + T)`` and
  queries attend to every slot ``<= their own`` whose ``kv_mask_bs`` is set.
  Returns ``(logits_btv float32, cache)``; ``last=k`` keeps only the last
  ``k`` positions' logits (``1`` in a prefill), so the vocabulary projection,
  the largest matmul of a small model, runs on those alone. Most users want :func:`logits_fn` or
  :mod:`es_jax.models.decoding` / :mod:`es_jax.models.generate` instead.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_jax.models.config import ModelConfig
    >>> cfg = ModelConfig(family="qwen2", vocab_size=11, hidden_size=10,
    ...     intermediate_size=13, num_layers=1, num_heads=3, num_kv_heads=1, head_dim=4,
    ...     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True)
    >>> model = Transformer(cfg)
    >>> params = init_params(model, jax.random.key(0))
    >>> ids, mask = jnp.array([[0, 5, 7]]), jnp.array([[0, 1, 1]])
    >>> logits_fn(model, params, ids, mask).shape
    (1, 3, 11)
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = Embedder(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype)
    if cfg.scan_layers:
      # Params and perturbations are sliced per layer; the cache is scanned too (in_axes 0)
      # and comes back stacked; rope angles, mask and start are the same for every layer.
      self.layers = nn.scan(
          Block, variable_axes={"params": 0, PERTURBATION: 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
          length=cfg.num_layers)(cfg)
    else:
      self.layers = [Block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           kernel_init=nn.initializers.normal(0.02))

  def __call__(self, input_ids_bt, positions_bt, kv_mask_bs, cache=None, start=0,
               last: int | None = None):
    cfg = self.config
    t = input_ids_bt.shape[1]
    s = kv_mask_bs.shape[1]
    if cache is not None:
      if isinstance(cache, KVCache) != cfg.scan_layers:
        raise ValueError(f"scan_layers={cfg.scan_layers} needs "
                         f"{'one stacked KVCache' if cfg.scan_layers else 'a KVCache per layer'}"
                         f", got {type(cache).__name__}; make it with init_cache(config, ...).")
      slots = (cache if cfg.scan_layers else cache[0]).k_bskh.shape[-3]
      if slots != s:
        raise ValueError(f"kv_mask_bs has {s} slots but the cache has {slots}.")
    if cache is None and s != t:
      raise ValueError(f"without a cache kv_mask_bs must cover the {t} input tokens, got {s}.")
    q_slot_t = start + jnp.arange(t)
    causal_ts = jnp.arange(s)[None, :] <= q_slot_t[:, None]
    mask_bts = kv_mask_bs.astype(bool)[:, None, :] & causal_ts[None]
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    sin_bth, cos_bth = jnp.sin(angles_bth), jnp.cos(angles_bth)

    x_btd = self.embed.encode(input_ids_bt)
    if cfg.scan_layers:
      _check_scanned_noise(self.variables.get(PERTURBATION, {}).get("layers"))
      x_btd, new_cache = self.layers(x_btd, sin_bth, cos_bth, mask_bts, cache, start)
    else:
      new_cache = []
      for i, layer in enumerate(self.layers):
        x_btd, layer_cache = layer(x_btd, sin_bth, cos_bth, mask_bts,
                                   None if cache is None else cache[i], start)
        new_cache.append(layer_cache)
      new_cache = tuple(new_cache)
    if last is not None:
      x_btd = x_btd[:, -last:]
    x_btd = self.final_norm(x_btd)
    if cfg.tie_word_embeddings:
      logits_btv = self.embed.decode(x_btd)
    else:
      logits_btv = self.lm_head(x_btd)
    return logits_btv.astype(jnp.float32), (None if cache is None else new_cache)


def _check_scanned_noise(noise: PyTree) -> None:
  """Raises unless every low-rank factor under 'layers' has its layer axis (a clear error
  instead of nn.scan's complaint about leading axes)."""
  leaves = jax.tree_util.tree_leaves_with_path(noise, is_leaf=lambda x: isinstance(x, LowRank))
  for path, leaf in leaves:
    if isinstance(leaf, LowRank) and leaf.a.ndim != 3:
      raise ValueError(
          f"the perturbation of 'layers/{noise_lib.path_str(path)}' is one low-rank matrix for "
          "all layers, but this model scans its layers: draw the noise with "
          "es_step(..., scanned=model.config.scanned) (or NoiseSpec(scanned=...)).")


def init_params(model: Transformer, key: jax.Array) -> PyTree:
  """Random params (normal(0.02) matrices, unit norm scales, zero biases) for ``model``.

  Example:
    >>> import functools, jax
    >>> from es_jax.models.config import ModelConfig
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1)
    >>> init = functools.partial(init_params, Transformer(cfg))
    >>> shapes = jax.eval_shape(init, jax.random.key(0))
    >>> shapes["layers_0"]["attn"]["q"]["kernel"].shape
    (896, 896)
  """
  ids = jnp.zeros((1, 1), jnp.int32)
  # One compiled program instead of hundreds of eagerly dispatched initialisers.
  init = jax.jit(lambda key: model.init(key, ids, ids, jnp.ones_like(ids))["params"])
  return init(key)


_LAYER = re.compile(r"layers_(\d+)")


def stack_layers(params: PyTree) -> PyTree:
  """Unrolled params (``layers_0`` ... ``layers_{L-1}``) as scanned ones (pure).

  Each ``layers_{i}/...`` leaf becomes slice ``i`` of the matching
  ``layers/...`` leaf, for a model with ``scan_layers=True``; checkpoints load
  unrolled and are stacked by this mapping. :func:`unstack_layers` inverts it.

  Example:
    >>> import jax.numpy as jnp
    >>> unrolled = {"layers_0": {"w": jnp.zeros(3)}, "layers_1": {"w": jnp.ones(3)},
    ...             "final_norm": {"scale": jnp.ones(3)}}
    >>> stacked = stack_layers(unrolled)
    >>> stacked["layers"]["w"].shape, sorted(stacked)
    ((2, 3), ['final_norm', 'layers'])
    >>> unstack_layers(stacked)["layers_1"]["w"].tolist()
    [1.0, 1.0, 1.0]
  """
  indices = sorted(int(m.group(1)) for m in map(_LAYER.fullmatch, params) if m)
  if indices != list(range(len(indices))) or not indices or "layers" in params:
    raise ValueError(f"stack_layers needs unrolled params with layers_0 ... layers_{{L-1}} and no "
                     f"'layers' entry, got top-level keys {sorted(params)}.")
  rest = {k: v for k, v in params.items() if not _LAYER.fullmatch(k)}
  layers = [params[f"layers_{i}"] for i in indices]
  try:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  except ValueError as e:  # one layer's tree differs from another's
    raise ValueError(f"the layers' param trees differ, so they cannot be stacked: {e}") from e
  return {**rest, "layers": stacked}


def unstack_layers(params: PyTree) -> PyTree:
  """Scanned params (``layers/...`` with a leading layer axis) as unrolled ones (pure)."""
  if "layers" not in params or any(_LAYER.fullmatch(k) for k in params):
    raise ValueError(f"unstack_layers needs scanned params with a 'layers' entry, got top-level "
                     f"keys {sorted(params)}.")
  num_layers = {x.shape[0] for x in jax.tree.leaves(params["layers"])}
  if len(num_layers) != 1:
    raise ValueError(f"the leaves under 'layers' stack different numbers of layers {num_layers}.")
  rest = {k: v for k, v in params.items() if k != "layers"}
  return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"])
                     for i in range(num_layers.pop())}}


def cast_matrices(config: ModelConfig, params: PyTree, dtype) -> PyTree:
  """``params`` with every matrix (a layer's slice, when scanned) cast to ``dtype``.

  Vectors (norm scales, biases) keep their dtype, so that their dense noise is
  added at full precision.

  Example:
    >>> import jax.numpy as jnp
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", scan_layers=True)
    >>> p = cast_matrices(cfg, {"layers": {"s": jnp.ones((2, 3)), "w": jnp.ones((2, 3, 3))}},
    ...                   jnp.bfloat16)
    >>> p["layers"]["s"].dtype, p["layers"]["w"].dtype
    (dtype('float32'), dtype(bfloat16))
  """
  def cast(path, x):
    layer_axes = int(any(re.search(r, noise_lib.path_str(path)) for r in config.scanned))
    return x.astype(dtype) if x.ndim - layer_axes >= 2 else x
  return jax.tree_util.tree_map_with_path(cast, params)


def variables(params: PyTree, noise: PyTree | None = None) -> dict[str, PyTree]:
  """The variables dict for ``model.apply``: params, plus the member's noise when given."""
  if noise is None:
    return {"params": params}
  return {"params": params, "perturbation": noise}


def logits_fn(model: Transformer, params: PyTree, input_ids: jax.Array,
              attention_mask: jax.Array, noise: PyTree | None = None, *,
              last: int | None = None) -> jax.Array:
  """Next-token logits ``(B, T, V)`` float32 of a left- or right-padded batch (jittable).

  Position ``t`` predicts token ``t + 1``; positions are counted from the mask,
  so left and right padding give the same logits at real tokens. With
  ``noise`` (one member's tree from :func:`es_jax.member_noise`) the member's
  perturbation is applied without forming its weights; vmap over noise trees
  for a population. ``last=k`` (static) returns only the last ``k`` positions,
  ``(B, k, V)``. ``functools.partial(logits_fn, model, params)`` is a
  ``LogitsFn`` for :mod:`es_jax.evaluation.loglik`.

  Under a mesh with explicit axes the model runs with those axes switched to
  automatic sharding (see :func:`es_jax.models.sharding.auto_sharded`).

  Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> from es_jax.models.config import ModelConfig
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1, vocab_size=32,
    ...                          hidden_size=16, intermediate_size=8, num_heads=2, head_dim=8)
    >>> model = Transformer(cfg)
    >>> params = init_params(model, jax.random.key(0))
    >>> fn = jax.jit(functools.partial(logits_fn, model))
    >>> fn(params, jnp.array([[3, 4]]), jnp.array([[1, 1]])).shape
    (1, 2, 32)
  """
  def run(params, input_ids, attention_mask, noise):
    logits, _ = model.apply(variables(params, noise), input_ids,
                            positions_from_mask(attention_mask), attention_mask, last=last)
    return logits
  return sharding.auto_sharded(run)(params, input_ids, attention_mask, noise)


def token_logprobs(model: Transformer, params: PyTree, input_ids: jax.Array,
                   attention_mask: jax.Array, noise: PyTree | None = None) -> jax.Array:
  """``log p(input_ids[:, t] | input_ids[:, :t])`` as ``(B, T)`` float32 (jittable).

  Entries whose token or predecessor is padding, and the first column, are 0:
  sum over a continuation's mask for its log-likelihood (HellaSwag) or use the
  per-token values as a policy's log-probs (GRPO).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_jax.models.config import ModelConfig
    >>> cfg = ModelConfig.preset("qwen2.5-0.5b-instruct", num_layers=1, vocab_size=32,
    ...                          hidden_size=16, intermediate_size=8, num_heads=2, head_dim=8)
    >>> model = Transformer(cfg)
    >>> params = init_params(model, jax.random.key(0))
    >>> lp = token_logprobs(model, params, jnp.array([[0, 3, 4]]), jnp.array([[0, 1, 1]]))
    >>> lp.shape, float(lp[0, 1])
    ((1, 3), 0.0)
  """
  logits_btv = logits_fn(model, params, input_ids, attention_mask, noise)
  logp_btv = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
  target_bt = input_ids[:, 1:]
  logp_bt = jnp.take_along_axis(logp_btv, target_bt[..., None], axis=-1)[..., 0]
  valid_bt = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
  logp_bt = jnp.where(valid_bt, logp_bt, 0.0)
  return jnp.concatenate([jnp.zeros_like(logp_bt[:, :1]), logp_bt], axis=1)

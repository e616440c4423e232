"""One frozen config for the Qwen2 / Qwen2.5 and Llama 3.x decoders, with presets.

The two families share one decoder (:mod:`es_jax.models.transformer`) and
differ only in a few fields: Qwen2 has q/k/v biases, Llama 3.x has ``llama3``
RoPE frequency scaling. :meth:`ModelConfig.from_hf_config` reads a
transformers config (object or ``config.json`` dict, old ``rope_theta`` /
``rope_scaling`` style or transformers 5 ``rope_parameters`` style) and
:meth:`ModelConfig.to_hf_config` writes one back for export.

Dtypes: ``param_dtype`` float32 and ``dtype`` bfloat16 are the defaults, the
recommended set-up for ES fine-tuning: an ES update is ~1e-4 per element and
rounds away in a bfloat16 master copy, so params stay float32 while matmuls
run in bfloat16. Use ``dtype=jnp.float32`` for exact comparisons.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal, Mapping

import jax.numpy as jnp
import numpy as np

Family = Literal["qwen2", "llama"]
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 (``rope_type="llama3"``) RoPE frequency scaling.

  Wavelengths shorter than ``original_max_position_embeddings /
  high_freq_factor`` are kept, longer than ``original_max_position_embeddings
  / low_freq_factor`` are stretched by ``factor``, and the band between is
  interpolated smoothly.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


LLAMA_3_2_ROPE_SCALING = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


# The params of a scanned model that stack layers: everything under 'layers/'.
SCANNED_LAYERS = ("^layers/",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Qwen2 / Llama decoder (hashable: a static jit argument).

  Attributes:
    family: ``"qwen2"`` or ``"llama"`` (the Hugging Face ``model_type``).
    vocab_size: V, rows of the embedding table.
    hidden_size: D, the residual width.
    intermediate_size: F, the SwiGLU MLP width.
    num_layers: decoder blocks.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (grouped-query attention: N % K == 0).
    head_dim: H (even, for RoPE); N * H need not equal D.
    rope_theta: RoPE base (1e6 for Qwen2.5, 5e5 for Llama 3.2).
    rms_norm_eps: epsilon of every RMSNorm.
    tie_word_embeddings: the output head reuses the embedding table.
    qkv_bias: q/k/v projections have biases (Qwen2: True).
    o_bias: the output projection has a bias (Llama ``attention_bias``).
    mlp_bias: gate/up/down have biases (Llama ``mlp_bias``).
    rope_scaling: Llama 3 frequency scaling, or None.
    max_position_embeddings: informational (exported to config.json).
    bos_token_id, eos_token_ids, pad_token_id: special tokens; decoding stops
      on any of ``eos_token_ids`` by default.
    dtype: computation dtype (activations, matmuls, KV cache).
    param_dtype: parameter dtype (float32 = the ES master copy).
    scan_layers: stack the decoder blocks' params along a leading layer axis
      (``layers/...``, shape ``(L, ...)``) and run them with ``nn.scan``, so
      that compile time does not grow with depth. Pass :attr:`scanned` to
      ``es_step(scanned=...)``; the default, unrolled ``layers_{i}/...``, keeps
      the trees (and the ES noise) of earlier runs.

  Example:
    >>> cfg = ModelConfig.preset("Qwen/Qwen2.5-0.5B-Instruct")
    >>> cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    (896, 14, 2, 64)
  """

  family: Family
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  tie_word_embeddings: bool
  qkv_bias: bool
  o_bias: bool = False
  mlp_bias: bool = False
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  scan_layers: bool = False

  def __post_init__(self):
    # Normalise so that equal configs hash equally (jnp.bfloat16 vs "bfloat16").
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
    eos = tuple(self.eos_token_ids)
    if not all(_is_int(i) and i >= 0 for i in eos):  # int() would round 2.5 to a wrong id
      raise ValueError(f"eos_token_ids must be non-negative integers, got {eos!r}.")
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in eos))
    if self.family not in _ARCHITECTURES:
      raise ValueError(f"family must be one of {sorted(_ARCHITECTURES)}, got {self.family!r}.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not isinstance(self.scan_layers, (bool, np.bool_)):
      raise TypeError(f"scan_layers must be a bool, got {self.scan_layers!r}.")
    object.__setattr__(self, "scan_layers", bool(self.scan_layers))
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (grouped-query attention).")

  @property
  def scanned(self) -> tuple[str, ...]:
    """Regexes of the params that stack layers, for ``es_step(scanned=...)``.

    Example:
      >>> ModelConfig.preset("qwen2.5-0.5b-instruct", scan_layers=True).scanned
      ('^layers/',)
    """
    return SCANNED_LAYERS if self.scan_layers else ()

  @property
  def num_groups(self) -> int:
    """G = N / K, query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> ModelConfig:
    """A copy with some fields changed, e.g. ``cfg.replace(dtype=jnp.float32)``."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def preset(cls, name: str, **changes) -> ModelConfig:
    """A preset by hub id or short name (case-insensitive), e.g. ``"qwen2.5-0.5b-instruct"``.

    Example:
      >>> ModelConfig.preset("meta-llama/Llama-3.2-1B-Instruct").rope_scaling.factor
      32.0
    """
    key = name.lower().rsplit("/", 1)[-1]
    if key not in PRESETS:
      raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
    return PRESETS[key].replace(**changes)

  @classmethod
  def from_hf_config(cls, hf_config: Any, **changes) -> ModelConfig:
    """Builds a config from a transformers config object or a ``config.json`` dict.

    Args:
      hf_config: ``transformers.Qwen2Config`` / ``LlamaConfig`` (or any object
        with ``to_dict()``), or the parsed ``config.json``.
      **changes: overrides, typically ``dtype=`` and ``param_dtype=``.

    Raises:
      ValueError: for a model type or feature this port does not implement, or a
        field that is missing or of the wrong type or range (the message names
        the ``config.json`` field).

    Example:
      >>> cfg = ModelConfig.from_hf_config({
      ...     "model_type": "qwen2", "vocab_size": 103, "hidden_size": 28,
      ...     "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 7,
      ...     "num_key_value_heads": 1, "head_dim": 6, "rope_theta": 1e6})
      >>> cfg.num_groups, cfg.qkv_bias
      (7, True)
    """
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config
    if not isinstance(d, Mapping):
      raise ValueError(f"a config must be a JSON object (a dict of transformers fields), got a "
                       f"{type(d).__name__}.")
    family = d.get("model_type")
    if family not in _ARCHITECTURES:
      raise ValueError(f"model_type {family!r} is not supported; this port implements "
                       f"{sorted(_ARCHITECTURES)} (Qwen2/Qwen2.5 and Llama 3.x).")
    if d.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; only 'silu' (SwiGLU).")
    if family == "qwen2" and d.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True is not supported; Qwen2.5 checkpoints "
                       "leave it off.")
    hidden_size = _int_field(d, "hidden_size")
    num_heads = _int_field(d, "num_attention_heads")
    head_dim = _int_field(d, "head_dim", default=None)
    if head_dim is None:
      head_dim = hidden_size // num_heads
    rope_theta, rope_scaling = _rope_from_hf(d)
    attention_bias = _bool_field(d, "attention_bias")
    fields = dict(
        family=family,
        vocab_size=_int_field(d, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_int_field(d, "intermediate_size"),
        num_layers=_int_field(d, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=_int_field(d, "num_key_value_heads", default=num_heads),
        head_dim=head_dim,
        rope_theta=rope_theta,
        rms_norm_eps=_positive_number(d, "rms_norm_eps", 1e-6),
        tie_word_embeddings=_bool_field(d, "tie_word_embeddings"),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=False if family == "qwen2" else _bool_field(d, "mlp_bias"),
        rope_scaling=rope_scaling,
        max_position_embeddings=_int_field(d, "max_position_embeddings", default=32768),
        bos_token_id=_int_field(d, "bos_token_id", minimum=0, default=None),
        eos_token_ids=_token_ids(d.get("eos_token_id"), "eos_token_id"),
        pad_token_id=_int_field(d, "pad_token_id", minimum=0, default=None),
    )
    fields.update(changes)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """The ``config.json`` dict of this model for transformers / vLLM.

    RoPE is written in the classic ``rope_theta`` + ``rope_scaling`` form, which
    transformers 4 and 5 and vLLM all read.

    Example:
      >>> ModelConfig.preset("qwen2.5-0.5b-instruct").to_hf_config()["architectures"]
      ['Qwen2ForCausalLM']
    """
    if self.family == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
      raise ValueError("a qwen2 config must have qkv_bias=True, o_bias=False, mlp_bias=False "
                       "to be exported: transformers' Qwen2 has exactly those biases.")
    if self.family == "llama" and (self.qkv_bias != self.o_bias):
      raise ValueError("a llama config must have qkv_bias == o_bias (transformers' "
                       "attention_bias covers all four projections) to be exported.")
    scaling = None
    if self.rope_scaling is not None:
      scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    eos = list(self.eos_token_ids)
    config = {
        "architectures": [_ARCHITECTURES[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": self.pad_token_id,
        "use_cache": True,
    }
    if self.family == "llama":
      config.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    else:
      config.update(use_sliding_window=False, sliding_window=None)
    return config


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_REQUIRED = object()


def _int_field(d: Mapping[str, Any], name: str, *, minimum: int = 1, default: Any = _REQUIRED):
  """``d[name]`` as an int >= ``minimum``; ``default`` when absent or null (required if none)."""
  value = d.get(name)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"field {name!r} is missing (an integer >= {minimum} is required).")
    return default
  if not _is_int(value) or value < minimum:
    raise ValueError(f"field {name!r} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _bool_field(d: Mapping[str, Any], name: str) -> bool:
  """``d[name]`` as a bool, False when absent or null (``bool("false")`` would be True)."""
  value = d.get(name)
  if value is None:
    return False
  if not isinstance(value, bool):
    raise ValueError(f"field {name!r} must be true or false, got {value!r}.")
  return value


def _positive_number(d: Mapping[str, Any], name: str, default: float) -> float:
  value = d.get(name)
  if value is None:
    return default
  if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
      or value <= 0):
    raise ValueError(f"field {name!r} must be a finite number > 0, got {value!r}.")
  return float(value)


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
  """A token id field (an int, a list of ints or null) as a tuple."""
  ids = () if value is None else (value,) if not isinstance(value, (list, tuple)) else value
  if not all(_is_int(i) and i >= 0 for i in ids):
    raise ValueError(f"field {name!r} must be a token id (an integer >= 0), a list of them or "
                     f"null, got {value!r}.")
  return tuple(int(i) for i in ids)


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from either config layout, resolved as transformers 5 resolves them.

  transformers 5 (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``) lets a non-empty
  classic ``rope_scaling`` replace ``rope_parameters`` whole, and takes the theta from the
  chosen dict, else the top-level ``rope_theta``, else 10000. Merging the two instead read a
  stale default ``rope_parameters`` over a yarn ``rope_scaling`` as plain RoPE.
  """
  for name in ("rope_parameters", "rope_scaling"):
    value = d.get(name)
    if value is not None and not isinstance(value, Mapping):
      raise ValueError(f"field {name!r} must be an object or null, got {value!r}.")
  name = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
  rope = d.get(name) or {}
  # Qwen2's transformers config reads {"full_attention": {...}} as RoPE per layer type.
  nested = [key for key, value in rope.items() if isinstance(value, Mapping)]
  if nested:
    raise ValueError(f"field {name!r} holds RoPE parameters per layer type ({nested}), which "
                     "this port does not implement; give one flat object.")
  source = f"field {name!r}"
  if name == "rope_scaling" and d.get("rope_parameters"):
    source += ", which transformers 5 reads in place of 'rope_parameters'"
  theta = rope.get("rope_theta", d.get("rope_theta"))
  theta = _positive_number({"rope_theta": theta}, "rope_theta", 10000.0)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"rope_type {rope_type!r} ({source}) is not supported; only 'default' and "
                     "'llama3'.")
  for key in ("factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings"):
    if rope.get(key) is None:
      raise ValueError(f"{source} lacks {key!r}, which rope_type 'llama3' needs.")
  return theta, RopeScaling(
      factor=_positive_number(rope, "factor", 1.0),
      low_freq_factor=_positive_number(rope, "low_freq_factor", 1.0),
      high_freq_factor=_positive_number(rope, "high_freq_factor", 1.0),
      original_max_position_embeddings=_int_field(rope, "original_max_position_embeddings"))


def _qwen25(hidden, intermediate, layers, heads, kv_heads, vocab, tied) -> ModelConfig:
  return ModelConfig(
      family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied, qkv_bias=True,
      max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645, 151643),
      pad_token_id=151643)


def _llama32(hidden, layers, heads, head_dim) -> ModelConfig:
  return ModelConfig(
      family="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=8192,
      num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=head_dim,
      rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=False,
      rope_scaling=LLAMA_3_2_ROPE_SCALING, max_position_embeddings=131072,
      bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))


# Shapes from each checkpoint's config.json (eos ids from generation_config.json).
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b-instruct": _qwen25(896, 4864, 24, 14, 2, 151936, tied=True),
    "qwen2.5-1.5b-instruct": _qwen25(1536, 8960, 28, 12, 2, 151936, tied=True),
    "qwen2.5-3b-instruct": _qwen25(2048, 11008, 36, 16, 2, 151936, tied=True),
    "qwen2.5-7b-instruct": _qwen25(3584, 18944, 28, 28, 4, 152064, tied=False),
    "llama-3.2-1b-instruct": _llama32(2048, 16, 32, 64),
    "llama-3.2-3b-instruct": _llama32(3072, 28, 24, 128),
}

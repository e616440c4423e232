"""How far fine-tuned parameters moved from theta_0, and how far the policy moved from pi_0.

All weight metrics work on any JAX pytree of arrays (nested dicts, Flax NNX
state, lists). A tensor's path is its keys joined with ``"/"``, e.g.
``"layers_0/attn/wq_dnh/kernel"`` or ``"model/layers/0/self_attn/q_proj/weight"``
(NNX's trailing ``.value`` is dropped). Groups come from regex rules matched
with ``re.search`` against that path, first match wins, unmatched -> ``"other"``.

Differences are taken in float32 (bf16 weights are upcast first). Norms are
``sqrt(sum(delta**2))``; a group's norm covers all its tensors together, and
its sparsity is the share of its elements with ``|delta| <= tau``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from es_jax import noise

GroupRule = tuple[str, str]


def _segment(pattern: str) -> str:
  """A regex matching one whole path segment."""
  return rf"(?:^|/)(?:{pattern})(?:/|$)"


# Order matters: norms before q/k (Qwen3's q_norm is a norm), mlp before o (an MLP "wo").
DEFAULT_GROUP_RULES: tuple[GroupRule, ...] = (
    ("norm", _segment(r"[^/]*norm[^/]*|ln(?:_[^/]*)?")),
    ("embed", _segment(r"[^/]*(?:embed|wte|wpe|lm_head)[^/]*")),
    ("mlp", _segment(r"[^/]*(?:mlp|ffn|feed_forward|gate_proj|up_proj|down_proj)[^/]*")),
    ("q", _segment(r"q_proj|q|wq[^/]*|query[^/]*")),
    ("k", _segment(r"k_proj|k|wk[^/]*|key[^/]*")),
    ("v", _segment(r"v_proj|v|wv[^/]*|value[^/]*")),
    ("o", _segment(r"o_proj|o|wo[^/]*|out_proj|attn_out[^/]*")),
)
OTHER_GROUP = "other"


def flatten_with_paths(tree: Any) -> dict[str, Any]:
  """Maps each leaf's ``"/"``-joined path to the leaf.

  Example:
    >>> import numpy as np
    >>> list(flatten_with_paths({"layers_0": {"attn": {"wq": np.ones(2)}}, "norm": [np.ones(1)]}))
    ['layers_0/attn/wq', 'norm/0']
  """
  flat = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    last = keypath[-1] if keypath else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
      keypath = keypath[:-1]  # NNX Variable wrapper, not part of the parameter's name
    flat[noise.path_str(keypath)] = leaf
  return flat


def assign_group(path: str, rules: Sequence[GroupRule] = DEFAULT_GROUP_RULES) -> str:
  """The group of a parameter path: the first rule whose regex matches, else ``"other"``.

  Example:
    >>> assign_group("model/layers/0/self_attn/q_proj/weight")
    'q'
    >>> assign_group("layers_3/mlp/up/kernel"), assign_group("bias_only")
    ('mlp', 'other')
  """
  for group, pattern in rules:
    if re.search(pattern, path, flags=re.IGNORECASE):
      return group
  return OTHER_GROUP


def group_paths(tree: Any, rules: Sequence[GroupRule] = DEFAULT_GROUP_RULES) -> dict[str, str]:
  """Maps each parameter path of ``tree`` to its group.

  Example:
    >>> group_paths({"embed_tokens": 0, "layers": [{"mlp": {"up_proj": 0}}]})
    {'embed_tokens': 'embed', 'layers/0/mlp/up_proj': 'mlp'}
  """
  return {path: assign_group(path, rules) for path in flatten_with_paths(tree)}


@dataclasses.dataclass(frozen=True)
class TensorDrift:
  """Drift of one tensor: element count, Frobenius norm of the change, share unchanged at tau."""
  path: str
  group: str
  size: int
  norm: float
  sparsity: float


@dataclasses.dataclass(frozen=True)
class GroupDrift:
  """Drift of a group of tensors taken together."""
  group: str
  num_tensors: int
  size: int
  norm: float
  sparsity: float


@dataclasses.dataclass(frozen=True)
class DriftReport:
  """Global, per-group and per-tensor drift between two parameter trees.

  Attributes:
    global_norm: ``||theta - theta_0||_F`` over all tensors as one vector.
    sparsity: share of all elements with ``|theta - theta_0| <= tau``.
    tau: the sparsity threshold.
    groups: group name -> :class:`GroupDrift`, in rule order, ``"other"`` last.
    tensors: one :class:`TensorDrift` per tensor, in tree order.
  """
  global_norm: float
  sparsity: float
  tau: float
  groups: Mapping[str, GroupDrift]
  tensors: tuple[TensorDrift, ...]

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict."""
    return dataclasses.asdict(self)


@jax.jit
def _sum_squares_and_small_count(a: jax.Array, b: jax.Array,
                                 tau: jax.Array) -> tuple[jax.Array, jax.Array]:
  # One small kernel per tensor shape: compiles fast and never holds all deltas at once.
  delta = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
  return jnp.sum(jnp.square(delta)), jnp.sum(jnp.abs(delta) <= tau, dtype=jnp.int32)


def _paired_leaves(params: Any, params0: Any) -> tuple[list[str], list[Any], list[Any]]:
  flat = flatten_with_paths(params)
  flat0 = flatten_with_paths(params0)
  if flat.keys() != flat0.keys():
    only = sorted(flat.keys() - flat0.keys())
    only0 = sorted(flat0.keys() - flat.keys())
    raise ValueError(f"params and params0 have different structures: only in params: "
                     f"{only[:5]}, only in params0: {only0[:5]}")
  paths = list(flat)
  for path in paths:
    shape, shape0 = np.shape(flat[path]), np.shape(flat0[path])
    if shape != shape0:
      raise ValueError(f"parameter '{path}' has shape {shape} in params but {shape0} in params0")
  return paths, [flat[p] for p in paths], [flat0[p] for p in paths]


def drift_report(params: Any, params0: Any, *, tau: float = 1e-6,
                 rules: Sequence[GroupRule] = DEFAULT_GROUP_RULES) -> DriftReport:
  """Global norm, per-group and per-tensor norms and sparsity of ``params - params0``.

  Args:
    params: current parameters theta (a pytree of arrays).
    params0: the initial parameters theta_0, same structure and shapes.
    tau: an element counts as unchanged when ``|theta - theta_0| <= tau``.
    rules: (group, regex) pairs, see :data:`DEFAULT_GROUP_RULES`.

  Returns:
    A :class:`DriftReport`.

  Raises:
    ValueError: if the trees differ in paths or shapes (naming the first ones).

  Example:
    >>> import numpy as np
    >>> theta0 = {"q_proj": {"weight": np.zeros((2, 2))}, "norm": {"scale": np.ones(2)}}
    >>> theta = {"q_proj": {"weight": np.full((2, 2), 3.0)}, "norm": {"scale": np.ones(2)}}
    >>> report = drift_report(theta, theta0)
    >>> report.global_norm, report.groups["q"].norm, report.groups["norm"].sparsity
    (6.0, 6.0, 1.0)
  """
  paths, leaves, leaves0 = _paired_leaves(params, params0)
  stats = jax.device_get([_sum_squares_and_small_count(a, b, jnp.float32(tau))
                          for a, b in zip(leaves, leaves0)])
  sums = [float(sum_sq) for sum_sq, _ in stats]
  counts = [int(count) for _, count in stats]
  tensors = []
  for path, leaf, sum_sq, count in zip(paths, leaves, sums, counts):
    size = int(np.prod(np.shape(leaf), dtype=np.int64))
    tensors.append(TensorDrift(path, assign_group(path, rules), size, math.sqrt(sum_sq),
                               count / size if size else 1.0))
  group_order = [name for name, _ in rules] + [OTHER_GROUP]
  groups = {}
  for name in dict.fromkeys(group_order):
    members = [(t, s, c) for t, s, c in zip(tensors, sums, counts) if t.group == name]
    if not members:
      continue
    size = sum(t.size for t, _, _ in members)
    groups[name] = GroupDrift(name, len(members), size, math.sqrt(sum(s for _, s, _ in members)),
                              sum(c for _, _, c in members) / size if size else 1.0)
  total_size = sum(t.size for t in tensors)
  return DriftReport(
      global_norm=math.sqrt(sum(sums)),
      sparsity=sum(counts) / total_size if total_size else 1.0,
      tau=tau,
      groups=groups,
      tensors=tuple(tensors))


def global_drift_norm(params: Any, params0: Any) -> float:
  """``||theta - theta_0||_F``: one Frobenius norm over all tensors together.

  Example:
    >>> import numpy as np
    >>> theta0 = {"a": np.zeros(4), "b": np.zeros(1)}
    >>> global_drift_norm({"a": np.full(4, 1.0), "b": np.zeros(1)}, theta0)
    2.0
  """
  return drift_report(params, params0).global_norm


def per_token_kl(logprobs: Any, ref_logprobs: Any) -> jax.Array:
  """``KL(pi || pi_ref)`` at every position, from full-vocabulary log-probs ``[B, T, V]``.

  Computed in float32 as ``sum_v p * (log p - log p_ref)``; vocabulary entries
  with ``p == 0`` contribute nothing. Inputs must be normalised log-probs (e.g.
  ``jax.nn.log_softmax(logits)``).

  Example:
    >>> import numpy as np
    >>> logp = np.log([[[0.5, 0.5]]])
    >>> per_token_kl(logp, logp).shape
    (1, 1)
  """
  logp = jnp.asarray(logprobs, jnp.float32)
  logq = jnp.asarray(ref_logprobs, jnp.float32)
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def mean_token_kl(logprobs: Any, ref_logprobs: Any, mask: Any) -> float:
  """Mean per-token ``KL(pi_theta || pi_0)`` over the positions where ``mask`` is nonzero.

  Args:
    logprobs: log-probs of the fine-tuned policy, ``[batch, time, vocab]``.
    ref_logprobs: log-probs of the initial policy, same shape.
    mask: ``[batch, time]``, 1 where a token counts (e.g. the attention mask).

  Returns:
    The mean KL per counted token, in nats.

  Raises:
    ValueError: on mismatched shapes or a mask that selects no token.

  Example:
    >>> import numpy as np
    >>> logp = np.log(np.array([[[0.5, 0.5]]]))
    >>> logq = np.log(np.array([[[0.25, 0.75]]]))
    >>> round(mean_token_kl(logp, logq, np.ones((1, 1))), 6)  # 0.5 ln 2 + 0.5 ln(2/3)
    0.143841
  """
  logp_shape, logq_shape, mask_shape = np.shape(logprobs), np.shape(ref_logprobs), np.shape(mask)
  if len(logp_shape) != 3 or logp_shape != logq_shape:
    raise ValueError(f"expected two [batch, time, vocab] arrays of the same shape, got "
                     f"{logp_shape} and {logq_shape}")
  if mask_shape != logp_shape[:2]:
    raise ValueError(f"mask has shape {mask_shape}; expected {logp_shape[:2]}")
  total, count = masked_kl_sum(logprobs, ref_logprobs, mask)
  if int(count) == 0:
    raise ValueError("mask selects no token; nothing to average")
  return float(total) / int(count)


@jax.jit
def masked_kl_sum(logprobs: jax.Array, ref_logprobs: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum of KL(pi || pi_ref) over the positions where mask is nonzero, their count)`` (jittable).

  The parts of :func:`mean_token_kl`, for averaging over several batches (or
  inside a jitted forward): ``sum(totals) / sum(counts)``. The sum is float32,
  the count int32; a mask that selects nothing gives ``(0, 0)``.

  Example:
    >>> import numpy as np
    >>> logp = np.log(np.array([[[0.5, 0.5], [0.5, 0.5]]]))
    >>> logq = np.log(np.array([[[0.25, 0.75], [0.5, 0.5]]]))
    >>> total, count = masked_kl_sum(logp, logq, np.array([[1, 1]]))
    >>> round(float(total), 6), int(count)
    (0.143841, 2)
  """
  counted = jnp.asarray(mask) != 0
  kl = per_token_kl(logprobs, ref_logprobs)
  return jnp.sum(jnp.where(counted, kl, 0.0)), jnp.sum(counted, dtype=jnp.int32)

"""The GRPO baseline's settings: the ``grpo`` section of an experiment config.

One dataclass serves both the runner's config (``--set grpo.group_size=8``)
and :func:`experiments.grpo.grpo_iteration`; the decode budget is the task's
(``task.max_new_tokens``) and is passed to the iteration separately.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optax

from experiments.validation import check, check_numbers


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """GRPO hyper-parameters; defaults are the forgetting paper's baseline (30 rollouts, beta 1e-3).

  Attributes:
    group_size: completions sampled per prompt, ``G`` (the papers: 30).
    prompts_per_iteration: prompts per GRPO step (the runner's data stream).
    clip_eps: PPO clip range: ratios outside ``[1 - eps, 1 + eps]`` stop
      contributing gradient in the direction that would leave it.
    kl_beta: weight of the k3 KL penalty to the reference model (papers: 1e-3;
      0 skips the reference forward).
    learning_rate: Adam's step size (TRL's default 1e-6).
    temperature: sampling temperature (> 0: GRPO needs a stochastic policy).
    num_inner_steps: optimisation steps per rollout batch, ``mu`` (1: on-policy).
    max_grad_norm: global-norm gradient clip before Adam (Hugging Face Trainer's
      default 1.0); None disables it.
    adv_eps: added to the group std before dividing (TRL's 1e-4).
    micro_batches: :func:`~experiments.grpo.grpo_iteration` splits the ``P*G``
      rows into this many equal micro-batches, one update call each, and
      :meth:`optimizer` accumulates their gradients (``optax.MultiSteps``) into
      one step: the same step as on the whole batch, in ``1 / micro_batches``
      of the activation memory.

  Example:
    >>> GrpoConfig().group_size
    30
    >>> GrpoConfig(clip_eps=2.0)
    Traceback (most recent call last):
    ...
    ValueError: clip_eps must be in (0, 1) (0.2 is the usual value), got 2.0.
    >>> GrpoConfig(learning_rate=float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: grpo.learning_rate=inf must be a finite number
  """

  group_size: int = 30
  prompts_per_iteration: int = 8
  clip_eps: float = 0.2
  kl_beta: float = 1e-3
  learning_rate: float = 1e-6
  temperature: float = 1.0
  num_inner_steps: int = 1
  max_grad_norm: float | None = 1.0
  adv_eps: float = 1e-4
  micro_batches: int = 1

  def __post_init__(self):
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    for name, ok, rule, hint in (
        ("group_size", is_int(self.group_size) and self.group_size >= 2, "an int >= 2",
         " (advantages compare completions of one prompt)"),
        ("prompts_per_iteration", is_int(self.prompts_per_iteration)
         and self.prompts_per_iteration >= 1, "an int >= 1", ""),
        ("clip_eps", 0 < self.clip_eps < 1, "in (0, 1)", " (0.2 is the usual value)"),
        ("kl_beta", self.kl_beta >= 0, ">= 0", " (0 disables the KL penalty)"),
        ("learning_rate", self.learning_rate > 0, "> 0", ""),
        ("temperature", self.temperature > 0, "> 0",
         " (GRPO samples; greedy decoding gives identical groups)"),
        ("num_inner_steps", is_int(self.num_inner_steps) and self.num_inner_steps >= 1,
         "an int >= 1", " (1 = on-policy)"),
        ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0, "> 0 or None",
         " (None disables clipping)"),
        ("adv_eps", self.adv_eps > 0, "> 0", " (it keeps all-equal groups finite)"),
        ("micro_batches", is_int(self.micro_batches) and self.micro_batches >= 1, "an int >= 1",
         " (1 = the whole batch at once)")):
      value = getattr(self, name)
      # An inf is left to check_numbers, whose message names it with its section.
      check(ok or (isinstance(value, float) and math.isinf(value)),
            f"{name} must be {rule}{hint}, got {value!r}.")
    check_numbers(self, "grpo.")

  def optimizer(self) -> optax.GradientTransformation:
    """Adam at ``learning_rate`` after a global-norm clip (TRL / HF Trainer defaults, no decay).

    No weight decay: decaying toward zero is not the KL anchor and would move
    every weight, where GRPO's update is known to be sparse. With
    ``micro_batches > 1`` it is wrapped in ``optax.MultiSteps``: the first
    ``micro_batches - 1`` calls only accumulate (params unchanged, so the
    on-policy ratio stays 1), the last applies Adam to the mean gradient.
    """
    optimizer = optax.adam(self.learning_rate)
    if self.max_grad_norm is not None:
      optimizer = optax.chain(optax.clip_by_global_norm(self.max_grad_norm), optimizer)
    if self.micro_batches > 1:
      optimizer = optax.MultiSteps(optimizer, every_k_schedule=self.micro_batches)
      optimizer = optimizer.gradient_transformation()
    return optimizer

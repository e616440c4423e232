"""Typed experiment configs, the presets of the papers, and ``--set`` overrides.

An :class:`ExperimentConfig` is a frozen tree of small dataclasses (model,
task, ES, AWD, GRPO, schedule). :data:`PRESETS` names the published setups;
a sweep preset names several configs, run one after another in
sub-directories. ``apply_overrides(config, ["es.population=128"])`` changes
any field by its dotted path, parsing the value by the field's type.

Example:
  >>> cfg = apply_overrides(preset("countdown_es"), ["es.population=128", "awd.kind=l2",
  ...                                                "awd.strength=10"])
  >>> cfg.es.population, cfg.awd.kind, cfg.awd.strength, cfg.es.sigma
  (128, 'l2', 10.0, 0.001)
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from es_jax import recipe
from es_jax.evaluation import PRIOR_SUITE
from experiments.grpo_config import GrpoConfig
from experiments.validation import check as _check
from experiments.validation import check_numbers as _check_numbers

ALGORITHMS = ("es", "grpo")
TARGETS = ("countdown", "gsm8k", "arithmetic")
AWD_KINDS = ("none", "l2", "l1")
# The shapings an ES patch can name (one registry, es_jax.recipe's), except group_z_score,
# whose group size the runner does not carry.
SHAPINGS = tuple(name for name in recipe.SHAPINGS if name != "group_z_score")
FITNESSES = ("reward", "answer_logprob")
# Upper bounds on the sizes a run can be given; past them it would crash raw after the model
# has loaded (or never end), so they are refused up front. Generous for a GPU cluster: EGGROLL's
# largest published population is 2**18, Qwen2.5's context 32,768 tokens.
MAX_POPULATION = 2**20
MAX_NEW_TOKENS = 2**15
MAX_EXAMPLES = 10**6       # task.num_train, num_eval, num_prior (generated tasks make them all)
MAX_PROMPT_BATCH = 2**14
MAX_ITERATIONS = 10**7
MAX_SEED = recipe.MAX_SEED  # jax.random.key(2**32) is key(0): a larger seed repeats a smaller one
PROMPT_CENTERINGS = ("none", "center", "normalize")


def _check_name(name: str) -> None:
  """A run name is one path component: it names the run's directory inside a sweep's ``--out``."""
  _check(isinstance(name, str) and bool(name) and name not in (".", "..")
         and not name.startswith(".") and all(c.isalnum() or c in "-_.+=" for c in name),
         f"name={name!r}: use letters, digits and - _ . + = (not starting with '.'), so that it "
         "names one directory inside --out")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which checkpoint, in which dtypes.

  Attributes:
    checkpoint: a local Hugging Face checkpoint directory or a hub id.
    dtype: compute dtype (``bfloat16`` on GPUs; ``float32`` for exact runs).
    param_dtype: dtype of the trained weights. ES steps are ~1e-4 per weight,
      below bfloat16's resolution at typical weight sizes: keep ``float32``.
    chat_template: wrap prompts in the tokenizer's chat template.
    scan_layers: stack the layers and run them with ``nn.scan``
      (``es_jax.models.ModelConfig.scan_layers``): compile time that does not
      grow with depth. The ES noise then differs (it depends on the params'
      layout), so a run does not reproduce the unrolled model's numbers.
  """
  checkpoint: str = "Qwen/Qwen2.5-0.5B-Instruct"
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  chat_template: bool = True
  scan_layers: bool = False

  def __post_init__(self):
    _check_numbers(self, "model.")
    for name in ("chat_template", "scan_layers"):
      _check(isinstance(getattr(self, name), bool),
             f"model.{name}={getattr(self, name)!r}: use true or false")
    for name in ("dtype", "param_dtype"):
      _check(getattr(self, name) in ("float32", "bfloat16", "float16"),
             f"model.{name}={getattr(self, name)!r}: use float32, bfloat16 or float16")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """The target task (trained on), the prior task (watched for forgetting), and their data.

  Attributes:
    target: ``countdown``, ``gsm8k`` or ``arithmetic`` (two-digit sums answered
      with only the number, :class:`es_jax.evaluation.ArithmeticTask`).
    train_source: None generates Countdown or arithmetic problems / loads GSM8K's
      train split from the hub; else a hub name or a local ``.jsonl``.
    num_train: training prompts (the papers: 200).
    prompts_per_iteration: prompts each ES member (or GRPO step) sees per
      iteration; None = all ``num_train`` (the papers' ES).
    eval_source: held-out target-task data (None: generated / hub test split).
    num_eval: held-out target-task prompts scored every ``eval_every``.
    prior: the prior tasks watched for forgetting: ``none``, one name of
      :data:`es_jax.evaluation.PRIOR_SUITE` (``hellaswag``, ``piqa``,
      ``arc_easy``, ``arc_challenge``, ``mmlu``, ``mmlu_pro``, ``winogrande``)
      or several, comma-separated (``hellaswag,piqa,arc_easy``).
    prior_source: where they load from. None: the hub; a directory: a data
      root in the layout of ``../shared/data``
      (:data:`experiments.prior_suite.LOCAL_FILES`); a file (one prior task
      only); ``shipped``: the subsets in ``experiments/data/`` (HellaSwag's
      1000 validation items, a random draw), for machines without a hub.
    prior_seed: None scores each task's first ``num_prior`` items; a seed, a
      random subset of them (``es_jax.evaluation.select_indices``), which a
      file stored in order needs (MMLU's go subject by subject).
    prior_protocol: ``loglik`` (lm-eval) or ``generative`` (numbered choice).
    num_prior: items of each prior task scored every ``eval_every``.
    kl_prompts: target-task eval prompts on which KL to the base model is measured.
    max_new_tokens: decode budget per completion.
    shots: solved problems shown before each plain prompt (``arithmetic`` only;
      needs ``model.chat_template=false``).
    prior_every: the prior task is scored at every ``prior_every``-th metrics
      record (and at the first and the last); the others record it as null.
  """
  target: str = "countdown"
  train_source: str | None = None
  num_train: int = 200
  prompts_per_iteration: int | None = None
  eval_source: str | None = None
  num_eval: int = 200
  prior: str = "hellaswag"
  prior_source: str | None = None
  prior_seed: int | None = None
  prior_protocol: str = "loglik"
  num_prior: int = 500
  kl_prompts: int = 16
  max_new_tokens: int = 1024
  shots: int = 0
  prior_every: int = 1

  def __post_init__(self):
    _check_numbers(self, "task.", {"max_new_tokens": MAX_NEW_TOKENS, "num_train": MAX_EXAMPLES,
                                   "num_eval": MAX_EXAMPLES, "num_prior": MAX_EXAMPLES,
                                   "prior_seed": MAX_SEED})
    _check(self.prior_every >= 1, f"task.prior_every={self.prior_every} must be >= 1")
    _check(self.prior_seed is None or 0 <= self.prior_seed <= MAX_SEED,
           f"task.prior_seed={self.prior_seed} must be None or in [0, {MAX_SEED}]")
    _check(self.shots >= 0, f"task.shots={self.shots} must be >= 0")
    _check(self.shots == 0 or self.target == "arithmetic",
           f"task.shots={self.shots} is an option of task.target=arithmetic only; "
           f"set task.shots=0 for {self.target!r}")
    _check(self.target in TARGETS, f"task.target={self.target!r}: use one of {TARGETS}")
    unknown = [name for name in self.prior_tasks if name not in PRIOR_SUITE]
    _check(isinstance(self.prior, str) and not unknown
           and len(set(self.prior_tasks)) == len(self.prior_tasks),
           f"task.prior={self.prior!r}: use none, or one or more (comma-separated, each once) of "
           f"{', '.join(PRIOR_SUITE)}")
    _check(self.prior_protocol in ("loglik", "generative"),
           f"task.prior_protocol={self.prior_protocol!r}: use loglik or generative")
    for name in ("num_train", "num_eval", "max_new_tokens"):
      _check(getattr(self, name) >= 1, f"task.{name}={getattr(self, name)} must be >= 1")
    _check(not self.prior_tasks or self.num_prior >= 1,
           f"task.num_prior={self.num_prior} must be >= 1 with task.prior={self.prior!r} "
           "(or set task.prior=none)")
    _check(0 <= self.kl_prompts <= self.num_eval,
           f"task.kl_prompts={self.kl_prompts} must be in [0, num_eval={self.num_eval}]: the KL "
           "is measured on the first kl_prompts held-out prompts")
    _check(self.prompts_per_iteration is None or 1 <= self.prompts_per_iteration <= self.num_train,
           f"task.prompts_per_iteration={self.prompts_per_iteration} must be in "
           f"[1, num_train={self.num_train}] or None (all)")


  @property
  def prior_tasks(self) -> tuple[str, ...]:
    """The names in ``prior`` (empty for ``none``)."""
    if not isinstance(self.prior, str) or self.prior == "none":
      return ()
    return tuple(name.strip() for name in self.prior.split(","))


@dataclasses.dataclass(frozen=True)
class EsSpec:
  """The ES step (defaults: the papers' ES of Qiu et al.; ``rank`` selects EGGROLL noise).

  Attributes:
    population: N members per iteration.
    sigma: noise scale.
    learning_rate: alpha of ``theta += alpha / N * sum_n Z_n eps_n``.
    rank: None = full-rank noise (Qiu et al.); r >= 1 = EGGROLL ``A B^T / sqrt(r)``.
    antithetic: mirrored pairs (the papers' ES: no).
    shaping: fitness shaping (``z_score`` as published).
    freeze: regexes of param paths that are not perturbed; None = the
      embedding table with low-rank noise (EGGROLL's reference excludes it,
      and a table lookup cannot take a low-rank factor), nothing with full rank.
    kl_beta: weight of a KL-to-base penalty in the fitness:
      ``fitness = reward - kl_beta * KL(member || base)``, the member's mean
      per-token KL to theta_0 on its own greedy completions of the
      iteration's prompts (the forgetting paper's open question); ``reward``
      is ``fitness``'s score. 0 = off, at no extra cost; > 0 adds two forwards
      per member and iteration, and with ``answer_logprob`` also the greedy
      decode the KL is measured on.
    chunk_size: members evaluated together (``es_jax.es_step``'s name; here
      it need not divide the population: the last chunk is smaller). It
      bounds memory: with full-rank noise each member holds a copy of the
      weights. None = all members with low-rank noise, 4 with full-rank noise.
    prompt_centering: how the ``(members, prompts)`` reward matrix becomes
      fitness before ``shaping``: ``none`` (each member's mean), ``center``
      (each prompt's column centred on its mean over the members, then averaged:
      eggroll-vllm's ``fitness_per_prompt``) or ``normalize`` (also divided by
      the column's std: every prompt weighs the same). See
      :func:`es_jax.per_prompt_centering`.
    fitness: ``reward`` (the papers': decode greedily, score with the task's
      reward) or ``answer_logprob`` (the mean log-probability of the gold
      completion, teacher-forced; tasks with a ``reference_completion`` only,
      see :mod:`experiments.likelihood`).
  """
  population: int = 30
  sigma: float = 1e-3
  learning_rate: float = 5e-4
  rank: int | None = None
  antithetic: bool = False
  shaping: str = "z_score"
  freeze: tuple[str, ...] | None = None
  kl_beta: float = 0.0
  chunk_size: int | None = None
  fitness: str = "reward"
  prompt_centering: str = "none"

  def __post_init__(self):
    _check_numbers(self, "es.", {"population": MAX_POPULATION, "chunk_size": MAX_POPULATION})
    _check(self.fitness in FITNESSES, f"es.fitness={self.fitness!r}: use one of {FITNESSES}")
    _check(self.prompt_centering in PROMPT_CENTERINGS,
           f"es.prompt_centering={self.prompt_centering!r}: use one of {PROMPT_CENTERINGS}")
    _check(self.population >= 2, f"es.population={self.population} must be >= 2")
    _check(self.sigma > 0 and self.learning_rate > 0,
           f"es.sigma={self.sigma} and es.learning_rate={self.learning_rate} must be > 0")
    _check(self.rank is None or self.rank >= 1, f"es.rank={self.rank}: None (full) or >= 1")
    _check(self.shaping in SHAPINGS, f"es.shaping={self.shaping!r}: use one of {SHAPINGS}")
    _check(self.kl_beta >= 0, f"es.kl_beta={self.kl_beta} must be >= 0 (0 = no KL penalty)")
    _check(self.chunk_size is None or self.chunk_size >= 1,
           f"es.chunk_size={self.chunk_size} must be >= 1 or None")

  @property
  def effective_chunk_size(self) -> int:
    """``chunk_size`` with its default resolved."""
    if self.chunk_size is not None:
      return min(self.chunk_size, self.population)
    return self.population if self.rank is not None else min(4, self.population)

  @property
  def frozen(self) -> tuple[str, ...]:
    """The regexes actually frozen (``freeze`` with its default resolved)."""
    if self.freeze is not None:
      return self.freeze
    return () if self.rank is None else ("embed",)


@dataclasses.dataclass(frozen=True)
class AwdSpec:
  """Anchored weight decay after the ES step (``none``, ``l2`` or ``l1``; the AWD paper's rule)."""
  kind: str = "none"
  strength: float = 0.0

  def __post_init__(self):
    _check_numbers(self, "awd.")
    _check(self.kind in AWD_KINDS, f"awd.kind={self.kind!r}: use one of {AWD_KINDS}")
    _check(self.kind == "none" or self.strength > 0,
           f"awd.strength={self.strength} must be > 0 with awd.kind={self.kind!r}")


@dataclasses.dataclass(frozen=True)
class MitigationSpec:
  """The forgetting paper's open checks, after the ES step (``es_jax.mitigations``).

  The chain is ``es_step -> sgd -> sparsified_updates -> anchored_weight_decay ->
  anchored_norm_cap``: the sparsification keeps the top entries of the ES step
  itself, and the cap comes last so that ``||theta - theta_0|| <= norm_cap``
  holds after every iteration.

  Attributes:
    sparsify_fraction: keep this fraction of each step's entries by magnitude
      (0 = off).
    sparsify_scope: ``per_tensor`` or ``global``.
    sparsify_residual: ``drop`` the rest of the step or ``carry`` it to the next.
    norm_cap: radius of the ball around theta_0 the weights are projected onto
      (0 = off).
    norm_cap_scope: ``global`` (one norm over all weights) or ``per_tensor``.
  """
  sparsify_fraction: float = 0.0
  sparsify_scope: str = "per_tensor"
  sparsify_residual: str = "drop"
  norm_cap: float = 0.0
  norm_cap_scope: str = "global"

  def __post_init__(self):
    _check_numbers(self, "mitigation.")
    _check(0 <= self.sparsify_fraction <= 1,
           f"mitigation.sparsify_fraction={self.sparsify_fraction} must be in [0, 1] (0 = off)")
    _check(self.norm_cap >= 0, f"mitigation.norm_cap={self.norm_cap} must be >= 0 (0 = off)")
    for name, allowed in (("sparsify_scope", ("per_tensor", "global")),
                          ("sparsify_residual", ("drop", "carry")),
                          ("norm_cap_scope", ("global", "per_tensor"))):
      _check(getattr(self, name) in allowed,
             f"mitigation.{name}={getattr(self, name)!r}: use one of {allowed}")


WANDB_MODES = ("offline", "online")


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
  """Experiment tracking beside ``metrics.jsonl`` (:mod:`experiments.tracking`); off by default.

  It does not change the trajectory, so a resume may turn it on or off.

  Attributes:
    tensorboard: write TensorBoard event files to ``<run dir>/tensorboard/``
      (needs the ``tracking`` extra: tensorboardX).
    wandb: log to Weights & Biases, into ``<run dir>/wandb/`` (needs the
      ``wandb`` extra).
    wandb_project: the W&B project the run belongs to.
    wandb_mode: ``offline`` (no network; ``wandb sync <run dir>/wandb/offline-run-*``
      uploads later) or ``online``.
  """
  tensorboard: bool = False
  wandb: bool = False
  wandb_project: str = "es_jax"
  wandb_mode: str = "offline"

  def __post_init__(self):
    for name in ("tensorboard", "wandb"):
      _check(isinstance(getattr(self, name), bool),
             f"tracking.{name}={getattr(self, name)!r}: use true or false")
    _check(self.wandb_mode in WANDB_MODES,
           f"tracking.wandb_mode={self.wandb_mode!r}: use one of {WANDB_MODES}")
    # W&B refuses these characters in a project name, but only once the run has started.
    _check(isinstance(self.wandb_project, str) and bool(self.wandb_project)
           and not set(self.wandb_project) & set("/\\#?%:"),
           f"tracking.wandb_project={self.wandb_project!r}: use a non-empty name without "
           "/ \\ # ? % :")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One run.

  Attributes:
    name: the preset (or variant) name; also the run directory's default name.
    algorithm: ``es`` or ``grpo``.
    iterations: ES generations / GRPO steps.
    eval_every: iterations between metric records (and the first, at 0).
    checkpoint_every: iterations between checkpoints (0: only at the end).
    keep_checkpoints: checkpoints kept (the newest).
    prompt_batch: prompts per decode call (bounds memory with ``es.chunk_size``).
    pop_devices: devices on the ``'pop'`` mesh axis; 0 = all local devices,
      1 = no mesh.
    seed: seeds the noise, data order and sampling.
  """
  name: str = "countdown_es"
  algorithm: str = "es"
  model: ModelSpec = ModelSpec()
  task: TaskSpec = TaskSpec()
  es: EsSpec = EsSpec()
  awd: AwdSpec = AwdSpec()
  mitigation: MitigationSpec = MitigationSpec()
  grpo: GrpoConfig = GrpoConfig()
  tracking: TrackingSpec = TrackingSpec()
  iterations: int = 500
  eval_every: int = 25
  checkpoint_every: int = 25
  keep_checkpoints: int = 3
  prompt_batch: int = 32
  pop_devices: int = 0
  seed: int = 0

  def __post_init__(self):
    _check_numbers(self, "", {"iterations": MAX_ITERATIONS, "prompt_batch": MAX_PROMPT_BATCH,
                              "seed": MAX_SEED})
    _check(self.seed >= 0, f"seed={self.seed} must be >= 0 (it seeds NumPy's generator too)")
    _check_name(self.name)
    _check(self.algorithm in ALGORITHMS, f"algorithm={self.algorithm!r}: use one of {ALGORITHMS}")
    _check(self.iterations >= 1 and self.eval_every >= 1 and self.prompt_batch >= 1,
           "iterations, eval_every and prompt_batch must be >= 1")
    _check(self.checkpoint_every >= 0 and self.keep_checkpoints >= 1,
           "checkpoint_every must be >= 0 and keep_checkpoints >= 1")
    _check(self.pop_devices >= 0, f"pop_devices={self.pop_devices} must be >= 0")
    _check(self.task.shots == 0 or not self.model.chat_template,
           f"task.shots={self.task.shots} builds plain few-shot prompts; set "
           "model.chat_template=false (or task.shots=0 for the chat question)")
    per_tensor = [name for name, on, scope in (
        ("sparsify", self.mitigation.sparsify_fraction, self.mitigation.sparsify_scope),
        ("norm_cap", self.mitigation.norm_cap, self.mitigation.norm_cap_scope))
        if on and scope == "per_tensor"]
    _check(not (self.model.scan_layers and per_tensor),
           f"mitigation.{'/'.join(per_tensor)} per_tensor with model.scan_layers=true would treat "
           "each stacked leaf (all layers of one weight kind) as one tensor; use scope global or "
           "model.scan_layers=false")
    alpha_lambda = self.es.learning_rate * self.awd.strength
    _check(self.awd.kind != "l2" or alpha_lambda < 1,
           f"awd.strength * es.learning_rate = {alpha_lambda:g} must be < 1 for L2 AWD "
           "(the decay factor 1 - alpha * lambda would flip or zero the deviation)")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
    """Inverse of :meth:`to_dict` (JSON round trip: lists become tuples where typed so)."""
    return _from_dict(cls, d)


# Fields renamed since runs were written: (section class, old name) -> new name.
RENAMED = {("EsSpec", "member_chunk"): "chunk_size"}


def _renamed(cls: type, names) -> str:
  """``" (X was renamed Y)"`` for each renamed field among ``names``, else ``""``."""
  hints = [f"{old} was renamed {RENAMED[cls.__name__, old]}" for old in sorted(names)
           if (cls.__name__, old) in RENAMED]
  return f" ({'; '.join(hints)})" if hints else ""


def _from_dict(cls, d: Mapping[str, Any]):
  hints = typing.get_type_hints(cls)
  unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
  _check(not unknown, f"unknown {cls.__name__} fields {sorted(unknown)}{_renamed(cls, unknown)}")
  kwargs = {}
  for name, value in d.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _from_dict(hint, value)
    elif isinstance(value, list):
      kwargs[name] = tuple(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides


def _parse(text: str, hint: Any, where: str) -> Any:
  """``text`` as a value of type ``hint`` (int, float, bool, str, optional, tuple of str)."""
  args = typing.get_args(hint)
  if type(None) in args:
    if text.lower() in ("none", "null"):
      return None
    hint = next(a for a in args if a is not type(None))
  if typing.get_origin(hint) is tuple:
    return tuple(part for part in text.split(",") if part) if text else ()
  if hint is bool:
    _check(text.lower() in ("true", "false", "1", "0"), f"{where}: expected true/false, got {text!r}")
    return text.lower() in ("true", "1")
  try:
    return hint(text)
  except ValueError:
    raise ValueError(f"{where}: cannot read {text!r} as {hint.__name__}") from None


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
  """``config`` with each ``"section.field=value"`` (or ``"field=value"``) applied.

  All overrides are applied before the config is validated, so
  ``awd.kind=l1 awd.strength=0.01`` works in either order.

  Raises:
    ValueError: naming the override, for an unknown field or an unreadable value,
      or naming the field, for an invalid resulting config.
  """
  tree = config.to_dict()
  for override in overrides:
    path, sep, text = override.partition("=")
    _check(bool(sep), f"override {override!r}: expected section.field=value, e.g. es.population=128")
    node, cls = tree, ExperimentConfig
    *sections, field = path.strip().split(".")
    for name in sections + [field]:
      fields = {f.name for f in dataclasses.fields(cls)}
      _check(name in fields, f"override {override!r}: {cls.__name__} has no field {name!r}"
                             f"{_renamed(cls, [name])}; fields: {', '.join(sorted(fields))}")
      hint = typing.get_type_hints(cls)[name]
      if name == field:
        _check(not dataclasses.is_dataclass(hint),
               f"override {override!r}: {name} is a section; set one of its fields")
        node[name] = _parse(text.strip(), hint, override)
      else:
        _check(dataclasses.is_dataclass(hint), f"override {override!r}: {name} is not a section")
        node, cls = node[name], hint
  return ExperimentConfig.from_dict(tree)


# ----------------------------------------------------------------------------- presets


def _with(config: ExperimentConfig, name: str, **sections: Mapping[str, Any]) -> ExperimentConfig:
  changes = {section: dataclasses.replace(getattr(config, section), **fields)
             for section, fields in sections.items()}
  return dataclasses.replace(config, name=name, **changes)


# The papers' ES on Countdown: full-rank noise, no antithetic
# pairs, z-score shaping, alpha=5e-4, sigma=1e-3, N=30, 200 prompts, greedy decoding.
COUNTDOWN_ES = ExperimentConfig()
GSM8K_ES = _with(COUNTDOWN_ES, "gsm8k_es", task=dict(target="gsm8k", max_new_tokens=512))
COUNTDOWN_EGGROLL = _with(COUNTDOWN_ES, "countdown_eggroll", es=dict(rank=1))
AWD_L2 = _with(COUNTDOWN_ES, "countdown_awd_l2", awd=dict(kind="l2", strength=10.0))
AWD_L1 = _with(COUNTDOWN_ES, "countdown_awd_l1", awd=dict(kind="l1", strength=0.01))
GRPO = dataclasses.replace(COUNTDOWN_ES, name="grpo", algorithm="grpo")

# The AWD paper's ablation grids.
L2_GRID = (0.05, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0)
L1_GRID = (1e-4, 1e-3, 1e-2, 5e-2)

SWEEPS: dict[str, tuple[ExperimentConfig, ...]] = {
    "awd_l2_sweep": tuple(_with(COUNTDOWN_ES, f"awd_l2_{s:g}", awd=dict(kind="l2", strength=s))
                          for s in L2_GRID),
    "awd_l1_sweep": tuple(_with(COUNTDOWN_ES, f"awd_l1_{s:g}", awd=dict(kind="l1", strength=s))
                          for s in L1_GRID),
    "population_sweep": tuple(_with(COUNTDOWN_EGGROLL, f"population_{n}", es=dict(population=n))
                              for n in (30, 128, 256)),
    "rank_sweep": tuple(_with(COUNTDOWN_ES, f"rank_{r}", es=dict(rank=r)) for r in (1, 4, 16)),
    "noise_rank": (_with(COUNTDOWN_ES, "full_rank", es=dict(rank=None)),
                   _with(COUNTDOWN_ES, "low_rank", es=dict(rank=1))),
}

# The main job (``make demo``): SmolLM2-135M-Instruct, packaged as GGUF, on a 2-core CPU.
# Two-digit sums asked 3-shot as plain text start at ~20% held out (the chat question: 0%),
# so ES has room on both sides; HellaSwag (acc_norm) on the shipped subset watches the prior
# skill. ES climbs the gold answer's log-likelihood (with 16 prompts a 0/1 reward gave every
# member the same fitness, so no update). Scaled to a ~15 minute budget: antithetic rank-1
# noise, N=8, 16 fresh prompts an iteration; the README gives the step-size reasoning.
SMOLLM2_ES = ExperimentConfig(
    name="smollm2_es",
    model=ModelSpec(checkpoint="smollm2-135m-instruct", dtype="float32", chat_template=False),
    task=TaskSpec(target="arithmetic", shots=3, num_train=1024, prompts_per_iteration=16,
                  num_eval=100, prior_source="shipped", num_prior=120, prior_every=3,
                  kl_prompts=16, max_new_tokens=6),
    es=EsSpec(population=8, sigma=1e-3, learning_rate=2e-3, rank=1, antithetic=True,
              fitness="answer_logprob"),
    iterations=12, eval_every=4, checkpoint_every=12, keep_checkpoints=1, prompt_batch=64)
SMOLLM2_AWD = _with(SMOLLM2_ES, "smollm2_es_awd", awd=dict(kind="l2", strength=50.0))
SWEEPS["smollm2_forgetting"] = (SMOLLM2_ES, SMOLLM2_AWD)
# The forgetting paper's open questions on the main job's model, task and budget: each run
# starts from the same theta_0, draws the same noise and is scored on the same items. The cap
# sits at the norm AWD reached (20); L1's alpha * lambda = 2e-4 per weight and iteration is
# about what L2 takes off the main job's final per-weight deviation (3e-3 * 0.1); beta = 1
# weighs the KL in the fitness's own unit (nats per token); N=32 keeps alpha. The last run is
# plain ES trained twice as long (its first 12 iterations are smollm2_es's), the prior task
# scored every 8: does the prior-task drift reverse once the new task has converged?
SWEEPS["smollm2_open_questions"] = (
    SMOLLM2_ES, SMOLLM2_AWD,
    _with(SMOLLM2_ES, "smollm2_es_awd_l1", awd=dict(kind="l1", strength=0.1)),
    _with(SMOLLM2_ES, "smollm2_es_norm_cap", mitigation=dict(norm_cap=20.0)),
    _with(SMOLLM2_ES, "smollm2_es_top10", mitigation=dict(sparsify_fraction=0.1)),
    _with(SMOLLM2_ES, "smollm2_es_kl", es=dict(kl_beta=1.0)),
    _with(SMOLLM2_ES, "smollm2_es_n32", es=dict(population=32, chunk_size=8)),
    dataclasses.replace(_with(SMOLLM2_ES, "smollm2_es_long", task=dict(prior_every=2)),
                        iterations=24, checkpoint_every=24))
# GRPO on the main job's model and task (not in the sweep: see the README for its cost).
SMOLLM2_GRPO = _with(SMOLLM2_ES, "smollm2_grpo", grpo=dict(group_size=8, prompts_per_iteration=4,
                                                           learning_rate=1e-5))
SMOLLM2_GRPO = dataclasses.replace(SMOLLM2_GRPO, algorithm="grpo")

PRESETS: dict[str, ExperimentConfig] = {
    c.name: c for c in (COUNTDOWN_ES, GSM8K_ES, COUNTDOWN_EGGROLL, AWD_L2, AWD_L1, GRPO,
                        SMOLLM2_ES, SMOLLM2_AWD, SMOLLM2_GRPO)}


def preset(name: str) -> ExperimentConfig:
  """One run's preset by name."""
  _check(name in PRESETS, f"unknown preset {name!r}; presets: {', '.join(PRESETS)}; "
                          f"sweeps: {', '.join(SWEEPS)}")
  return PRESETS[name]


def expand(name: str) -> tuple[ExperimentConfig, ...]:
  """The configs a preset or sweep name stands for."""
  if name in SWEEPS:
    return SWEEPS[name]
  return (preset(name),)

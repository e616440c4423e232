"""A JSON-serialisable recipe of an ES optimizer chain: what an ES patch stores.

An ES fine-tune is determined by theta_0, the optimizer chain and each
generation's fitness vector (the noise is a pure function of the ES key and
the generation). :class:`EsRecipe` describes the chain in plain data, so it
can be written beside the fitness history, fingerprinted, and rebuilt into
the same optax transformation later::

  es_step(None, ...)  ->  sgd | adam  ->  post-step transforms, in order
                                          (anchored_weight_decay, sparsified_updates,
                                           anchored_norm_cap)

The experiments runner's ES chain is
``EsRecipe(EsStepRecipe(population=N, sigma=s, seed=seed, rank=r, antithetic=a,
shaping=name, estimator="qiu", freeze=frozen), OptimizerRecipe("sgd", alpha),
(AwdRecipe(strength, kind),))``.

Learning rates are constants here: a schedule is code, not data.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, ClassVar, Literal

import jax
import optax

from es_jax import _checks
from es_jax import awd
from es_jax import es
from es_jax import mitigations
from es_jax import shaping
from es_jax import sharding

RECIPE_VERSION = 1
#: Seeds that give one key in JAX's 32- and 64-bit modes: past 32 bits the default
#: mode keeps only the low 32 (``key(2**32)`` is ``key(0)``), and past 63 it overflows.
MAX_SEED = 2**32 - 1
#: Post-step transforms a recipe may chain: each may hold a copy of the params.
MAX_POST = 8

#: Shaping functions a recipe may name (a recipe stores the name, not the function).
SHAPINGS = {
    "z_score": shaping.z_score,
    "centered_rank": shaping.centered_rank,
    "identity": shaping.identity,
    "antithetic_difference": shaping.antithetic_difference,
    "group_z_score": shaping.group_z_score,  # needs group_size
}


def _coerce_fields(obj, *, ints=(), optional_ints=(), floats=(), optional_floats=(), bools=(),
                   strs=()):
  """Checks field types (JSON gives lists, ints for floats) and stores canonical values."""
  where = type(obj).__name__
  for name in ints + optional_ints:
    value = getattr(obj, name)
    if value is None and name in optional_ints:
      continue
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{where}.{name} must be an int{' or None' if name in optional_ints else ''}"
                      f", got {type(value).__name__} {value!r}.")
  for name in floats + optional_floats:
    value = getattr(obj, name)
    if value is None and name in optional_floats:
      continue
    object.__setattr__(obj, name, _checks.real_in(f"{where}.{name}", value, low=-math.inf))
  for name in bools:
    if not isinstance(getattr(obj, name), bool):
      raise TypeError(f"{where}.{name} must be a bool, got {getattr(obj, name)!r}.")
  for name in strs:
    if not isinstance(getattr(obj, name), str):
      raise TypeError(f"{where}.{name} must be a string, got {getattr(obj, name)!r}.")


@dataclasses.dataclass(frozen=True)
class EsStepRecipe:
  """The :func:`es_jax.es_step` arguments, with ``reward_fn=None`` (fitness is passed in).

  ``seed``, in ``[0, MAX_SEED]``, gives the key ``jax.random.key(seed)``; ``shaping``
  names a function of :data:`SHAPINGS` (``group_size`` is for ``"group_z_score"``).
  Other fields are ``es_step``'s keyword arguments of the same names.
  """

  population: int
  sigma: float
  seed: int
  rank: int | None = 1
  antithetic: bool = True
  shaping: str = "z_score"
  group_size: int | None = None
  estimator: Literal["gradient", "qiu"] = "gradient"
  on_failure: Literal["exclude", "worst"] = "exclude"
  vector_noise: Literal["full", "frozen"] = "full"
  freeze: tuple[str, ...] = ()
  scanned: tuple[str, ...] = ()
  chunk_size: int | None = None
  population_axis: str = sharding.POP_AXIS

  def __post_init__(self):
    _coerce_fields(self, ints=("population", "seed"),
                   optional_ints=("rank", "group_size", "chunk_size"), floats=("sigma",),
                   bools=("antithetic",),
                   strs=("shaping", "estimator", "on_failure", "vector_noise", "population_axis"))
    for name in ("freeze", "scanned"):
      object.__setattr__(self, name, _checks.regexes(f"EsStepRecipe.{name}", getattr(self, name)))
    _checks.integer("EsStepRecipe.seed", self.seed, minimum=0, maximum=MAX_SEED)
    if self.shaping not in SHAPINGS:
      raise ValueError(f"EsStepRecipe.shaping must be one of {sorted(SHAPINGS)}, got "
                       f"{self.shaping!r}.")
    if (self.shaping == "group_z_score") != (self.group_size is not None):
      raise ValueError("EsStepRecipe.group_size is required with shaping='group_z_score' and "
                       f"only then; got shaping={self.shaping!r}, group_size={self.group_size!r}.")
    if self.group_size is not None and (self.group_size < 1 or self.population % self.group_size):
      raise ValueError(f"EsStepRecipe.group_size={self.group_size} must divide "
                       f"population={self.population}.")

  def fitness_shaping(self):
    if self.shaping == "group_z_score":
      return functools.partial(shaping.group_z_score, group_size=self.group_size)
    return SHAPINGS[self.shaping]

  def build(self) -> optax.GradientTransformationExtraArgs:
    return es.es_step(None, population=self.population, sigma=self.sigma,
                      key=jax.random.key(self.seed), rank=self.rank, antithetic=self.antithetic,
                      fitness_shaping=self.fitness_shaping(), estimator=self.estimator,
                      on_failure=self.on_failure, vector_noise=self.vector_noise,
                      freeze=self.freeze, scanned=self.scanned, chunk_size=self.chunk_size,
                      population_axis=self.population_axis)


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
  """``optax.sgd(learning_rate, momentum)`` or ``optax.adam(learning_rate, b1, b2, eps)``."""

  name: Literal["sgd", "adam"]
  learning_rate: float
  momentum: float | None = None
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def __post_init__(self):
    _coerce_fields(self, floats=("learning_rate", "b1", "b2", "eps"),
                   optional_floats=("momentum",), strs=("name",))
    if self.name not in ("sgd", "adam"):
      raise ValueError(f"OptimizerRecipe.name must be 'sgd' or 'adam', got {self.name!r}.")
    if not self.learning_rate > 0:
      raise ValueError(f"OptimizerRecipe.learning_rate must be > 0, got {self.learning_rate!r}.")
    if self.name == "adam" and self.momentum is not None:
      raise ValueError("OptimizerRecipe.momentum is sgd's; adam uses b1.")

  def build(self) -> optax.GradientTransformation:
    if self.name == "sgd":
      return optax.sgd(self.learning_rate, momentum=self.momentum)
    return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class AwdRecipe:
  """:func:`es_jax.anchored_weight_decay` after the optimizer, with its learning rate (exact rule)."""

  transform: ClassVar[str] = "anchored_weight_decay"
  strength: float
  kind: Literal["l2", "l1"] = "l2"

  def __post_init__(self):
    _coerce_fields(self, floats=("strength",), strs=("kind",))

  def build(self, learning_rate: float) -> optax.GradientTransformation:
    return awd.anchored_weight_decay(self.strength, kind=self.kind, learning_rate=learning_rate)


@dataclasses.dataclass(frozen=True)
class NormCapRecipe:
  """:func:`es_jax.anchored_norm_cap`."""

  transform: ClassVar[str] = "anchored_norm_cap"
  radius: float
  scope: Literal["global", "per_tensor"] = "global"

  def __post_init__(self):
    _coerce_fields(self, floats=("radius",), strs=("scope",))

  def build(self, learning_rate: float) -> optax.GradientTransformation:
    del learning_rate
    return mitigations.anchored_norm_cap(self.radius, scope=self.scope)


@dataclasses.dataclass(frozen=True)
class SparsifyRecipe:
  """:func:`es_jax.sparsified_updates`."""

  transform: ClassVar[str] = "sparsified_updates"
  fraction: float
  scope: Literal["per_tensor", "global"] = "per_tensor"
  residual: Literal["drop", "carry"] = "drop"

  def __post_init__(self):
    _coerce_fields(self, floats=("fraction",), strs=("scope", "residual"))

  def build(self, learning_rate: float) -> optax.GradientTransformation:
    del learning_rate
    return mitigations.sparsified_updates(self.fraction, scope=self.scope, residual=self.residual)


PostRecipe = AwdRecipe | NormCapRecipe | SparsifyRecipe
_POST = {cls.transform: cls for cls in (AwdRecipe, NormCapRecipe, SparsifyRecipe)}


def _from_fields(cls, data: Any, where: str):
  if not isinstance(data, dict):
    raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}.")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"unknown field(s) {unknown} in {where}; known: {sorted(known)}.")
  try:
    return cls(**data)
  except TypeError as e:
    if "required" in str(e) or "missing" in str(e):
      raise ValueError(f"{where}: {e}") from None
    raise


@dataclasses.dataclass(frozen=True)
class EsRecipe:
  """es_step -> optimizer -> post-step transforms (in the given order), as plain data.

  ``build()`` gives the optax chain; ``to_json()`` / ``from_json()`` round-trip
  it exactly (floats as their shortest repr); ``fingerprint()`` is the sha256
  of the canonical JSON (sorted keys, no spaces), equal for equal recipes. A
  recipe is validated on construction by building it, so an invalid one never
  exists.

  Example:
    >>> import es_jax
    >>> from es_jax.recipe import EsRecipe, EsStepRecipe, OptimizerRecipe, AwdRecipe
    >>> recipe = EsRecipe(EsStepRecipe(population=30, sigma=1e-3, seed=0, rank=None,
    ...                                antithetic=False, estimator="qiu"),
    ...                   OptimizerRecipe("sgd", 5e-4), (AwdRecipe(10.0),))
    >>> EsRecipe.from_json(recipe.to_json()) == recipe
    True
    >>> tx = recipe.build()   # es_step(None, ...), sgd(5e-4), anchored_weight_decay(10, lr=5e-4)
    >>> len(recipe.fingerprint())
    64
  """

  es: EsStepRecipe
  optimizer: OptimizerRecipe
  post: tuple[PostRecipe, ...] = ()

  def __post_init__(self):
    if not isinstance(self.es, EsStepRecipe):
      raise TypeError(f"EsRecipe.es must be an EsStepRecipe, got {type(self.es).__name__}.")
    if not isinstance(self.optimizer, OptimizerRecipe):
      raise TypeError("EsRecipe.optimizer must be an OptimizerRecipe, got "
                      f"{type(self.optimizer).__name__}.")
    post = tuple(self.post)
    if len(post) > MAX_POST:
      raise ValueError(f"EsRecipe.post holds {len(post)} transforms; at most {MAX_POST} are "
                       "allowed (each may hold a copy of the params): drop the repeated ones.")
    for p in post:
      if not isinstance(p, tuple(_POST.values())):
        raise TypeError("EsRecipe.post holds AwdRecipe, NormCapRecipe or SparsifyRecipe, got "
                        f"{type(p).__name__}.")
    object.__setattr__(self, "post", post)
    self.build()  # the transforms' own checks (ranges, combinations) run now

  def build(self) -> optax.GradientTransformationExtraArgs:
    """The optax chain: ``tx.update(None, state, params, fitness=f)`` is one generation."""
    lr = self.optimizer.learning_rate
    return optax.chain(self.es.build(), self.optimizer.build(), *(p.build(lr) for p in self.post))

  def to_dict(self) -> dict[str, Any]:
    return {
        "version": RECIPE_VERSION,
        "es": self._es_dict(),
        "optimizer": dataclasses.asdict(self.optimizer),
        "post": [{"transform": p.transform, **dataclasses.asdict(p)} for p in self.post],
    }

  def _es_dict(self) -> dict[str, Any]:
    es = {**dataclasses.asdict(self.es), "freeze": list(self.es.freeze),
          "scanned": list(self.es.scanned)}
    if not es["scanned"]:  # written only when used, so that older recipes keep their fingerprint
      del es["scanned"]
    return es

  @classmethod
  def from_dict(cls, data: Any) -> EsRecipe:
    """The recipe of :meth:`to_dict`; unknown fields or versions raise ``ValueError``."""
    if not isinstance(data, dict):
      raise ValueError(f"a recipe must be a JSON object, got {type(data).__name__}.")
    if data.get("version") != RECIPE_VERSION:
      raise ValueError(f"recipe version {data.get('version')!r} is not supported; this es_jax "
                       f"reads version {RECIPE_VERSION}.")
    unknown = sorted(set(data) - {"version", "es", "optimizer", "post"})
    if unknown:
      raise ValueError(f"unknown field(s) {unknown} in the recipe.")
    post = []
    for i, item in enumerate(data.get("post", [])):
      if not isinstance(item, dict) or item.get("transform") not in _POST:
        raise ValueError(f"recipe.post[{i}] must name a transform among {sorted(_POST)}, got "
                         f"{item!r}.")
      fields = {k: v for k, v in item.items() if k != "transform"}
      post.append(_from_fields(_POST[item["transform"]], fields, f"recipe.post[{i}]"))
    return cls(es=_from_fields(EsStepRecipe, data.get("es"), "recipe.es"),
               optimizer=_from_fields(OptimizerRecipe, data.get("optimizer"), "recipe.optimizer"),
               post=tuple(post))

  def to_json(self) -> str:
    """Canonical JSON: sorted keys, no whitespace, ASCII (the fingerprint's input)."""
    return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)

  @classmethod
  def from_json(cls, text: str) -> EsRecipe:
    return cls.from_dict(json.loads(text))

  def fingerprint(self) -> str:
    """sha256 hex digest of :meth:`to_json`."""
    return hashlib.sha256(self.to_json().encode()).hexdigest()

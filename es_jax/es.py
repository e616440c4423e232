"""The ES step as an optax ``GradientTransformationExtraArgs``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from es_jax import _checks
from es_jax import noise as noise_lib
from es_jax import shaping
from es_jax import sharding
from es_jax.noise import NoiseSpec

PyTree = Any
RewardFn = Callable[..., jax.Array]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EsConfig:
  """Static settings of an :func:`es_step` (no leaves: travels in the state's treedef)."""

  noise: NoiseSpec
  fitness_shaping: Callable[[jax.Array], jax.Array]
  estimator: Literal["gradient", "qiu"]
  on_failure: Literal["exclude", "worst"]
  chunk_size: int | None
  population_axis: str


class EsState(NamedTuple):
  """State of :func:`es_step`.

  Attributes:
    count: generation counter; generation ``count`` uses noise folded from it.
    rng_key: base key; the noise of a generation is a pure function of
      ``(rng_key, count, member)`` and the params' static layout.
    rewards: raw rewards of the last generation, shape ``(population,)``.
    num_failed: how many members failed: a NaN/inf reward, or a NaN/inf
      weight from the fitness shaping (see :func:`es_step`'s ``on_failure``).
    config: static settings (no array leaves), so that :func:`member_params`
      and :func:`member_noise` need only the state.
  """

  count: jax.Array
  rng_key: jax.Array
  rewards: jax.Array
  num_failed: jax.Array
  config: EsConfig


def es_step(
    reward_fn: RewardFn | None,
    *,
    population: int,
    sigma: float,
    key: jax.Array,
    rank: int | None = 1,
    antithetic: bool = True,
    fitness_shaping: Callable[[jax.Array], jax.Array] = shaping.z_score,
    estimator: Literal["gradient", "qiu"] = "gradient",
    reward_input: Literal["params", "noise"] = "params",
    on_failure: Literal["exclude", "worst"] = "exclude",
    vector_noise: Literal["full", "frozen"] = "full",
    freeze: tuple[str, ...] | str = (),
    scanned: tuple[str, ...] | str = (),
    chunk_size: int | None = None,
    population_axis: str = sharding.POP_AXIS,
) -> optax.GradientTransformationExtraArgs:
  """Evolution Strategies estimate of the reward gradient, as a descent direction.

  Each ``update`` is one ES generation: it evaluates ``population`` perturbed
  copies of ``params`` (``theta + sigma * eps_i``), shapes their rewards and
  returns ``-c * sum_i f_i eps_i``; chain it before any optax optimizer.

  Scaling ``c`` (``estimator``):
    * ``"gradient"`` (default): ``c = 1 / (N sigma)``, the textbook OpenAI-ES
      estimate of the gradient of the Gaussian-smoothed reward.
    * ``"qiu"``: ``c = 1 / N``. With ``fitness_shaping=z_score``,
      ``antithetic=False``, ``rank=None`` and ``optax.sgd(alpha)`` after it,
      this is exactly Qiu et al.'s ``theta += alpha / N * sum_n Z_n eps_n``.
  ``N`` counts the members that did not fail (see ``on_failure``).

  Noise: EGGROLL low-rank ``eps = A B^T / sqrt(rank)`` for matrix leaves
  (``rank=None`` gives full-rank Gaussian noise, i.e. vanilla ES), full-rank
  or frozen for vectors, regenerated from ``(key, count, member)`` and the
  tree's static layout (one draw per group of same-shape leaves) and never
  stored; see :mod:`es_jax.noise` for the conventions. Fresh noise every
  generation; antithetic pairs by default.

  Rewards come from one of:
    * ``reward_fn(member_params, batch)`` with ``reward_input="params"`` (the
      generic path: any JAX function; members are formed inside a vmap, in
      chunks of ``chunk_size`` members);
    * ``reward_fn(params, member_noise, batch)`` with ``reward_input="noise"``
      (the fast path: e.g. a model built from :class:`es_jax.Dense` applied with
      ``{'params': params, 'perturbation': member_noise}``; no member's weights
      are formed);
    * ``tx.update(None, state, params, fitness=rewards)`` with ``reward_fn=None``
      for rewards computed outside JAX; :func:`member_params` gives member
      ``i``'s parameters for the same state, hence the same noise.
  ``batch`` is the ``batch=`` extra argument of ``update`` (``None`` if absent).
  Rewards, like the shaping's weights, must be real numbers (bool, integer or
  float): complex or non-numeric ones are refused with a TypeError, since the
  cast to float32 would drop an imaginary part.

  Sharding: under ``jax.set_mesh(mesh)`` with an axis named ``population_axis``
  the members (and the noise draws in the update) are split across that axis;
  rewards are all-gathered once and each device reduces its members' share.

  Args:
    reward_fn: higher-is-better scalar reward, or ``None`` (pass ``fitness=``).
    population: number of members N (even when ``antithetic``).
    sigma: noise scale: finite, > 0 and a normal float32 (>= 1.2e-38).
    key: base PRNG key.
    rank: EGGROLL rank, or ``None`` for full-rank noise.
    antithetic: evaluate (+eps, -eps) pairs.
    fitness_shaping: function from ``(N,)`` rewards to weights
      (:mod:`es_jax.shaping`).
    estimator: ``"gradient"`` or ``"qiu"`` (see above).
    reward_input: ``"params"`` or ``"noise"`` (see above).
    on_failure: ``"exclude"`` failed members, or give them the ``"worst"``
      finite reward. Either way failed members cannot make the update
      non-finite. The bounded shapings (all but ``shaping.identity``) keep it
      finite for any finite rewards; ``identity`` passes the rewards' scale on,
      so its update is finite while ``|R| / (N sigma)`` times the noise fits
      in float32 (no intermediate step overflows first), and inf/NaN (never a
      silent zero) beyond that. A member whose shaped weight is NaN/inf (a
      custom shaping's 0/0, say) fails too, whatever ``on_failure``: it is
      excluded from the sum and from N like a failed reward, and counted in
      ``num_failed``, so a shaping that fails every member gives a zero step
      with ``num_failed == population``, not a silent one.
    vector_noise: ``"full"`` or ``"frozen"`` for leaves with ndim < 2.
    freeze: regex or regexes of leaf paths to leave unperturbed.
    scanned: regex or regexes of leaves that stack layers along their first
      axis (``nn.scan``); each layer is perturbed as its own leaf. A model with
      ``ModelConfig(scan_layers=True)`` needs ``scanned=config.scanned``.
    chunk_size: members evaluated (and noise draws reduced) per chunk; must
      divide ``population`` (and be a multiple of the population mesh axis
      size when sharded). ``None`` evaluates all at once.
    population_axis: mesh axis name for the population.

  Returns:
    An optax ``GradientTransformationExtraArgs`` with :class:`EsState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, es_jax
    >>> target = jnp.arange(3.0)
    >>> reward = lambda p, batch: -jnp.sum((p["w"] - target) ** 2)
    >>> tx = optax.chain(
    ...     es_jax.es_step(reward, population=32, sigma=0.1, key=jax.random.key(0)),
    ...     optax.sgd(0.01))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> update = jax.jit(tx.update)
    >>> for _ in range(100):
    ...   updates, state = update(None, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params["w"], target, atol=0.1))
    True
  """
  spec = NoiseSpec(population=population, sigma=sigma, rank=rank, antithetic=antithetic,
                   vector_noise=vector_noise, freeze=freeze, scanned=scanned)
  population = spec.population  # a Python int even when given as a NumPy / JAX integer
  if not callable(fitness_shaping):
    raise TypeError(f"fitness_shaping must be a function of the (N,) rewards, got "
                    f"{type(fitness_shaping).__name__}.")
  if estimator not in ("gradient", "qiu"):
    raise ValueError(f"estimator must be 'gradient' or 'qiu', got {estimator!r}.")
  if reward_input not in ("params", "noise"):
    raise ValueError(f"reward_input must be 'params' or 'noise', got {reward_input!r}.")
  if on_failure not in ("exclude", "worst"):
    raise ValueError(f"on_failure must be 'exclude' or 'worst', got {on_failure!r}.")
  chunk_size = _check_chunk_size(spec, chunk_size)
  if reward_fn is not None and not callable(reward_fn):
    raise TypeError(f"reward_fn must be callable or None, got {type(reward_fn).__name__}.")
  if not (isinstance(key, jax.Array) and key.shape == ()
          and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise TypeError("key must be a single typed PRNG key such as jax.random.key(0), got "
                    f"{type(key).__name__} of dtype {getattr(key, 'dtype', None)} and shape "
                    f"{getattr(key, 'shape', None)}.")
  if str(jax.random.key_impl(key)) != "threefry2x32":
    # rbg's batching rule draws a whole vmapped batch from the first key, so a
    # member's noise would depend on how the members are batched, and the
    # update would not see the noise the forward pass used.
    raise ValueError(f"key uses the {str(jax.random.key_impl(key))!r} PRNG; es_step needs "
                     "threefry2x32 (jax.random.key(seed)) so that noise is the same however "
                     "members are batched or sharded.")
  config = EsConfig(noise=spec, fitness_shaping=fitness_shaping, estimator=estimator,
                    on_failure=on_failure, chunk_size=chunk_size, population_axis=population_axis)

  def init_fn(params):
    # Validates every leaf against the noise spec (dtype, rank too large) early.
    noise_lib.check_params(spec, params)
    return EsState(count=jnp.zeros([], jnp.int32), rng_key=key,
                   rewards=jnp.zeros([population], jnp.float32),
                   num_failed=jnp.zeros([], jnp.int32), config=config)

  def update_fn(updates, state, params=None, *, fitness=None, batch=None, **extra_args):
    del updates, extra_args  # ES needs no gradient; other extra args belong to other transforms.
    if params is None:
      raise ValueError("es_step needs params: call tx.update(None, state, params, ...).")
    noise_lib.check_params(spec, params)
    if fitness is None:
      if reward_fn is None:
        raise ValueError("No reward: es_step was built with reward_fn=None, so pass the "
                         "members' rewards as tx.update(..., fitness=rewards).")
      fitness = _evaluate(reward_fn, reward_input, config, state, params, batch)
    fitness = shaping.real_array("fitness", fitness)
    if fitness.shape != (population,):
      raise ValueError(f"fitness must have shape (population,)=({population},), got {fitness.shape}.")
    rewards = fitness.astype(jnp.float32)
    weights, counted = _member_weights(config, rewards)
    updates = _descent_direction(config, state, params, weights, counted)
    # With on_failure="worst", a NaN/inf reward counts in the update but still failed.
    num_failed = jnp.sum(~(jnp.isfinite(rewards) & counted)).astype(jnp.int32)
    return updates, EsState(count=optax.safe_increment(state.count), rng_key=state.rng_key,
                            rewards=rewards, num_failed=num_failed, config=config)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _evaluate(reward_fn, reward_input, config: EsConfig, state: EsState, params, batch):
  return population_rewards(reward_fn, config.noise, state.rng_key, state.count, params, batch,
                            reward_input=reward_input, chunk_size=config.chunk_size,
                            population_axis=config.population_axis)


def population_rewards(reward_fn: RewardFn, spec: NoiseSpec, key: jax.Array, generation,
                       params: PyTree, batch: Any = None, *,
                       reward_input: Literal["params", "noise"] = "params",
                       chunk_size: int | None = None,
                       population_axis: str | None = sharding.POP_AXIS) -> jax.Array:
  """Every member's reward for one generation, as :func:`es_step`'s ``update`` computes them.

  Draws each antithetic pair's noise once and evaluates it with both signs
  (the costly part of a fast-path forward is the draw; flipping the sign is
  free), members in ``lax.map`` chunks of ``chunk_size`` and split over
  ``population_axis`` when the ambient mesh has it. For benchmarks and custom
  loops that need the rewards without an update; inside ``jit``.

  Args:
    reward_fn: ``reward_fn(member_params, batch)`` or, with ``reward_input="noise"``,
      ``reward_fn(params, member_noise, batch)``; a scalar per member.
    spec: the population's noise.
    key, generation: as in :func:`es_jax.noise.member_noise`.
    params: the unperturbed params.
    batch: passed to ``reward_fn``.
    reward_input: ``"params"`` or ``"noise"`` (see :func:`es_step`).
    chunk_size: members per chunk, dividing the population (even with
      antithetic pairs); ``None`` evaluates all at once.
    population_axis: mesh axis to split the members over.

  Returns:
    ``(population,)`` float32 rewards in member order.

  Example:
    >>> import jax, jax.numpy as jnp, es_jax
    >>> spec = es_jax.NoiseSpec(population=4, sigma=0.5, rank=None)
    >>> reward = lambda p, batch: jnp.sum(p["w"])
    >>> r = population_rewards(reward, spec, jax.random.key(0), 0, {"w": jnp.zeros(3)})
    >>> r.shape, bool(r[0] == -r[1])  # an antithetic pair: +eps and -eps
    ((4,), True)
  """
  if reward_input not in ("params", "noise"):
    raise ValueError(f"reward_input must be 'params' or 'noise', got {reward_input!r}.")
  chunk_size = _check_chunk_size(spec, chunk_size)

  def reward_of(noise):
    if reward_input == "params":
      reward = reward_fn(noise_lib.perturb(params, noise), batch)
    else:
      reward = reward_fn(params, noise, batch)
    reward = shaping.real_array("reward_fn's reward", reward)
    if reward.shape != ():
      raise ValueError(f"reward_fn must return a scalar per member, got shape {reward.shape}.")
    return reward.astype(jnp.float32)

  def draw_rewards(draw):
    members_per_draw = 2 if spec.antithetic else 1
    noise = noise_lib.member_noise(spec, key, generation, params, draw * members_per_draw)
    signs = jnp.array([1.0, -1.0][:members_per_draw])
    return jax.vmap(lambda sign: reward_of(noise_lib.scale_noise(noise, sign)))(signs)

  draws_per_chunk = (chunk_size or spec.population) * spec.num_pairs // spec.population
  axis = population_axis
  if draws_per_chunk % sharding.axis_size(axis):
    raise ValueError(
        f"{draws_per_chunk} noise draws per chunk cannot be split over the "
        f"{sharding.axis_size(axis)} devices of mesh axis '{axis}'; make chunk_size (or "
        "population) a multiple of the axis size (times 2 with antithetic sampling).")
  draws = jnp.arange(spec.num_pairs, dtype=jnp.int32).reshape(-1, draws_per_chunk)
  rewards = jax.lax.map(
      lambda ids: jax.vmap(draw_rewards)(sharding.constrain_population(ids, axis)), draws)
  # One all-gather of N scalars: shaping needs every member's reward. Members
  # 2k and 2k+1 are draw k's (+, -) pair, so row-major order is member order.
  return sharding.replicate(rewards, axis).reshape(-1)


def _check_chunk_size(spec: NoiseSpec, chunk_size) -> int | None:
  if chunk_size is None:
    return None
  chunk_size = _checks.integer("chunk_size", chunk_size, minimum=1)
  if spec.population % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1 and divide "
                     f"population={spec.population}.")
  if spec.antithetic and chunk_size % 2:
    raise ValueError(f"chunk_size={chunk_size} must be even so antithetic pairs stay together.")
  return chunk_size


def _member_weights(config: EsConfig, rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each member's shaped weight (0 if it failed), and which members count in the update.

  A member fails if its reward (after ``on_failure``) or its shaped weight is
  NaN/inf; a non-finite weight must not pass as a 0 while N still counts it.
  """
  spec = config.noise
  if config.on_failure == "worst":
    rewards = shaping.replace_failed_with_worst(rewards)
  name = getattr(config.fitness_shaping, "__name__", repr(config.fitness_shaping))
  shaped = shaping.real_array(f"fitness_shaping {name}'s weights", config.fitness_shaping(rewards))
  if shaped.shape != (spec.population,):
    # Broadcasting a wrong shape would silently give every member a wrong weight.
    raise ValueError(f"fitness_shaping {name} returned shape {shaped.shape}, but it must return "
                     f"one weight per member, shape (population,)=({spec.population},).")
  counted = jnp.isfinite(rewards) & jnp.isfinite(shaped)
  return jnp.where(counted, shaped, 0.0).astype(jnp.float32), counted


def _descent_direction(config: EsConfig, state: EsState, params, weights, counted):
  spec = config.noise
  num_valid = jnp.maximum(counted.sum(), 1).astype(jnp.float32)
  scale = 1.0 / num_valid
  if config.estimator == "gradient":
    scale = scale / spec.sigma
  # Member i contributes f_i * sign_i to the draw of its pair.
  _, signs = noise_lib.pair_of(spec, jnp.arange(spec.population))
  # Combine at unit scale, then apply the weights' magnitude last: raw (identity)
  # rewards near the float32 maximum overflow only if a pair's weight itself does.
  # ldexp scales by powers of two exactly and never forms 1 / max|f| (subnormal, flushed to 0).
  _, exponent = jnp.frexp(jnp.max(jnp.abs(weights)))
  unit_pairs = (jnp.ldexp(weights, -exponent) * signs).reshape(spec.num_pairs, -1).sum(axis=1)
  pair_weights = jnp.ldexp(unit_pairs * -scale, exponent)
  # As many noise draws per chunk as members are evaluated per chunk: the same memory bound.
  return noise_lib.weighted_sum(spec, state.rng_key, state.count, params, pair_weights,
                                chunk_size=config.chunk_size, population_axis=config.population_axis)


def member_noise(state: EsState, params: PyTree, member) -> PyTree:
  """Member ``member``'s perturbation ``sigma * eps`` for the generation ``state`` will update.

  The tree holds :class:`es_jax.LowRank` factors for matrix leaves, dense
  arrays for full-rank leaves and ``None`` for frozen leaves; pass it to a
  model built from :class:`es_jax.Dense` as ``{'perturbation': noise}``.
  """
  state = _es_state(state)
  noise_lib.check_params(state.config.noise, params)
  return noise_lib.member_noise(state.config.noise, state.rng_key, state.count, params, member)


def member_params(state: EsState, params: PyTree, member) -> PyTree:
  """Member ``member``'s parameters ``theta + sigma * eps`` for the coming update.

  For rewards computed outside JAX: score ``member_params(es_state, params, i)``
  for every ``i``, then ``tx.update(None, state, params, fitness=rewards)``.
  ``state`` may be the :class:`EsState` or a chained optimizer state holding one.
  """
  return noise_lib.perturb(params, member_noise(state, params, member))


def _es_state(state) -> EsState:
  if isinstance(state, EsState):
    return state
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, EsState))
           if isinstance(s, EsState)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one EsState in the optimizer state, found {len(found)}.")
  return found[0]

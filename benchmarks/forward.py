"""Part a: the population forward of the Flax Qwen2 port, five ways, plus a profile.

Every method computes the same thing: for each of N members, the mean
log-probability of one shared prompt of T tokens under that member's
weights (``es_jax.models.token_logprobs``, teacher-forced), i.e. the scalar
an ES reward reduces a member to. Methods:

* ``plain``: the unperturbed model on the N x T batch (the prompt tiled N
  times): batched inference, the throughput ceiling.
* ``fast r=1`` / ``fast r=4``: es_jax's EGGROLL fast path as ``es_step``
  (``reward_input="noise"``) runs it: a vmap over antithetic pairs that draws
  each pair's low-rank noise once inside the program and applies it with both
  signs inside the ``es_jax.Dense`` layers; no member's weights exist.
* ``full-rank``: vanilla ES as ``es_step(rank=None)`` runs it: each pair's
  full-rank noise drawn, both members' weights ``theta +/- sigma*eps`` formed
  and the model applied to them, in ``jax.lax.map`` chunks of members.
* ``evosax OpenES``: evosax's ``Open_ES.ask`` (N full parameter vectors from
  one ``jax.random.normal`` call, unravelled to parameter trees), then the
  model vmapped over the members' trees.

The embedding table is frozen (not perturbed) in every method, as in the
EGGROLL reference (a low-rank perturbation of a lookup table is not a matmul);
norm scales and biases get full-rank noise in es_jax's methods and are part
of evosax's solution vector.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

import es_jax
from benchmarks import common
from es_jax import noise as noise_lib
from es_jax.models.config import ModelConfig
from es_jax.models.transformer import Transformer, init_params, token_logprobs

PyTree = Any
SIGMA = 0.01
FREEZE = ("embed",)
SIGNS = (1.0, -1.0)
METHODS = ("plain", "fast r=1", "fast r=4", "full-rank", "evosax OpenES")
# Profile of the fast path (at one N per size): what its gap to plain consists of.
PROFILE = ("fast r=1, noise given", "noise draw r=1 (es_jax)", "same normals, one call",
           "fast r=1, draw fenced (lax.cond)")
# Memory-bound methods: their footprint is copies of N (or a chunk of) member parameter vectors.
EVOSAX_COPIES = 2  # z and the population (XLA's buffer assignment at the sizes that run: ~2.0)
FULL_RANK_COPIES = 2  # one pair's noise is shared; each member's weights are formed


@dataclasses.dataclass(frozen=True)
class Size:
  """A scaled-down Qwen2.5 shape: GQA with 2 KV heads, q/k/v biases, tied embeddings."""

  hidden: int
  intermediate: int
  layers: int
  heads: int
  vocab: int

  def config(self, dtype) -> ModelConfig:
    return ModelConfig.preset(
        "qwen2.5-0.5b-instruct", vocab_size=self.vocab, hidden_size=self.hidden,
        intermediate_size=self.intermediate, num_layers=self.layers, num_heads=self.heads,
        num_kv_heads=2, head_dim=self.hidden // self.heads, eos_token_ids=(), dtype=dtype)


@dataclasses.dataclass
class Setup:
  """One model size with its params and the shared prompt."""

  name: str
  size: Size
  model: Transformer
  params: PyTree
  ids: jax.Array  # (1, T)
  mask: jax.Array
  num_params: int
  num_perturbed: int  # outside FREEZE

  @property
  def tokens(self) -> int:
    return int(self.ids.size)


def make_setup(size: Size, tokens: int, dtype) -> Setup:
  model = Transformer(size.config(dtype))
  params = init_params(model, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (1, tokens), 3, size.vocab, jnp.int32)
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  # Full-rank vector noise, as in every es_jax method (the rank does not change the count).
  spec = noise_lib.NoiseSpec(population=2, sigma=SIGMA, rank=None, freeze=FREEZE)
  name = f"{num_params / 1e6:.1f}M"
  return Setup(name, size, model, params, ids, jnp.ones_like(ids), num_params,
               noise_lib.num_perturbed(spec, params))


def is_frozen(path: str) -> bool:
  return any(re.search(pattern, path) for pattern in FREEZE)


def frozen_part(params: PyTree) -> dict:
  """The top-level subtrees in FREEZE (the embedding)."""
  return {k: v for k, v in params.items() if is_frozen(k)}


def perturbed_part(params: PyTree) -> dict:
  return {k: v for k, v in params.items() if not is_frozen(k)}


def member_reward(model: Transformer, params: PyTree, ids, mask, noise=None) -> jax.Array:
  """Mean log-prob of the prompt's tokens under one member: the scalar a reward reduces to."""
  return token_logprobs(model, params, ids, mask, noise).mean()


# --------------------------------------------------------------------------- methods


def plain_program(setup: Setup, population: int) -> common.Program:
  """Batched inference of the unperturbed model on the N x T rows."""
  ids, mask = jnp.tile(setup.ids, (population, 1)), jnp.tile(setup.mask, (population, 1))

  def rewards(params, ids, mask):
    logp = token_logprobs(setup.model, params, ids, mask)
    return logp.reshape(population, -1).mean(axis=1)

  return common.compile_program(rewards, setup.params, ids, mask)


def fast_program(setup: Setup, population: int, rank: int) -> common.Program:
  """es_jax's fast path exactly as es_step's evaluation runs it (one draw per pair, +/-)."""
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=rank, freeze=FREEZE)
  model = setup.model
  reward = lambda params, noise, batch: member_reward(model, params, *batch, noise)

  def rewards(params, ids, mask, key, generation):
    return es_jax.population_rewards(reward, spec, key, generation, params, (ids, mask),
                                     reward_input="noise")

  # key and generation are arguments, not constants, so XLA cannot fold the draw away.
  return common.compile_program(rewards, setup.params, setup.ids, setup.mask, jax.random.key(2),
                                jnp.int32(0))


def full_rank_chunk(setup: Setup, population: int, budget_bytes: int) -> int:
  """Members per lax.map chunk: as many as fit a quarter of the budget, 2 to 64."""
  per_member = setup.num_perturbed * 4 * FULL_RANK_COPIES
  return max(2, min(population, 64, common.largest_power_of_two_at_most(
      budget_bytes / 4 / per_member)))


def full_rank_program(setup: Setup, population: int, chunk: int) -> common.Program:
  """Vanilla ES as es_step(rank=None) runs it, members in chunks of ``chunk``."""
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=None, freeze=FREEZE)
  model = setup.model
  reward = lambda member_params, batch: member_reward(model, member_params, *batch)

  def rewards(params, ids, mask, key, generation):
    return es_jax.population_rewards(reward, spec, key, generation, params, (ids, mask),
                                     reward_input="params", chunk_size=chunk)

  return common.compile_program(rewards, setup.params, setup.ids, setup.mask, jax.random.key(2),
                                jnp.int32(0))


def evosax_program(setup: Setup, population: int) -> common.Program:
  """evosax's OpenES ask() (N full parameter vectors) driving the same model."""
  # The bench extra; imported only when run.
  Open_ES = common.import_bench_dependency("evosax.algorithms").Open_ES  # noqa: N806

  solution = perturbed_part(setup.params)
  strategy = Open_ES(population_size=population, solution=solution, optimizer=optax.sgd(1e-3),
                     std_schedule=optax.constant_schedule(SIGMA))
  es_params = strategy.default_params
  state = strategy.init(jax.random.key(3), solution, es_params)
  model = setup.model

  def rewards(state, frozen, ids, mask, key):
    members, _ = strategy.ask(key, state, es_params)
    return jax.vmap(lambda member: member_reward(model, {**frozen, **member}, ids, mask))(members)

  return common.compile_program(rewards, state, frozen_part(setup.params), setup.ids, setup.mask,
                                jax.random.key(4))


def build_program(method: str, setup: Setup, population: int, budget_bytes: int) -> common.Program:
  if method == "plain":
    return plain_program(setup, population)
  if method.startswith("fast r="):
    return fast_program(setup, population, int(method.split("=")[1]))
  if method == "full-rank":
    return full_rank_program(setup, population, full_rank_chunk(setup, population, budget_bytes))
  if method == "evosax OpenES":
    return evosax_program(setup, population)
  raise ValueError(method)


def estimated_bytes(method: str, setup: Setup, population: int, budget_bytes: int) -> int | None:
  """Footprint that grows with N x params (None for the methods where it does not)."""
  vector = setup.num_perturbed * 4
  if method == "evosax OpenES":
    return EVOSAX_COPIES * population * vector + 2 * vector + setup.num_params * 4
  if method == "full-rank":
    chunk = full_rank_chunk(setup, population, budget_bytes)
    return FULL_RANK_COPIES * chunk * vector + setup.num_params * 4
  return None


# --------------------------------------------------------------------------- profile


def noise_given_program(setup: Setup, population: int) -> common.Program:
  """The fast path without its draw: every pair's rank-1 noise drawn before the call.

  Same structure as :func:`fast_program` (a vmap over pairs, both signs of a
  pair applied to the same factors), so ``fast - given`` is the draw's cost.
  """
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=1, freeze=FREEZE)
  params, model = setup.params, setup.model
  draw = lambda k: noise_lib.member_noise(spec, jax.random.key(2), 0, params, 2 * k)
  noise = jax.jit(jax.vmap(draw))(jnp.arange(spec.num_pairs))

  def rewards(params, noise, ids, mask):
    def pair(pair_noise):
      signed = lambda sign: member_reward(model, params, ids, mask,
                                          noise_lib.scale_noise(pair_noise, sign))
      return jax.vmap(signed)(jnp.array(SIGNS))
    return jax.vmap(pair)(noise).reshape(-1)

  return common.compile_program(rewards, params, noise, setup.ids, setup.mask)


def noise_draw_program(setup: Setup, population: int) -> common.Program:
  """Only the draw: every pair's rank-1 noise tree, as the fast path draws it."""
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=1, freeze=FREEZE)
  shapes = jax.eval_shape(lambda: setup.params)

  def draw(key, generation):
    return jax.vmap(lambda k: noise_lib.member_noise(spec, key, generation, shapes, 2 * k))(
        jnp.arange(spec.num_pairs))

  return common.compile_program(draw, jax.random.key(2), jnp.int32(0))


def one_call_draw_program(setup: Setup, population: int) -> common.Program:
  """As many normals as the draw, from one ``jax.random.normal`` call: the RNG's peak rate."""
  count = normals_per_draw(setup, 1) * (population // 2)
  return common.compile_program(lambda key: jax.random.normal(key, (count,)), jax.random.key(2))


def fenced_fast_program(setup: Setup, population: int) -> common.Program:
  """The fast path with its draw behind a fusion boundary: a candidate fix, not es_jax's code.

  XLA:CPU fuses the tail of the normal sampler (the erf-inverse polynomial)
  into the elementwise fusions that consume the factor ``b`` of
  ``(x a) b^T``, so it is recomputed for every token and sign instead of once
  per element. ``optimization_barrier`` does not stop it (the CPU pipeline
  removes barriers before fusion); control flow does: here all pairs' noise
  is drawn inside a ``lax.cond`` whose predicate (``generation >= 0``) is
  always true but unknown to the compiler, so the factors are materialised
  once and then read by the forward.
  """
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=1, freeze=FREEZE)
  model = setup.model

  def rewards(params, ids, mask, key, generation):
    draw = lambda: jax.vmap(lambda k: noise_lib.member_noise(spec, key, generation, params, 2 * k))(
        jnp.arange(spec.num_pairs))
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(draw))
    noise = jax.lax.cond(generation >= 0, draw, zeros)

    def pair(pair_noise):
      signed = lambda sign: member_reward(model, params, ids, mask,
                                          noise_lib.scale_noise(pair_noise, sign))
      return jax.vmap(signed)(jnp.array(SIGNS))
    return jax.vmap(pair)(noise).reshape(-1)

  return common.compile_program(rewards, setup.params, setup.ids, setup.mask, jax.random.key(2),
                                jnp.int32(0))


def build_profile_program(method: str, setup: Setup, population: int) -> common.Program:
  if method == "fast r=1, noise given":
    return noise_given_program(setup, population)
  if method == "noise draw r=1 (es_jax)":
    return noise_draw_program(setup, population)
  if method == "same normals, one call":
    return one_call_draw_program(setup, population)
  if method == "fast r=1, draw fenced (lax.cond)":
    return fenced_fast_program(setup, population)
  raise ValueError(method)


def normals_per_draw(setup: Setup, rank: int) -> int:
  """Normals in one pair's low-rank noise tree (matrices r(m+n), vectors their size)."""
  spec = noise_lib.NoiseSpec(population=2, sigma=SIGMA, rank=rank, freeze=FREEZE)
  return noise_lib.normals_per_draw(spec, setup.params)

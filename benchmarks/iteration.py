"""Parts b and d: a whole ES iteration, es_jax vs the sequential loop; the cost of AWD.

An iteration is: generate (greedy decode of ``new_tokens`` tokens for each of
the member's prompts), score (a reward computed on device from the generated
tokens), update (shape the rewards, form the ES direction, apply it). Methods:

* ``plain decode``: the unperturbed model decoding the N x B rows, the
  inference ceiling of the same batch (no noise, no update).
* ``population decode``: ``es_jax.models.decode_population`` with every
  member's rank-1 noise drawn before the call: the decoding part alone.
* ``es_jax iteration``: one jitted program: draw the N members' noise
  (``es_jax.member_noise``, as the README's population decoding does),
  ``decode_population``, score, ``tx.update(..., fitness=rewards)`` with
  ``optax.chain(es_step(None, rank=1), optax.sgd)``, apply.
* ``vanilla loop``: the structure of the reference PyTorch implementations
  (Qiu et al.), in es_jax's vanilla mode: for each member in a Python loop,
  add its full-rank noise to the weights in place (a jitted function with a
  donated buffer, noise regenerated from the member's seed), evaluate
  (decode + score, jitted), subtract the same noise again; then z-score the
  rewards and, member by member, add ``lr * z_i / (N sigma) * sigma eps_i``
  in place. No antithetic pairs, as in the reference.

Part d's step is ``es_step(reward, reward_input="noise")`` on the
teacher-forced prompt reward of part a, with ``optax.sgd`` and optionally
``anchored_weight_decay`` chained last (the exact placement); AWD's share is
(with - without) / with. (Part d does not use the decoding iteration: each
variant is another ~1 min compile on a 2-core CPU, and AWD's cost, O(params),
does not depend on how the rewards were obtained.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import es_jax
from benchmarks import common
from benchmarks.forward import FREEZE, SIGMA, Setup, member_reward
from es_jax import noise as noise_lib
from es_jax.models import decode, decode_population

PyTree = Any
LEARNING_RATE = 1e-3
AWD_STRENGTH = 1.0  # lr * strength < 1, as the exact rule needs
METHODS = ("plain decode", "population decode", "es_jax iteration", "vanilla loop")
AWD_METHODS = ("es_step", "es_step + AWD")


@dataclasses.dataclass(frozen=True)
class Task:
  """The batch every member generates for."""

  prompts: int
  prompt_tokens: int
  new_tokens: int

  def inputs(self, vocab: int) -> tuple[jax.Array, jax.Array]:
    ids = jax.random.randint(jax.random.key(7), (self.prompts, self.prompt_tokens), 3, vocab,
                             jnp.int32)
    return ids, jnp.ones_like(ids)


def score(tokens: jax.Array, vocab: int) -> jax.Array:
  """Reward of generated tokens (..., B, G): the share of ids in the lower half of the vocabulary.

  A stand-in for a task reward: any function of the completions works, and
  this one is computed on device so every method scores the same way.
  """
  return jnp.mean(tokens < vocab // 2, axis=(-2, -1)).astype(jnp.float32)


def es_transform(population: int, awd: bool, reward_fn=None, reward_input: str = "params"):
  """``chain(es_step(rank=1), sgd[, anchored_weight_decay])`` with the benchmark's settings."""
  parts = [es_jax.es_step(reward_fn, population=population, sigma=SIGMA, key=jax.random.key(5),
                          rank=1, freeze=FREEZE, reward_input=reward_input),
           optax.sgd(LEARNING_RATE)]
  if awd:
    parts.append(es_jax.anchored_weight_decay(AWD_STRENGTH, learning_rate=LEARNING_RATE))
  return optax.chain(*parts)


# --------------------------------------------------------------------------- part b


def plain_decode_program(setup: Setup, task: Task, population: int) -> common.Program:
  ids, mask = task.inputs(setup.size.vocab)
  ids, mask = jnp.tile(ids, (population, 1)), jnp.tile(mask, (population, 1))

  def generate(params, ids, mask):
    return decode(setup.model, params, ids, mask, max_new_tokens=task.new_tokens, eos_ids=()).tokens

  return common.compile_program(generate, setup.params, ids, mask)


def population_decode_program(setup: Setup, task: Task, population: int) -> common.Program:
  ids, mask = task.inputs(setup.size.vocab)
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=1, freeze=FREEZE)
  params = setup.params
  draw = lambda i: noise_lib.member_noise(spec, jax.random.key(2), 0, params, i)
  noise = jax.jit(jax.vmap(draw))(jnp.arange(population))

  def generate(params, noise, ids, mask):
    return decode_population(setup.model, params, noise, ids, mask,
                             max_new_tokens=task.new_tokens, eos_ids=()).tokens

  return common.compile_program(generate, params, noise, ids, mask)


def es_iteration_program(setup: Setup, task: Task, population: int) -> common.Program:
  """Generate, score and update in one jitted program (es_jax's fast path)."""
  ids, mask = task.inputs(setup.size.vocab)
  tx = es_transform(population, awd=False)
  opt_state = tx.init(setup.params)
  model, vocab = setup.model, setup.size.vocab

  def iteration(params, opt_state, ids, mask):
    noise = jax.vmap(lambda i: es_jax.member_noise(opt_state, params, i))(jnp.arange(population))
    tokens = decode_population(model, params, noise, ids, mask, max_new_tokens=task.new_tokens,
                               eos_ids=()).tokens
    updates, opt_state = tx.update(None, opt_state, params, fitness=score(tokens, vocab))
    return optax.apply_updates(params, updates), opt_state

  return common.compile_program(iteration, setup.params, opt_state, ids, mask)


def vanilla_loop_program(setup: Setup, task: Task, population: int) -> common.Program:
  """The reference implementations' perturb-evaluate-restore loop, from jitted pieces."""
  ids, mask = task.inputs(setup.size.vocab)
  spec = noise_lib.NoiseSpec(population=population, sigma=SIGMA, rank=None, antithetic=False,
                             freeze=FREEZE)
  model, vocab = setup.model, setup.size.vocab
  key, generation = jax.random.key(6), jnp.int32(0)

  def add_member_noise(params, key, generation, member, coef):
    """``params + coef * sigma * eps_member``, in place (params are donated)."""
    noise = noise_lib.member_noise(spec, key, generation, params, member)
    return jax.tree.map(lambda n, p: p if n is None else p + coef * n, noise, params,
                        is_leaf=lambda x: x is None)

  def evaluate(params, ids, mask):
    tokens = decode(model, params, ids, mask, max_new_tokens=task.new_tokens, eos_ids=()).tokens
    return score(tokens, vocab)

  # A private copy: the loop donates (overwrites) its params, the other methods share setup.params.
  state = {"params": jax.tree.map(jnp.copy, setup.params)}
  scalar = jnp.float32(0.0)
  pieces = [common.compile_executable(add_member_noise, state["params"], key, generation,
                                      jnp.int32(0), scalar, donate_argnums=(0,)),
            common.compile_executable(evaluate, state["params"], ids, mask),
            common.compile_executable(es_jax.z_score, jnp.zeros(population, jnp.float32))]
  (add_noise, *_), (evaluate_c, *_), (z_score_c, *_) = pieces
  step_coef = LEARNING_RATE / (population * SIGMA)  # Qiu: theta += lr/N sum z_i eps_i

  def run(members: int) -> jax.Array:
    params, rewards = state["params"], []
    for i in range(members):
      member = jnp.int32(i)
      params = add_noise(params, key, generation, member, jnp.float32(1.0))
      rewards.append(evaluate_c(params, ids, mask))
      params = add_noise(params, key, generation, member, jnp.float32(-1.0))
    rewards = jnp.stack(rewards + [jnp.float32(0.0)] * (population - members))
    z = z_score_c(rewards)
    for i in range(members):
      params = add_noise(params, key, generation, jnp.int32(i), step_coef * z[i])
    state["params"] = params
    return params

  return common.Program(
      call=lambda: run(population), lower_s=sum(p[1] for p in pieces),
      compile_s=sum(p[2] for p in pieces), arg_bytes=common.tree_bytes(setup.params),
      # The loop holds one params copy (updated in place) plus its largest piece's temporaries.
      xla_bytes=common.tree_bytes(setup.params) + max(
          (p[3] or 0) - common.tree_bytes(setup.params) for p in pieces[:2]),
      warmup=lambda: run(1), warmup_scale=population)


def build_program(method: str, setup: Setup, task: Task, population: int) -> common.Program:
  if method == "plain decode":
    return plain_decode_program(setup, task, population)
  if method == "population decode":
    return population_decode_program(setup, task, population)
  if method == "es_jax iteration":
    return es_iteration_program(setup, task, population)
  if method == "vanilla loop":
    return vanilla_loop_program(setup, task, population)
  raise ValueError(method)


# --------------------------------------------------------------------------- part d


def es_step_program(setup: Setup, population: int, awd: bool) -> common.Program:
  """One ``es_step`` generation on the teacher-forced prompt reward, applied to the params."""
  model = setup.model
  reward = lambda params, noise, batch: member_reward(model, params, *batch, noise)
  tx = es_transform(population, awd, reward_fn=reward, reward_input="noise")
  opt_state = tx.init(setup.params)

  def step(params, opt_state, ids, mask):
    updates, opt_state = tx.update(None, opt_state, params, batch=(ids, mask))
    return optax.apply_updates(params, updates), opt_state

  return common.compile_program(step, setup.params, opt_state, setup.ids, setup.mask)

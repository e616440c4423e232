"""Rebuild a fine-tune from theta_0, its optimizer chain and its fitness history.

ES never needs the members' weights after a generation: member ``i``'s noise
is a pure function of ``(key, generation, i, leaf path)`` (:mod:`es_jax.noise`)
and ``es_step``'s update is a function of the params, the state and the
``(N,)`` fitness vector. Feeding the recorded fitness vectors back into the
same chain, from the same theta_0, therefore walks the same trajectory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_jax import noise as noise_lib
from es_jax.recipe import EsRecipe

PyTree = Any


def all_finite(params: PyTree) -> jax.Array:
  """Whether every element of every leaf is finite (one fused reduction; a traced bool)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))


def replay(tx: Any, params: PyTree, fitness_history: Any) -> tuple[PyTree, PyTree]:
  """Re-runs ``len(fitness_history)`` ES generations from ``params`` = theta_0.

  Generation ``g`` applies ``updates, state = tx.update(None, state, params,
  fitness=fitness_history[g])``, ``params = optax.apply_updates(params,
  updates)`` as one jitted step (the step the experiments runner jits), from
  ``state = tx.init(theta_0)``.

  Exactness: bit for bit the params of a run that applied the same jitted step
  with the same chain on the same backend and device layout (the same mesh
  over the population axis, or none). On another number of devices the
  per-device partial sums of the update are added in another order, so the
  result agrees to float32 round-off accumulated over the generations.

  Args:
    tx: the run's optax chain with ``es_step(None, ...)`` first, or an
      :class:`es_jax.recipe.EsRecipe` (built here).
    params: theta_0, the params the run started from (not modified).
    fitness_history: ``(generations, population)`` fitness vectors as passed
      to ``tx.update(..., fitness=...)`` (NaN for failed members); cast to
      float32, as ``es_step`` does.

  Returns:
    ``(params, opt_state)`` after the last generation; the state continues the
    run (its generation counter is ``len(fitness_history)``).

  Raises:
    ValueError: ``fitness_history`` has the wrong shape, or the weights become
      non-finite (named: the first such generation and the non-finite leaves),
      which no run that checked its weights can have recorded.

  Example:
    >>> import jax, jax.numpy as jnp, optax, es_jax
    >>> tx = optax.chain(es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0)),
    ...                  optax.sgd(0.1))
    >>> theta0 = {"w": jnp.zeros(3)}
    >>> history = jnp.array([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.3, 0.3]])
    >>> params, state = theta0, tx.init(theta0)
    >>> for f in history:
    ...   updates, state = tx.update(None, state, params, fitness=f)
    ...   params = optax.apply_updates(params, updates)
    >>> replayed, _ = es_jax.replay(tx, theta0, history)
    >>> bool(jnp.allclose(replayed["w"], params["w"], rtol=1e-6))
    True
  """
  population = None
  if isinstance(tx, EsRecipe):
    population, tx = tx.es.population, tx.build()
  history = np.asarray(fitness_history, np.float32)
  if history.ndim != 2 or (population is not None and history.shape[1] != population):
    want = f"(generations, {population})" if population else "(generations, population)"
    raise ValueError(f"fitness_history must have shape {want}, got {history.shape}.")

  def step(params, state, fitness, first_bad, generation):
    updates, state = tx.update(None, state, params, fitness=fitness)
    params = optax.apply_updates(params, updates)
    # The first generation with non-finite weights stays on the device (-1 while
    # none): checked inside the step, as the runner does, with no sync per generation.
    first_bad = jnp.where((first_bad < 0) & ~all_finite(params), generation, first_bad)
    return params, state, first_bad

  state = tx.init(params)
  # Our own copies are donated, so the loop holds one set of params and states
  # (the caller's theta_0 stays valid).
  params, state = jax.tree.map(jnp.copy, (params, state))
  jit_step = jax.jit(step, donate_argnums=(0, 1))
  first_bad = jnp.int32(-1)
  for generation, fitness in enumerate(history):
    params, state, first_bad = jit_step(params, state, fitness, first_bad, generation)
  if int(first_bad) >= 0:
    _raise_non_finite(params, int(first_bad), len(history))
  return params, state


def _raise_non_finite(params: PyTree, generation: int, generations: int):
  bad = [noise_lib.path_str(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
         if not bool(jnp.all(jnp.isfinite(leaf)))]
  raise ValueError(
      f"replay: the weights are non-finite from generation {generation} of {generations} on "
      f"(the update fed fitness_history[{generation}], 0-based); non-finite leaves at the end: "
      f"{bad[:5]}{' ...' if len(bad) > 5 else ''}. No run that checked its weights recorded "
      "this history with this recipe: check the recipe's learning rate and sigma.")

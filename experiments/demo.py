"""The main job on the embedded default: ES fine-tuning drifts, anchored weight decay holds it.

What it shows, end to end on a CPU with no downloads (the phenomenon of
reference sections 1-3, scaled down to an 81k-parameter model):

1. A tiny Qwen2-architecture model (``es_jax.models.Transformer``: 2 layers,
   width 64, tied embeddings, float32) with the character tokenizer.
2. Gradient pretraining (Adam, 600 steps) teaches it a PRIOR task, letter
   shift (``"c+3="`` -> ``"f"``), and shows it the format of the NEW task,
   digit product (``"3*4="`` -> ``"2"``), with mostly off-by-one answers, so
   that it answers with a digit but usually the wrong one, the right one a
   close second (see :mod:`experiments.demo_tasks`).
3. ES fine-tunes it on the new task (reward: exact match of the greedy answer,
   all 100 problems every generation) with ``es_jax.es_step``: EGGROLL rank-1
   noise, the fast path ``reward_input="noise"``, Qiu et al.'s estimator
   (z-scored fitness, ``theta += alpha / N * sum_n Z_n eps_n``), N=32,
   sigma=0.02, alpha=0.006, 450 iterations, embedding table frozen. Twice from
   the same theta_0 with the same noise key: plain ES (``optax.sgd(alpha)``
   after the ES direction) and ES + anchored weight decay (``optax.sgd(alpha)``
   then ``es_jax.anchored_weight_decay(0.8, learning_rate=alpha)``, L2;
   alpha * lambda = 0.0048, the published product).
   GRPO (:mod:`experiments.grpo`'s objective; 30 sampled answers for each of 8
   problems per step, k3 KL beta=1e-3 to theta_0, Adam 3e-5) fine-tunes the
   same theta_0 for 150 steps: the papers' gradient baseline.
4. Every ``--eval-every`` (10) iterations it records the new-task reward and
   the prior-task accuracy (greedy, unperturbed weights), the prior task's
   negative log-likelihood, and ``es_jax.evaluation.drift_report``: the global
   update norm ``||theta_t - theta_0||`` and the sparsity at tau = 1e-6, in
   float32 and after rounding both weight sets to bfloat16 (the papers' storage).
5. It prints a Markdown table and a short reading computed from the metrics,
   and writes into ``--out`` (default ``runs/demo/``): ``metrics.jsonl``,
   ``summary.json``, ``table.md`` and plots ``demo.png`` (all three panels),
   ``new_task_reward.png``, ``prior_task_accuracy.png``, ``update_norm.png``.

What the run shows, and how much of it holds across seeds and machines, is in
the README's "The main job" section: the numbers come from running this
script, so they live beside the command that produced them, not here.

Run (from the repository root): ``python -m experiments.demo`` (or
``make demo``): about 3-4 minutes on 2 CPU cores, mostly the 2 x 450 ES
iterations. ``--quick`` is a tiny smoke run (~30 s, mostly compilation);
``--help`` lists the knobs (``--seed``, ``--iterations``, ``--awd-strength``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global
from tqdm import tqdm

import es_jax
from es_jax import noise as noise_lib
from es_jax.evaluation import drift_report
from es_jax.models import ModelConfig, Transformer, char_tokenizer, init_params, logits_fn
from experiments import demo_tasks, grpo

TAU = 1e-6  # sparsity threshold of the forgetting paper
Record = dict[str, Any]  # one line of metrics.jsonl


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Every knob of the demo; the defaults are the documented run."""

  # Model: Qwen2 architecture, char tokenizer (vocab 103), float32 compute.
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  # Pretraining (Adam, cross-entropy on the answer token).
  pretrain_steps: int = 600
  pretrain_batch: int = 256
  pretrain_lr: float = 3e-3
  # Share of new-task examples in the pretraining corpus with the right answer
  # (the rest are off by one): < 0.5, so the model starts mostly wrong.
  p_correct: float = 0.4
  # ES (Qiu et al.'s update with EGGROLL rank-1 noise).
  iterations: int = 450
  population: int = 32
  sigma: float = 0.02
  alpha: float = 6e-3
  # alpha * lambda = 0.0048, the published product (lambda=10 at alpha=5e-4: 0.005).
  awd_strength: float = 0.8
  # GRPO baseline (group 30, clipped objective, KL beta 1e-3 to theta_0, Adam).
  grpo_iterations: int = 150
  grpo_group: int = 30
  grpo_prompts: int = 8
  grpo_lr: float = 3e-5
  grpo_kl_beta: float = 1e-3
  eval_every: int = 10
  seed: int = 0


# A smoke-test size: the whole pipeline in seconds (plus compilation). The AWD
# strength is large (alpha * lambda = 0.45) so that its smaller norm is certain
# even after a handful of steps.
QUICK = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
             head_dim=8, pretrain_steps=20, pretrain_batch=64, iterations=8, population=8,
             eval_every=4, awd_strength=75.0, grpo_iterations=8, grpo_group=4, grpo_prompts=4)


# ----------------------------------------------------------------------------- model


def build_model(cfg: DemoConfig, tokenizer) -> Transformer:
  """A tiny Qwen2 decoder over the character vocabulary."""
  return Transformer(ModelConfig(
      family="qwen2", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
      max_position_embeddings=64, eos_token_ids=(tokenizer.eos_token_id,),
      pad_token_id=tokenizer.pad_token_id,
      # float32 compute: an ES step is ~1e-3 per weight, below bfloat16's resolution.
      dtype=jnp.float32))


def answer_logits(model: Transformer, params, input_ids: jax.Array, noise=None) -> jax.Array:
  """Logits ``(batch, vocab)`` of the token after the prompt (the one-token answer)."""
  return logits_fn(model, params, input_ids, jnp.ones_like(input_ids), noise)[:, -1]


def greedy_accuracy(logits: jax.Array, answer_ids: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == answer_ids)


def new_task_reward(model: Transformer, params, member_noise, batch) -> jax.Array:
  """ES fitness of one member: exact-match rate of its greedy answers (reward_input="noise")."""
  input_ids, answer_ids = batch
  return greedy_accuracy(answer_logits(model, params, input_ids, member_noise), answer_ids)


def evaluate_tasks(model: Transformer, params, prior: tuple[jax.Array, jax.Array],
                   new: tuple[jax.Array, jax.Array],
                   off_by_one_ids: jax.Array) -> dict[str, jax.Array]:
  """Greedy accuracy on both tasks (and how often the new task gets the off-by-one digit)."""
  prior_logits = answer_logits(model, params, prior[0])
  new_logits = answer_logits(model, params, new[0])
  prior_logp = jax.nn.log_softmax(prior_logits)
  return {
      "new_task_reward": greedy_accuracy(new_logits, new[1]),
      "new_task_off_by_one": greedy_accuracy(new_logits, off_by_one_ids),
      "prior_task_accuracy": greedy_accuracy(prior_logits, prior[1]),
      # Smoother than accuracy: shows the prior task eroding before answers flip.
      "prior_task_nll": -jnp.mean(jnp.take_along_axis(prior_logp, prior[1][:, None], -1)),
  }


# ----------------------------------------------------------------------------- pretraining


def pretrain(model: Transformer, params, tasks, cfg: DemoConfig):
  """Adam on cross-entropy of the answer token, batches from demo_tasks.pretraining_batch."""
  prior, new, off_by_one = tasks
  optimizer = optax.adam(cfg.pretrain_lr)

  def loss_fn(params, input_ids, answer_ids):
    logp = jax.nn.log_softmax(answer_logits(model, params, input_ids))
    return -jnp.mean(jnp.take_along_axis(logp, answer_ids[:, None], -1))

  @jax.jit
  def step(params, opt_state, key):
    input_ids, answer_ids = demo_tasks.pretraining_batch(
        key, prior, new, off_by_one.answer_ids, cfg.p_correct, cfg.pretrain_batch)
    loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, answer_ids)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  base_key = jax.random.key(cfg.seed + 1)
  bar = tqdm(range(cfg.pretrain_steps), desc="pretrain (Adam)", ncols=100)
  for i in bar:
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(base_key, i))
    if i % 50 == 0 or i == cfg.pretrain_steps - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
  return params


# ----------------------------------------------------------------------------- ES fine-tuning


def post_es_transforms(cfg: DemoConfig) -> dict[str, tuple[float, optax.GradientTransformation]]:
  """Each run's AWD strength and what follows the ES direction in it.

  ``optax.chain(es_step, post)`` is the run's optimizer: ``sgd(alpha)`` for
  plain ES, ``sgd(alpha)`` then ``anchored_weight_decay(lambda,
  learning_rate=alpha)`` (the published post-step rule) for ES + AWD. The ES
  transform itself is one object shared by the runs and jitted on its own:
  one compiled population forward (compiling it takes tens of seconds on a
  CPU, everything else about one) and one noise key, so both runs see the
  same noise.
  """
  awd = es_jax.anchored_weight_decay(cfg.awd_strength, kind="l2", learning_rate=cfg.alpha)
  return {
      "ES": (0.0, optax.sgd(cfg.alpha)),
      f"ES + AWD (L2, lambda={cfg.awd_strength:g})":
          (cfg.awd_strength, optax.chain(optax.sgd(cfg.alpha), awd)),
  }


def snapshot(run: str, iteration: int, params, params0, evaluate, member_reward) -> Record:
  """One metrics record: task scores of the current weights and their drift from theta_0."""
  scores = {k: float(v) for k, v in jax.device_get(evaluate(params)).items()}
  drift = drift_report(params, params0, tau=TAU)
  # The papers' checkpoints are bfloat16: a change below its resolution is no change there.
  as_bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  drift_bf16 = drift_report(as_bf16(params), as_bf16(params0), tau=TAU)
  return {
      "run": run, "iteration": iteration, "es_member_reward": member_reward, **scores,
      "update_norm": drift.global_norm, "sparsity": drift.sparsity,
      "sparsity_bf16": drift_bf16.sparsity,
      "group_norms": {name: g.norm for name, g in drift.groups.items()},
      "group_sparsity": {name: g.sparsity for name, g in drift.groups.items()},
  }


def fine_tune(run: str, post_tx, params0, es_tx, es_update, evaluate, batch,
              cfg: DemoConfig) -> list[Record]:
  """``cfg.iterations`` ES generations from ``params0``; returns the metrics records."""

  @jax.jit
  def apply_step(params, direction, post_state):
    updates, post_state = post_tx.update(direction, post_state, params)
    return optax.apply_updates(params, updates), post_state

  params, es_state, post_state = params0, es_tx.init(params0), post_tx.init(params0)
  records = [snapshot(run, 0, params, params0, evaluate, None)]
  bar = tqdm(range(1, cfg.iterations + 1), desc=run, ncols=100)
  for iteration in bar:
    direction, es_state = es_update(None, es_state, params, batch=batch)
    params, post_state = apply_step(params, direction, post_state)
    member_reward = float(es_state.rewards.mean())
    if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
      records.append(snapshot(run, iteration, params, params0, evaluate, member_reward))
    bar.set_postfix(reward=f"{member_reward:.3f}", norm=f"{records[-1]['update_norm']:.2f}",
                    refresh=False)  # redraw at tqdm's own pace, not every step
  return records


def grpo_fine_tune(run: str, model: Transformer, params0, evaluate, batch,
                   cfg: DemoConfig) -> list[Record]:
  """The GRPO baseline on the same new task, from the same theta_0 (all weights trained).

  Each step samples ``grpo_group`` answers for each of ``grpo_prompts`` random
  problems, rewards exact matches, and takes one Adam step on
  :func:`experiments.grpo.grpo_objective` (on-policy: ratio 1) with the k3 KL
  to theta_0 weighted by ``grpo_kl_beta``.
  """
  optimizer = optax.adam(cfg.grpo_lr)
  input_ids, answer_ids = batch

  def answer_logp(params, ids):
    return jax.nn.log_softmax(answer_logits(model, params, ids), axis=-1)

  @jax.jit
  def step(params, opt_state, key):
    rows_key, sample_key = jax.random.split(key)
    rows = jax.random.choice(rows_key, len(input_ids), (cfg.grpo_prompts,), replace=False)
    ids = input_ids[rows]
    tokens = jax.random.categorical(sample_key, answer_logp(params, ids),
                                    shape=(cfg.grpo_group, cfg.grpo_prompts)).T  # (P, G)
    rewards = (tokens == answer_ids[rows][:, None]).astype(jnp.float32)
    advantages = grpo.group_advantages(rewards).reshape(-1)
    ref_logp = jnp.take_along_axis(answer_logp(params0, ids), tokens, -1).reshape(-1, 1)

    def loss_fn(params):
      logp = jnp.take_along_axis(answer_logp(params, ids), tokens, -1).reshape(-1, 1)
      loss, _ = grpo.grpo_objective(logp, jax.lax.stop_gradient(logp), ref_logp, advantages,
                                    jnp.ones_like(logp), kl_beta=cfg.grpo_kl_beta)
      return loss

    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rewards.mean()

  params, opt_state = params0, optimizer.init(params0)
  records = [snapshot(run, 0, params, params0, evaluate, None)]
  base_key = jax.random.key(cfg.seed + 3)
  bar = tqdm(range(1, cfg.grpo_iterations + 1), desc=run, ncols=100)
  for iteration in bar:
    params, opt_state, reward = step(params, opt_state, jax.random.fold_in(base_key, iteration))
    if iteration % cfg.eval_every == 0 or iteration == cfg.grpo_iterations:
      records.append(snapshot(run, iteration, params, params0, evaluate, float(reward)))
    bar.set_postfix(reward=f"{float(reward):.3f}", norm=f"{records[-1]['update_norm']:.3f}",
                    refresh=False)
  return records


def perturbed_size(es_state: es_jax.EsState, params) -> int:
  """d: how many weights ES perturbs (frozen leaves excluded)."""
  spec = es_state.config.noise
  sizes = jax.tree_util.tree_map_with_path(
      lambda path, x: 0 if noise_lib.leaf_kind(spec, noise_lib.path_str(path), x.shape) == "frozen"
      else x.size, params)
  return int(sum(jax.tree.leaves(sizes)))


def random_walk_norm(cfg: DemoConfig, d: int, awd_strength: float, steps: int) -> float:
  """Expected ``||theta_T - theta_0||`` if every ES step were pure noise (unit-variance Z).

  A step moves each weight by ~alpha / sqrt(N) (reference section 2); L2 AWD
  then multiplies the deviation by ``c = 1 - alpha * lambda``, so the variance
  after T steps is ``s^2 * sum_{t=1..T} c^(2t)``: ``s^2 T`` without AWD (the
  sqrt(T) random walk) and ``~s^2 / (2 alpha lambda)`` as T grows with it.
  """
  step_var = cfg.alpha ** 2 / cfg.population
  c2 = (1.0 - cfg.alpha * awd_strength) ** 2
  growth = steps if c2 == 1.0 else c2 * (1.0 - c2 ** steps) / (1.0 - c2)
  return math.sqrt(d * step_var * growth)


# ----------------------------------------------------------------------------- reporting


def run_names(records: list[Record]) -> list[str]:
  return list(dict.fromkeys(r["run"] for r in records))


def history_of(records: list[Record], run: str) -> list[Record]:
  return [r for r in records if r["run"] == run]


def summary_rows(records: list[Record]) -> list[Record]:
  """Start and end of each run, in run order."""
  rows = []
  for run in run_names(records):
    history = history_of(records, run)
    first, last = history[0], history[-1]
    rows.append({
        "run": run, "iterations": last["iteration"],
        "new_task_reward": (first["new_task_reward"], last["new_task_reward"]),
        "prior_task_accuracy": (first["prior_task_accuracy"], last["prior_task_accuracy"]),
        "prior_task_nll": (first["prior_task_nll"], last["prior_task_nll"]),
        "update_norm": last["update_norm"],
        "random_walk_prediction": last["random_walk_prediction"],
        "sparsity": last["sparsity"],
        "sparsity_bf16": last["sparsity_bf16"],
    })
  return rows


def markdown_table(rows: list[Record]) -> str:
  lines = ["| run | iterations | new-task reward | prior-task accuracy | prior-task NLL "
           "| update norm | random-walk prediction | sparsity (tau=1e-6) | sparsity in bf16 |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    arrow = lambda pair: f"{pair[0]:.3f} -> {pair[1]:.3f}"
    walk = row["random_walk_prediction"]
    lines.append(
        f"| {row['run']} | {row['iterations']} | {arrow(row['new_task_reward'])} "
        f"| {arrow(row['prior_task_accuracy'])} | {arrow(row['prior_task_nll'])} "
        f"| {row['update_norm']:.3f} | {'-' if walk is None else f'{walk:.3f}'} "
        f"| {row['sparsity']:.3f} | {row['sparsity_bf16']:.3f} |")
  return "\n".join(lines)


def norm_growth_late(records: list[Record], run: str) -> float:
  """Relative growth of the update norm over the last third of a run."""
  history = history_of(records, run)
  end = history[-1]
  middle = min(history, key=lambda r: abs(r["iteration"] - 2 * end["iteration"] / 3))
  return end["update_norm"] / max(middle["update_norm"], 1e-12) - 1.0


def reading(rows: list[Record], records: list[Record]) -> list[str]:
  """Plain statements, computed from the metrics, of whether the phenomenon shows in this run."""
  plain, awd = rows[0], rows[1]
  lines = []
  for row in rows:
    start, end = row["new_task_reward"]
    lines.append(f"{row['run']}: new-task reward {start:.2f} -> {end:.2f} "
                 f"({'raised' if end > start else 'NOT raised'}).")
  lost_plain, lost_awd = (row["prior_task_accuracy"][0] - row["prior_task_accuracy"][1]
                          for row in (plain, awd))
  lines.append(f"Prior-task accuracy lost: {lost_plain:.3f} with ES, {lost_awd:.3f} with AWD "
               f"({'AWD loses less' if lost_awd < lost_plain else 'AWD does NOT lose less'}).")
  smaller = awd["update_norm"] < plain["update_norm"]
  lines.append(
      f"Update norm: {plain['update_norm']:.3f} with ES, {awd['update_norm']:.3f} with AWD "
      f"({'AWD smaller' if smaller else 'AWD NOT smaller'}); over the last third it grew "
      f"{100 * norm_growth_late(records, plain['run']):+.0f}% with ES (a pure random walk: "
      f"{100 * (math.sqrt(1.5) - 1):+.0f}%) and "
      f"{100 * norm_growth_late(records, awd['run']):+.0f}% with AWD.")
  lines.append(at_equal_reward(records, plain["run"], awd["run"]))
  if len(rows) > 2:
    gradient = rows[2]
    lost = gradient["prior_task_accuracy"][0] - gradient["prior_task_accuracy"][1]
    lines.append(
        f"{gradient['run']}: prior-task accuracy lost {lost:.3f}; ES/GRPO update-norm ratio "
        f"{plain['update_norm'] / max(gradient['update_norm'], 1e-12):.1f}x (papers: ~1000x); "
        f"GRPO sparsity {gradient['sparsity']:.1%} at tau=1e-6 in float32, "
        f"{gradient['sparsity_bf16']:.1%} in bfloat16 (papers: ~95%), ES {plain['sparsity']:.1%} "
        f"and {plain['sparsity_bf16']:.1%}.")
  return lines


def at_equal_reward(records: list[Record], plain: str, awd: str) -> str:
  """Prior-task accuracy of plain ES when it first matched AWD's final new-task reward.

  AWD can trade new-task reward for less drift; this separates forgetting that
  comes with learning the new task from forgetting that comes with the walk.
  """
  awd_end = history_of(records, awd)[-1]
  target = awd_end["new_task_reward"]
  match = next((r for r in history_of(records, plain) if r["new_task_reward"] >= target), None)
  if match is None:
    return f"Plain ES never reached AWD's final new-task reward {target:.2f}."
  return (f"At equal new-task reward ({target:.2f}): plain ES got there at iteration "
          f"{match['iteration']} with prior-task accuracy {match['prior_task_accuracy']:.3f} and "
          f"norm {match['update_norm']:.2f}; AWD ends with {awd_end['prior_task_accuracy']:.3f} "
          f"and {awd_end['update_norm']:.2f}.")


def plot_metric(ax, records: list[Record], key: str, title: str) -> None:
  """One line per run (plus the dashed random-walk prediction for the update norm)."""
  for run in run_names(records):
    history = history_of(records, run)
    steps = [r["iteration"] for r in history]
    line, = ax.plot(steps, [r[key] for r in history], label=run)
    if key == "update_norm" and history[-1]["random_walk_prediction"] is not None:
      ax.plot(steps, [r["random_walk_prediction"] for r in history], ls="--", lw=1,
              color=line.get_color(), label=f"{run}: random-walk prediction")
  ax.set_title(title)
  ax.set_xlabel("iteration")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="upper left" if key == "update_norm" else "best")


PANELS = (("new_task_reward", "new-task reward (digit product, greedy)"),
          ("prior_task_accuracy", "prior-task accuracy (letter shift)"),
          ("update_norm", "update norm ||theta_t - theta_0||"))


def write_plots(records: list[Record], out: pathlib.Path) -> list[pathlib.Path]:
  """``demo.png`` with all panels, and one PNG per panel."""
  paths = [out / "demo.png"]
  fig = Figure(figsize=(5 * len(PANELS), 4), layout="constrained")
  for ax, (key, title) in zip(fig.subplots(1, len(PANELS)), PANELS):
    plot_metric(ax, records, key, title)
  fig.savefig(paths[-1], dpi=110)
  for key, title in PANELS:
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    plot_metric(fig.subplots(), records, key, title)
    paths.append(out / f"{key}.png")
    fig.savefig(paths[-1], dpi=110)
  return paths


def write_outputs(out: pathlib.Path, records: list[Record], summary: dict[str, Any],
                  table: str) -> list[pathlib.Path]:
  """The run directory: metrics.jsonl, summary.json, table.md and the plots."""
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "metrics.jsonl", "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  (out / "table.md").write_text(table + "\n")
  return [out / "metrics.jsonl", out / "summary.json", out / "table.md", *write_plots(records, out)]


# ----------------------------------------------------------------------------- main


def parse_config(argv: Sequence[str] | None) -> tuple[DemoConfig, pathlib.Path]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
  parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
  for field in dataclasses.fields(DemoConfig):
    parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                        help=f"default: {field.default}")
  args = parser.parse_args(argv)
  changes = dict(QUICK) if args.quick else {}
  changes.update({f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)
                  if getattr(args, f.name) is not None})
  return DemoConfig(**changes), pathlib.Path(args.out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the demo; returns the summary written to ``summary.json``."""
  start = time.time()
  load_before = os.getloadavg()
  cfg, out = parse_config(argv)
  tokenizer = char_tokenizer()
  prior = demo_tasks.letter_shift_task(tokenizer)
  new = demo_tasks.digit_product_task(tokenizer)
  off_by_one = demo_tasks.digit_product_task(tokenizer, offset=1)
  model = build_model(cfg, tokenizer)
  params = init_params(model, jax.random.key(cfg.seed))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"Model: Qwen2 architecture, {cfg.num_layers} layers, width {cfg.hidden_size}, "
        f"{num_params:,} parameters. Prior task: {prior.name} ({len(prior)} prompts, e.g. "
        f"{prior.prompts[23]!r} -> {prior.answers[23]!r}); new task: {new.name} ({len(new)} "
        f"prompts, e.g. {new.prompts[34]!r} -> {new.answers[34]!r}).")

  evaluate = jax.jit(functools.partial(
      evaluate_tasks, model,
      prior=(jnp.asarray(prior.input_ids), jnp.asarray(prior.answer_ids)),
      new=(jnp.asarray(new.input_ids), jnp.asarray(new.answer_ids)),
      off_by_one_ids=jnp.asarray(off_by_one.answer_ids)))
  params0 = pretrain(model, params, (prior, new, off_by_one), cfg)
  pretrained = {k: float(v) for k, v in jax.device_get(evaluate(params0)).items()}
  pretrain_seconds = time.time() - start
  print(f"Pretrained: prior-task accuracy {pretrained['prior_task_accuracy']:.3f}; new task: "
        f"reward {pretrained['new_task_reward']:.3f}, off-by-one answers "
        f"{pretrained['new_task_off_by_one']:.3f}.")

  es_tx = es_jax.es_step(
      functools.partial(new_task_reward, model), population=cfg.population, sigma=cfg.sigma,
      key=jax.random.key(cfg.seed + 2), rank=1, estimator="qiu", reward_input="noise",
      # The tied embedding table is the output head too; EGGROLL leaves embeddings unperturbed.
      freeze=("embed",))
  es_update = jax.jit(es_tx.update)
  batch = (jnp.asarray(new.input_ids), jnp.asarray(new.answer_ids))
  d = perturbed_size(es_tx.init(params0), params0)
  records, run_seconds = [], {}
  for run, (strength, post_tx) in post_es_transforms(cfg).items():
    run_start = time.time()
    history = fine_tune(run, post_tx, params0, es_tx, es_update, evaluate, batch, cfg)
    run_seconds[run] = time.time() - run_start
    for record in history:
      record["random_walk_prediction"] = random_walk_norm(cfg, d, strength, record["iteration"])
    records += history
  run_start = time.time()
  grpo_run = f"GRPO (G={cfg.grpo_group}, beta={cfg.grpo_kl_beta:g})"
  history = grpo_fine_tune(grpo_run, model, params0, evaluate, batch, cfg)
  run_seconds[grpo_run] = time.time() - run_start
  for record in history:
    record["random_walk_prediction"] = None  # no random walk: GRPO follows a gradient
  records += history

  rows = summary_rows(records)
  table = markdown_table(rows)
  notes = reading(rows, records)
  summary = {
      "config": dataclasses.asdict(cfg), "num_params": int(num_params), "perturbed_params": d,
      "pretrained": pretrained, "rows": rows, "reading": notes,
      "seconds": {"pretraining": pretrain_seconds, **run_seconds, "total": time.time() - start},
      "load_average": {"before": load_before, "after": os.getloadavg()},
  }
  paths = write_outputs(out, records, summary, table)
  print(f"\nES: N={cfg.population}, sigma={cfg.sigma:g}, alpha={cfg.alpha:g}, EGGROLL rank 1, "
        f"{d:,} perturbed weights (embedding frozen). Random-walk prediction: "
        "alpha*sqrt(d/N)*sqrt(T) for ES; with AWD the same walk shrunk by (1-alpha*lambda) "
        "per step.\n")
  print(table + "\n")
  print("\n".join(f"- {line}" for line in notes))
  print(f"\nWrote {', '.join(p.name for p in paths)} to {out}/ in {time.time() - start:.0f} s "
        f"(load average {load_before[0]:.1f} at start).")
  return summary


if __name__ == "__main__":
  main()

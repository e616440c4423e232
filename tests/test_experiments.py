"""The experiment runner: configs, a countdown_es run on a tiny HF checkpoint, resume after
SIGKILL, 8 devices against one, and run directories that are never overwritten."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import es_jax
from experiment_fixtures import (digit_share_reward, make_tiny_checkpoint, short_run_overrides,
                                 write_short_gsm8k, write_short_hellaswag)
from experiments import components, rollouts
from experiments import config as config_lib
from experiments.checkpointing import RunCheckpointError, RunCheckpointer
from experiments.config import ExperimentConfig, apply_overrides, preset
from experiments.run import RunError, fingerprint, main, run
from experiments.trainers import make_trainer

WORKER = pathlib.Path(__file__).parent / "experiment_worker.py"
RECORD_KEYS = {"iteration", "target_accuracy", "target_reward", "prior_accuracy", "kl_to_base",
               "update_norm", "sparsity", "group_norms", "group_sparsity", "train_reward",
               "wall_time_s"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("assets")
  return types.SimpleNamespace(
      checkpoint=make_tiny_checkpoint(root / "ckpt"),
      gsm8k=write_short_gsm8k(root / "gsm8k.jsonl"),
      hellaswag=write_short_hellaswag(root / "hellaswag.jsonl"))


def short_config(assets, *extra: str) -> ExperimentConfig:
  overrides = short_run_overrides(assets.checkpoint, assets.gsm8k, assets.hellaswag)
  return apply_overrides(preset("countdown_es"), overrides + list(extra))


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_time(records):
  return [{k: v for k, v in r.items() if k not in ("wall_time_s", "seconds")} for r in records]


def final_state(config: ExperimentConfig, run_dir: pathlib.Path):
  parts = components.build(config)
  like = make_trainer(parts, config).init(parts.params0)
  with RunCheckpointer(run_dir / "checkpoints", fingerprint=fingerprint(config)) as checkpointer:
    state, _ = checkpointer.restore(like)
  return state


def assert_trees_equal(a, b):
  a_leaves, a_def = jax.tree.flatten(a)
  b_leaves, b_def = jax.tree.flatten(b)
  assert a_def == b_def
  for x, y in zip(a_leaves, b_leaves):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- configs


def test_presets_carry_the_published_settings():
  es = preset("countdown_es")
  assert (es.es.population, es.es.sigma, es.es.learning_rate, es.task.num_train) == (30, 1e-3, 5e-4, 200)
  assert es.es.shaping == "z_score" and not es.es.antithetic and es.awd.kind == "none"
  assert (preset("countdown_awd_l2").awd.kind, preset("countdown_awd_l2").awd.strength) == ("l2", 10.0)
  assert (preset("countdown_awd_l1").awd.kind, preset("countdown_awd_l1").awd.strength) == ("l1", 0.01)
  grpo = preset("grpo")
  assert (grpo.algorithm, grpo.grpo.group_size, grpo.grpo.kl_beta) == ("grpo", 30, 1e-3)
  assert preset("gsm8k_es").task.target == "gsm8k"
  assert [c.es.population for c in config_lib.expand("population_sweep")] == [30, 128, 256]
  assert {c.es.rank for c in config_lib.expand("noise_rank")} == {None, 1}


def test_overrides_parse_by_field_type_and_round_trip_through_json():
  cfg = apply_overrides(preset("countdown_es"), [
      "es.rank=4", "es.freeze=embed,lm_head", "es.antithetic=true", "task.prompts_per_iteration=none",
      "awd.kind=l1", "awd.strength=0.01", "iterations=7"])
  assert (cfg.es.rank, cfg.es.freeze, cfg.es.antithetic, cfg.iterations) == (4, ("embed", "lm_head"), True, 7)
  assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("override, message", [
    ("es.populaton=3", "no field 'populaton'"),
    ("es.population=many", "cannot read 'many' as int"),
    ("es.population=1", "es.population=1 must be >= 2"),
    ("awd.kind=l3", "awd.kind='l3'"),
    ("es", "expected section.field=value"),
    ("es.member_chunk=4", "member_chunk was renamed chunk_size"),
    ("es.kl_beta=-0.1", r"es.kl_beta=-0.1 must be >= 0"),
])
def test_bad_overrides_say_what_is_wrong(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(preset("countdown_es"), [override])


def test_fields_added_later_stay_out_of_the_fingerprint_at_their_default():
  # A run checkpointed before grpo.adv_eps and es.kl_beta were config fields still resumes;
  # a changed one counts.
  default = fingerprint(preset("countdown_es"))
  assert "adv_eps" not in default["grpo"] and "kl_beta" not in default["es"]
  assert "fitness" not in default["es"]
  assert not {"shots", "prior_every", "prior_seed"} & set(default["task"])
  assert "mitigation" not in default
  assert "chunk_size" not in default["es"]
  changed = fingerprint(apply_overrides(preset("countdown_es"), ["grpo.adv_eps=1e-3"]))
  assert changed["grpo"]["adv_eps"] == 1e-3
  assert fingerprint(preset("smollm2_es"))["es"]["fitness"] == "answer_logprob"


def test_l2_awd_needs_alpha_lambda_below_one():
  with pytest.raises(ValueError, match="must be < 1"):
    apply_overrides(preset("countdown_awd_l2"), ["awd.strength=2000"])


def test_prompt_order_is_a_fresh_permutation_each_epoch():
  cfg = apply_overrides(preset("countdown_es"), ["task.num_train=10", "task.prompts_per_iteration=4"])
  seen = np.concatenate([components.prompt_indices(cfg, it)[0] for it in range(1, 6)])
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert components.prompt_indices(cfg, 3)[1] == 12
  full = components.prompt_indices(preset("countdown_es"), 5)[0]
  np.testing.assert_array_equal(full, np.arange(200))  # the papers' ES: every prompt, every time


# ----------------------------------------------------------------------------- runs


def test_countdown_es_runs_on_a_tiny_hf_checkpoint(assets, tmp_path):
  """Wiring: the countdown_es preset, real Countdown reward, 2 iterations, eval and checkpoints."""
  out = tmp_path / "run"
  rc = main(["countdown_es", "--out", str(out), "--no-progress", "--set",
             f"model.checkpoint={assets.checkpoint}", "model.dtype=float32", "task.num_train=3",
             "task.num_eval=2", "task.max_new_tokens=5", f"task.prior_source={assets.hellaswag}",
             "task.num_prior=2", "task.kl_prompts=1", "es.population=4", "iterations=2",
             "eval_every=1", "checkpoint_every=1", "prompt_batch=3", "pop_devices=1"])
  assert rc == 0
  records = read_metrics(out)
  assert [r["iteration"] for r in records] == [0, 1, 2]
  for r in records:
    assert RECORD_KEYS <= set(r)
    assert 0 <= r["target_accuracy"] <= 1 and 0 <= r["prior_accuracy"] <= 1
    assert set(r["group_sparsity"]) >= {"q", "k", "v", "o", "mlp", "norm"}
  for name in ("forgetting.png", "update_norm.png", "sparsity.png", "pareto.png", "config.json"):
    assert (out / name).stat().st_size > 0
  assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]


def test_resume_after_sigkill_is_bit_identical(assets, tmp_path, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  config = short_config(assets, "iterations=8")
  reference = run(config, tmp_path / "reference", progress=False)
  assert reference[-1]["update_norm"] > 0  # the test reward gives real updates

  killed = tmp_path / "killed"
  overrides = short_run_overrides(assets.checkpoint, assets.gsm8k, assets.hellaswag)
  proc = subprocess.Popen(
      [sys.executable, str(WORKER), "countdown_es", "--out", str(killed), "--no-progress",
       "--set", *overrides, "iterations=8"],
      env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 240
  while not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline, "no checkpoint within 240 s"
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit())
  assert saved and saved[-1] < 8

  resumed = run(config, killed, resume=True, progress=False)
  assert without_time(resumed) == without_time(reference)
  assert without_time(read_metrics(killed)) == without_time(reference)
  final = final_state(config, tmp_path / "reference")
  assert_trees_equal(final_state(config, killed), final)
  # The run's ES patch (its fitness history, half of it restored from a checkpoint's meta)
  # replays to the trained params bit for bit.
  patch = es_jax.load_patch(killed / "run.espatch")
  assert patch.fitness_history.shape == (8, 8) and patch.metadata["pop_devices"] == 1
  assert_trees_equal(es_jax.apply_patch(patch, components.build(config).params0), final["params"])


def test_eight_devices_give_the_metrics_of_one(assets, tmp_path, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  one = run(short_config(assets, "iterations=2", "pop_devices=1"), tmp_path / "one", progress=False)
  eight = run(short_config(assets, "iterations=2", "pop_devices=8"), tmp_path / "eight",
              progress=False)
  assert one[-1]["update_norm"] > 0
  for a, b in zip(without_time(one), without_time(eight)):
    assert a.keys() == b.keys()
    for key in a:
      if key == "prior_tasks":  # per task: items' correctness and margins
        assert a[key].keys() == b[key].keys()
        for task in a[key]:
          assert b[key][task]["correct"] == a[key][task]["correct"], task
          np.testing.assert_allclose(b[key][task]["margin"], a[key][task]["margin"], rtol=1e-5,
                                     atol=1e-6, err_msg=task)
      elif isinstance(a[key], dict):
        np.testing.assert_allclose(list(b[key].values()), list(a[key].values()), rtol=1e-5, atol=1e-7)
      elif isinstance(a[key], float):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
      else:
        assert a[key] == b[key], key


def test_a_run_directory_is_never_overwritten(assets, tmp_path, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  config = short_config(assets, "iterations=2")
  out = tmp_path / "run"
  run(config, out, progress=False)
  files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  with pytest.raises(RunError, match="--resume"):
    run(config, out, progress=False)
  with pytest.raises(RunCheckpointError, match="sigma"):
    run(apply_overrides(config, ["es.sigma=0.1"]), out, resume=True, progress=False)
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
  # Extending a finished run is a resume with more iterations.
  extended = run(apply_overrides(config, ["iterations=4"]), out, resume=True, progress=False)
  assert [r["iteration"] for r in extended] == [0, 2, 4]


def test_grpo_runs_on_the_same_model_and_task(assets, tmp_path, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  config = short_config(assets, "algorithm=grpo", "grpo.group_size=4", "grpo.prompts_per_iteration=2",
                        "grpo.learning_rate=1e-3", "iterations=2")
  records = run(config, tmp_path / "grpo", progress=False)
  assert [r["iteration"] for r in records] == [0, 2]
  assert records[-1]["update_norm"] > 0 and records[-1]["kl_to_base"] > 0
  assert 0 < records[-1]["train_reward"] < 1


def test_main_job_sweep_shares_theta0_noise_and_baseline(assets, tmp_path, monkeypatch):
  """The main job's wiring on the tiny checkpoint: plain ES and ES + AWD start from one
  iteration-0 evaluation, draw the same noise (so their first fitness vectors agree), and the
  sweep ends with one table row per run."""
  from experiments import evaluate, likelihood, run as run_lib
  calls = []
  snapshot = evaluate.snapshot
  monkeypatch.setattr(evaluate, "snapshot",
                      lambda parts, config, params, it, **kw: calls.append((config.name, it))
                      or snapshot(parts, config, params, it, **kw))
  fitness = {}
  answer_logprob = likelihood.population_answer_logprob

  def recording(*args, **kw):
    fitness.setdefault(len(fitness), answer_logprob(*args, **kw))
    return fitness[len(fitness) - 1]

  monkeypatch.setattr(likelihood, "population_answer_logprob", recording)
  overrides = [f"model.checkpoint={assets.checkpoint}", "task.num_train=4",
               "task.prompts_per_iteration=2", "task.num_eval=2", "task.num_prior=2",
               "task.kl_prompts=1", "es.population=4", "es.sigma=0.2", "iterations=2",
               "eval_every=2", "prompt_batch=2", "pop_devices=1"]
  configs = [apply_overrides(c, overrides) for c in config_lib.expand("smollm2_forgetting")]
  assert [c.awd.kind for c in configs] == ["none", "l2"] and configs[0].task.shots == 3
  results = run_lib.run_sweep(configs, tmp_path / "sweep", resume=False, progress=False,
                              sweep="smollm2_forgetting", overrides=overrides)
  assert calls == [("smollm2_es", 0), ("smollm2_es", 2), ("smollm2_es_awd", 2)]
  first = [records[0] for records in results.values()]
  # The shipped subset, with each item's correctness and margin.
  assert first[0] == first[1] and set(first[0]["prior_tasks"]) == {"hellaswag"}
  assert [len(first[0]["prior_tasks"]["hellaswag"][k]) for k in ("correct", "margin")] == [2, 2]
  np.testing.assert_array_equal(fitness[0], fitness[2])  # iteration 1 of each run: same noise
  assert len(set(fitness[0].mean(axis=1))) == 4 and not np.array_equal(fitness[0], fitness[1])
  table = (tmp_path / "sweep" / "summary.md").read_text().splitlines()
  assert [line.split("|")[1].strip() for line in table[2:4]] == ["smollm2_es", "smollm2_es_awd"]
  assert [line.split("|")[2].strip() for line in table[7:]] == ["hellaswag", "hellaswag"]


def test_answer_logprob_fitness_is_each_members_gold_answer_likelihood(assets):
  """es.fitness=answer_logprob against lm-eval-style scoring of each member's materialised
  weights (another code path: full weights instead of the low-rank noise, logits on the host)."""
  import functools
  from es_jax.evaluation import score_continuations
  from es_jax.models import logits_fn
  from experiments import likelihood
  config = apply_overrides(preset("smollm2_es"), [
      f"model.checkpoint={assets.checkpoint}", "task.num_train=5",
      "task.prompts_per_iteration=3", "task.num_eval=1", "task.kl_prompts=1",
      "task.prior=none", "es.population=4", "es.sigma=0.3", "es.fitness=answer_logprob"])
  parts = components.build(config)
  trainer = make_trainer(parts, config)
  state = trainer.init(parts.params0)
  indices = np.array([4, 0, 2])
  fitness = likelihood.population_answer_logprob(
      parts.model, state["opt_state"], parts.params0, trainer.answers, indices, population=4,
      chunk_size=3)
  requests = [(parts.target_task.build_prompt(parts.train.examples[i]),
               parts.target_task.reference_completion(parts.train.examples[i])) for i in indices]
  assert requests[0][1] == f" {parts.train.examples[4].answer}"
  for m in range(4):
    member = es_jax.member_params(state["opt_state"], parts.params0, m)
    scores = score_continuations(functools.partial(logits_fn, parts.model, member), parts.tokenizer,
                                 requests)
    expected = np.mean([s.sum_logprob for s in scores])
    np.testing.assert_allclose(fitness[m].mean(), expected, rtol=1e-4, err_msg=f"member {m}")
    np.testing.assert_allclose(fitness[m], [s.sum_logprob for s in scores], rtol=1e-4)
  assert len(set(np.round(fitness.mean(axis=1), 6))) == 4  # the members differ: a dense signal
  with pytest.raises(ValueError, match="gold completion"):
    likelihood.encode_answers(types.SimpleNamespace(name="countdown"), [], parts.tokenizer,
                              chat_template=False)


# ----------------------------------------------------------------------------- KL penalty


def _reference_member_kl(parts, config, state, member, indices):
  """float64 NumPy: member ``member``'s mean per-token KL(member || base) on its own greedy
  completions, from its materialised weights (es_jax.member_params) and the base logits."""
  from es_jax.models import decode, logits_fn
  weights = es_jax.member_params(state["opt_state"], state["params"], member)
  total, count = 0.0, 0
  for i in indices:
    ids, mask = parts.train.input_ids[i:i + 1], parts.train.attention_mask[i:i + 1]
    out = decode(parts.model, weights, ids, mask, max_new_tokens=config.task.max_new_tokens,
                 eos_ids=parts.eos_ids)
    n = int(out.lengths[0])
    full = np.concatenate([ids, np.asarray(out.tokens)[:, :n]], axis=1)
    full_mask = np.ones_like(full)
    full_mask[:, :ids.shape[1]] = mask
    t = ids.shape[1]
    member_logits = np.asarray(logits_fn(parts.model, weights, full, full_mask), np.float64)
    base_logits = np.asarray(logits_fn(parts.model, parts.params0, full, full_mask), np.float64)
    for logits, base in zip(member_logits[0, t - 1:t - 1 + n], base_logits[0, t - 1:t - 1 + n]):
      logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      logq = base - base.max() - np.log(np.exp(base - base.max()).sum())
      total += float(np.sum(np.exp(logp) * (logp - logq)))
      count += 1
  return total / count


def test_kl_penalty_is_each_members_kl_to_the_base_on_its_own_completions(assets, monkeypatch):
  """es.kl_beta: a member's KL matches float64 NumPy on its materialised weights, and the
  update sees reward - beta * KL; the main job's noise (rank 1, antithetic); prompt_batch=3
  over 4 prompts, so a filled batch's repeated rows must not count."""
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  config = short_config(assets, "es.kl_beta=0.5", "es.rank=1", "es.antithetic=true",
                        "es.population=4", "es.chunk_size=4", "prompt_batch=3", "es.sigma=0.3")
  parts = components.build(config)
  trainer = make_trainer(parts, config)
  state = trainer.init(parts.params0)
  # One step first, so the members perturb theta_1 != theta_0 (the KL is to theta_0).
  state, _ = trainer.step(state, 1)
  seen = []
  score_population = rollouts.score_population
  monkeypatch.setattr(rollouts, "score_population",
                      lambda *a, **kw: seen.append(score_population(*a, **kw)) or seen[-1])
  indices, _ = components.prompt_indices(config, 2)
  _, info = trainer.step(state, 2)
  scores = seen[0]
  for member in (0, 3):
    expected = _reference_member_kl(parts, config, state, member, indices)
    assert expected > 1e-4  # a real divergence, not a vacuous zero
    np.testing.assert_allclose(scores.kl[member], expected, rtol=1e-5)  # measured: 3e-7
  np.testing.assert_array_equal(
      info["fitness"], np.asarray(scores.rewards - 0.5 * scores.kl, np.float32))
  assert info["train_kl"] == pytest.approx(float(np.mean(scores.kl)))


def test_kl_penalty_on_the_likelihood_fitness_uses_the_members_own_completions(assets,
                                                                                monkeypatch):
  """es.fitness=answer_logprob with es.kl_beta: the update sees each member's gold-answer
  log-likelihood minus beta times the KL measured on its own greedy completions."""
  from experiments import likelihood
  config = apply_overrides(preset("smollm2_es"), [
      f"model.checkpoint={assets.checkpoint}", "task.num_train=5", "task.prompts_per_iteration=3",
      "task.num_eval=1", "task.kl_prompts=1", "task.prior=none", "es.population=4",
      "es.sigma=0.3", "es.kl_beta=0.5"])
  parts = components.build(config)
  trainer = make_trainer(parts, config)
  seen = {}
  for module, name in ((rollouts, "score_population"),
                       (likelihood, "population_answer_logprob")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw:
                        seen.setdefault(_n, _f(*a, **kw)))
  _, info = trainer.step(trainer.init(parts.params0), 1)
  kl = seen["score_population"].kl
  assert kl.shape == (4,) and np.all(kl > 0)  # sigma=0.3 moves every member off theta_0
  np.testing.assert_array_equal(info["fitness"], np.asarray(
      seen["population_answer_logprob"].mean(axis=1) - 0.5 * kl, np.float32))


def test_kl_penalty_off_measures_nothing(assets, monkeypatch):
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  config = short_config(assets)
  assert config.es.kl_beta == 0.0
  called = []
  monkeypatch.setattr(rollouts.policy_kl, "members_kl_sums", lambda *a: called.append(1))
  parts = components.build(config)
  trainer = make_trainer(parts, config)
  _, info = trainer.step(trainer.init(parts.params0), 1)
  assert not called and "train_kl" not in info


def test_mitigations_bound_the_drift_and_keep_the_top_fraction(assets, tmp_path, monkeypatch):
  """mitigation.norm_cap: ||theta - theta_0|| <= R after every iteration (the projection is
  binding here); mitigation.sparsify_fraction: one iteration changes at most round(f * n)
  entries of each tensor (counted on the weights, not read from the transform)."""
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  plain = run(short_config(assets, "iterations=2", "eval_every=1"), tmp_path / "plain",
              progress=False)
  radius = plain[-1]["update_norm"] / 2
  capped = run(short_config(assets, "iterations=2", "eval_every=1", f"mitigation.norm_cap={radius}"),
               tmp_path / "capped", progress=False)
  assert all(r["update_norm"] <= radius * (1 + 1e-5) for r in capped)
  assert capped[-1]["update_norm"] == pytest.approx(radius, rel=1e-4)

  config = short_config(assets, "iterations=1", "mitigation.sparsify_fraction=0.05")
  run(config, tmp_path / "sparse", progress=False)
  params0 = components.build(config).params0
  final = final_state(config, tmp_path / "sparse")["params"]
  for before, after in zip(jax.tree.leaves(params0), jax.tree.leaves(final)):
    changed = int(np.sum(np.asarray(before) != np.asarray(after)))
    assert changed <= max(1, round(0.05 * before.size)), (before.shape, changed)
  with pytest.raises(ValueError, match="sparsify_fraction"):
    apply_overrides(config, ["mitigation.sparsify_fraction=2"])


@pytest.mark.parametrize("centering", ["center", "normalize"])
def test_prompt_centering_feeds_each_prompts_centred_rewards(assets, monkeypatch, centering):
  """es.prompt_centering against NumPy on the (members, prompts) matrix the step measured."""
  monkeypatch.setattr(rollouts, "score", lambda task, examples, texts: np.array(
      [sum(ch.isdigit() for ch in t) / max(len(t), 1) + 0.1 * k for k, t in enumerate(texts)]))
  config = short_config(assets, f"es.prompt_centering={centering}")
  parts = components.build(config)
  trainer = make_trainer(parts, config)
  seen = []
  score_population = rollouts.score_population
  monkeypatch.setattr(rollouts, "score_population",
                      lambda *a, **kw: seen.append(score_population(*a, **kw)) or seen[-1])
  _, info = trainer.step(trainer.init(parts.params0), 1)
  matrix = seen[0].by_prompt
  assert matrix.shape == (8, 4)
  centred = matrix - matrix.mean(axis=0)
  if centering == "normalize":
    centred = centred / (matrix.std(axis=0) + 1e-8)
  np.testing.assert_allclose(info["fitness"], centred.mean(axis=1), rtol=1e-5, atol=1e-6)


def _anchors(state):
  """The theta_0 subtrees of the state: the AWD and norm-cap states' anchors."""
  anchored = (es_jax.AnchoredWeightDecayState, es_jax.AnchoredNormCapState)
  nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, anchored))
  return [node.anchor for node in nodes if isinstance(node, anchored)]


def test_awd_and_norm_cap_keep_one_theta0_and_resume_bit_identically(assets, tmp_path,
                                                                      monkeypatch):
  """theta_0 lives once: the trainer's steps keep both anchors as the base's own arrays, the
  checkpoints leave them out, a resume rebuilds them from the base (checked by its sha256) and
  continues bit-identically, and a base that changed since the run started is refused."""
  monkeypatch.setattr(rollouts, "score", digit_share_reward)
  checkpoint = make_tiny_checkpoint(tmp_path / "ckpt")  # its own: replaced at the end
  overrides = short_run_overrides(checkpoint, assets.gsm8k, assets.hellaswag) + [
      "awd.kind=l2", "awd.strength=10", "mitigation.norm_cap=0.3", "iterations=4"]
  config = apply_overrides(preset("countdown_es"), overrides)

  parts = components.build(config)
  trainer = make_trainer(parts, config)
  state = trainer.init(parts.params0)
  for iteration in (1, 2):
    state, _ = trainer.step(state, iteration)
  base = jax.tree.leaves(parts.params0)
  assert len(_anchors(state)) == 2
  for anchor in _anchors(state):
    assert all(a is b for a, b in zip(jax.tree.leaves(anchor), base, strict=True))

  reference = run(config, tmp_path / "reference", progress=False)
  assert reference[-1]["update_norm"] == pytest.approx(0.3, rel=1e-4)  # the cap binds
  split = tmp_path / "split"
  run(apply_overrides(config, ["iterations=2"]), split, progress=False)
  resumed = run(config, split, resume=True, progress=False)
  assert without_time(resumed) == without_time(reference)
  manifest = json.loads((split / "checkpoints" / "4" / "manifest" / "metadata").read_text())
  assert not [e["path"] for e in manifest["leaves"] if "anchor" in e["path"]]
  assert set(manifest["anchors"].values()) == {es_jax.params_sha256(parts.params0)}
  assert_trees_equal(final_state(config, split), final_state(config, tmp_path / "reference"))

  make_tiny_checkpoint(checkpoint, seed=1)  # the base changes under the run
  with pytest.raises(RunCheckpointError, match="the base checkpoint changed since this run "
                                               "started"):
    run(apply_overrides(config, ["iterations=6"]), split, resume=True, progress=False)

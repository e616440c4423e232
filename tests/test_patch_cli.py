"""``python -m es_jax.models.patch_cli``: a patch applied to a Hugging Face checkpoint on disk."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import es_jax
from es_jax import models
from es_jax.models import patch_cli
from es_jax.recipe import AwdRecipe, EsRecipe, EsStepRecipe, OptimizerRecipe

CONFIG = models.ModelConfig(
    family="qwen2", vocab_size=31, hidden_size=10, intermediate_size=13, num_layers=1,
    num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=1e4, rms_norm_eps=1e-6,
    tie_word_embeddings=True, qkv_bias=True, eos_token_ids=(2,), pad_token_id=0,
    dtype=jnp.float32)
RECIPE = EsRecipe(EsStepRecipe(population=8, sigma=0.02, seed=1, rank=1, freeze=("embed",),
                               estimator="qiu"),
                  OptimizerRecipe("sgd", 0.01), (AwdRecipe(5.0),))


def write_checkpoint(path, seed):
  params = models.init_params(models.Transformer(CONFIG), jax.random.key(seed))
  models.save_pretrained(path, CONFIG, params)
  (path / "tokenizer.json").write_text('{"tiny": true}')
  return path


@pytest.fixture(scope="module")
def base_and_patch(tmp_path_factory):
  root = tmp_path_factory.mktemp("patch_cli")
  base = write_checkpoint(root / "base", seed=0)
  _, theta0 = models.load_model(base, dtype=jnp.float32)
  history = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  tx = RECIPE.build()

  @jax.jit
  def step(params, state, fitness):
    updates, state = tx.update(None, state, params, fitness=fitness)
    return optax.apply_updates(params, updates), state

  params, state = theta0, tx.init(theta0)
  for fitness in history:
    params, state = step(params, state, fitness)
  assert not np.array_equal(params["layers_0"]["mlp"]["up"]["kernel"],
                            theta0["layers_0"]["mlp"]["up"]["kernel"])  # the run moved
  path = es_jax.save_patch(root / "run.espatch", es_jax.make_patch(RECIPE, theta0, history))
  return root, base, path, params


def test_apply_writes_the_fine_tuned_checkpoint(base_and_patch, capsys):
  root, base, path, want = base_and_patch
  out = root / "out"
  patch_cli.main(["apply", "--base", str(base), "--patch", str(path), "--out", str(out)])
  assert "applied 4 generations (N=8)" in capsys.readouterr().out
  got = models.load_params(out, models.load_config(out, dtype=jnp.float32))
  for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
  assert (out / "tokenizer.json").read_text() == '{"tiny": true}'
  code, err = apply_error(capsys, base, path, out)
  assert code == 2 and "exists and is not empty" in err


def test_apply_refuses_another_base(base_and_patch, capsys):
  root, _, path, _ = base_and_patch
  other = write_checkpoint(root / "other", seed=1)
  code, err = apply_error(capsys, other, path, root / "out_other")
  assert code == 2 and "wrong base model: the params' sha256" in err
  assert not (root / "out_other").exists()


def test_info_runs_as_a_module(base_and_patch):
  _, _, path, _ = base_and_patch
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-m", "es_jax.models.patch_cli", "info", str(path)],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
  info = json.loads(result.stdout)
  assert info["generations"] == 4 and info["population"] == 8
  assert info["recipe_sha256"] == RECIPE.fingerprint()
  assert info["bytes"] == path.stat().st_size


def apply_error(capsys, base, patch, out):
  """``main(["apply", ...])``'s exit code and stderr, which must be one line."""
  with pytest.raises(SystemExit) as exit_info:
    patch_cli.main(["apply", "--base", str(base), "--patch", str(patch), "--out", str(out)])
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return exit_info.value.code, err


def test_unusable_paths_give_one_line_and_exit_code_2(base_and_patch, tmp_path, capsys):
  _, base, path, _ = base_and_patch
  (tmp_path / "file").write_text("x")
  cases = {"missing base": (tmp_path / "missing", path, tmp_path / "o1"),
           "patch is a directory": (base, tmp_path, tmp_path / "o2"),
           "missing patch": (base, tmp_path / "none.espatch", tmp_path / "o3"),
           "out is a file": (base, path, tmp_path / "file")}
  for case, (b, p, o) in cases.items():
    code, err = apply_error(capsys, b, p, o)
    assert code == 2, case
    assert str(o if case == "out is a file" else p if "patch" in case else b) in err, case
  assert (tmp_path / "file").read_text() == "x"
  assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
  with pytest.raises(SystemExit) as exit_info:
    patch_cli.main(["info", str(tmp_path)])
  assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_apply_refuses_a_patch_that_replays_to_non_finite_weights(base_and_patch, capsys):
  # lr = 1e300 is inf in float32: the first generation's weights are not finite.
  root, base, _, _ = base_and_patch
  _, theta0 = models.load_model(base, dtype=jnp.float32)
  recipe = EsRecipe(RECIPE.es, OptimizerRecipe("sgd", 1e300))
  path = es_jax.save_patch(root / "inf.espatch",
                           es_jax.make_patch(recipe, theta0, np.ones((2, 8), np.float32)))
  code, err = apply_error(capsys, base, path, root / "out_inf")
  assert code == 2 and "non-finite from generation 0" in err
  assert not (root / "out_inf").exists()

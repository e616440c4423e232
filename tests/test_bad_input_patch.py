"""Hostile input to ES patches, recipes and replay ("No silent wrong result and nothing lost").

Hostile patch files are laid out here by hand, as :mod:`es_jax.patch`'s docstring
defines the format (prefix, sorted-key JSON header, float32 history, sha256 of
everything before it), so that their checksum is valid and only their contents
are wrong. Each test failed before its fix: a raw ``re.error``,
``RecursionError``, ``OverflowError`` or numpy error, a silently accepted value,
non-finite weights, or a file mode of 0600.
"""

import hashlib
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import es_jax
from es_jax.recipe import EsRecipe, EsStepRecipe, NormCapRecipe, OptimizerRecipe

THETA0 = {"hidden": {"kernel": 0.3 * jax.random.normal(jax.random.key(1), (7, 11))},
          "out": {"bias": jnp.zeros(3)}}
RECIPE = EsRecipe(EsStepRecipe(population=16, sigma=0.05, seed=3, rank=None, antithetic=False),
                  OptimizerRecipe("sgd", 0.05))
HISTORY = np.arange(2 * 16, dtype=np.float32).reshape(2, 16)


def fingerprint(recipe_dict):
  """sha256 of the recipe's canonical JSON (sorted keys, no spaces, ASCII), per the format."""
  text = json.dumps(recipe_dict, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def patch_bytes(header, history):
  """A patch file with this header (a dict, or its JSON text) and a valid trailing sha256."""
  if isinstance(header, dict):
    header = json.dumps(header, sort_keys=True, separators=(",", ":"))
  header = header.encode()
  body = (struct.pack("<8sIQ", b"ESPATCH\x00", 1, len(header)) + header +
          np.asarray(history, "<f4").tobytes())
  return body + hashlib.sha256(body).digest()


def valid_header():
  return es_jax.make_patch(RECIPE, THETA0, HISTORY).header()


def with_recipe(header, change):
  """``header`` whose recipe dict was edited by ``change``, with a matching recipe_sha256."""
  change(header["recipe"])
  header["recipe_sha256"] = fingerprint(header["recipe"])
  return header


def test_hand_laid_patch_is_read():
  # The layout above is the module's: an unchanged header loads.
  patch = es_jax.Patch.from_bytes(patch_bytes(valid_header(), HISTORY))
  assert patch.recipe == RECIPE
  np.testing.assert_array_equal(patch.fitness_history, HISTORY)


# Item 5: an invalid regex raised re.error, which is not a ValueError.

BAD_REGEXES = ["(", "[a-", "a{4294967296}", "(" * 5000 + ")" * 5000]


@pytest.mark.parametrize("pattern", BAD_REGEXES, ids=["paren", "set", "repeat", "deep"])
@pytest.mark.parametrize("argument", ["freeze", "scanned"])
def test_invalid_regex_is_a_value_error_naming_it(argument, pattern):
  with pytest.raises(ValueError, match=f"{argument}.*invalid regex"):
    es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0), **{argument: pattern})
  with pytest.raises(ValueError, match=f"{argument}.*invalid regex"):
    es_jax.NoiseSpec(population=4, sigma=0.1, **{argument: ("ok", pattern)})
  with pytest.raises(ValueError, match=f"EsStepRecipe.{argument}.*invalid regex"):
    EsStepRecipe(population=4, sigma=0.1, seed=0, **{argument: [pattern]})


def test_invalid_regex_message_quotes_the_pattern_and_re():
  with pytest.raises(ValueError, match=r"freeze holds an invalid regex '\(': missing \)"):
    es_jax.es_step(None, population=4, sigma=0.1, key=jax.random.key(0), freeze="(")


@pytest.mark.parametrize("argument", ["freeze", "scanned"])
def test_patch_whose_recipe_holds_an_invalid_regex_is_a_patch_error(argument, tmp_path):
  header = with_recipe(valid_header(), lambda r: r["es"].update({argument: ["[a-"]}))
  path = tmp_path / "bad.espatch"
  path.write_bytes(patch_bytes(header, HISTORY))
  with pytest.raises(es_jax.PatchError, match=f"bad.espatch.*{argument}.*invalid regex '\\[a-'"):
    es_jax.load_patch(path)


# Item 6: hostile headers with a valid sha256.

def test_metadata_nested_200000_deep_is_a_patch_error():
  text = json.dumps(valid_header(), sort_keys=True, separators=(",", ":"))
  text = text.replace('"metadata":{}', '"metadata":{"a":' + "[" * 200_000 + "]" * 200_000 + "}")
  assert text.count("[") > 200_000
  with pytest.raises(es_jax.PatchError, match="nests too deeply"):
    es_jax.Patch.from_bytes(patch_bytes(text, HISTORY))
  deep = []
  for _ in range(200_000):
    deep = [deep]
  with pytest.raises(ValueError, match="'metadata' nests 200002 levels"):
    es_jax.make_patch(RECIPE, THETA0, HISTORY, metadata={"a": deep})


def nested(depth):
  """A JSON value ``depth`` arrays/objects deep: {"a": [[...[]...]]}."""
  value = []
  for _ in range(depth - 2):
    value = [value]
  return {"a": value}


def test_metadata_nested_deeper_than_the_bound_names_the_field():
  header = valid_header()
  header["metadata"] = nested(40)
  with pytest.raises(es_jax.PatchError, match="'metadata' nests 40 levels"):
    es_jax.Patch.from_bytes(patch_bytes(header, HISTORY))
  # make_patch refuses what load_patch would: nothing is written that cannot be read back.
  with pytest.raises(ValueError, match="'metadata' nests 40 levels"):
    es_jax.make_patch(RECIPE, THETA0, HISTORY, metadata=nested(40))
  es_jax.Patch.from_bytes(es_jax.make_patch(RECIPE, THETA0, HISTORY, metadata=nested(8)).to_bytes())


@pytest.mark.parametrize("generations,population,rows,match", [
    (-2, -16, 2, "generations must be an integer >= 1, got -2"),   # -2 x -16 = 32 values
    (0, 16, 0, "generations must be an integer >= 1, got 0"),
    (2.9, 16, 2, "generations must be an integer"),                # was truncated to 2
    ("2", 16, 2, "generations must be an integer"),                # was parsed
    (True, 32, 2, "generations must be an integer"),
    (4, 8, 2, "population 8 differs from its recipe's population 16"),  # 4 x 8 = 2 x 16
    (1e400, 16, 2, "generations must be an integer"),              # json's inf: OverflowError
])
def test_header_sizes_must_be_positive_integers(generations, population, rows, match):
  header = {**valid_header(), "generations": generations, "population": population}
  text = json.dumps(header, sort_keys=True, separators=(",", ":")).replace("Infinity", "1e400")
  with pytest.raises(es_jax.PatchError, match=match):
    es_jax.Patch.from_bytes(patch_bytes(text, np.zeros((rows, 16))))


def test_make_patch_refuses_an_empty_history():
  with pytest.raises(ValueError, match="at least one generation"):
    es_jax.make_patch(RECIPE, THETA0, np.zeros((0, 16)))


@pytest.mark.parametrize("seed", [2**70, 2**63, 2**32, -1])
def test_seed_outside_the_prng_range_is_refused(seed):
  header = with_recipe(valid_header(), lambda r: r["es"].update(seed=seed))
  with pytest.raises(es_jax.PatchError, match=r"EsStepRecipe.seed must be an integer in \[0, "
                                              r"4294967295\]"):
    es_jax.Patch.from_bytes(patch_bytes(header, HISTORY))
  with pytest.raises(ValueError, match="EsStepRecipe.seed"):
    EsStepRecipe(population=4, sigma=0.1, seed=seed)


def test_seeds_past_32_bits_would_alias():
  # Why the bound: with JAX's default 32-bit mode, key(2**32) is key(0), so two
  # recipes that differ would replay the same noise.
  assert not jax.config.jax_enable_x64
  np.testing.assert_array_equal(jax.random.key_data(jax.random.key(2**32)),
                                jax.random.key_data(jax.random.key(0)))
  assert EsStepRecipe(population=4, sigma=0.1, seed=2**32 - 1).seed == 2**32 - 1


def test_twenty_thousand_post_transforms_are_refused():
  cap = {"transform": "anchored_norm_cap", "radius": 1.0, "scope": "global"}
  header = with_recipe(valid_header(), lambda r: r.update(post=[cap] * 20_000))
  with pytest.raises(es_jax.PatchError, match="EsRecipe.post holds 20000 transforms; at most 8"):
    es_jax.Patch.from_bytes(patch_bytes(header, HISTORY))
  with pytest.raises(ValueError, match="EsRecipe.post holds 9 transforms"):
    EsRecipe(RECIPE.es, RECIPE.optimizer, (NormCapRecipe(1.0),) * 9)
  assert len(EsRecipe(RECIPE.es, RECIPE.optimizer, (NormCapRecipe(1.0),) * 8).post) == 8


@pytest.mark.parametrize("field,value,match", [
    ("recipe_sha256", None, "recipe_sha256"),
    ("metadata", [["a", 1]], "metadata must be a JSON object"),
    ("base", {"sha256": "0" * 64, "tensors": [["w", "float32", [-3]]]},
     "a dimension of base tensor 'w' must be an integer >= 0, got -3"),
])
def test_other_malformed_header_fields_are_patch_errors(field, value, match):
  header = valid_header()
  if value is None:
    del header[field]
  else:
    header[field] = value
  with pytest.raises(es_jax.PatchError, match=match):
    es_jax.Patch.from_bytes(patch_bytes(header, HISTORY))


def test_a_directory_or_missing_file_is_a_patch_error(tmp_path):
  with pytest.raises(es_jax.PatchError, match="cannot be read"):
    es_jax.load_patch(tmp_path)
  with pytest.raises(es_jax.PatchError, match="cannot be read"):
    es_jax.load_patch(tmp_path / "missing.espatch")


# Item 8: replay and apply_patch returned non-finite weights.

def overflowing(learning_rate):
  return EsRecipe(EsStepRecipe(population=16, sigma=0.05, seed=3, rank=None, antithetic=False),
                  OptimizerRecipe("sgd", learning_rate))


def test_replay_refuses_weights_that_overflow_and_names_the_generation():
  # Generations 0-2 have equal fitness: z-scored to 0, an update of exactly 0,
  # so the weights stay theta_0. Generation 3 spreads the fitness; each weight's
  # update is then ~|N(0, 16)| / (N sigma) ~ 5, times lr = 1e38 > float32's max 3.4e38.
  history = np.ones((5, 16), np.float32)
  history[3:] = np.random.default_rng(0).normal(size=(2, 16))
  recipe = overflowing(1e38)
  same, _ = es_jax.replay(recipe, THETA0, history[:3])
  for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(THETA0)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match=r"non-finite from generation 3 .*fitness_history\[3\].*"
                                       "hidden/kernel"):
    es_jax.replay(recipe, THETA0, history)
  with pytest.raises(es_jax.PatchError, match="non-finite from generation 3"):
    es_jax.apply_patch(es_jax.make_patch(recipe, THETA0, history), THETA0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_learning_rate_1e300_is_refused_at_generation_0():
  # 1e300 is inf in float32: the first update is inf (or 0 * inf = NaN).
  with pytest.raises(ValueError, match="non-finite from generation 0 "):
    es_jax.replay(overflowing(1e300), THETA0, HISTORY)


# Item 15f: save_patch wrote 0600 (a temporary file from tempfile) where open() gives 0644.

def test_save_patch_honours_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    path = es_jax.save_patch(tmp_path / "run.espatch", es_jax.make_patch(RECIPE, THETA0, HISTORY))
    with open(tmp_path / "plain", "wb"):
      pass
  finally:
    os.umask(old)
  assert os.stat(path).st_mode & 0o777 == 0o644
  assert os.stat(tmp_path / "plain").st_mode & 0o777 == 0o644  # what open() gives
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "run.espatch"]  # no leftovers

"""KV-cache decoding vs transformers' generate, a no-cache recompute and materialised members."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from es_jax.models import decoding
from es_jax.models import generate as gen
from es_jax import sharding as pop_sharding
from es_jax.models import sharding
from es_jax.models.tokenizer import char_tokenizer
from model_fixtures import (jit_logits, left_padded_batch, member, perturb, population_noise,
                            ported)

NAME = "qwen_untied"  # every test decodes this model: one compiled program per setting
MAX_NEW = 8
PROMPT_LEN = 32  # every test uses (3, 32) prompts, the text tests' bucket, to share programs


def _prompts(seed):
  return left_padded_batch(seed=seed, batch=3, length=PROMPT_LEN)


def _no_cache_greedy(model, params, ids, mask, eos_id, pad_id):
  """Reference: re-run the full forward on prompt + tokens so far, argmax the last logits."""
  b, t = ids.shape
  # One fixed-size buffer: the future slots are masked, and a causal model never reads them.
  seq = np.concatenate([ids, np.full((b, MAX_NEW), pad_id)], axis=1)
  seq_mask = np.concatenate([mask, np.zeros((b, MAX_NEW), mask.dtype)], axis=1)
  done = np.zeros(b, bool)
  out = np.full((b, MAX_NEW), pad_id)
  for step in range(MAX_NEW):
    logits = np.asarray(jit_logits(model, params, seq, seq_mask))
    token = np.where(done, pad_id, logits[:, t + step - 1].argmax(-1))
    out[:, step] = token
    seq[:, t + step], seq_mask[:, t + step] = token, 1
    done |= token == eos_id
  return out


def test_greedy_decoding_matches_transformers_generate_and_no_cache_recompute():
  torch_model, _, model, params = ported(NAME)
  ids, mask = _prompts(6)
  pad_id = 0
  # Pick as EOS a token the first row emits mid-way, so early stopping is exercised.
  free = gen.decode(model, params, ids, mask, max_new_tokens=MAX_NEW, eos_ids=(), pad_id=pad_id)
  eos_id = int(np.asarray(free.tokens)[0, 3])
  out = gen.decode(model, params, ids, mask, max_new_tokens=MAX_NEW, eos_ids=(eos_id,),
                     pad_id=pad_id)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  assert lengths[0] <= 4 and tokens[0, lengths[0] - 1] == eos_id
  assert np.all(tokens[0, lengths[0]:] == pad_id)

  with torch.no_grad():
    hf = torch_model.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
        max_new_tokens=MAX_NEW, eos_token_id=eos_id, pad_token_id=pad_id).numpy()
  hf_new = hf[:, ids.shape[1]:]
  np.testing.assert_array_equal(tokens[:, :hf_new.shape[1]], hf_new)
  assert np.all(tokens[:, hf_new.shape[1]:] == pad_id)  # transformers stopped when all rows had
  np.testing.assert_array_equal(tokens, _no_cache_greedy(model, params, ids, mask, eos_id, pad_id))


def test_population_decoding_with_zero_noise_equals_plain_decoding():
  _, _, model, params = ported(NAME)
  zero = jax.tree.map(jnp.zeros_like, population_noise(NAME))
  ids, mask = _prompts(7)
  plain = gen.decode(model, params, ids, mask, max_new_tokens=MAX_NEW, eos_ids=(2,))
  out = gen.decode_population(model, params, zero, ids, mask, max_new_tokens=MAX_NEW,
                                eos_ids=(2,))
  assert out.tokens.shape == (4, *plain.tokens.shape)
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(out.tokens[i]), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths[i]), np.asarray(plain.lengths))


def test_population_member_decodes_like_its_materialised_weights():
  _, _, model, params = ported(NAME)
  noise = population_noise(NAME)  # sigma 0.05 against weights of std 0.2
  ids, mask = _prompts(7)
  out = gen.decode_population(model, params, noise, ids, mask, max_new_tokens=MAX_NEW,
                                eos_ids=(2,))
  tokens = np.asarray(out.tokens)
  for i in range(4):
    ref = gen.decode(model, perturb(params, member(noise, i)), ids, mask,
                       max_new_tokens=MAX_NEW, eos_ids=(2,))
    np.testing.assert_array_equal(tokens[i], np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths[i]), np.asarray(ref.lengths))
  distinct = {tokens[i].tobytes() for i in range(4)}
  assert len(distinct) >= 3, "members should decode differently at this sigma"


def test_population_decoding_on_a_2x4_mesh_matches_single_device():
  _, _, model, params = ported(NAME)
  noise = population_noise(NAME)
  ids, mask = _prompts(7)
  ref = gen.decode_population(model, params, noise, ids, mask, max_new_tokens=MAX_NEW,
                                eos_ids=(2,))
  mesh = jax.make_mesh((2, 4), ("pop", "model"))
  with jax.set_mesh(mesh):
    out = gen.decode_population(
        model, sharding.shard_params(params, mesh), pop_sharding.place_population(noise, mesh),
        ids, mask, max_new_tokens=MAX_NEW, eos_ids=(2,))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_sampling_is_reproducible_and_per_member():
  _, _, model, params = ported(NAME)
  zero = jax.tree.map(jnp.zeros_like, population_noise(NAME))
  ids, mask = _prompts(8)
  run = lambda key: np.asarray(gen.decode_population(
      model, params, zero, ids, mask, max_new_tokens=MAX_NEW, eos_ids=(), key=key,
      temperature=1.5).tokens)  # top_p is covered by test_top_p_keeps_only_the_nucleus
  first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # Same weights, independent draws: the samples differ between members.
  assert len({first[i].tobytes() for i in range(4)}) == 4
  with pytest.raises(ValueError, match="needs key"):
    gen.decode(model, params, ids, mask, max_new_tokens=2, temperature=1.0)


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]] * 4000))
  key = jax.random.key(0)
  assert set(np.asarray(gen.sample_token(logits, key, 1.0, 0.5)).tolist()) == {0}
  nucleus = np.asarray(gen.sample_token(logits, key, 1.0, 0.85))
  assert set(nucleus.tolist()) == {0, 1}
  assert abs((nucleus == 0).mean() - 2 / 3) < 0.05  # renormalised 0.6 / 0.9
  full = np.asarray(gen.sample_token(logits, key, 1.0, 1.0))
  assert abs((full == 2).mean() - 0.1) < 0.03
  np.testing.assert_array_equal(gen.sample_token(logits[:2], None, 0.0, 0.5), [0, 0])


def test_text_api_chat_template_stop_strings_and_population():
  _, _, model, params = ported(NAME)
  tok = char_tokenizer()
  prompts = ["12+3=", [{"role": "user", "content": "say hi"}], "abc"]
  ids, mask = gen.encode_prompts(tok, prompts, chat_template=True, pad_to_multiple=16)
  assert ids.shape == (3, PROMPT_LEN) and mask[:, -1].all()
  assert tok.decode(ids[0][mask[0] == 1]).endswith("<|im_start|>assistant\n")

  texts = gen.generate_text(model, params, tok, prompts, chat_template=True,
                            max_new_tokens=MAX_NEW, pad_to_multiple=16)
  out = gen.decode(model, params, ids, mask, max_new_tokens=MAX_NEW,
                     eos_ids=(2,))
  expected = gen.completion_texts(tok, out.tokens, out.lengths, eos_ids=(2,))
  assert texts == expected and all(isinstance(t, str) for t in texts)
  stop = texts[0][2:4]
  if stop:
    cut = gen.generate_text(model, params, tok, prompts, chat_template=True,
                            max_new_tokens=MAX_NEW, pad_to_multiple=16, stop=[stop])
    assert cut[0] == texts[0][:texts[0].index(stop)]

  # A different prompt length in the same bucket reuses the compiled program.
  compiled = decoding._decode_jit._cache_size()
  gen.generate_text(model, params, tok, ["1+1=", "say hello", ""], chat_template=True,
                    max_new_tokens=MAX_NEW, pad_to_multiple=16)
  assert decoding._decode_jit._cache_size() == compiled

  noise = population_noise(NAME)
  population = gen.generate_text_population(model, params, tok, prompts, noise,
                                            chat_template=True, max_new_tokens=MAX_NEW,
                                            pad_to_multiple=16)
  assert len(population) == 4 and all(len(member_texts) == 3 for member_texts in population)
  single = gen.generate_text(model, perturb(params, member(noise, 1)), tok, prompts,
                             chat_template=True, max_new_tokens=MAX_NEW, pad_to_multiple=16)
  assert population[1] == single


def test_bfloat16_compute_decodes_from_float32_master_params():
  _, _, model, params = ported(NAME)
  bf16 = type(model)(model.config.replace(dtype=jnp.bfloat16))
  ids, mask = _prompts(7)
  out = gen.decode_population(bf16, params, population_noise(NAME), ids, mask,
                              max_new_tokens=MAX_NEW, eos_ids=(2,))
  ref = gen.decode_population(model, params, population_noise(NAME), ids, mask,
                              max_new_tokens=MAX_NEW, eos_ids=(2,))
  tokens = np.asarray(out.tokens)
  assert tokens.shape == (4, 3, MAX_NEW) and tokens.min() >= 0 and tokens.max() < 103
  # bfloat16 rounding may flip a near-tie; where float32's top-2 margin is clear,
  # the first tokens agree.
  ref_first = np.asarray(ref.tokens)[..., 0]
  noise = population_noise(NAME)
  compared = 0
  for i in range(4):
    logits = np.asarray(jit_logits(model, params, ids, mask, member(noise, i)))[:, -1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    np.testing.assert_array_equal(tokens[i, clear, 0], ref_first[i, clear])
    compared += clear.sum()
  assert compared >= 6  # of 12 rows: the check is not vacuous

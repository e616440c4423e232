"""The Flax Qwen2 / Llama decoder vs transformers' PyTorch models, and its ES and sharding paths."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import es_jax
from es_jax import noise as noise_lib
from es_jax.models import checkpoint, sharding
from es_jax.models.config import ModelConfig
from es_jax.models.transformer import (Transformer, init_params, logits_fn, rope_inv_freq,
                                       token_logprobs)
from es_jax.noise import LowRank
from model_fixtures import (HF_CONFIGS, jit_logits, left_padded_batch, member, perturb,
                            population_noise, ported, torch_logits)



@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers_on_left_padded_batch(name):
  torch_model, _, model, params = ported(name)
  ids, mask = left_padded_batch(seed=1)
  ref = torch_logits(torch_model, ids, mask)
  out = np.asarray(jit_logits(model, params, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0  # a meaningful comparison, not two near-zero tensors
  np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


def test_right_padding_gives_the_same_logits_at_real_tokens():
  _, _, model, params = ported("qwen_tied")
  ids, mask = left_padded_batch(seed=2)
  lengths = mask.sum(-1)
  right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
  for row, n in enumerate(lengths):
    right_ids[row, :n], right_mask[row, :n] = ids[row, -n:], 1
  left = np.asarray(jit_logits(model, params, jnp.asarray(ids), jnp.asarray(mask)))
  right = np.asarray(jit_logits(model, params, jnp.asarray(right_ids), jnp.asarray(right_mask)))
  np.testing.assert_allclose(left[mask.astype(bool)], right[right_mask.astype(bool)], atol=1e-5)


def test_token_logprobs_match_torch_log_softmax():
  torch_model, _, model, params = ported("llama_tied")
  ids, mask = left_padded_batch(seed=3)
  ref_logp = jax.nn.log_softmax(torch_logits(torch_model, ids, mask), axis=-1)
  ref = np.take_along_axis(np.asarray(ref_logp)[:, :-1], ids[:, 1:, None], -1)[..., 0]
  ref = np.where(mask[:, 1:] * mask[:, :-1] > 0, ref, 0.0)
  out = np.asarray(jax.jit(token_logprobs, static_argnums=0)(model, params, ids, mask))
  assert out.shape == ids.shape and np.all(out[:, 0] == 0)
  np.testing.assert_allclose(out[:, 1:], ref, atol=1e-4)


def test_llama3_rope_frequencies_match_transformers():
  for preset in ("llama-3.2-1b-instruct", "llama-3.2-3b-instruct"):
    config = ModelConfig.preset(preset)
    hf_config = transformers.LlamaConfig(**config.to_hf_config())
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    np.testing.assert_allclose(rope_inv_freq(config), ref.numpy(), rtol=1e-6)
    # The scaling changes the low frequencies, so a missing scaling would show.
    assert not np.allclose(rope_inv_freq(config.replace(rope_scaling=None)), ref.numpy())


def test_presets_have_the_published_shapes():
  q05 = ModelConfig.preset("Qwen/Qwen2.5-0.5B-Instruct")
  assert (q05.hidden_size, q05.intermediate_size, q05.num_layers, q05.num_heads,
          q05.num_kv_heads, q05.head_dim, q05.vocab_size) == (896, 4864, 24, 14, 2, 64, 151936)
  assert q05.tie_word_embeddings and q05.qkv_bias and q05.rope_theta == 1e6
  q7 = ModelConfig.preset("qwen2.5-7b-instruct")
  assert (q7.hidden_size, q7.intermediate_size, q7.num_layers, q7.num_heads, q7.num_kv_heads,
          q7.vocab_size, q7.tie_word_embeddings) == (3584, 18944, 28, 28, 4, 152064, False)
  l1 = ModelConfig.preset("meta-llama/Llama-3.2-1B-Instruct")
  assert (l1.hidden_size, l1.intermediate_size, l1.num_layers, l1.num_heads, l1.num_kv_heads,
          l1.head_dim, l1.vocab_size, l1.rms_norm_eps) == (2048, 8192, 16, 32, 8, 64, 128256, 1e-5)
  assert l1.rope_theta == 5e5 and l1.tie_word_embeddings and not l1.qkv_bias
  assert (l1.rope_scaling.factor, l1.rope_scaling.low_freq_factor, l1.rope_scaling.high_freq_factor,
          l1.rope_scaling.original_max_position_embeddings) == (32.0, 1.0, 4.0, 8192)
  # Fine-tuning default: float32 master params, bfloat16 compute.
  assert q05.param_dtype == jnp.float32 and q05.dtype == jnp.bfloat16
  with pytest.raises(KeyError, match="known presets"):
    ModelConfig.preset("gpt2")


@pytest.mark.parametrize("preset", sorted(es_jax.models.PRESETS))
def test_config_round_trips_through_transformers(preset):
  config = ModelConfig.preset(preset)
  hf_class = transformers.Qwen2Config if config.family == "qwen2" else transformers.LlamaConfig
  hf = hf_class(**config.to_hf_config())  # transformers 5 rewrites RoPE as rope_parameters
  assert ModelConfig.from_hf_config(hf) == config
  assert ModelConfig.from_hf_config(config.to_hf_config()) == config


def test_unsupported_configs_are_rejected_with_a_reason():
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    ModelConfig.from_hf_config({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="head_dim must be even"):
    ModelConfig.preset("qwen2.5-0.5b-instruct", head_dim=7)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig.preset("qwen2.5-0.5b-instruct", num_kv_heads=3)


def test_population_logits_equal_materialised_members():
  _, _, model, params = ported("qwen_untied")  # EGGROLL: low-rank matrices, dense norms/biases
  noise = population_noise("qwen_untied")
  ids, mask = left_padded_batch(seed=4)
  population = jax.jit(jax.vmap(functools.partial(logits_fn, model), in_axes=(None, None, None, 0)))
  out = np.asarray(population(params, ids, mask, noise))
  real = mask.astype(bool)
  for i in range(4):
    ref = np.asarray(jit_logits(model, perturb(params, member(noise, i)), ids, mask))
    np.testing.assert_allclose(out[i][real], ref[real], atol=1e-4)
  assert np.abs(out[0] - out[1])[real].max() > 1e-2  # the members really differ


def test_full_rank_noise_on_tied_embeddings_equals_materialised_weights():
  _, _, model, params = ported("llama_tied")
  rng = np.random.default_rng(0)
  # Full-rank (vanilla ES) noise is a dense array per leaf; the embedding's
  # reaches both the token lookup and the tied output head.
  noise = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), params)
  ids, mask = left_padded_batch(seed=4)
  out = np.asarray(jit_logits(model, params, ids, mask, noise))
  ref = np.asarray(jit_logits(model, perturb(params, noise), ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(out[real], ref[real], atol=1e-4)
  assert np.abs(out - np.asarray(jit_logits(model, params, ids, mask)))[real].max() > 1e-2


def test_lowrank_embedding_noise_raises_a_clear_error():
  _, _, model, params = ported("qwen_tied")
  vocab, hidden = params["embed"]["embedding"].shape
  noise = {"embed": {"embedding": LowRank(jnp.ones((vocab, 1)), jnp.ones((hidden, 1)),
                                           jnp.float32(0.1))}}
  ids, mask = left_padded_batch()
  with pytest.raises(TypeError, match=r"freeze=\('embed',\)"):
    jit_logits(model, params, ids, mask, noise)


def test_bfloat16_compute_with_float32_params_stays_close():
  _, _, model, params = ported("qwen_tied")
  bf16 = Transformer(model.config.replace(dtype=jnp.bfloat16))
  ids, mask = left_padded_batch()
  ref = np.asarray(jit_logits(model, params, ids, mask))
  out = jit_logits(bf16, params, ids, mask)
  assert out.dtype == jnp.float32
  real = mask.astype(bool)
  assert np.abs(np.asarray(out) - ref)[real].max() < 0.1 * np.abs(ref[real]).max()


def test_sharded_logits_on_a_2x4_mesh_match_single_device():
  # Population sharding over 'pop' is covered by the population decode on this mesh.
  _, _, model, params = ported("qwen_untied")  # q/k/v/o and MLP split 4 ways; vocab 103 is not
  ids, mask = left_padded_batch(seed=5)
  ref = np.asarray(jit_logits(model, params, ids, mask))
  mesh = jax.make_mesh((2, 4), ("pop", "model"))
  with jax.set_mesh(mesh):
    sharded = sharding.shard_params(params, mesh)
    assert sharded["layers_0"]["attn"]["q"]["kernel"].sharding.spec == jax.P(None, "model")
    assert sharded["layers_0"]["attn"]["o"]["kernel"].sharding.spec == jax.P("model", None)
    assert sharded["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec == jax.P(None, "model")
    assert sharded["layers_0"]["mlp"]["down"]["kernel"].sharding.spec == jax.P("model", None)
    assert sharded["embed"]["embedding"].sharding.spec == jax.P(None, None)  # 103 % 4 != 0
    out = jit_logits(model, sharded, ids, mask)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_init_params_has_the_documented_tree():
  config = ModelConfig.preset("qwen2.5-7b-instruct", num_layers=1)
  shapes = jax.eval_shape(functools.partial(init_params, Transformer(config)), jax.random.key(0))
  flat = {noise_lib.path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
  mapping = checkpoint.param_mapping(config)
  assert flat == {"/".join(m.path): m.shape for m in mapping.values()}
  assert flat["layers_0/attn/q/kernel"] == (3584, 3584)
  assert flat["layers_0/attn/k/bias"] == (512,)
  assert flat["lm_head/kernel"] == (3584, 152064)

"""es_jax: Evolution Strategies for fine-tuning language models in JAX."""

from es_jax import noise
from es_jax import shaping
from es_jax import sharding
from es_jax.awd import AnchoredWeightDecayState
from es_jax.awd import anchored_weight_decay
from es_jax.es import EsConfig
from es_jax.es import EsState
from es_jax.es import es_step
from es_jax.es import member_noise
from es_jax.es import member_params
from es_jax.es import population_rewards
from es_jax.layers import Dense
from es_jax.mitigations import AnchoredNormCapState
from es_jax.mitigations import SparsifiedUpdatesState
from es_jax.mitigations import anchored_norm_cap
from es_jax.mitigations import sparsified_updates
from es_jax.noise import LowRank
from es_jax.noise import NoiseSpec
from es_jax.noise import materialize
from es_jax.noise import perturb
from es_jax.patch import Patch
from es_jax.patch import PatchError
from es_jax.patch import apply_patch
from es_jax.patch import load_patch
from es_jax.patch import make_patch
from es_jax.patch import params_sha256
from es_jax.patch import save_patch
from es_jax.patch import tensor_manifest
from es_jax.recipe import AwdRecipe
from es_jax.recipe import EsRecipe
from es_jax.recipe import EsStepRecipe
from es_jax.recipe import NormCapRecipe
from es_jax.recipe import OptimizerRecipe
from es_jax.recipe import SparsifyRecipe
from es_jax.replay import replay
from es_jax.shaping import antithetic_difference
from es_jax.shaping import centered_rank
from es_jax.shaping import group_z_score
from es_jax.shaping import per_prompt_centering
from es_jax.shaping import z_score

__all__ = [
    "AnchoredWeightDecayState",
    "Dense",
    "EsConfig",
    "EsState",
    "LowRank",
    "NoiseSpec",
    "anchored_weight_decay",
    "antithetic_difference",
    "centered_rank",
    "es_step",
    "group_z_score",
    "materialize",
    "member_noise",
    "member_params",
    "perturb",
    "shaping",
    # the lower-level modules, public (noise draws, the population mesh axis)
    "noise",
    "population_rewards",
    "sharding",
    "z_score",
    # forgetting mitigations, per-prompt centring
    "AnchoredNormCapState",
    "SparsifiedUpdatesState",
    "anchored_norm_cap",
    "per_prompt_centering",
    "sparsified_updates",
    # ES patches: a run as its fitness history
    "AwdRecipe",
    "EsRecipe",
    "EsStepRecipe",
    "NormCapRecipe",
    "OptimizerRecipe",
    "Patch",
    "PatchError",
    "SparsifyRecipe",
    "apply_patch",
    "load_patch",
    "make_patch",
    "params_sha256",
    "replay",
    "save_patch",
    "tensor_manifest",
]

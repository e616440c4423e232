"""``python tests/experiment_worker.py ARGS...``: experiments.run's CLI with the test's
stand-in training reward (see experiment_fixtures.digit_share_reward), for kill tests."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import jax  # noqa: E402

import os  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # the same devices as the test process
if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the test session's cache (see conftest.py)
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import experiment_fixtures  # noqa: E402
from experiments import rollouts, run  # noqa: E402

rollouts.score = experiment_fixtures.digit_share_reward
sys.exit(run.main(sys.argv[1:]))

"""Test-wide set-up: 8 fake CPU devices, so sharding tests see a real mesh.

This must run before JAX initialises its backends; every other test still runs
on the default (first) device unless it builds a mesh.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Worker scripts run in subprocesses (test_sharding.py starts a JAX cluster with one,
# test_experiments.py kills a run of the other): importing them would run them.
collect_ignore = ["multiprocess_worker.py", "experiment_worker.py"]

"""Test-wide set-up: 8 fake CPU devices, so sharding tests see a real mesh, and one
persistent XLA compilation cache shared by the pytest-xdist workers and the
subprocesses tests start.

This must run before JAX initialises its backends; every other test still runs
on the default (first) device unless it builds a mesh.
"""

import os
import shutil
import tempfile

# The suite is compile-bound (tiny models, many programs): LLVM's -O0 halves XLA's
# compile times on CPU and changes no result a test compares (both sides of every
# comparison run under the same flags; tolerances against torch are unaffected).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# Set in the controlling process first; the xdist workers and test subprocesses inherit
# it, so a program compiled once (the tiny models' decode and ES update take 10-20 s
# each on 2 cores) is loaded from disk everywhere else.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="es_jax_xla_cache_"))
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Worker scripts run in subprocesses (test_sharding.py starts a JAX cluster with one,
# test_experiments.py kills a run of the other): importing them would run them.
collect_ignore = ["multiprocess_worker.py", "experiment_worker.py"]


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it removes it
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

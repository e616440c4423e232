"""The population sharded over devices and processes gives the single-device update."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import es_fixtures


def _atol(want):
  # Entries reach ~10 and are sums over 32 members of terms of that size, summed in
  # another order on each device: float32 rounding leaves ~1e-6 of the largest
  # entry, so small entries are compared at that absolute scale.
  return 3e-6 * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_eight_devices_match_one(axis_type):
  want, want_rewards = es_fixtures.single_device_update()
  es, params, x = es_fixtures.problem()
  mesh = jax.make_mesh((8,), ("pop",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    update = jax.jit(es.update)
    got, state = update(None, es.init(params), params, batch=x)
    hlo = update.lower(None, es.init(params), params, batch=x).compile().as_text()
  chex.assert_trees_all_close(state.rewards, want_rewards, rtol=1e-5)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=_atol(want))
  # 8 antithetic pairs per chunk of 16 members: each device draws 1 pair and
  # evaluates its 2 members; the update is all-reduced.
  assert "f32[1,2,9,11]" in hlo and "f32[8,2,9,11]" not in hlo
  assert re.search(r"all-reduce", hlo)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  worker = Path(__file__).with_name("multiprocess_worker.py")
  out = tmp_path / "update.npz"
  port = _free_port()
  # The workers import the es_jax this test imported (a checkout on PYTHONPATH, not
  # whatever is installed), so both sides draw the same noise.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent), *sys.path]),
         "XLA_FLAGS": ""}
  procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)
  got = np.load(out)
  want, want_rewards = es_fixtures.single_device_update()
  np.testing.assert_allclose(got["rewards"], want_rewards, rtol=1e-5)
  for path, leaf in jax.tree_util.tree_leaves_with_path(want):
    np.testing.assert_allclose(got[jax.tree_util.keystr(path)], leaf, rtol=1e-4, atol=_atol(want))

"""One of two JAX processes on loopback (gloo collectives) computing one ES update.

Usage: python multiprocess_worker.py PORT PROCESS_ID OUT.npz
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)

port, process_id, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id, initialization_timeout=120)

import numpy as np  # noqa: E402

import es_fixtures  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2
es, params, x = es_fixtures.problem()
mesh = jax.make_mesh((4,), ("pop",))
with jax.set_mesh(mesh):
  updates, state = jax.jit(es.update)(None, es.init(params), params, batch=x)
leaves = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_leaves_with_path(updates)}
if process_id == 0:
  np.savez(out, rewards=np.asarray(state.rewards.addressable_data(0)), **leaves)
jax.distributed.shutdown()

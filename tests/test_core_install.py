"""The core installs and runs with jax, optax, flax and numpy only (issue 11).

Each check runs in a fresh interpreter whose import system refuses the
optional dependencies, as a ``pip install es_jax`` without extras would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Run from the repository root: `-c` puts it first on sys.path, so the subprocess imports this
# checkout's es_jax and experiments (experiments/ is not installed).
ROOT = Path(__file__).resolve().parents[1]

# Every third-party module an extra brings (pyproject.toml) that the core must not import.
EXTRA_ONLY = ("transformers", "tokenizers", "safetensors", "gguf", "huggingface_hub", "datasets",
              "tqdm", "orbax", "matplotlib", "evosax", "torch", "tensorboardX", "tensorboard",
              "wandb")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {EXTRA_ONLY!r}

    class Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

    sys.meta_path.insert(0, Blocker())
""")


def run_python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_es_step_runs_without_the_extras():
  result = run_python("""
      import jax, jax.numpy as jnp, optax
      import es_jax

      target = jnp.arange(3.0)
      reward = lambda p, batch: -jnp.sum((p["w"] - target) ** 2)
      tx = optax.chain(es_jax.es_step(reward, population=8, sigma=0.1, key=jax.random.key(0)),
                       es_jax.anchored_weight_decay(1.0), optax.sgd(0.05))
      params = {"w": jnp.zeros(3)}
      state = tx.init(params)
      before = float(reward(params, None))
      for _ in range(20):
        updates, state = tx.update(None, state, params)
        params = optax.apply_updates(params, updates)
      print(before, float(reward(params, None)))
      loaded = sorted({m.partition(".")[0] for m in sys.modules} & set(BLOCKED))
      assert not loaded, loaded
  """)
  assert result.returncode == 0, result.stderr
  before, after = map(float, result.stdout.split())
  assert after > before  # the step moved toward the target: it ran, not just imported


def test_extra_only_modules_name_their_extra():
  result = run_python("""
      for module, extra in [("es_jax.models", "models"), ("es_jax.evaluation", "eval"),
                            ("experiments", "experiments")]:
        try:
          __import__(module)
        except ImportError as e:
          assert f"es_jax[{extra}]" in str(e) or f".[{extra}]" in str(e), (module, str(e))
        else:
          raise AssertionError(f"{module} imported without its extra")
      from es_jax.evaluation import data  # noqa: F401  (fails above: the package needs tqdm)
  """)
  assert result.returncode == 1
  assert "es_jax[eval]" in result.stderr, result.stderr

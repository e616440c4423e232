"""The README's quickstart runs exactly as written."""

import re
from pathlib import Path

import jax.numpy as jnp


def test_quickstart_runs_and_improves_the_reward():
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  code = re.search(r"## Quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # our own documentation, not model output
  before = scope["loss"]({"w": jnp.zeros((3, 4))}, scope["batch"])
  after = scope["loss"](scope["params"], scope["batch"])
  assert after < before

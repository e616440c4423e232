"""Optional dependencies: which extra of ``pip install es_jax[...]`` brings each one.

The core (``es_step``, AWD, noise, shaping, ``Dense``, sharding, patches) needs
jax, optax, flax and numpy only. A subpackage that needs more checks for it on
import, so that a core-only install fails with the command that fixes it
rather than with a bare ``No module named ...``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def _missing_message(user: str, missing: list[str], extra: str) -> str:
  return (f"{user} needs {', '.join(missing)}, which the core install of es_jax leaves out; "
          f"install the {extra!r} extra: pip install 'es_jax[{extra}]'")


def require(extra: str, user: str, modules: tuple[str, ...]) -> None:
  """Raises ImportError naming ``extra`` unless every module in ``modules`` is installed.

  Args:
    extra: the ``[project.optional-dependencies]`` name that installs them.
    user: what needs them, for the message (e.g. ``"es_jax.models"``).
    modules: top-level module names (e.g. ``("transformers", "safetensors")``).

  Example:
    >>> require("models", "es_jax.models", ("no_such_module_here",))
    Traceback (most recent call last):
    ...
    ImportError: es_jax.models needs no_such_module_here, which the core install of es_jax leaves out; install the 'models' extra: pip install 'es_jax[models]'
  """
  missing = []
  for name in modules:
    try:
      # Imported, not just looked up: the subpackage imports it next anyway, and a module
      # that is found but cannot be imported is as missing as one that is not there.
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name is not None and e.name != name and not name.startswith(e.name + "."):
        raise  # installed, but one of its own dependencies is missing: its message says which
      missing.append(name)
  if missing:
    raise ImportError(_missing_message(user, missing, extra), name=missing[0])


def import_module(name: str, *, extra: str, user: str) -> ModuleType:
  """``importlib.import_module(name)``, or an ImportError naming ``extra`` if it is missing."""
  require(extra, user, (name.partition(".")[0],))
  return importlib.import_module(name)

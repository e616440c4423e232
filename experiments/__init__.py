"""The experiment runner: ``python -m experiments.run`` from the repository root.

Not installed with es_jax (it is a folder of the repository); its dependencies
are the ``experiments`` extra: ``pip install -e '.[experiments]'``.
"""

import importlib.util as _importlib_util


def _installed(name: str) -> bool:
  try:
    return _importlib_util.find_spec(name) is not None
  except ModuleNotFoundError:  # an import hook that refuses it
    return False


# Checked here, before any submodule: a core-only install then says what to install.
_MISSING = [name for name in ("orbax", "matplotlib", "tqdm", "transformers", "datasets")
            if not _installed(name)]
if _MISSING:
  raise ImportError(f"experiments needs {', '.join(_MISSING)}, which the core install of "
                    "es_jax leaves out; install the 'experiments' extra: "
                    "pip install -e '.[experiments]'", name=_MISSING[0])

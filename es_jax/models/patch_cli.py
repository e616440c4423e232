"""Apply an ES patch to a base checkpoint: ``python -m es_jax.models.patch_cli``.

::

  python -m es_jax.models.patch_cli apply --base CKPT --patch run.espatch --out DIR [--dtype bfloat16]
  python -m es_jax.models.patch_cli info run.espatch

``apply`` verifies the patch, loads ``CKPT`` with :func:`es_jax.models.load_model`
(a Hugging Face directory or hub id, or whatever else ``load_model`` reads) in
the param dtype the patch was made with, refuses a base whose checksum differs
from the patch's theta_0, replays the fitness history
(:func:`es_jax.patch.apply_patch`) and writes Hugging Face safetensors with
:func:`es_jax.models.save_pretrained`, plus the base's tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from es_jax import patch as patch_lib
from es_jax.models import checkpoint, export

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                    "chat_template.jinja")


def apply(base: str, patch_path: str, out: str, *, dtype: str | None = None) -> pathlib.Path:
  """Replays the patch at ``patch_path`` onto ``base`` and writes the result to ``out``.

  Raises:
    es_jax.patch.PatchError: unreadable patch or wrong base (checked before
      replaying), or a replay that gives non-finite weights (nothing written);
      ``FileExistsError`` if ``out`` is a file or a non-empty directory.
  """
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"--out {out} exists and is {'not empty' if out.is_dir() else 'a file'}; "
                          "choose a new directory.")
  patch = patch_lib.load_patch(patch_path)  # before loading a model that may take minutes
  dtypes = {d for _, d, _ in patch.base_tensors}
  if len(dtypes) != 1:
    raise patch_lib.PatchError(f"the patch's base mixes param dtypes {sorted(dtypes)}; apply it "
                               "with es_jax.patch.apply_patch on params loaded by hand.")
  start = time.perf_counter()
  # The base's param paths say its layout: a scanned model's blocks are one 'layers' subtree.
  scanned = any(path.split("/")[0] == "layers" for path, _, _ in patch.base_tensors)
  model, params = checkpoint.load_model(base, dtype=jnp.float32, param_dtype=dtypes.pop(),
                                        scan_layers=scanned)
  loaded = time.perf_counter()
  params = jax.block_until_ready(patch_lib.apply_patch(patch, params))
  replayed = time.perf_counter()
  export.save_pretrained(out, model.config, params,
                         dtype=None if dtype is None else jnp.dtype(dtype))
  # A local directory, or a hub id load_model has just put in the HF cache (a single
  # file such as a GGUF has no tokenizer files beside it to copy).
  source = pathlib.Path(base)
  if not source.exists():
    source = pathlib.Path(checkpoint.resolve_checkpoint(base))
  for name in _TOKENIZER_FILES:
    if source.is_dir() and (source / name).exists():
      shutil.copy2(source / name, out / name)
  print(f"applied {patch.generations} generations (N={patch.fitness_history.shape[1]}) to "
        f"{base}: load {loaded - start:.1f} s, replay {replayed - loaded:.1f} s; wrote {out}")
  return out


def info(patch_path: str) -> dict:
  """A patch's header and sizes, JSON-serialisable."""
  patch = patch_lib.load_patch(patch_path)
  history = patch.fitness_history
  return {"generations": patch.generations, "population": history.shape[1],
          "bytes": pathlib.Path(patch_path).stat().st_size,
          "failed_members": int(np.sum(~np.isfinite(history))),
          "recipe": patch.recipe.to_dict(), "recipe_sha256": patch.recipe.fingerprint(),
          "base_sha256": patch.base_sha256, "base_tensors": len(patch.base_tensors),
          "base_params": sum(math.prod(s) for _, _, s in patch.base_tensors),  # no int64 wrap
          "metadata": patch.metadata}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m es_jax.models.patch_cli",
                                   description="Apply or inspect an es_jax patch.")
  commands = parser.add_subparsers(dest="command", required=True)
  apply_parser = commands.add_parser("apply", help="replay a patch onto its base checkpoint")
  apply_parser.add_argument("--base", required=True,
                            help="base checkpoint, as es_jax.models.load_model reads it")
  apply_parser.add_argument("--patch", required=True, help="the .espatch file")
  apply_parser.add_argument("--out", required=True, help="new directory for the HF safetensors")
  apply_parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                            help="dtype of the written tensors (default: the params', lossless)")
  info_parser = commands.add_parser("info", help="print a patch's header as JSON")
  info_parser.add_argument("patch")
  args = parser.parse_args(argv)
  try:
    if args.command == "apply":
      apply(args.base, args.patch, args.out, dtype=args.dtype)
    else:
      print(json.dumps(info(args.patch), indent=2))
  # ValueError covers PatchError and a base that cannot be read (CheckpointError);
  # OSError a path that cannot be used. One line, exit code 2, as experiments.run.
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()

"""Row loading shared by the tasks: `datasets` for hub names and local files, clear errors.

Every task loads through :func:`load_rows`, which returns plain dicts and
reports problems by row number, then validates the fields it needs with
:func:`require_field`. Row numbers in messages are 0-based; for a local JSON
Lines file row ``i`` is line ``i + 1`` when the file has no blank lines.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from es_jax import _extras

LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet", ".csv")


class DataError(ValueError):
  """A data source is missing, unreadable or has a malformed row."""


def looks_like_local_path(source: str | Path) -> bool:
  """True when ``source`` should be read from disk rather than from the hub.

  Example:
    >>> looks_like_local_path("data/test.jsonl"), looks_like_local_path("openai/gsm8k")
    (True, False)
  """
  text = str(source)
  return (isinstance(source, Path) or text.endswith(LOCAL_SUFFIXES)
          or text.startswith((".", "/", "~")) or Path(text).exists())


def _builder_for(path: Path) -> str:
  name = path.name.lower()
  if name.endswith(".parquet"):
    return "parquet"
  if name.endswith(".csv"):
    return "csv"
  return "json"


def _read_json_lines_strictly(path: Path, task: str) -> list[dict[str, Any]]:
  """Reads a JSON Lines file with the standard library to say exactly which line is bad."""
  opener = gzip.open if path.name.endswith(".gz") else open
  rows = []
  with opener(path, "rt", encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(
            f"{task}: line {line_no} of '{path}' is not valid JSON ({e.msg} at column "
            f"{e.colno}); fix or remove that line") from e
      if not isinstance(row, dict):
        raise DataError(
            f"{task}: line {line_no} of '{path}' is a JSON {type(row).__name__}, "
            "expected an object with named fields")
      rows.append(row)
  return rows


def _load_local(path: Path, task: str) -> list[dict[str, Any]]:
  # Imported lazily: parsing and rewards must not need it.
  datasets = _extras.import_module("datasets", extra="eval", user="reading data files")

  path = path.expanduser()
  if not path.exists():
    raise DataError(f"{task}: data file '{path}' does not exist; pass an existing "
                    f"file ({', '.join(LOCAL_SUFFIXES)}) or a hub dataset name")
  if not path.is_file():
    raise DataError(f"{task}: '{path}' is not a file; pass a data file, not a directory")
  try:
    with open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise DataError(f"{task}: cannot read '{path}': {e}") from e
  builder = _builder_for(path)
  try:
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    return ds.to_list()
  except Exception as e:  # datasets wraps parse errors without saying which row
    if builder == "json":
      # Re-read line by line: either it names the bad line, or the lines are valid JSON
      # with inconsistent types, which the per-row validation then reports by row.
      try:
        return _read_json_lines_strictly(path, task)
      except (UnicodeDecodeError, OSError, EOFError) as read_error:
        raise DataError(f"{task}: cannot read '{path}': {read_error}") from read_error
    raise DataError(f"{task}: cannot read '{path}' as {builder}: {e}") from e


def _load_hub(name: str, config: str | None, split: str, task: str) -> list[dict[str, Any]]:
  datasets = _extras.import_module("datasets", extra="eval", user="loading hub datasets")

  try:
    ds = datasets.load_dataset(name, config, split=split) if config else datasets.load_dataset(
        name, split=split)
  except Exception as e:
    raise DataError(
        f"{task}: could not load hub dataset '{name}'"
        f"{f' (config {config!r})' if config else ''} split '{split}': {e}. "
        "Without network access pass a local file path instead.") from e
  return ds.to_list()


def load_rows(source: str | Path, *, task: str, split: str,
              hub_config: str | None = None) -> list[dict[str, Any]]:
  """Loads rows as dicts from a local data file or a Hugging Face hub dataset.

  Args:
    source: a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``,
      ``.csv``) or a hub dataset name such as ``"openai/gsm8k"``.
    task: task name used in error messages.
    split: the split to load from the hub (local files have one split).
    hub_config: the hub dataset's configuration name, e.g. ``"main"``.

  Returns:
    A list of row dicts.

  Raises:
    DataError: the file is missing or unreadable, a line is not a JSON object,
      or the hub dataset cannot be loaded.

  Example:
    >>> import json, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
    >>> _ = open(path, "w").write(json.dumps({"a": 1}) + "\\n")
    >>> load_rows(path, task="demo", split="test")
    [{'a': 1}]
  """
  if looks_like_local_path(source):
    rows = _load_local(Path(source), task)
  else:
    rows = _load_hub(str(source), hub_config, split, task)
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise DataError(f"{task}: row {i} of '{source}' is not an object with named fields")
  return rows


def select_indices(num_rows: int, limit: int | None = None, seed: int | None = None) -> list[int]:
  """Chooses which rows to use: all, the first ``limit``, or a seeded random subset.

  Args:
    num_rows: rows available.
    limit: how many to keep; None keeps all.
    seed: with a limit, draw a random subset with this seed (sorted, so the
      order follows the source); None takes the first ``limit`` rows.

  Returns:
    Sorted row indices.

  Example:
    >>> select_indices(10, limit=3)
    [0, 1, 2]
    >>> select_indices(10, limit=3, seed=0) == select_indices(10, limit=3, seed=0)
    True
  """
  if limit is None or limit >= num_rows:
    return list(range(num_rows))
  if limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  if seed is None:
    return list(range(limit))
  chosen = np.random.default_rng(seed).choice(num_rows, size=limit, replace=False)
  return sorted(int(i) for i in chosen)


def require_field(row: dict[str, Any], field: str, kinds: type | tuple[type, ...], *,
                  task: str, row_index: int, source: str | Path) -> Any:
  """Returns ``row[field]`` if present, not None and of the given type(s); else raises.

  Example:
    >>> require_field({"q": "hi"}, "q", str, task="demo", row_index=0, source="x")
    'hi'
  """
  if field not in row or row[field] is None:
    raise DataError(f"{task}: row {row_index} of '{source}' is missing field '{field}' "
                    f"(fields present: {sorted(k for k, v in row.items() if v is not None)})")
  value = row[field]
  # bool is an int subclass; a label of True is a data error, not 1.
  if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
    raise DataError(f"{task}: row {row_index} of '{source}': field '{field}' is a bool")
  if not isinstance(value, kinds):
    names = ", ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
    raise DataError(f"{task}: row {row_index} of '{source}': field '{field}' should be "
                    f"{names}, got {type(value).__name__} {value!r:.80}")
  return value


def check_str_list(value: Sequence[Any], field: str, *, length: int | None, task: str,
                   row_index: int, source: str | Path) -> tuple[str, ...]:
  """Validates a list of strings (e.g. HellaSwag endings) and returns it as a tuple."""
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise DataError(f"{task}: row {row_index} of '{source}': field '{field}' should be a "
                    f"list of strings, got {value!r:.120}")
  if length is not None and len(value) != length:
    raise DataError(f"{task}: row {row_index} of '{source}': field '{field}' has "
                    f"{len(value)} entries, expected {length}")
  return tuple(value)

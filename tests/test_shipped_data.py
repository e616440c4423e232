"""The HellaSwag subset shipped for the main job is exactly the documented draw."""

import gzip
import json
import pathlib

import pytest

from es_jax.evaluation import HellaSwagTask, select_indices

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "experiments" / "data" / "hellaswag_validation_1000.jsonl.gz"
SHARED = ROOT.parent / "shared" / "data" / "hellaswag" / "validation.jsonl.gz"


def _rows(path):
  with gzip.open(path, "rt") as f:
    return [json.loads(line) for line in f]


@pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} absent: cannot redraw the subset")
def test_subset_is_the_seed_0_draw_of_the_validation_split():
  full = _rows(SHARED)
  assert _rows(SHIPPED) == [full[i] for i in select_indices(len(full), limit=1000, seed=0)]


def test_subset_loads_as_hellaswag():
  examples = HellaSwagTask().load(str(SHIPPED))
  assert len(examples) == 1000
  assert all(len(ex.endings) == 4 and 0 <= ex.label <= 3 for ex in examples)
  # Labels of a uniform sample are roughly balanced (the split's are).
  counts = [sum(ex.label == k for ex in examples) for k in range(4)]
  assert min(counts) > 200, counts

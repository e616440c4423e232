"""The prior-task subsets shipped for the main job are exactly the documented draws."""

import gzip
import json
import pathlib

import pytest

from es_jax.evaluation import HellaSwagTask, get_task, select_indices
from experiments import components

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


SUITE_SUBSETS = [  # (task, shipped file, the shared split it was drawn from, items)
    ("piqa", "piqa_validation_500.jsonl.gz", "piqa/valid.jsonl", 500),
    ("arc_easy", "arc_easy_test_500.jsonl.gz", "arc_easy/test.jsonl", 500),
]


@pytest.mark.parametrize("name, file, split, n", SUITE_SUBSETS)
def test_suite_subsets_are_the_seed_0_draws_of_their_splits(name, file, split, n):
  shared = ROOT.parent / "shared" / "data" / split
  if not shared.exists():
    pytest.skip(f"{shared} absent: cannot redraw the subset")
  task = get_task(name)
  content = lambda ex: (ex.question, ex.options, ex.label)  # ids are row numbers
  shipped = task.load(str(ROOT / "experiments" / "data" / file))
  assert [content(ex) for ex in shipped] == [content(ex) for ex in
                                             task.load(str(shared), limit=n, seed=0)]


def test_the_runner_ships_exactly_these_subsets():
  assert {name: path.name for name, path in components.SHIPPED_PRIOR.items()} == {
      "hellaswag": SHIPPED.name, **{name: file for name, file, _, _ in SUITE_SUBSETS}}

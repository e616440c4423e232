"""HellaSwag: loading, the lm-eval construction, acc/acc_norm, the generative parser, and
log-likelihood scoring against a direct PyTorch computation on a tiny Qwen2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from es_jax.evaluation import hellaswag as hs
from es_jax.evaluation.data import DataError
from es_jax.evaluation.loglik import ChoiceLoglik, encode_pair, score_continuations
from es_jax.evaluation.runner import evaluate_generation, evaluate_loglik

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HELLASWAG_VAL = DATA / "hellaswag" / "validation.jsonl.gz"

ITEM = hs.HellaSwagExample(
    ind=24, activity_label="Roof shingle removal", context="A man is sitting on a roof. he",
    endings=("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
             "is holding a rubik's cube.", "starts pulling up roofing on a roof."),
    label=3)


@pytest.fixture(scope="module")
def shared_items():
  if not HELLASWAG_VAL.exists():
    pytest.skip(f"shared HellaSwag data not found at {HELLASWAG_VAL}")
  return hs.HellaSwagTask().load(str(HELLASWAG_VAL))


def test_shared_file_loads(shared_items):
  assert len(shared_items) == 10042
  assert all(len(item.endings) == 4 and 0 <= item.label < 4 for item in shared_items)
  first = shared_items[0]
  assert (first.ind, first.activity_label, first.label) == (0, "Roof shingle removal", 3)


def test_seeded_subset_is_reproducible(shared_items):
  task = hs.HellaSwagTask()
  a = task.load(str(HELLASWAG_VAL), limit=25, seed=11)
  assert a == task.load(str(HELLASWAG_VAL), limit=25, seed=11)
  assert [x.ind for x in a] != [x.ind for x in task.load(str(HELLASWAG_VAL), limit=25, seed=12)]
  assert len({x.ind for x in a}) == 25
  assert task.load(str(HELLASWAG_VAL), limit=4) == shared_items[:4]


def test_lm_eval_construction_on_a_hand_written_item():
  assert hs.query(ITEM) == "Roof shingle removal: A man is sitting on a roof. he"
  query = "Roof shingle removal: A man is sitting on a roof. he"
  assert hs.loglik_requests(ITEM) == [
      (query, " is using wrap to wrap a pair of skis."),
      (query, " is ripping level tiles off."),
      (query, " is holding a rubik's cube."),
      (query, " starts pulling up roofing on a roof."),
  ]


def test_wikihow_preprocessing_and_ctx_a_ctx_b(tmp_path):
  row = {"ind": 5, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to plant a tree [title] Dig a hole.", "ctx_b": "you",
         "ctx": "ignored when ctx_a and ctx_b are present",
         "endings": ["[step] Put the tree in.", "b", "c", "d"], "label": "0"}
  path = tmp_path / "h.jsonl"
  path.write_text(json.dumps(row) + "\n")
  (item,) = hs.HellaSwagTask().load(str(path))
  assert item.context == "[header] How to plant a tree [title] Dig a hole. You"
  assert item.label == 0
  # strip; " [title]" -> ". "; drop [...]; one pass of "  " -> " ".
  assert hs.query(item) == "Home and Garden: How to plant a tree. Dig a hole. You"
  # lm-eval leaves the space that preceded "[step]", so the continuation starts with two.
  assert hs.loglik_requests(item)[0][1] == "  Put the tree in."


def test_acc_and_acc_norm_from_given_logprobs():
  # Ending lengths 37, 27, 26, 36 characters (without the leading space).
  assert [len(e) for e in hs.choices(ITEM)] == [37, 27, 26, 36]
  logprobs = [-30.0, -20.0, -19.0, -27.0]
  # acc: argmax(-30, -20, -19, -27) = 2.
  # acc_norm: -30/37 = -0.811, -20/27 = -0.741, -19/26 = -0.731, -27/36 = -0.75 -> 2.
  assert hs.loglik_predictions(logprobs, [37, 27, 26, 36]) == (2, 2)
  logprobs = [-30.0, -20.0, -19.0, -25.0]
  # acc still 2; acc_norm: -25/36 = -0.694 is now the best -> 3 (the label).
  scored = hs.HellaSwagTask().score_logliks(
      ITEM, [ChoiceLoglik(lp, 10, 0) for lp in logprobs])
  assert scored.metrics["acc"] == 0.0 and scored.metrics["acc_norm"] == 1.0
  assert scored.metrics["accuracy"] == 1.0 and scored.prediction == "2"


@pytest.mark.parametrize("text, expected", [
    ("3", 2), ("The answer is (2).", 1), ("Option 4, not 1", 3), ("4. starts pulling", 3),
    ("0", None), ("9", None), ("", None), ("no digits", None), ("\u0663 then 2", 1),
    ("\uff13", None), ("1234", 0),
])
def test_generative_parser_takes_the_first_ascii_digit(text, expected):
  assert hs.parse_choice(text) == expected


def test_generative_protocol_end_to_end():
  task = hs.HellaSwagTask(protocol="generative")
  prompt = task.build_prompt(ITEM)
  assert "Roof shingle removal: A man is sitting on a roof. he" in prompt
  assert "\n1. is using wrap to wrap a pair of skis.\n" in prompt
  assert "\n4. starts pulling up roofing on a roof.\n" in prompt
  replies = {prompt: "4"}
  result = evaluate_generation(task, [ITEM, ITEM], lambda ps: [replies[p] for p in ps])
  assert result.summary.metrics["accuracy"] == 1.0


def test_bad_rows_name_row_and_field(tmp_path):
  good = {"ind": 0, "activity_label": "a", "ctx": "c", "endings": ["1", "2", "3", "4"],
          "label": 0}
  path = tmp_path / "h.jsonl"
  for bad, pattern in [
      ({**good, "endings": ["1", "2", "3"]}, r"row 1 .*'endings' has 3 entries"),
      ({**good, "label": 7}, r"row 1 .*'label' is 7"),
      ({**good, "label": "x"}, r"row 1 .*'label' is 'x'"),
      ({k: v for k, v in good.items() if k != "ctx"}, r"row 1 .*missing field 'ctx'"),
  ]:
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=pattern):
      hs.HellaSwagTask().load(str(path))
  with pytest.raises(ValueError, match="unknown HellaSwag protocol"):
    hs.HellaSwagTask(protocol="mc")  # type: ignore[arg-type]


# ---- log-likelihood scoring on a tiny model ----

@pytest.fixture(scope="module")
def tiny_qwen2():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from es_jax.models.tokenizer import char_tokenizer

  config = transformers.Qwen2Config(
      vocab_size=103, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval().to(torch.float32)
  return torch, model, char_tokenizer()


def _direct_loglik(torch, model, tokenizer, context, continuation):
  """Unbatched reference: one forward over context + continuation, sum the continuation."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = tokenizer(context).input_ids
  continuation_ids = tokenizer(context + continuation).input_ids[len(context_ids):]
  ids = torch.tensor([context_ids + continuation_ids])
  with torch.no_grad():
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
  return sum(float(logprobs[len(context_ids) + j - 1, token])
             for j, token in enumerate(continuation_ids)), len(continuation_ids)


ITEMS = [
    ITEM,
    hs.HellaSwagExample(1, "Clean and jerk", "A lady walks to a barbell. She bends down and "
                        "grabs the pole. the lady", ("swings and lands in her arms.",
                        "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                        "stands and lifts the weight over her head."), 3),
    hs.HellaSwagExample(2, "Baking cookies", "A woman mixes flour and sugar in a bowl.",
                        ("She", "She then adds three eggs and stirs until the dough is smooth.",
                         "The bowl", "Then she puts the bowl in the oven"), 1),
]


def test_batched_scoring_matches_direct_torch_computation(tiny_qwen2):
  torch, model, tokenizer = tiny_qwen2
  shapes = []

  def logits_fn(input_ids, attention_mask):
    shapes.append(input_ids.shape)
    assert input_ids.dtype == np.int32
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(input_ids).long(),
                  attention_mask=torch.from_numpy(attention_mask).long())
    return out.logits.numpy()

  requests = [r for item in ITEMS for r in hs.loglik_requests(item)]
  requests += [("Trailing spaces move:  ", "onto the continuation"), ("", "no context at all")]
  scores = score_continuations(logits_fn, tokenizer, requests, batch_size=5, bucket=16)
  for (context, continuation), score in zip(requests, scores):
    if context:
      expected, n_tokens = _direct_loglik(torch, model, tokenizer, context, continuation)
      assert score.sum_logprob == pytest.approx(expected, abs=1e-4)
      assert score.num_tokens == n_tokens
    assert score.num_chars == len(continuation)
  assert all(b == 5 and t % 16 == 0 for b, t in shapes)
  assert len(shapes) == 3  # 14 requests in batches of 5

  def logprobs_fn(input_ids, attention_mask):  # per-token log-probs, as a model would on device
    logp = torch.log_softmax(torch.from_numpy(logits_fn(input_ids, attention_mask)), dim=-1)
    ids = torch.from_numpy(input_ids).long()
    picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return np.concatenate([np.full((len(ids), 1), np.nan), picked.numpy()], axis=1)

  for score, via_logprobs in zip(scores, score_continuations(None, tokenizer, requests,
                                                             batch_size=5, logprobs_fn=logprobs_fn)):
    assert via_logprobs.sum_logprob == pytest.approx(score.sum_logprob, abs=1e-4)
    assert via_logprobs[1:] == score[1:]
  with pytest.raises(ValueError, match="exactly one of"):
    score_continuations(logits_fn, tokenizer, requests, logprobs_fn=logprobs_fn)

  result = evaluate_loglik(hs.HellaSwagTask(), ITEMS, logits_fn, tokenizer, batch_size=4)
  for record, item in zip(result.records, ITEMS):
    direct = [_direct_loglik(torch, model, tokenizer, c, x)[0] for c, x in hs.loglik_requests(item)]
    lengths = [len(e) for e in hs.choices(item)]
    assert record.metrics["acc"] == float(int(np.argmax(direct)) == item.label)
    assert record.metrics["acc_norm"] == float(
        int(np.argmax(np.array(direct) / lengths)) == item.label)
    assert [c[0] for c in record.details["choices"]] == pytest.approx(direct, abs=1e-4)


def test_encode_pair_moves_trailing_spaces():
  from es_jax.models.tokenizer import char_tokenizer

  tok = char_tokenizer()
  context_ids, continuation_ids = encode_pair(tok, "Hello  ", "world")
  assert tok.decode(context_ids) == "Hello"
  assert tok.decode(continuation_ids) == "  world"


def test_max_length_truncates_on_the_left():
  from es_jax.models.tokenizer import char_tokenizer

  seen = []

  def logits_fn(input_ids, attention_mask):
    seen.append(input_ids.shape[1])
    return np.zeros(input_ids.shape + (103,), np.float32)

  (score,) = score_continuations(logits_fn, char_tokenizer(), [("x" * 100, "abc")],
                                 max_length=40)
  assert seen == [40]
  assert score.sum_logprob == pytest.approx(3 * np.log(1 / 103))
  with pytest.raises(ValueError, match="more than max_length"):
    score_continuations(logits_fn, char_tokenizer(), [("x", "y" * 50)], max_length=40)

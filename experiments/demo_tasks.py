"""Synthetic, verifiable tasks for the demo: a prior skill and a new one, same prompt format.

Both tasks are 4-character prompts ``"<x><op><k>="`` answered by one character, so
with :func:`es_jax.models.char_tokenizer` every prompt is 4 tokens (no padding)
and the answer is the greedy next token after ``=``: a reward is one forward
pass, cheap enough to score a whole ES population in one jitted program.

* Prior task, letter shift: ``"c+3="`` -> ``"f"`` (Caesar shift, wraps z -> a);
  26 x 10 = 260 prompts. Taught by gradient pretraining; stands in for the
  capability (HellaSwag in the papers) that fine-tuning should not destroy.
* New task, digit product: ``"3*4="`` -> ``"2"`` (last digit of the product);
  10 x 10 = 100 prompts. The verifiable-reward task ES fine-tunes on (Countdown
  in the papers); reward = exact match of the greedy answer. Its own operator
  lets the model keep the two skills apart (an earlier version used ``+`` for
  both; learning the new task then shifted the letters too, which no weight
  decay can prevent, and hid the drift this demo is about).

The pretraining corpus also holds digit-product prompts, but with a systematic
error: a share of their answers are off by one (``"3*4="`` -> ``"3"``), see
:func:`pretraining_batch`. The pretrained model therefore knows the answer
format and ranks the right digit second; its greedy answer is mostly wrong.
That gives ES a reward signal from the first generation (a small perturbation
can flip a near-tie), the way an instruct model already answers Countdown in
the right format before RL.
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp
import numpy as np

LETTERS = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class Task:
  """All prompts of a task with their one-token answers.

  Attributes:
    name: short label for tables and plots.
    prompts: the prompt strings, e.g. ``"3+4="``.
    answers: the answer characters.
    input_ids: ``(n, 4)`` int32 token ids of the prompts.
    answer_ids: ``(n,)`` int32 token ids of the answers.
  """

  name: str
  prompts: tuple[str, ...]
  answers: tuple[str, ...]
  input_ids: np.ndarray
  answer_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.prompts)


def make_task(name: str, pairs: list[tuple[str, str]], tokenizer) -> Task:
  """Tokenizes ``(prompt, answer)`` pairs; all prompts must have the same token length."""
  prompts, answers = zip(*pairs)
  input_ids = np.asarray(tokenizer(list(prompts))["input_ids"], np.int32)
  answer_ids = np.asarray(tokenizer.convert_tokens_to_ids(list(answers)), np.int32)
  return Task(name, tuple(prompts), tuple(answers), input_ids, answer_ids)


def letter_shift_task(tokenizer) -> Task:
  """Prior task: ``"c+3="`` -> ``"f"`` for every letter and shift 0-9.

  Example:
    >>> from es_jax.models import char_tokenizer
    >>> task = letter_shift_task(char_tokenizer())
    >>> len(task), task.prompts[-1], task.answers[-1]
    (260, 'z+9=', 'i')
  """
  pairs = [(f"{c}+{k}=", LETTERS[(i + k) % 26]) for i, c in enumerate(LETTERS) for k in range(10)]
  return make_task("letter shift", pairs, tokenizer)


def digit_product_task(tokenizer, offset: int = 0) -> Task:
  """New task: ``"3*4="`` -> ``"2"``, the last digit of ``a * b (+ offset)``.

  ``offset=1`` gives the off-by-one answers of the pretraining corpus.

  Example:
    >>> from es_jax.models import char_tokenizer
    >>> task = digit_product_task(char_tokenizer())
    >>> len(task), task.prompts[-1], task.answers[-1]
    (100, '9*9=', '1')
    >>> digit_product_task(char_tokenizer(), offset=1).answers[-1]
    '2'
  """
  pairs = [(f"{a}*{b}=", str((a * b + offset) % 10)) for a in range(10) for b in range(10)]
  return make_task("digit product", pairs, tokenizer)


def pretraining_batch(key: jax.Array, prior: Task, new: Task, misleading_answer_ids: np.ndarray,
                      p_correct: float, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """A pretraining batch: half prior-task examples, half new-task prompts with noisy answers.

  A new-task example is labelled with the right answer with probability
  ``p_correct`` and otherwise with ``misleading_answer_ids`` (the off-by-one
  digit), drawn afresh each time. With ``p_correct < 0.5`` the model learns to
  prefer the wrong digit but keeps the right one as a close runner-up.

  Returns:
    ``(input_ids (batch, 4), answer_ids (batch,))``, jittable.
  """
  half = batch_size // 2
  key_prior, key_new, key_label = jax.random.split(key, 3)
  prior_idx = jax.random.randint(key_prior, (batch_size - half,), 0, len(prior))
  new_idx = jax.random.randint(key_new, (half,), 0, len(new))
  correct = jax.random.uniform(key_label, (half,)) < p_correct
  new_answers = jnp.where(correct, jnp.asarray(new.answer_ids)[new_idx],
                          jnp.asarray(misleading_answer_ids)[new_idx])
  input_ids = jnp.concatenate([jnp.asarray(prior.input_ids)[prior_idx],
                               jnp.asarray(new.input_ids)[new_idx]])
  answer_ids = jnp.concatenate([jnp.asarray(prior.answer_ids)[prior_idx], new_answers])
  return input_ids, answer_ids

"""Evaluation for es_jax: tasks, rewards, log-likelihood scoring, drift metrics, a runner.

Parsing and rewards need only the standard library; model-based evaluation
takes the model as a callable (see :mod:`es_jax.evaluation.runner`).
"""

from __future__ import annotations

from es_jax import _extras

# Before the submodules: without the extra, say which one to install.
_extras.require("eval", "es_jax.evaluation", ("tqdm",))

from es_jax.evaluation.arithmetic import (
    ArithmeticExample,
    ArithmeticTask,
    arithmetic_reward,
    generate_problems,
)
from es_jax.evaluation.base import GenerativeTask, LoglikTask, Scored, chat_prompt
from es_jax.evaluation.countdown import (
    CountdownExample,
    CountdownReward,
    CountdownTask,
    countdown_prompt,
    countdown_reward,
    countdown_reward_parts,
    generate_instances,
    solve,
)
from es_jax.evaluation.data import DataError, select_indices
from es_jax.evaluation.drift import (
    DEFAULT_GROUP_RULES,
    DriftReport,
    GroupDrift,
    TensorDrift,
    assign_group,
    drift_report,
    flatten_with_paths,
    global_drift_norm,
    group_paths,
    masked_kl_sum,
    mean_token_kl,
    per_token_kl,
)
from es_jax.evaluation.gsm8k import (
    GSM8KExample,
    GSM8KTask,
    extract_answer,
    gold_answer,
    gsm8k_reward,
    numbers_match,
    parse_number,
)
from es_jax.evaluation.hellaswag import (
    HellaSwagExample,
    HellaSwagTask,
    loglik_predictions,
    parse_choice,
    preprocess,
)
from es_jax.evaluation.loglik import (ChoiceLoglik, LogitsFn, TokenLogprobsFn, encode_pair,
                                      score_continuations)
from es_jax.evaluation.multiple_choice import (
    MultipleChoiceExample,
    MultipleChoiceTask,
    choice_margin,
    parse_option_letter,
    parse_option_number,
)
from es_jax.evaluation.paired import PairedChange, detectable_multiple, paired_change, suite_change
from es_jax.evaluation.registry import TASKS, get_task
from es_jax.evaluation.runner import (
    EvalRecord,
    EvalResult,
    EvalSummary,
    Generator,
    PopulationEvalResult,
    PopulationGenerator,
    evaluate_generation,
    evaluate_loglik,
    evaluate_population,
    summarize,
)
from es_jax.evaluation.safe_arith import (
    ArithLimits,
    UnsafeExpressionError,
    evaluate as evaluate_expression,
    try_evaluate as try_evaluate_expression,
)
from es_jax.evaluation.suite import (
    PRIOR_SUITE,
    ARCChallengeTask,
    ARCEasyTask,
    MMLUProTask,
    MMLUTask,
    PIQATask,
    WinoGrandeTask,
)

__all__ = [
    "ARCChallengeTask",
    "ARCEasyTask",
    "ArithLimits",
    "ArithmeticExample",
    "ArithmeticTask",
    "ChoiceLoglik",
    "CountdownExample",
    "CountdownReward",
    "CountdownTask",
    "DEFAULT_GROUP_RULES",
    "DataError",
    "DriftReport",
    "EvalRecord",
    "EvalResult",
    "EvalSummary",
    "GSM8KExample",
    "GSM8KTask",
    "GenerativeTask",
    "Generator",
    "GroupDrift",
    "HellaSwagExample",
    "HellaSwagTask",
    "LogitsFn",
    "LoglikTask",
    "MMLUProTask",
    "MMLUTask",
    "MultipleChoiceExample",
    "MultipleChoiceTask",
    "PIQATask",
    "PRIOR_SUITE",
    "PairedChange",
    "PopulationEvalResult",
    "PopulationGenerator",
    "Scored",
    "TASKS",
    "TensorDrift",
    "TokenLogprobsFn",
    "UnsafeExpressionError",
    "WinoGrandeTask",
    "arithmetic_reward",
    "assign_group",
    "chat_prompt",
    "choice_margin",
    "countdown_prompt",
    "countdown_reward",
    "countdown_reward_parts",
    "detectable_multiple",
    "drift_report",
    "encode_pair",
    "evaluate_expression",
    "evaluate_generation",
    "evaluate_loglik",
    "evaluate_population",
    "extract_answer",
    "flatten_with_paths",
    "generate_instances",
    "generate_problems",
    "get_task",
    "global_drift_norm",
    "gold_answer",
    "group_paths",
    "gsm8k_reward",
    "loglik_predictions",
    "masked_kl_sum",
    "mean_token_kl",
    "numbers_match",
    "paired_change",
    "parse_choice",
    "parse_number",
    "parse_option_letter",
    "parse_option_number",
    "per_token_kl",
    "preprocess",
    "score_continuations",
    "select_indices",
    "solve",
    "suite_change",
    "summarize",
    "try_evaluate_expression",
]

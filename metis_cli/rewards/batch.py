"""Scoring many rollouts against their examples, and per-subset summaries.

The one place that turns (rollouts, examples) into rewards and headline figures, used by HDPO
(rewards per step, held-out eval during RL), `metis eval` and `metis curate`. A judge that cannot
score a rollout yields `correct=None`: it is retried `retries` times, then left unscored and
counted, never silently scored 0 (docs/algorithm.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from metis_cli.rewards.scoring import RolloutScore, score_rollout, scored_incorrect
from metis_cli.rewards.tool_economy import correctness_and_budgets
from metis_cli.telemetry import metrics as m

# (example, prediction, gold) -> bool | None; the example gives the judge its question.
ExampleChecker = Callable[[Any, str, str], "bool | None"]


def build_checker(reward_cfg) -> ExampleChecker:
    """The recipe's `reward.checker` as an (example, prediction, gold) -> bool | None function."""
    if reward_cfg.checker == "judge":
        from metis_cli.rewards.judge import OpenAIJudge

        return OpenAIJudge.from_config(reward_cfg.judge).score_example
    from metis_cli.rewards.checkers import get_checker

    check = get_checker(reward_cfg.checker)
    return lambda example, prediction, gold: check(prediction, gold)


def score_rollouts(rollouts, examples, checker: ExampleChecker, reward_cfg, *, retries: int = 0,
                   max_concurrency: int = 8) -> list[RolloutScore]:
    """One RolloutScore per rollout; `examples[r.prompt_index]` holds its prompt and gold answer
    (a string, or a list of acceptable answers: the best match scores).

    A rollout still unscored after `retries` re-scorings stays unscored, unless the recipe says
    `reward.judge.on_failure: incorrect` (the reference behaviour): then it scores as wrong, with
    `scoring_failed` set so that it can still be counted.
    """
    failures_are_wrong = reward_cfg.judge is not None and reward_cfg.judge.on_failure == "incorrect"

    def score(rollout) -> RolloutScore:
        example = examples[rollout.prompt_index]
        result = None
        for _ in range(retries + 1):
            result = score_rollout(
                rollout.assistant_texts, example.answer or "", rollout.tool_calls,
                lambda prediction, gold: checker(example, prediction, gold),
                reward_cfg.acc_weight, reward_cfg.format_weight,
                format_rule=reward_cfg.format, answer_position=reward_cfg.answer_position,
            )
            if result.correct is not None:
                break
        if result.correct is None and failures_are_wrong:
            return scored_incorrect(result, reward_cfg.format_weight)
        return result

    if reward_cfg.checker != "judge":
        return [score(r) for r in rollouts]
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        return list(pool.map(score, rollouts))


@dataclass(frozen=True)
class RolloutFigures:
    """Headline figures of a set of rollouts: one RL step's, or one eval subset's. Named as in
    metrics.jsonl (`telemetry.metrics`); `accuracy` is None when no rollout is scored."""

    rollouts: int
    accuracy: float | None  # share of the scored rollouts that are correct
    format_ok: float  # share of all rollouts that pass the format check
    tool_call_ratio: float  # share with T >= 1
    tool_calls_mean: float
    tool_errors: int  # error observations, every kind
    tool_timeouts: int
    malformed_tool_calls: int
    unscored: int
    truncated: int  # ended at a token limit
    generated_tokens: int
    response_tokens_mean: float  # generated tokens per rollout
    tool_call_ratio_correct: float | None  # rewards/tool_economy.py correctness_and_budgets
    tool_call_ratio_wrong: float | None
    turn_budget_share: float
    token_budget_share: float


def rollout_figures(rollouts, scores: list[RolloutScore]) -> RolloutFigures:
    """The figures of `rollouts` with their `scores` (same order, at least one rollout)."""
    n = len(rollouts)
    scored = [s for s in scores if s.correct is not None]
    return RolloutFigures(
        rollouts=n,
        accuracy=sum(s.correct for s in scored) / len(scored) if scored else None,
        format_ok=sum(s.format_ok for s in scores) / n,
        tool_call_ratio=sum(r.tool_calls >= 1 for r in rollouts) / n,
        tool_calls_mean=sum(r.tool_calls for r in rollouts) / n,
        tool_errors=sum(sum(r.tool_errors.values()) for r in rollouts),
        tool_timeouts=sum(r.tool_errors.get("timeout", 0) for r in rollouts),
        malformed_tool_calls=sum(r.tool_errors.get("malformed", 0) for r in rollouts),
        unscored=n - len(scored),
        truncated=sum(r.finish_reason == "length" for r in rollouts),
        generated_tokens=sum(r.generated_tokens for r in rollouts),
        response_tokens_mean=sum(r.generated_tokens for r in rollouts) / n,
        **correctness_and_budgets(rollouts, scores),
    )


def subset_summary(rollouts, scores: list[RolloutScore], examples) -> dict[str, dict[str, float | None]]:
    """Per subset (sorted): n, accuracy (over scored rollouts; None when none is scored),
    tool_call_ratio, tool_calls_mean, tool_errors, generated_tokens_mean, unscored; the
    `rollout_figures` of the subset's rollouts. DONE.json keeps these as eval_first / eval_last."""
    groups: dict[str, list[tuple]] = defaultdict(list)
    for rollout, score in zip(rollouts, scores):
        groups[examples[rollout.prompt_index].subset].append((rollout, score))
    summary = {}
    for subset, pairs in sorted(groups.items()):
        figures = rollout_figures([r for r, _ in pairs], [s for _, s in pairs])
        summary[subset] = {  # the eval/<subset>/<figure> entries of metrics.jsonl are taken from here
            "n": figures.rollouts, m.ACCURACY: figures.accuracy, m.TOOL_CALL_RATIO: figures.tool_call_ratio,
            m.TOOL_CALLS_MEAN: figures.tool_calls_mean, m.TOOL_ERRORS: figures.tool_errors,
            "generated_tokens_mean": figures.response_tokens_mean, m.UNSCORED: figures.unscored,
        }
    return summary

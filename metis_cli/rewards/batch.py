"""Scoring many rollouts against their examples, and per-subset summaries.

The one place that turns (rollouts, examples) into rewards and headline figures, used by HDPO
(rewards per step, held-out eval during RL), `metis eval` and `metis curate`. A judge that cannot
score a rollout yields `correct=None`: it is retried `retries` times, then left unscored and
counted, never silently scored 0 (DESIGN.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from metis_cli.rewards.scoring import RolloutScore, score_rollout

# (question, prediction, gold) -> bool | None
QuestionChecker = Callable[[str, str, str], "bool | None"]


def build_checker(reward_cfg) -> QuestionChecker:
    """The recipe's `reward.checker` as a (question, prediction, gold) -> bool | None function."""
    if reward_cfg.checker == "judge":
        from metis_cli.rewards.judge import OpenAIJudge

        judge_cfg = reward_cfg.judge
        judge = OpenAIJudge(
            judge_cfg.base_url, judge_cfg.model, api_key_env=judge_cfg.api_key_env,
            max_retries=judge_cfg.max_retries, backoff_s=judge_cfg.backoff_s, timeout_s=judge_cfg.timeout_s,
        )
        return judge.score
    from metis_cli.rewards.checkers import get_checker

    check = get_checker(reward_cfg.checker)
    return lambda question, prediction, gold: check(prediction, gold)


def score_rollouts(rollouts, examples, checker: QuestionChecker, reward_cfg, *, retries: int = 0,
                   max_concurrency: int = 8) -> list[RolloutScore]:
    """One RolloutScore per rollout; `examples[r.prompt_index]` holds its question and gold answer."""

    def score(rollout) -> RolloutScore:
        example = examples[rollout.prompt_index]
        result = None
        for _ in range(retries + 1):
            result = score_rollout(
                rollout.assistant_texts, example.answer or "", rollout.tool_calls,
                lambda prediction, gold: checker(example.question, prediction, gold),
                reward_cfg.acc_weight, reward_cfg.format_weight,
            )
            if result.correct is not None:
                break
        return result

    if reward_cfg.checker != "judge":
        return [score(r) for r in rollouts]
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        return list(pool.map(score, rollouts))


def subset_summary(rollouts, scores: list[RolloutScore], examples) -> dict[str, dict[str, float]]:
    """Per subset: accuracy, tool_call_ratio (share with T >= 1), tool_calls_mean, tool_errors,
    generated_tokens_mean, unscored. Accuracy is over scored rollouts."""
    groups: dict[str, list[tuple]] = defaultdict(list)
    for rollout, score in zip(rollouts, scores):
        groups[examples[rollout.prompt_index].subset].append((rollout, score))
    summary = {}
    for subset, pairs in sorted(groups.items()):
        scored = [s for _, s in pairs if s.correct is not None]
        n = len(pairs)
        summary[subset] = {
            "n": n,
            "accuracy": sum(s.correct for s in scored) / len(scored) if scored else float("nan"),
            "tool_call_ratio": sum(r.tool_calls >= 1 for r, _ in pairs) / n,
            "tool_calls_mean": sum(r.tool_calls for r, _ in pairs) / n,
            "tool_errors": sum(sum(r.tool_errors.values()) for r, _ in pairs),
            "generated_tokens_mean": sum(r.generated_tokens for r, _ in pairs) / n,
            "unscored": n - len(scored),
        }
    return summary

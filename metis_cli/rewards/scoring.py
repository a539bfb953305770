"""HDPO's two rewards for one finished rollout (docs/algorithm.md).

    r_acc  = acc_weight * correct + format_weight * format_ok      (0.9 / 0.1 in the paper)
    r_tool = 1 / (T + 1) if correct else 0                         (T = tool calls made)

`correct` comes from a checker `(prediction, gold) -> bool | None`: one of rewards/checkers.py,
or a judge wrapped as `lambda pred, gold: judge.score(question, pred, gold)`; a list gold answer
scores its best match. None means the rollout could not be scored; then both rewards are None
and the advantage code leaves the rollout out of its group (unless the recipe says
`reward.judge.on_failure: incorrect`, see `scored_incorrect`). A rollout without an `<answer>`
is wrong (False), not unscored. Which answer counts and which format rule applies are the
recipe's `reward.answer_position` and `reward.format` (rewards/answer.py, rewards/format.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metis_cli.rewards.answer import rollout_answer
from metis_cli.rewards.checkers import Gold, best_match
from metis_cli.rewards.format import format_ok as check_format


@dataclass
class RolloutScore:
    """correct is None when unscored. scoring_failed: the checker gave no verdict and the rollout
    was scored as incorrect anyway (`reward.judge.on_failure: incorrect`)."""

    correct: bool | None
    format_ok: bool
    r_acc: float | None
    r_tool: float | None
    answer: str | None
    scoring_failed: bool = False


def score_rollout(
    assistant_texts: list[str],
    gold: Gold,
    tool_calls: int,
    checker: Callable[[str, str], bool | None],
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
    *,
    format_rule: str = "metis",
    answer_position: str = "last",
) -> RolloutScore:
    """Score one rollout from its assistant turns (tool turns excluded) and its tool-call count."""
    answer = rollout_answer(assistant_texts, answer_position)
    well_formed = check_format(assistant_texts, format_rule)
    correct = False if answer is None else best_match(checker, answer, gold)
    if correct is None:
        return RolloutScore(None, well_formed, None, None, answer)
    correct = bool(correct)
    r_acc = acc_weight * float(correct) + format_weight * float(well_formed)
    r_tool = 1.0 / (tool_calls + 1) if correct else 0.0
    return RolloutScore(correct, well_formed, r_acc, r_tool, answer)


def scored_incorrect(score: RolloutScore, format_weight: float) -> RolloutScore:
    """An unscored rollout scored as a wrong answer (the official code's treatment of a judge
    failure; metis's default keeps it unscored instead)."""
    return RolloutScore(False, score.format_ok, format_weight * float(score.format_ok), 0.0, score.answer,
                        scoring_failed=True)

"""HDPO's two rewards for one finished rollout (DESIGN.md "HDPO, exactly").

    r_acc  = acc_weight * correct + format_weight * format_ok      (0.9 / 0.1 in the paper)
    r_tool = 1 / (T + 1) if correct else 0                         (T = tool calls made)

`correct` comes from a checker `(prediction, gold) -> bool | None`: one of rewards/checkers.py,
or a judge wrapped as `lambda pred, gold: judge.score(question, pred, gold)`. None means the
rollout could not be scored; then both rewards are None and the advantage code leaves the rollout
out of its group. A rollout without an `<answer>` is wrong (False), not unscored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metis_cli.rewards.answer import final_answer
from metis_cli.rewards.format import format_ok as check_format


@dataclass
class RolloutScore:
    correct: bool | None
    format_ok: bool
    r_acc: float | None
    r_tool: float | None
    answer: str | None


def score_rollout(
    assistant_texts: list[str],
    gold: str,
    tool_calls: int,
    checker: Callable[[str, str], bool | None],
    acc_weight: float = 0.9,
    format_weight: float = 0.1,
) -> RolloutScore:
    """Score one rollout from its assistant turns (tool turns excluded) and its tool-call count."""
    answer = final_answer(assistant_texts)
    well_formed = check_format(assistant_texts)
    correct = False if answer is None else checker(answer, gold)
    if correct is None:
        return RolloutScore(None, well_formed, None, None, answer)
    correct = bool(correct)
    r_acc = acc_weight * float(correct) + format_weight * float(well_formed)
    r_tool = 1.0 / (tool_calls + 1) if correct else 0.0
    return RolloutScore(correct, well_formed, r_acc, r_tool, answer)

"""The step's tool-economy figures from its rollouts and their scores: calls, errors and timeouts
per tool, the tool-call ratio among correct and among wrong rollouts, and the share of rollouts
that ran out of turns or tokens (names and meanings: telemetry/metrics.py, docs/metrics.md).

The ratio among correct rollouts is the figure that shows blind tool use directly: a model that
calls the calculator for 2 + 2 and gets it right still pays a call, and HDPO's efficiency channel
should drive this down first, while the ratio among wrong rollouts may stay high.

A pure function over plain attributes (`tool_calls`, `tool_trace`, `finish_reason` of
agent/rollout_types.py's Rollout; `correct` of rewards/scoring.py's RolloutScore, None when
unscored), so it needs neither the engine nor a model.

Must not touch: the rewards themselves (rewards/scoring.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from metis_cli.telemetry import metrics as m

OTHER_TOOL = "other"
"""Where calls that name no enabled tool are counted (model text must not invent metric keys)."""


def correctness_and_budgets(rollouts: Sequence, scores: Sequence) -> dict:
    """tool_call_ratio_correct / _wrong (over scored rollouts; None when there are none of that
    kind) and the shares that hit the turn and the token budget; rollouts[i] is scored by scores[i].
    rewards/batch.py `rollout_figures` includes these in every step's figures."""
    if len(rollouts) != len(scores):
        raise ValueError(f"{len(rollouts)} rollouts but {len(scores)} scores")
    correct = [r for r, s in zip(rollouts, scores) if s.correct is True]
    wrong = [r for r, s in zip(rollouts, scores) if s.correct is False]
    return {
        m.TOOL_CALL_RATIO_CORRECT: _called_share(correct),
        m.TOOL_CALL_RATIO_WRONG: _called_share(wrong),
        m.TURN_BUDGET_SHARE: _share(sum(r.finish_reason == "max_turns" for r in rollouts), len(rollouts)),
        m.TOKEN_BUDGET_SHARE: _share(sum(r.finish_reason == "length" for r in rollouts), len(rollouts)),
    }


def per_tool_figures(rollouts: Sequence, tool_names: Iterable[str]) -> dict:
    """`tools/<tool>/calls|errors|timeouts` for every enabled tool (zeros included), plus
    `tools/other/...` when calls named no enabled tool; malformed calls (no name) are left out."""
    names = list(tool_names)
    counts = {name: {"calls": 0, "errors": 0, "timeouts": 0} for name in names}
    for rollout in rollouts:
        for name, error in rollout.tool_trace:
            if name is None:  # malformed: no tool to charge it to (malformed_tool_calls counts it)
                continue
            figures = counts.setdefault(name if name in names else OTHER_TOOL, {"calls": 0, "errors": 0, "timeouts": 0})
            figures["calls"] += 1
            figures["errors"] += error is not None
            figures["timeouts"] += error == "timeout"
    return {m.tool_key(name, figure): value for name, figures in counts.items() for figure, value in figures.items()}


def _called_share(rollouts: list) -> float | None:
    return _share(sum(r.tool_calls >= 1 for r in rollouts), len(rollouts))


def _share(count: int, total: int) -> float | None:
    return count / total if total else None

"""Filter 2, execution consistency: re-run every recorded tool call through the tool registry.

A trajectory is dropped when one of its calls fails on re-execution (unknown tool, bad
arguments, a tool error, a timeout) or when the output recorded in its `tool` turn differs from
what re-execution gives: training on it would teach the model "hallucinated environment
dynamics" (a calculator that says 123 * 45 = 5000). Outputs are compared with whitespace
collapsed; tools listed in `ignore_output_of` (non-deterministic ones) must still succeed, but
their outputs are not compared. Each call is re-run on its own (`calls_so_far=0`): the question is
whether the recorded call reproduces, not whether it fits this recipe's per-rollout call limit.
All calls of a batch of rows go to the registry at once, so they run concurrently.
"""

from __future__ import annotations

from metis_cli.curate.rows import Candidate
from metis_cli.curate.validity import RecordedCall, recorded_calls


class ExecutionFilter:
    name = "execution"

    def __init__(self, registry, ignore_output_of: list[str]):
        self.registry = registry
        self.ignore_output_of = set(ignore_output_of)

    def apply(self, rows: list[Candidate]) -> None:
        pending: list[tuple[Candidate, RecordedCall]] = []
        for row in rows:
            calls = recorded_calls(row.example.trajectory or [])
            if not calls:
                row.note(self.name, "no tool calls")
            pending += [(row, call) for call in calls]
        if not pending:
            return
        results = self.registry.execute_many([(call.call, 0) for _, call in pending])
        for (row, call), result in zip(pending, results):
            if not row.kept:
                continue  # an earlier call of this row already failed; report the first problem
            if not result.ok:
                row.drop(self.name, "tool call fails on re-execution",
                         f"{call.describe()}: {result.error}: {_clip(result.text)}")
            elif call.recorded_output is None:
                row.drop(self.name, "tool call without a recorded output", f"{call.describe()} has no tool turn")
            elif call.call.name not in self.ignore_output_of and not _same(call.recorded_output, result.text):
                row.drop(self.name, "recorded tool output differs from re-execution",
                         f"{call.describe()}: recorded {_clip(call.recorded_output)!r}, "
                         f"re-execution gives {_clip(result.text)!r}")


def _same(recorded: str, actual: str) -> bool:
    return recorded.split() == actual.split()


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

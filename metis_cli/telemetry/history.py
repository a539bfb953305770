"""One stage's metrics.jsonl records merged per step, and what they imply: what the dashboard
(`tui/`) and the training curves of `metis eval`'s plot (`evaluation/plot.py`) read.

Records for the same step are merged (an eval line may follow the train line of its step), and a
step logged again after a resume replaces the earlier values, so charts show one value per step.
Derived numbers (ETA, warning totals, eval subsets) are computed here, not in widgets. Field
names come from `telemetry.metrics`. Torch-free.
"""

from __future__ import annotations

import bisect
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from metis_cli.telemetry import metrics as m

# Per-step counters that mean something went wrong; shown as warnings (key -> words for a person).
WARNING_COUNTERS = {
    m.TOOL_TIMEOUTS: "timeouts",
    m.UNSCORED: "unscored",
    m.TOOL_ERRORS: "tool errors",
    m.MALFORMED_TOOL_CALLS: "malformed",
}

# Steps whose timing feeds the ETA: recent enough to follow a slowdown, many enough to be steady.
ETA_WINDOW_STEPS = 20


def as_number(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class MetricsHistory:
    """Records of one stage by step, ascending."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._by_step: dict[int, dict] = {}
        self._eval_subsets: set[str] = set()
        # key -> (steps, values) with a number for key; kept up to date as steps arrive at the
        # end (the usual case), rebuilt lazily after anything else. Redraws read only these.
        self._columns: dict[str, tuple[list[float], list[float]]] = {}
        self.records_without_step = 0

    def add(self, records: Iterable[dict]) -> int:
        """Merge records in; returns how many had a usable step."""
        added = 0
        for record in records:
            step = record.get(m.STEP)
            if isinstance(step, bool) or not isinstance(step, int):
                self.records_without_step += 1
                continue
            at_end = not self._steps or step >= self._steps[-1]
            if step in self._by_step:
                self._by_step[step] = {**self._by_step[step], **record}
            else:
                bisect.insort(self._steps, step)
                self._by_step[step] = dict(record)
            if at_end:
                self._extend_columns(step, record)
            else:
                self._columns.clear()
            self._eval_subsets.update(split[0] for split in map(m.split_eval_key, record) if split is not None)
            added += 1
        return added

    def _extend_columns(self, step: int, record: dict) -> None:
        for key, (steps, values) in self._columns.items():
            number = as_number(record.get(key))
            if number is None:
                continue
            if steps and steps[-1] == step:
                values[-1] = number
            else:
                steps.append(float(step))
                values.append(number)

    def _column(self, key: str) -> tuple[list[float], list[float]]:
        if key not in self._columns:
            steps: list[float] = []
            values: list[float] = []
            for step in self._steps:
                number = as_number(self._by_step[step].get(key))
                if number is not None:
                    steps.append(float(step))
                    values.append(number)
            self._columns[key] = (steps, values)
        return self._columns[key]

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def records(self) -> list[dict]:
        return [self._by_step[step] for step in self._steps]

    @property
    def latest_record(self) -> dict:
        return self._by_step[self._steps[-1]] if self._steps else {}

    @property
    def latest_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def latest(self, key: str) -> Any:
        """The newest value logged for `key` (None if never logged)."""
        for step in reversed(self._steps):
            if key in self._by_step[step]:
                return self._by_step[step][key]
        return None

    def latest_number(self, key: str) -> float | None:
        """The newest value of `key` as a number; None when it was never logged, or when the newest
        record that has it logged null (accuracy with nothing scored shows as unknown, not stale)."""
        return as_number(self.latest(key))

    def series(self, key: str, max_points: int | None = None) -> tuple[list[float], list[float]]:
        """(steps, values) where `key` has a number; averaged into `max_points` buckets if longer."""
        steps, values = self._column(key)
        if max_points is not None and len(steps) > max_points:
            return _bucket_means(steps, max_points), _bucket_means(values, max_points)
        return list(steps), list(values)

    @property
    def total_steps(self) -> int | None:
        number = self.latest_number(m.TOTAL_STEPS)
        return int(number) if number is not None else None

    @property
    def last_checkpoint(self) -> str | None:
        value = self.latest(m.CHECKPOINT)
        return str(value) if value else None

    def total(self, key: str) -> float:
        """Sum of a per-step counter over the run."""
        return sum(self._column(key)[1])

    def warning_totals(self) -> dict[str, int]:
        """Nonzero warning counters summed over the run, keyed by the words to show."""
        totals = {words: int(self.total(key)) for key, words in WARNING_COUNTERS.items()}
        return {words: count for words, count in totals.items() if count > 0}

    def eval_subsets(self) -> list[str]:
        """Subsets with held-out eval numbers (`eval/<subset>/<metric>` keys), sorted."""
        return sorted(self._eval_subsets)

    def latest_eval_step(self) -> int | None:
        for step in reversed(self._steps):
            if any(m.split_eval_key(key) is not None for key in self._by_step[step]):
                return step
        return None

    def seconds_per_step(self) -> float | None:
        """Median step time over the recent window: logged `step_s`, else gaps between `time`s."""
        recent = self._steps[-ETA_WINDOW_STEPS:]
        logged = [as_number(self._by_step[step].get(m.STEP_S)) for step in recent]
        durations = [seconds for seconds in logged if seconds is not None and seconds > 0]
        if not durations:
            timed = [(step, as_number(self._by_step[step].get(m.TIME))) for step in recent]
            timed = [(step, at) for step, at in timed if at is not None]
            durations = [
                (later_at - earlier_at) / (later_step - earlier_step)
                for (earlier_step, earlier_at), (later_step, later_at) in zip(timed, timed[1:])
                if later_step > earlier_step and later_at >= earlier_at
            ]
        return statistics.median(durations) if durations else None

    def eta_s(self) -> float | None:
        """Seconds until `total_steps`, at the recent pace (None when unknown)."""
        total, step, pace_s = self.total_steps, self.latest_step, self.seconds_per_step()
        if total is None or step is None or pace_s is None:
            return None
        return max(0, total - step) * pace_s

    @property
    def reached_total(self) -> bool:
        total, step = self.total_steps, self.latest_step
        return total is not None and step is not None and step >= total


def load_history(metrics_path: Path) -> MetricsHistory:
    """A MetricsHistory of one metrics.jsonl file; corrupt lines are skipped."""
    history = MetricsHistory()
    history.add(m.read_metrics(metrics_path))
    return history


def _bucket_means(values: list[float], buckets: int) -> list[float]:
    size = len(values) / buckets
    means = []
    for index in range(buckets):
        chunk = values[int(index * size) : max(int((index + 1) * size), int(index * size) + 1)]
        means.append(sum(chunk) / len(chunk))
    return means

"""Where the dashboard's numbers come from: which stage folder to show, and what is new in it.

A RUN_DIR given to `metis watch` is resolved by `find_stage`: a folder holding metrics.jsonl is
shown as it is; otherwise `hdpo/` is preferred over `sft/`; if neither exists yet, the dashboard
waits. While following a run folder that shows `sft/`, an `hdpo/` folder appearing switches the
view to it (the pipeline moved on from cold start to RL).

Reads only; never writes into the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from metis_cli.telemetry import metrics as m
from metis_cli.tui.metrics_tail import LatestRollouts, MetricsTail, RolloutBatch

STAGES = ("hdpo", "sft")  # in order of preference when a run folder holds both


@dataclass(frozen=True)
class StageLocation:
    stage_dir: Path
    stage: str | None  # None: not known from the folder name; the records' "stage" field tells


def find_stage(folder: Path) -> StageLocation | None:
    """The stage folder to show for `folder` (a run folder or a stage folder), None if none yet."""
    folder = Path(folder)
    named_stage = folder.name if folder.name in STAGES else None
    if (folder / "metrics.jsonl").is_file() or named_stage:
        return StageLocation(folder, named_stage)
    for stage in STAGES:
        if (folder / stage).is_dir():
            return StageLocation(folder / stage, stage)
    return None


@dataclass
class SourcePoll:
    """What one poll found."""

    records: list[dict] = field(default_factory=list)
    rollouts: RolloutBatch | None = None
    reset: bool = False  # forget everything shown so far: another stage, or metrics.jsonl replaced


class StageSource:
    """Reads a stage folder incrementally; optionally follows a run folder to its newest stage."""

    def __init__(self, location: StageLocation | None, *, follow_run_dir: Path | None = None):
        self._run_dir = Path(follow_run_dir) if follow_run_dir is not None else None
        self.location: StageLocation | None = None
        self.stage: str | None = None
        self._tail: MetricsTail | None = None
        self._rollouts: LatestRollouts | None = None
        self._restarts_seen = 0
        if location is not None:
            self._switch_to(location)

    @classmethod
    def for_stage(cls, stage_dir: Path, stage: str | None = None) -> StageSource:
        """A source reading one known stage folder (which may not exist yet)."""
        return cls(StageLocation(Path(stage_dir), stage))

    @classmethod
    def following(cls, run_dir: Path) -> StageSource:
        """A source for `metis watch RUN_DIR`: resolves (and re-resolves) the stage to show."""
        return cls(None, follow_run_dir=run_dir)

    @property
    def stage_dir(self) -> Path | None:
        return self.location.stage_dir if self.location else None

    @property
    def metrics_path(self) -> Path | None:
        return self._tail.path if self._tail else None

    @property
    def corrupt_lines(self) -> int:
        return self._tail.corrupt_lines if self._tail else 0

    def waiting_for(self) -> str:
        """The path the dashboard is waiting for, for the 'waiting for ...' message."""
        if self.location is None:
            return f"{self._run_dir}/{{{','.join(STAGES)}}}/metrics.jsonl"
        return str(self.location.stage_dir / "metrics.jsonl")

    def poll(self) -> SourcePoll:
        result = SourcePoll()
        if self._run_dir is not None:
            located = find_stage(self._run_dir)
            if located is not None and located != self.location and self._may_switch_to(located):
                self._switch_to(located)
                result.reset = True
        if self._tail is None or self._rollouts is None:
            return result
        result.records = self._tail.read_new()
        if self._tail.restarts != self._restarts_seen:
            self._restarts_seen = self._tail.restarts
            result.reset = True
        if self.stage is None:
            self.stage = next(
                (record[m.STAGE] for record in result.records if record.get(m.STAGE) in STAGES), None
            )
        result.rollouts = self._rollouts.poll()
        return result

    def _may_switch_to(self, located: StageLocation) -> bool:
        # Only ever move forward (nothing -> sft -> hdpo); never flap back.
        if self.location is None:
            return True
        return self.location.stage == "sft" and located.stage == "hdpo"

    def _switch_to(self, location: StageLocation) -> None:
        self.location = location
        self.stage = location.stage
        self._tail = MetricsTail(location.stage_dir / "metrics.jsonl")
        self._rollouts = LatestRollouts(location.stage_dir / "rollouts")
        self._restarts_seen = 0

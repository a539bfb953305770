"""Experiment trackers: what a stage writes to metrics.jsonl, mirrored to TensorBoard and W&B.

`run.report_to: [tensorboard, wandb]` (default: none). metrics.jsonl stays the source of truth;
a tracker is a copy for people who already live in those tools:
- every numeric field of every metrics.jsonl row, at its `step` (held-out eval figures keep
  their `eval/<subset>/<figure>` keys, so each subset gets its own curves);
- the resolved recipe, as the W&B run config and as a TensorBoard text entry at step 0;
- the sampled rollouts a stage saves (`<stage>/rollouts/*.jsonl`, hdpo's `samples_to_save`), as
  a W&B table and TensorBoard text, at the step they were saved (image parts as `[image WxH]`).
TensorBoard writes to `<stage>/tensorboard/` (`tensorboard --logdir runs/NAME` shows both
stages); W&B to `<stage>/wandb/`, project `$WANDB_PROJECT` (default "metis"), one run per stage
whose id is kept in `<stage>/wandb_run_id` so a resumed stage continues it. `WANDB_MODE=offline`
logs without network (`wandb sync` uploads later).

A tracker that cannot start (not installed, W&B without an API key or network) is one warning
at start, and training goes on without it; one that fails later is one warning and is dropped.

How stages get them without wiring: `write_resolved_recipe` (telemetry/run.py) announces the
recipe here, and the `MetricsLog` a stage then opens in its folder (`sft.output`,
`hdpo.output`) asks `for_stage_dir` for the trackers that recipe asks for. docs/metrics.md lists
the fields.

Must not touch: what is written to metrics.jsonl (telemetry/metrics.py, telemetry/run.py).
Torch-free at import: TensorBoard's writer is imported when a run asks for it.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path
from typing import Protocol

from metis_cli.telemetry.message_text import image_sizes, message_text

log = logging.getLogger("metis.trackers")

TRACKERS = ("tensorboard", "wandb")
STAGES = ("sft", "hdpo")
NOT_SCALARS = {"stage", "step", "total_steps", "time"}
"""metrics.jsonl fields that are labels or the x axis, not curves."""
ROLLOUT_COLUMNS = ("step", "prompt_id", "sample", "subset", "question", "gold", "final_answer", "correct",
                   "tool_calls", "tool_errors", "r_acc", "r_tool", "adv_acc", "adv_tool")
INSTALL_HINT = "install it with: pip install 'metis-cli[track]'"


class Tracker(Protocol):
    name: str

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def log_rollouts(self, rows: list[dict], step: int) -> None: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------------ finding them
_announced: dict[Path, tuple[object, str]] = {}


def announce(recipe) -> None:
    """Remember `recipe` as the one whose stages' MetricsLog opens trackers (write_resolved_recipe)."""
    for stage in STAGES:
        _announced[Path(getattr(recipe, stage).output).resolve()] = (recipe, stage)


def for_stage_dir(stage_dir: Path) -> Trackers | None:
    """The trackers the announced recipe asks for in `stage_dir`; None when it asks for none."""
    found = _announced.get(Path(stage_dir).resolve())
    if found is None or not found[0].run.report_to:
        return None
    recipe, stage = found
    return open_trackers(recipe, stage, Path(stage_dir))


def open_trackers(recipe, stage: str, stage_dir: Path) -> Trackers:
    """Start every tracker in `recipe.run.report_to` for one stage; those that cannot start are warned about."""
    trackers = []
    for name in dict.fromkeys(recipe.run.report_to):
        try:
            trackers.append(_OPENERS[name](recipe, stage, Path(stage_dir)))
        except Exception as error:  # noqa: BLE001 - a tracker never stops training
            log.warning("trackers: %s is off for this %s run (training goes on): %s", name, stage, _why(error))
    return Trackers(trackers, Path(stage_dir))


def _why(error: Exception) -> str:
    if isinstance(error, ImportError):
        return f"{error.name} is not installed; {INSTALL_HINT}" if error.name else f"{error}; {INSTALL_HINT}"
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------ one stage's set
class Trackers:
    """The trackers of one stage: `log(record)` for every metrics.jsonl row."""

    def __init__(self, trackers: list[Tracker], stage_dir: Path):
        self.trackers = trackers
        self.rollouts_dir = stage_dir / "rollouts"
        self._rollout_files = set(self._rollout_paths())  # an earlier session's samples are logged already

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.trackers]

    def log(self, record: dict) -> None:
        step = record.get("step")
        if not isinstance(step, int) or not self.trackers:
            return
        values = scalars(record)
        new_rollouts = self._new_rollouts()
        for tracker in list(self.trackers):
            try:
                tracker.log_scalars(values, step)
                for rows in new_rollouts:
                    tracker.log_rollouts(rows, step)
            except Exception as error:  # noqa: BLE001
                log.warning("trackers: %s failed and is off from step %d on (metrics.jsonl goes on): %s",
                            tracker.name, step, _why(error))
                self._drop(tracker)
        total = record.get("total_steps")
        if isinstance(total, int) and step >= total:
            self.close()

    def resumed_at(self, step: int) -> None:
        """The stage goes on after `step`: steps logged after it are redone (TensorBoard drops them)."""
        for tracker in self.trackers:
            purge = getattr(tracker, "purge_after", None)
            if purge is not None:
                purge(step)

    def close(self) -> None:
        for tracker in list(self.trackers):
            self._drop(tracker)

    def _drop(self, tracker: Tracker) -> None:
        self.trackers.remove(tracker)
        try:
            tracker.close()
        except Exception as error:  # noqa: BLE001
            log.warning("trackers: closing %s failed: %s", tracker.name, _why(error))

    def _rollout_paths(self) -> list[Path]:
        return sorted(self.rollouts_dir.glob("*.jsonl")) if self.rollouts_dir.is_dir() else []

    def _new_rollouts(self) -> list[list[dict]]:
        batches = []
        for path in self._rollout_paths():
            if path not in self._rollout_files:
                self._rollout_files.add(path)
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                if rows:
                    batches.append(rows)
        return batches


def scalars(record: dict) -> dict[str, float]:
    """The record's curves: finite numbers (booleans as 0/1), labels and the x axis left out."""
    return {key: float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and math.isfinite(value)}


def transcript(row: dict) -> str:
    """A saved rollout's messages as markdown text, image parts as `[image WxH]` with the sizes
    the row gives (telemetry/message_text.py, what the TUI shows)."""
    sizes = image_sizes(row)  # shared over the messages: sizes go in order of appearance
    return "\n\n".join(f"**{m.get('role')}**: {message_text(m, sizes).strip()}"
                       for m in row.get("messages") or [] if isinstance(m, dict))


# ------------------------------------------------------------------------------ TensorBoard
class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, recipe, stage: str, stage_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        from metis_cli.recipe import recipe_to_yaml

        self._writer_type = SummaryWriter
        self.log_dir = stage_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir))
        self.writer.add_text("recipe", f"```yaml\n{recipe_to_yaml(recipe)}\n```", 0)
        self.writer.flush()

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # readers (tensorboard, a killed run) see each step at once

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        parts = []
        for row in rows:
            header = ", ".join(f"{column}={row.get(column)}" for column in ROLLOUT_COLUMNS[1:] if column in row)
            parts.append(f"{header}\n\n{transcript(row)}")
        self.writer.add_text("rollouts", "\n\n---\n\n".join(parts), step)
        self.writer.flush()

    def purge_after(self, step: int) -> None:
        self.writer.close()
        self.writer = self._writer_type(str(self.log_dir), purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------ Weights & Biases
class WandbTracker:
    name = "wandb"

    def __init__(self, recipe, stage: str, stage_dir: Path):
        import wandb

        _require_wandb_credentials()
        id_file = stage_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "metis"), name=f"{recipe.run.name}-{stage}",
            group=recipe.run.name, job_type=stage, dir=str(stage_dir), id=run_id, resume="allow",
            config=recipe.model_dump(mode="json"), reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        id_file.write_text(run_id + "\n")
        self._table = wandb.Table

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_rollouts(self, rows: list[dict], step: int) -> None:
        columns = [*ROLLOUT_COLUMNS, "transcript"]
        data = [[_cell(row.get(column)) for column in ROLLOUT_COLUMNS] + [transcript(row)]
                for row in rows]
        self.run.log({"rollouts": self._table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _cell(value):
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def _require_wandb_credentials() -> None:
    """Online W&B without a key would prompt for one (or hang on a server): refuse it up front."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        if netrc.netrc().authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise RuntimeError("no W&B API key: set WANDB_API_KEY or run `wandb login`, or set WANDB_MODE=offline "
                       "to log locally and `wandb sync` later")


_OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}

"""Run and stage folders, and the append-only `metrics.jsonl` every consumer reads.

`runs/<name>/recipe.yaml` keeps the resolved recipe; each stage (`sft/`, `hdpo/`) owns a folder
with `metrics.jsonl`, `checkpoints/`, `final/` and, when it completed, `DONE.json`. A folder that
holds a finished run is never overwritten silently, and an unfinished one is only continued with
`--resume` or replaced with `--overwrite`. This module must stay torch-free (the TUI reads it).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from metis_cli.errors import RunFolderError
from metis_cli.files import append_whole, storage_errors, write_atomic

DONE_FILE = "DONE.json"
INPUTS_FILE = "inputs.json"
METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSONL writer: one object per line, flushed at once so tails see it. Each row
    also goes to the trackers the run's recipe asks for in this folder (`run.report_to`,
    telemetry/trackers.py), after it is written."""

    def __init__(self, path: Path):
        from metis_cli.telemetry import trackers

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = trackers.for_stage_dir(self.path.parent)

    def append(self, record: dict) -> None:
        cleaned = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(cleaned, default=str)
        append_whole(self.path, line + "\n")
        if self.trackers is not None:
            self.trackers.log(cleaned)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (they are redone when a run resumes)."""
        if self.trackers is not None:
            self.trackers.resumed_at(step)
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        write_atomic(self.path, "".join(f"{line}\n" for line in kept))


def prepare_stage_dir(stage_dir: Path, *, resume: bool, overwrite: bool, command: str,
                      inputs: dict | None = None) -> Path:
    """Make the stage folder ready for a new run, or for resuming; refuse to clobber results.

    `inputs` (`stage_inputs`) are kept in INPUTS_FILE; resuming a run made with other inputs is
    refused, since the result would mix two recipes."""
    stage_dir = Path(stage_dir)
    done = stage_dir / DONE_FILE
    started = (stage_dir / METRICS_FILE).exists() or (stage_dir / "checkpoints").exists()
    inputs_path = stage_dir / INPUTS_FILE
    if resume and not overwrite and started and inputs is not None and inputs_path.exists():
        changed = _changed(json.loads(inputs_path.read_text()), inputs)
        if changed:
            raise RunFolderError(
                f"{stage_dir} holds an unfinished {command} run made with a different recipe "
                f"({describe_changes(changed)} changed); resuming would mix the two: restore those fields, "
                f"or pass --overwrite to start over"
            )
    if overwrite and stage_dir.exists():
        shutil.rmtree(stage_dir)
    elif done.exists() and not resume:
        raise RunFolderError(
            f"{stage_dir} already holds a finished {command} run; pass --overwrite to replace it "
            f"or set another run.name (e.g. --set run.name=NEW)"
        )
    elif started and not resume:
        raise RunFolderError(
            f"{stage_dir} holds an unfinished {command} run; pass --resume to continue it or --overwrite to start over"
        )
    stage_dir.mkdir(parents=True, exist_ok=True)
    if inputs is not None and not (resume and inputs_path.exists()):
        write_atomic(inputs_path, json.dumps(inputs, indent=2, default=str))
    from metis_cli.telemetry import control

    for what in control.REQUESTS:  # a request left by an earlier session must not stop this one
        control.clear(stage_dir, what)
    return stage_dir


def mark_done(stage_dir: Path, summary: dict) -> None:
    write_atomic(Path(stage_dir) / DONE_FILE, json.dumps({"finished_at": time.time(), **summary}, indent=2, default=str))


def is_done(stage_dir: Path) -> bool:
    return (Path(stage_dir) / DONE_FILE).exists()


STAGE_INPUTS = {"sft": ("run.seed", "model", "data.synthetic", "data.malformed_rows", "sft"),
                "hdpo": ("run.seed", "model", "data", "tools", "rollout", "reward", "hdpo")}
"""The recipe parts a stage's result depends on; DONE.json keeps them as `inputs`."""
_NOT_INPUTS = {
    "sft": {"data.synthetic.rl_prompts", "data.synthetic.eval_per_subset"},
    # the cold-start data reaches hdpo only through the SFT model it starts from
    "hdpo": {"data.synthetic.knowledge_examples", "data.synthetic.cold_start_examples",
             "data.synthetic.direct_answer_share", "data.synthetic.answer_noise", "data.synthetic.closeup_share"},
}
_BOOKKEEPING = {"eval_every", "save_every", "sample_every", "samples_to_save", "output", "max_unscored_share",
                "patience"}
"""Fields that change what is logged or where, or when a failing judge stops the run, not what is
trained (so `--resume --set reward.judge.patience=...` is allowed)."""


def stage_inputs(recipe, stage: str) -> dict:
    """{dotted field: value} of the recipe parts `stage` depends on (STAGE_INPUTS), flattened."""
    dumped = recipe.model_dump(mode="json")
    flat: dict = {}
    for part in STAGE_INPUTS[stage]:
        node = dumped
        for key in part.split("."):
            node = node[key]
        _flatten(node, part, flat)
    for name in recipe.data.synthetic.fields_for_other_tasks():  # runs recorded before the field match
        flat.pop(f"data.synthetic.{name}", None)
    return {key: value for key, value in flat.items() if key not in _NOT_INPUTS[stage]}


def changed_inputs(stage_dir: Path, recipe, stage: str) -> list[str]:
    """Fields whose value differs between the finished run in `stage_dir` and `recipe` (empty
    when they agree, or when the run predates DONE.json keeping its inputs)."""
    recorded = json.loads((Path(stage_dir) / DONE_FILE).read_text()).get("inputs")
    if recorded is None:
        return []
    return _changed(recorded, stage_inputs(recipe, stage))


def describe_changes(changed: list[str]) -> str:
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def _changed(recorded: dict, current: dict) -> list[str]:
    return sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))


def _flatten(node, prefix: str, into: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _BOOKKEEPING:
                _flatten(value, f"{prefix}.{key}", into)
    else:
        into[prefix] = node


def write_resolved_recipe(recipe) -> Path:
    """`<run.output_dir>/recipe.yaml`; also makes `recipe` the one whose `run.report_to` the
    stages' MetricsLog follows (telemetry/trackers.py)."""
    from metis_cli.recipe import recipe_to_yaml
    from metis_cli.telemetry import trackers

    trackers.announce(recipe)

    path = Path(recipe.run.output_dir) / "recipe.yaml"
    with storage_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, recipe_to_yaml(recipe))
    return path

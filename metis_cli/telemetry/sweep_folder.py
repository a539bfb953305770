"""The sweep folder `metis sweep` writes, and how every reader finds and reads it.

`<sweep>/sweep.json` is the one file that says a folder is a sweep: the plan (recipe, fixed
overrides, the grid's axes, seeds) and one entry per run (variant x seed) with its status and
final figures. `stages/sweep.py` writes it (atomically, after every change of a run's status);
`metis eval SWEEP`, the dashboard (`metis watch SWEEP`) and the report read it through this
module. Run folders are `<sweep>/runs/<variant>/seed-<seed>/`, shared SFT stages
`<sweep>/sft/seed-<seed>-<digest>/` (docs/sweep.md). Paths inside sweep.json are relative to the
sweep folder. Torch-free: the dashboard imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from metis_cli.errors import RunFolderError
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.history import MetricsHistory, load_history
from metis_cli.telemetry.run import METRICS_FILE

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = 1
STATUSES = ("pending", "running", "done", "failed", "stopped")
"""A run's status: `running` found by a later session means the sweep was killed during it."""
FINAL_FIGURES = (m.ACCURACY, m.TOOL_CALL_RATIO, m.TOOL_CALLS_MEAN)


def is_sweep_dir(folder: str | Path) -> bool:
    """True when `folder` holds a sweep.json (a sweep folder, finished or not)."""
    return (Path(folder) / SWEEP_FILE).is_file()


def read_sweep(folder: str | Path) -> dict:
    """sweep.json of `folder`; RunFolderError when it is missing, corrupt or of another format."""
    path = Path(folder) / SWEEP_FILE
    try:
        sweep = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{folder} is not a sweep folder (no {SWEEP_FILE}); `metis sweep RECIPE --out "
                             f"{folder}` makes one") from None
    except ValueError as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}); rerun `metis sweep ... --resume` to rewrite it") from None
    if not isinstance(sweep, dict) or sweep.get("format") != SWEEP_FORMAT or not isinstance(sweep.get("runs"), list):
        raise RunFolderError(f"{path} is not a metis sweep file of format {SWEEP_FORMAT}")
    return sweep


def run_path(folder: str | Path, run: dict, key: str = "run_dir") -> Path:
    """The absolute path of a run entry's `run_dir` (or another path key)."""
    return Path(folder) / run[key]


def final_figures(history: MetricsHistory) -> tuple[int | None, dict[str, dict]]:
    """(step, {subset: {figure: value}}) of the last held-out eval in an hdpo history."""
    step = history.latest_eval_step()
    if step is None:
        return None, {}
    return step, _eval_figures(next(r for r in history.records if r[m.STEP] == step))


def first_figures(history: MetricsHistory) -> dict[str, dict]:
    """{subset: {figure: value}} of step 0's eval: the model RL started from (the SFT model)."""
    records = history.records
    return _eval_figures(records[0]) if records and records[0].get(m.STEP) == 0 else {}


def run_history(folder: str | Path, run: dict) -> MetricsHistory | None:
    """The hdpo metrics of one run entry, None when the run wrote none yet."""
    path = run_path(folder, run) / "hdpo" / METRICS_FILE
    return load_history(path) if path.is_file() else None


def _eval_figures(record: dict) -> dict[str, dict]:
    figures: dict[str, dict] = {}
    for key, value in record.items():
        split = m.split_eval_key(key)
        if split is not None and split[1] in FINAL_FIGURES:
            figures.setdefault(split[0], {})[split[1]] = value
    return figures

"""Entry points into the dashboard: `metis watch RUN_DIR` and `metis hdpo|sft RECIPE --tui`.

`run_with_dashboard` starts training as a child process (`python -m metis_cli CHILD_ARGV`, output
appended to `<run folder>/train.log`), shows the dashboard in train mode, and returns the trainer's
exit code. Leaving with training still running (detach, or a dashboard crash) leaves it running
and says how to find it again. Never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from metis_cli.errors import MetisError, RunFolderError
from metis_cli.tui.app import Dashboard
from metis_cli.tui.training_process import TrainingProcess

TRAIN_LOG_NAME = "train.log"


def require_terminal(what: str) -> None:
    """The dashboard draws on an interactive terminal; refuse clearly instead of drawing garbage."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise MetisError(
            f"{what} needs an interactive terminal (stdin and stdout are not one here). "
            "Run training without --tui and read the run folder's metrics.jsonl, or open "
            "`metis watch RUN_DIR` in a terminal."
        )


def check_run_dir(run_dir: Path) -> None:
    """A run folder that can exist (now or later): its parent exists and it is not a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a run folder; give the folder a recipe's run.output_dir names")
    if not run_dir.parent.is_dir():
        raise RunFolderError(
            f"{run_dir.parent} does not exist, so no run folder {run_dir} can appear there; check the path "
            "(it is the recipe's run.output_dir, e.g. runs/<name>)"
        )


def watch(run_dir: Path) -> int:
    """Show a running or finished run (waits for it to appear); training is never affected."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    require_terminal("metis watch")
    return Dashboard(run_dir=run_dir, mode="watch").run() or 0


def run_with_dashboard(child_argv: list[str], stage_dir: Path, stage: str) -> int:
    """Train (`metis CHILD_ARGV` in a child process) with the dashboard open; the trainer's exit code."""
    stage_dir = Path(stage_dir)
    require_terminal("--tui")
    log_path = stage_dir.parent / TRAIN_LOG_NAME
    training = TrainingProcess.start_metis(child_argv, stage_dir=stage_dir, log_path=log_path)
    try:
        Dashboard(stage_dir, mode="train", stage=stage, training=training).run()
    finally:
        exit_code = training.poll()
        if exit_code is None:
            print(
                f"training goes on in the background (pid {training.pid}); log: {log_path}\n"
                f"watch it: metis watch {stage_dir.parent}   stop it: touch {stage_dir / 'control' / 'stop'}",
                file=sys.stderr,
            )
    if exit_code is None:
        return 0
    if exit_code != 0:
        print(f"training exited with code {exit_code}; end of {log_path}:\n{training.log_tail()}", file=sys.stderr)
    return exit_code

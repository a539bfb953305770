"""`metis watch RUN_DIR`: open the training dashboard on a running or finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import cli_command


@cli_command
def watch(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="Run folder (the recipe's run.output_dir) or one stage folder in it (runs/NAME/hdpo).",
            show_default=False,
        ),
    ],
) -> None:
    """Watch a run: live charts of tool use and both HDPO channels, rollouts, progress.

    Works on a running or finished run, and waits for one that has not started yet. Leaving
    (q) never affects training; c asks the trainer to save a checkpoint.
    """
    from metis_cli.tui.launch import watch as watch_run  # Textual loads only when this runs

    raise typer.Exit(watch_run(run_dir))

"""Requests from the dashboard to a running trainer, as empty files in `<stage_dir>/control/`.

- `checkpoint`: save a checkpoint after the current step (the trainer then `clear()`s the request).
- `stop`: save a checkpoint and exit cleanly.

The dashboard (another process) calls `request()`; the trainer polls `pending()` after each step,
acts, and calls `clear()`. Files rather than signals or sockets: they cross processes, survive a
dashboard that quits, and a person can make one by hand (`touch runs/demo/hdpo/control/stop`).

This module must stay free of torch: the TUI imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from metis_cli.errors import RunFolderError

REQUESTS = ("checkpoint", "stop")


def control_dir(stage_dir: Path) -> Path:
    """The folder holding a stage's pending requests."""
    return Path(stage_dir) / "control"


def request(stage_dir: Path, what: str) -> Path:
    """Ask the trainer of `stage_dir` to `what` ("checkpoint" or "stop"); returns the request file.

    The file appears atomically (made under a temporary name, then renamed), so a trainer polling
    the folder never sees a request half made. Asking twice is the same as asking once.
    """
    _check_request(what)
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        # Creating the stage folder here would make a trainer that has not started yet believe
        # the stage already ran.
        raise RunFolderError(
            f"{stage_dir} does not exist: the trainer has not started this stage yet, so there is "
            f"nothing to {what}. Start training first (metis hdpo/sft RECIPE)."
        )
    folder = control_dir(stage_dir)
    folder.mkdir(exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{what}.", dir=folder)
    os.close(descriptor)
    target = folder / what
    os.replace(temporary, target)
    return target


def pending(stage_dir: Path) -> set[str]:
    """The requests waiting in `stage_dir` (a subset of REQUESTS; half-made temp files ignored)."""
    try:
        names = os.listdir(control_dir(stage_dir))
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {name for name in names if name in REQUESTS}


def clear(stage_dir: Path, what: str) -> None:
    """Mark the request `what` as handled (no error if it was not pending)."""
    _check_request(what)
    (control_dir(stage_dir) / what).unlink(missing_ok=True)


def _check_request(what: str) -> None:
    if what not in REQUESTS:
        raise ValueError(f"unknown control request {what!r}; expected one of {', '.join(REQUESTS)}")

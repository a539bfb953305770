"""The training child of `--tui` mode: starting it, asking it to stop, killing it, reading its log.

Training runs in its own process (and process group) so the dashboard stays responsive and so a
dashboard that dies leaves training running (`metis watch` can attach again). A graceful stop
goes through the control files (`metis_cli.telemetry.control`); killing is the last resort.
Never imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from metis_cli.telemetry import control

# After SIGTERM, wait this long before SIGKILL: a trainer may be mid-write of a checkpoint.
KILL_GRACE_S = 10.0
LOG_TAIL_BYTES = 4096


def exit_status(returncode: int) -> int:
    """Popen's code as a shell reports it: a death by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class TrainingProcess:
    """A running trainer writing into `stage_dir`, with its output going to `log_path`."""

    def __init__(self, process: subprocess.Popen, *, stage_dir: Path, log_path: Path):
        self.process = process
        self.stage_dir = Path(stage_dir)
        self.log_path = Path(log_path)
        self.stop_requested_at: float | None = None
        self.terminated_at: float | None = None

    @classmethod
    def start(cls, command: list[str], *, stage_dir: Path, log_path: Path) -> TrainingProcess:
        """Start `command` with stdout and stderr appended to `log_path` and no terminal input."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {started} started: {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # terminal signals and a dying dashboard do not reach it
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return cls(process, stage_dir=stage_dir, log_path=log_path)

    @classmethod
    def start_metis(cls, child_argv: list[str], *, stage_dir: Path, log_path: Path) -> TrainingProcess:
        """Start `python -m metis_cli CHILD_ARGV` with this interpreter."""
        return cls.start([sys.executable, "-m", "metis_cli", *child_argv], stage_dir=stage_dir, log_path=log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """The exit status once the trainer has exited, else None (escalates a pending kill)."""
        returncode = self.process.poll()
        if returncode is not None:
            return exit_status(returncode)
        if self.terminated_at is not None and time.monotonic() - self.terminated_at > KILL_GRACE_S:
            self._signal_group(signal.SIGKILL)
        return None

    def request_stop(self) -> None:
        """Ask for a checkpoint and a clean exit after the current step."""
        self.stop_requested_at = time.monotonic()
        if self.stage_dir.is_dir():
            control.request(self.stage_dir, "stop")
        else:
            # Still loading (no stage folder yet): nothing to save, so stopping means ending it.
            self.terminate()

    def terminate(self) -> None:
        """SIGTERM to the trainer and anything it started; SIGKILL follows after KILL_GRACE_S."""
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
            self._signal_group(signal.SIGTERM)

    def seconds_since_stop_request(self) -> float | None:
        if self.stop_requested_at is None:
            return None
        return time.monotonic() - self.stop_requested_at

    def log_tail(self, lines: int = 12) -> str:
        """The last `lines` lines of the log (what a person needs to see why it died)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

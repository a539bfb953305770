"""Incremental, torch-free readers of what a trainer writes: metrics.jsonl and rollout samples.

`MetricsTail` follows one append-only metrics.jsonl the way `tail -f` does: it remembers its byte
offset, returns only lines that end in a newline (a line the trainer is still writing waits for
the next read), skips and counts lines that are not JSON objects, and returns nothing while the
file does not exist yet. `LatestRollouts` reads the newest `rollouts/step_*.jsonl`.

Neither writes anything, and neither may import torch: the dashboard and `metis watch` use them.
Lines are parsed by `telemetry.metrics.parse_json_lines`, the reader every consumer shares.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from metis_cli.telemetry.metrics import parse_json_lines

# One poll reads at most this much, so attaching to a huge finished run stays responsive.
MAX_READ_BYTES = 8 * 1024 * 1024

# The folder's mtime tells when a file was added; rescan anyway this often in case two files
# arrived within one mtime tick on a coarse-clock filesystem.
RESCAN_EVERY_S = 5.0

_ROLLOUT_FILE = re.compile(r"^step_(\d+)\.jsonl$")


class MetricsTail:
    """Follows one metrics.jsonl; call `read_new()` as often as you like."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset_bytes = 0
        self.corrupt_lines = 0
        # Bumped when the file shrank or was replaced: the caller should forget what it read.
        self.restarts = 0
        self._partial_line = b""
        self._identity: tuple[int, int] | None = None

    def read_new(self) -> list[dict]:
        """The records completed since the last call (empty while the file does not exist)."""
        try:
            handle = open(self.path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return []
        with handle:
            stat = os.fstat(handle.fileno())
            identity = (stat.st_dev, stat.st_ino)
            # Shrunk (cut back on resume) or replaced (--overwrite): read it again from the top.
            replaced = self._identity is not None and identity != self._identity
            if stat.st_size < self.offset_bytes or replaced:
                self.offset_bytes = 0
                self._partial_line = b""
                self.restarts += 1
            self._identity = identity
            handle.seek(self.offset_bytes)
            chunk = handle.read(MAX_READ_BYTES)
        self.offset_bytes += len(chunk)
        *complete_lines, self._partial_line = (self._partial_line + chunk).split(b"\n")
        records, corrupt = parse_json_lines(complete_lines)
        self.corrupt_lines += corrupt
        return records

    @property
    def waiting_for_more(self) -> bool:
        """True when the last read stopped inside a line the writer has not finished."""
        return bool(self._partial_line)


@dataclass(frozen=True)
class RolloutBatch:
    """The rollouts sampled at one step, read from `rollouts/step_<step>.jsonl`."""

    step: int
    path: Path
    rollouts: tuple[dict, ...]
    corrupt_lines: int = 0


class LatestRollouts:
    """Reads the newest rollout sample file of a stage, only when something changed."""

    def __init__(self, rollouts_dir: Path):
        self.rollouts_dir = Path(rollouts_dir)
        self._folder_mtime_ns: int | None = None
        self._scanned_at_s = float("-inf")
        self._newest_first: list[tuple[int, Path]] = []
        self._last_seen: tuple[Path, int, int] | None = None

    def poll(self) -> RolloutBatch | None:
        """A new batch when the newest sample file appeared or grew since the last poll, else None."""
        self._rescan_if_folder_changed()
        # The newest file may have no complete line yet: then show the one before it.
        for step, path in self._newest_first[:2]:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            seen = (path, stat.st_size, stat.st_mtime_ns)
            if seen == self._last_seen:
                return None
            lines = path.read_bytes().split(b"\n")[:-1]  # the last piece has no newline yet
            rollouts, corrupt = parse_json_lines(lines)
            if rollouts:
                self._last_seen = seen
                return RolloutBatch(step=step, path=path, rollouts=tuple(rollouts), corrupt_lines=corrupt)
        return None

    def _rescan_if_folder_changed(self) -> None:
        try:
            mtime_ns = self.rollouts_dir.stat().st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            self._newest_first = []
            return
        now_s = time.monotonic()
        if mtime_ns == self._folder_mtime_ns and now_s - self._scanned_at_s < RESCAN_EVERY_S:
            return
        self._folder_mtime_ns = mtime_ns
        self._scanned_at_s = now_s
        found = []
        with os.scandir(self.rollouts_dir) as entries:
            for entry in entries:
                match = _ROLLOUT_FILE.match(entry.name)
                if match:
                    found.append((int(match.group(1)), Path(entry.path)))
        self._newest_first = sorted(found, reverse=True)

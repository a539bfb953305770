"""A per-call pids cgroup: the process cap that still holds when metis runs as root.

RLIMIT_NPROC (set inside the sandbox) is ignored by the kernel for uid 0, and CI containers run
as root, so there a fork bomb would be bounded only by the wall-clock timeout and could exhaust
the machine's pid space meanwhile. Where a pids cgroup (v1 `pids` hierarchy or v2 with the pids
controller delegated) is writable, each sandboxed call gets its own child cgroup with `pids.max`,
joined by the launcher before it execs anything, and removed after the call.

Must not touch cgroups it did not create.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import signal
import time
from pathlib import Path

_NAMES = itertools.count()
_REMOVE_ROUNDS, _REMOVE_PAUSE_S = 200, 0.01
# Joins the cgroup, then becomes the sandbox command: nothing runs outside the cap.
_JOIN_SCRIPT = 'echo $$ > "$0" && exec "$@"'


def _own_cgroup_dirs() -> list[Path]:
    """Folders of this process's cgroup in every mounted hierarchy that has the pids controller."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    v1_mount = v2_mount = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup" and "pids" in fields[3].split(","):
            v1_mount = Path(fields[1])
        elif fields[2] == "cgroup2":
            v2_mount = Path(fields[1])
    dirs = []
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if v1_mount is not None and "pids" in controllers.split(","):
            dirs.append(v1_mount / relative)
        elif hierarchy == "0" and v2_mount is not None:
            control = v2_mount / relative / "cgroup.subtree_control"
            if control.exists() and "pids" in control.read_text().split():
                dirs.append(v2_mount / relative)
    return dirs


def _remove_stale(parent: Path) -> None:
    """Delete empty cgroups left by metis processes that were killed mid-call."""
    for stale in parent.glob("metis-sandbox-*"):
        owner = stale.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                stale.rmdir()
            except OSError:
                pass  # still has processes, or not ours to remove


@functools.cache
def pids_cgroup_parent() -> Path | None:
    """A cgroup folder where this process may create pids-limited children, or None."""
    for parent in _own_cgroup_dirs():
        probe = parent / f"metis-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        usable = (probe / "pids.max").exists()
        probe.rmdir()
        if usable:
            _remove_stale(parent)
            return parent
    return None


class PidsCgroup:
    """One call's cgroup: create, wrap the command so it joins, then kill what is left and remove."""

    def __init__(self, parent: Path, max_pids: int):
        self.path = parent / f"metis-sandbox-{os.getpid()}-{next(_NAMES)}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_pids))

    def wrap(self, command: list[str]) -> list[str]:
        return ["/bin/sh", "-c", _JOIN_SCRIPT, str(self.path / "cgroup.procs"), *command]

    def _members(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def _kill_round(self) -> bool:
        """Delete the cgroup if empty (True), else kill what is in it and return False."""
        members = self._members()
        if not members:
            try:
                self.path.rmdir()
                return True
            except OSError:
                pass  # exiting processes still counted; retry shortly
        kill_switch = self.path / "cgroup.kill"  # cgroup v2 only
        if kill_switch.exists():
            kill_switch.write_text("1")
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return False

    async def remove(self) -> None:
        """Kill every process still in the cgroup, then delete it."""
        for _ in range(_REMOVE_ROUNDS):
            if self._kill_round():
                return
            await asyncio.sleep(_REMOVE_PAUSE_S)
        raise RuntimeError(f"could not remove sandbox cgroup {self.path}: processes keep running")

    def remove_blocking(self) -> None:
        """remove() for callers outside an event loop (ending a python session)."""
        for _ in range(_REMOVE_ROUNDS):
            if self._kill_round():
                return
            time.sleep(_REMOVE_PAUSE_S)
        raise RuntimeError(f"could not remove sandbox cgroup {self.path}: processes keep running")

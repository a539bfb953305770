"""One persistent python session (`tools.python.persistent`): a long-lived sandboxed interpreter
per rollout whose variables survive from one call to the next, like a notebook kernel.

The session is one sandboxed process started exactly like a one-off call (python_sandbox.py: same
isolation layer, scratch folder, scrubbed environment, resource limits and pids cgroup), but
running sandbox_prelude.py's session loop. Per call, the code is written to the scratch folder as
`call_<n>.py`, its path sent on a control pipe, and the worker answers one status line on a status
pipe; stdout and stderr share a third pipe, read with the call's output cap. Wall-clock and output
limits hold per call; the CPU limit per call too (the worker moves its soft limit each call), and
memory, open files and processes are capped for the whole session. A call that hits the wall
clock or the output cap, or whose code kills the interpreter, ends the session: it is killed, and
the rollout's next call starts a fresh one (the observation says so).

Pipes are read with `loop.add_reader` on whatever event loop runs the call, so a session outlives
the event loops of single batches (the turn-synchronous schedule starts one per turn).

Must not touch: the isolation layers (sandbox_isolation.py) or what an observation says
(python_sandbox.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.tools.pids_cgroup import PidsCgroup
from metis_cli.agent.tools.sandbox_isolation import Isolation, remove_scratch, scrubbed_env

# A session's CPU time is capped at this many calls' worth: the per-call limit is a soft limit the
# code itself could raise, up to this hard one.
SESSION_CPU_CALLS = 32
_POLL_S = 0.05
_EXIT_GRACE_S = 0.5  # how long a worker that stopped answering gets to exit by itself
_READ_CHUNK_BYTES = 65536


@dataclass
class SessionRun:
    """What one call in a session produced. exit_status: the call's status (the worker's own exit
    status when it died; None when it was stopped); ended: the session is gone after it."""

    output: bytes
    exit_status: int | None
    timed_out: bool
    overflowed: bool
    ended: bool


class PythonSession:
    """A started session. `run` one call at a time (`lock()`); `close` from any thread, any time."""

    def __init__(self, isolation: Isolation, limits, packages: tuple[Path, ...], prelude: list[str], *,
                 launcher_processes: int, open_files: int, cgroup: PidsCgroup | None):
        """Start the worker. `prelude`: the interpreter arguments that run sandbox_prelude.py;
        `cgroup`: a fresh pids cgroup the session joins and owns (removed by close), or None."""
        self.host_workdir = tempfile.mkdtemp(prefix="metis-python-session-")
        self.calls = 0
        self._locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._closed = False
        self.limits = limits
        command, self.workdir = isolation.command(self.host_workdir, packages)
        packages_dir = isolation.packages_dir(self.host_workdir, packages)
        control_read, self._control = os.pipe()
        self._status, status_write = os.pipe()
        self._output, output_write = os.pipe()
        own_pid_namespace = "1" if isolation.layer != "none" else "0"
        command += [*prelude, "--session", str(control_read), str(status_write), str(limits.memory_mb),
                    str(limits.cpu_time_s), str(limits.memory_mb * 2**20), str(open_files),
                    str(limits.max_processes + launcher_processes - 1), str(limits.cpu_time_s * SESSION_CPU_CALLS),
                    own_pid_namespace, packages_dir]  # fmt: skip
        self._cgroup = cgroup
        if cgroup is not None:
            command = cgroup.wrap(command)
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output_write, stderr=output_write,
                pass_fds=(control_read, status_write), cwd=self.host_workdir, env=scrubbed_env(self.host_workdir),
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            self._release()
            raise
        finally:
            for fd in (control_read, status_write, output_write):
                os.close(fd)
        os.set_blocking(self._status, False)
        os.set_blocking(self._output, False)
        self._status_text = b""

    @property
    def alive(self) -> bool:
        return not self._closed and self._process.poll() is None

    def lock(self) -> asyncio.Lock:
        """Serialises the calls of one rollout (several in one turn run concurrently otherwise)."""
        loop = asyncio.get_running_loop()
        if loop not in self._locks:
            self._locks[loop] = asyncio.Lock()
        return self._locks[loop]

    async def run(self, code: str) -> SessionRun:
        """Run one call; stops it at the wall clock or the output cap (ending the session)."""
        self.calls += 1
        name = f"call_{self.calls}.py"
        Path(self.host_workdir, name).write_text(code, encoding="utf-8")
        try:
            os.write(self._control, f"{self.workdir}/{name}\n".encode())
        except OSError:  # the worker is gone (its code killed it between calls, or it never started)
            return await self._ended(bytearray(), timed_out=False, overflowed=False)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        watched = [self._status, self._output]
        for fd in watched:
            loop.add_reader(fd, wake.set)
        deadline = loop.time() + self.limits.wall_timeout_s
        output = bytearray()
        try:
            while True:
                if self._drain_output(output, loop, watched):
                    return await self._ended(output, timed_out=False, overflowed=True)
                status = self._read_status(loop, watched)
                if status is not None:
                    self._drain_output(output, loop, watched)
                    return SessionRun(bytes(output), status, False, False, ended=False)
                if self._process.poll() is not None or self._status not in watched:
                    self._drain_output(output, loop, watched)
                    return await self._ended(output, timed_out=False, overflowed=False)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return await self._ended(output, timed_out=True, overflowed=False)
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), min(remaining, _POLL_S))
                except asyncio.TimeoutError:
                    pass
        except BaseException:  # cancelled (the registry's timeout, a stopped run): the state is unknown
            self.close()
            raise
        finally:
            for fd in watched:
                loop.remove_reader(fd)

    def _drain_output(self, output: bytearray, loop, watched: list[int]) -> bool:
        """Read what the pipe holds, keeping output_bytes + 1 bytes; True once over the cap."""
        cap = self.limits.output_bytes
        while True:
            try:
                chunk = os.read(self._output, _READ_CHUNK_BYTES)
            except BlockingIOError:
                break
            if not chunk:  # every writer closed it: stop watching, or the loop would spin
                if self._output in watched:
                    loop.remove_reader(self._output)
                    watched.remove(self._output)
                break
            output += chunk[: max(0, cap + 1 - len(output))]
            if len(output) > cap:
                return True
        return False

    def _read_status(self, loop, watched: list[int]) -> int | None:
        while b"\n" not in self._status_text:
            try:
                chunk = os.read(self._status, 64)
            except BlockingIOError:
                return None
            if not chunk:
                if self._status in watched:
                    loop.remove_reader(self._status)
                    watched.remove(self._status)
                return None
            self._status_text += chunk
        line, _, self._status_text = self._status_text.partition(b"\n")
        try:
            return int(line)
        except ValueError:
            return 1  # the code wrote to the status pipe itself; its session is confused, not broken

    async def _ended(self, output: bytearray, *, timed_out: bool, overflowed: bool) -> SessionRun:
        exited_by_itself = not (timed_out or overflowed)
        if exited_by_itself:  # the worker is gone or going: let the launcher report its exit status
            for _ in range(round(_EXIT_GRACE_S / _POLL_S)):
                if self._process.poll() is not None:
                    break
                await asyncio.sleep(_POLL_S)
        self.close()
        status = self._process.returncode if exited_by_itself else None
        return SessionRun(bytes(output[: self.limits.output_bytes]), status, timed_out, overflowed, ended=True)

    def close(self) -> None:
        """Kill the session's processes and remove its scratch folder and cgroup (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._process.wait()
        self._release()

    def _release(self) -> None:
        for fd in (self._control, self._status, self._output):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._cgroup is not None:
            self._cgroup.remove_blocking()
        started = time.perf_counter()
        while True:
            try:
                remove_scratch(self.host_workdir)
                return
            except OSError:  # a dying process still writing into it
                if time.perf_counter() - started > 2.0:
                    raise
                time.sleep(0.01)

"""The `python` tool: run model-written code in a sandboxed interpreter and return what it printed.

One call = one fresh temporary folder (the only writable place, removed afterwards), one process
tree in its own session, limits on wall clock, CPU time, memory, processes, file size and output
bytes, a scrubbed environment and no network. The base interpreter (not the venv's) runs with
`-I -S`, so model code sees the standard library only, never the project's packages. How strong
the isolation is depends on the layer available here (sandbox_isolation.py); the limits are set
by sandbox_prelude.py inside the sandbox.

With `tools.python.persistent`, the calls of one rollout share one long-lived sandboxed
interpreter instead (python_session.py), sandboxed the same way; `tools.python.packages` makes
chosen packages of metis's environment (numpy, PIL, ...) importable read-only. Both are off by
default: then the tool is exactly the one-call-one-process tool above. With
`tools.python.images`, the code also gets the conversation's images as files and the images it
saves under `outputs/` come back to the model (sandbox_images.py); the sandbox is unchanged.

Model mistakes and limit hits come back as error observations, never as exceptions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.tools.base import ToolContext, ToolErrorKind, ToolResult
from metis_cli.agent.tools.pids_cgroup import PidsCgroup
from metis_cli.agent.tools.python_session import PythonSession
from metis_cli.agent.tools.sandbox_images import collect_outputs, write_inputs
from metis_cli.agent.tools.sandbox_isolation import (
    choose_isolation,
    package_paths,
    remove_scratch,
    scrubbed_env,
    warn_once,
)
from metis_cli.agent.tools.sandbox_prelude import CPU_LIMIT_EXIT_STATUS

_PRELUDE_SOURCE = Path(__file__).with_name("sandbox_prelude.py").read_text(encoding="utf-8")
# bwrap's outer monitor and the namespace's pid 1 run beside the model's processes.
_LAUNCHER_PROCESSES = 2
_OPEN_FILES = 64
_READ_CHUNK_BYTES = 65536
# After the code exits, output still in the pipe is read for at most this long.
_DRAIN_GRACE_S = 0.5
SESSION_ENDED_NOTE = "(The python session ended: the next call starts a new one, without earlier variables.)"


@dataclass(frozen=True)
class PythonLimits:
    """Per-call limits (recipe `tools.python`)."""

    wall_timeout_s: float = 10.0
    cpu_time_s: int = 5
    memory_mb: int = 512  # address space; also the largest file the code may write
    output_bytes: int = 16384
    max_processes: int = 16  # processes and threads, the interpreter included


@dataclass
class _Run:
    output: bytes
    exit_status: int | None  # None when the process was stopped by us
    timed_out: bool
    overflowed: bool


def _kill_group(process_group: int) -> None:
    try:
        os.killpg(process_group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _read_capped(stream: asyncio.StreamReader, buffer: bytearray, cap: int, overflow: asyncio.Event) -> None:
    """Read the stream to EOF, keeping the first cap + 1 bytes; set overflow when there is more."""
    while chunk := await stream.read(_READ_CHUNK_BYTES):
        # Past the cap the data is drained and dropped, so the writer never blocks on a full pipe.
        buffer += chunk[: max(0, cap + 1 - len(buffer))]
        if len(buffer) > cap:
            overflow.set()


async def _open_output_pipe() -> tuple[int, asyncio.StreamReader, asyncio.ReadTransport]:
    """A pipe for the child's stdout+stderr that we own (and can close even if a stray process
    keeps its write end open): (write fd for the child, reader, transport)."""
    read_fd, write_fd = os.pipe()
    stream = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(read_fd, "rb", buffering=0)
    )
    return write_fd, stream, transport


async def _run_capped(command: list[str], *, cwd: str, env: dict, limits: PythonLimits) -> _Run:
    """Run command in a new session; stop it at the wall-clock deadline or the output cap."""
    write_fd, stream, transport = await _open_output_pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
            cwd=cwd, env=env, start_new_session=True,
        )  # fmt: skip
    except BaseException:
        transport.close()
        raise
    finally:
        os.close(write_fd)
    buffer = bytearray()
    overflow = asyncio.Event()
    reader = asyncio.ensure_future(_read_capped(stream, buffer, limits.output_bytes, overflow))
    waiter = asyncio.ensure_future(process.wait())
    overflow_seen = asyncio.ensure_future(overflow.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, overflow_seen}, timeout=limits.wall_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        timed_out = not done
        exited_by_itself = waiter.done() and not overflow.is_set()
    finally:
        # Kills the launcher and whatever the code left behind in its process group.
        _kill_group(process.pid)
        await process.wait()
        try:
            await asyncio.wait_for(reader, _DRAIN_GRACE_S)
        except asyncio.TimeoutError:
            pass  # a stray process kept the pipe open; what was read is kept
        overflow_seen.cancel()
        transport.close()
    return _Run(
        output=bytes(buffer[: limits.output_bytes]),
        exit_status=process.returncode if exited_by_itself else None,
        timed_out=timed_out,
        overflowed=len(buffer) > limits.output_bytes,
    )


def _signal_of(exit_status: int, launcher_reports_signals: bool) -> int | None:
    """The signal that ended the code, if any (bwrap/unshare report it as 128 + signal)."""
    if exit_status < 0:
        return -exit_status
    if launcher_reports_signals and exit_status > 128:
        return exit_status - 128
    return None


class PythonTool:
    """Runs Python code in a sandbox; the observation is its combined stdout and stderr.

    persistent: calls made with a `session` key (one per rollout, from the registry) share one
    interpreter (python_session.py) until `end_session`; calls without one stay one-off.
    packages: import names made importable read-only from metis's environment (numpy, PIL, ...).
    """

    name = "python"
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "A complete Python 3 program."}},
        "required": ["code"],
        "additionalProperties": False,
    }
    uses_sessions = True

    def __init__(self, limits: PythonLimits | None = None, sandbox: str = "auto", *, persistent: bool = False,
                 packages: tuple[str, ...] | list[str] = (), images: bool = False, max_images: int = 4,
                 max_image_pixels: int = 1024 * 1024):
        self.limits = limits or PythonLimits()
        self.isolation = choose_isolation(sandbox)
        self.persistent = persistent
        self.needs_context = images  # the registry then passes the conversation's images
        self.max_images = max_images
        self.max_image_pixels = max_image_pixels
        self.package_names = tuple(packages)
        self.packages = package_paths(self.package_names)
        self.description = self._describe()
        self._sessions: dict = {}
        self._sessions_lock = threading.Lock()
        # Sessions still open when metis exits are killed (bwrap's would die with us anyway).
        weakref.finalize(self, _close_all, self._sessions, self._sessions_lock)

    def _describe(self) -> str:
        library = "standard library only" if not self.package_names else (
            f"standard library plus {', '.join(self.package_names)}")
        images = (" The conversation's images are the files image_1.png, image_2.png, ... in the current "
                  "folder; images the code saves under outputs/ are shown to you.") if self.needs_context else ""
        if not self.persistent:
            return (f"Run Python 3 code ({library}) in a sandbox with no network and no files "
                    "outside a scratch folder; returns what the code prints (stdout and stderr). "
                    "Use print() to show results." + images)
        return (f"Run Python 3 code ({library}) in a sandbox with no network and no files outside a "
                "scratch folder. Like a notebook: variables, imports and files persist between calls "
                "while you answer this question; returns what the code prints (stdout and stderr) and "
                "the value of a final bare expression." + images)

    def _command(self, host_workdir: str) -> list[str]:
        command, workdir = self.isolation.command(host_workdir, self.packages)
        limits = self.limits
        packages_dir = self.isolation.packages_dir(host_workdir, self.packages)
        return command + [
            "-c", _PRELUDE_SOURCE, f"{workdir}/main.py", str(limits.memory_mb), str(limits.cpu_time_s),
            str(limits.memory_mb * 2**20), str(_OPEN_FILES), str(limits.max_processes + _LAUNCHER_PROCESSES - 1),
            *([packages_dir] if packages_dir else []),
        ]  # fmt: skip

    def _open_cgroup(self) -> PidsCgroup | None:
        if self.isolation.pids_cgroup is None:
            return None
        try:
            return PidsCgroup(self.isolation.pids_cgroup, self.limits.max_processes + _LAUNCHER_PROCESSES)
        except OSError as error:
            warn_once(f"python tool: no pids cgroup ({error}); fork bombs are stopped only by the timeout")
            return None

    async def call(self, arguments: dict, session=None, context: ToolContext | None = None) -> ToolResult:
        started = time.perf_counter()
        images = context.images if self.needs_context and context is not None else ()
        if self.persistent and session is not None:
            result = await self._call_in_session(arguments["code"], session, images)
        else:
            run, returned, notes = await self._run_once(arguments["code"], images)
            result = self._with_images(self._observation(run), returned, notes, len(images))
        result.runtime_s = time.perf_counter() - started
        return result

    async def _run_once(self, code: str, images=()) -> tuple[_Run, list, list[str]]:
        """(the run, images it saved under outputs/, notes on images not passed either way)."""
        host_workdir = tempfile.mkdtemp(prefix="metis-python-")
        cgroup = None
        try:
            Path(host_workdir, "main.py").write_text(code, encoding="utf-8")
            notes = write_inputs(host_workdir, images) if self.needs_context else []
            command = self._command(host_workdir)
            cgroup = self._open_cgroup()
            if cgroup is not None:
                command = cgroup.wrap(command)
            run = await _run_capped(command, cwd=host_workdir, env=scrubbed_env(host_workdir), limits=self.limits)
            returned, more_notes = self._collect(host_workdir)
            return run, returned, notes + more_notes
        finally:
            if cgroup is not None:
                await cgroup.remove()
            remove_scratch(host_workdir)

    def _collect(self, host_workdir: str) -> tuple[list, list[str]]:
        if not self.needs_context:
            return [], []
        return collect_outputs(host_workdir, max_images=self.max_images, max_pixels=self.max_image_pixels,
                               max_file_bytes=self.limits.memory_mb * 2**20)

    @staticmethod
    def _with_images(result: ToolResult, returned: list, notes: list[str], first_index: int) -> ToolResult:
        """`result` with the images the code saved, and a line saying which image numbers they got."""
        lines = list(notes)
        if returned:
            last = first_index + len(returned) - 1
            shown = f"image {first_index}" if last == first_index else f"images {first_index} to {last}"
            lines.append(f"(outputs/ shown as {shown})")
        if lines:
            result.text = "\n".join([result.text, *lines])
        result.images = returned
        return result

    def _session(self, key) -> PythonSession:
        with self._sessions_lock:
            session = self._sessions.get(key)
            if session is not None:
                if session.alive:
                    return session
                session.close()  # its worker died between calls: clean up, then start afresh
            session = PythonSession(self.isolation, self.limits, self.packages, ["-c", _PRELUDE_SOURCE],
                                    launcher_processes=_LAUNCHER_PROCESSES, open_files=_OPEN_FILES,
                                    cgroup=self._open_cgroup())
            self._sessions[key] = session
            return session

    async def _call_in_session(self, code: str, key, images=()) -> ToolResult:
        session = self._session(key)
        async with session.lock():
            notes = write_inputs(session.host_workdir, images) if self.needs_context else []
            run = await session.run(code)
            returned, more_notes = self._collect(session.host_workdir) if not run.ended else ([], [])
        if not run.ended:
            result = self._observation(_Run(run.output, run.exit_status, False, False))
            return self._with_images(result, returned, notes + more_notes, len(images))
        self.end_session(key, session)
        result = self._observation(_Run(run.output, run.exit_status, run.timed_out, run.overflowed))
        result.text += f"\n{SESSION_ENDED_NOTE}"
        return result

    def end_session(self, key, session: PythonSession | None = None) -> None:
        """Kill the session of `key` (a rollout's), if it has one; with `session`, only that one."""
        with self._sessions_lock:
            current = self._sessions.get(key)
            if current is None or (session is not None and current is not session):
                return
            del self._sessions[key]
        current.close()

    def _observation(self, run: _Run) -> ToolResult:
        output = run.output.decode("utf-8", errors="replace").rstrip()
        limits = self.limits

        def with_error(kind: str, message: str) -> ToolResult:
            return ToolResult(text=f"{output}\nError: {message}".lstrip("\n"), error=kind)

        if run.overflowed:
            return with_error(
                ToolErrorKind.LIMIT_EXCEEDED,
                f"output exceeded {limits.output_bytes} bytes; it was cut there and the code was stopped",
            )
        if run.timed_out:
            limit = f"wall-clock limit of {limits.wall_timeout_s:g} s"
            return with_error(ToolErrorKind.TIMEOUT, f"{limit} exceeded; the code was stopped")
        status = run.exit_status
        if status == 0:
            return ToolResult(text=output or "(no output; use print() to show results)")
        if status == CPU_LIMIT_EXIT_STATUS:
            limit = f"CPU time limit of {limits.cpu_time_s} s"
            return with_error(ToolErrorKind.TIMEOUT, f"{limit} exceeded; the code was stopped")
        stopped_by = _signal_of(status, launcher_reports_signals=self.isolation.layer != "none")
        if stopped_by is not None:
            name = signal.Signals(stopped_by).name if stopped_by in signal.valid_signals() else str(stopped_by)
            cause = "a CPU, memory or process limit, or a crash"
            return with_error(ToolErrorKind.CRASHED, f"the code was killed by {name} ({cause})")
        if output:
            return ToolResult(text=output, error=ToolErrorKind.TOOL_ERROR)
        return with_error(ToolErrorKind.TOOL_ERROR, f"the code exited with status {status}")


def _close_all(sessions: dict, lock: threading.Lock) -> None:
    with lock:
        open_sessions = list(sessions.values())
        sessions.clear()
    for session in open_sessions:
        session.close()

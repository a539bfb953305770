"""The first code run inside the python sandbox: set limits, deny sockets, then run the model's code.

This file is not imported by metis. Its text is passed to the sandboxed interpreter with
`python -I -S -c <this file> <code path> <limits...>`, so it may use the standard library only,
and it imports only C modules up front: every call pays for what is imported here (`signal`,
`socket` and `traceback` would add ~40 ms), so the pure-Python ones load only when needed.

Limits are set here, inside the sandbox, rather than in the launcher: RLIMIT_NPROC then counts
the processes of the sandbox's own user namespace, not every process of the user. Model code runs
in the same process afterwards and cannot raise the hard limits set here.

Sockets are denied in-process too: the only network guard when no network namespace is
available, and a clearer message than "Network is unreachable" when there is one. Replacing
`_socket.socket` covers `socket.socket` as well, which subclasses it and calls its `__init__`.

Two modes:
  - one call: `<code path> <limits...> [<packages dir>]` runs one file and exits with its status;
  - a session (`tools.python.persistent`, agent/tools/python_session.py): `--session <control fd>
    <status fd> <limits...> <session cpu s> <reap mode> <packages dir>` stays alive, reads one code
    path per line from the control fd, runs each in the same namespace (variables survive), and
    answers one status line per call on the status fd. Before each call the CPU soft limit is
    moved to "used so far + the per-call limit" (the hard limit caps the whole session); after
    it, every other process of the sandbox is killed (the call's leftovers), so nothing runs
    between calls but the session's own threads.
A packages dir (read-only, `tools.python.packages`) is appended to sys.path.
"""

from __future__ import annotations

import _signal
import _socket
import builtins
import os
import resource
import sys

# Exit status the launcher reads as "CPU time limit hit" (what a shell reports for SIGXCPU).
CPU_LIMIT_EXIT_STATUS = 128 + 24
_SIGXCPU, _SIGXFSZ = 24, 25  # Linux numbers; `signal` itself would import enum


class _NoNetworkSocket(_socket.socket):
    __slots__ = ()  # socket.socket subclasses this and adds its own __weakref__ slot

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        # socketpair() and wrapping an inherited fd are local plumbing; new sockets reach out.
        if fileno is None:
            raise PermissionError("network access is disabled in the python tool sandbox")
        _OriginalSocket.__init__(self, family, type, proto, fileno)


_OriginalSocket = _socket.socket


def _set_limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def _apply_limits(memory_bytes: int, cpu_s: int, file_bytes: int, open_files: int, processes: int,
                  cpu_hard_s: int | None = None) -> None:
    _set_limit(resource.RLIMIT_AS, memory_bytes)
    # Soft limit sends SIGXCPU (handled below); the hard one, a second later, kills for sure.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_hard_s or cpu_s + 1))
    _set_limit(resource.RLIMIT_FSIZE, file_bytes)
    _set_limit(resource.RLIMIT_NOFILE, open_files)
    _set_limit(resource.RLIMIT_NPROC, processes)
    _set_limit(resource.RLIMIT_CORE, 0)


def _on_cpu_limit(signum, frame):
    # The launcher reads this status and writes the message; flushing keeps the output so far.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(CPU_LIMIT_EXIT_STATUS)


def _exec_showing_last_value(source: str, code_path: str, namespace: dict) -> None:
    """Run the code like a notebook cell: a final bare expression's value is printed (its repr)."""
    import _ast

    tree = compile(source, code_path, "exec", _ast.PyCF_ONLY_AST)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
    exec(compile(tree, code_path, "exec"), namespace)
    if last is not None:
        value = eval(compile(_ast.Expression(last.value), code_path, "eval"), namespace)
        if value is not None:
            print(repr(value))


def _run(code_path: str, memory_mb: int, namespace: dict | None = None) -> int:
    """Run one code file; a namespace given (a session's) is kept and shows the last value."""
    with open(code_path, encoding="utf-8") as file:
        source = file.read()
    try:
        if namespace is None:
            namespace = {"__name__": "__main__", "__file__": code_path, "__builtins__": builtins}
            exec(compile(source, code_path, "exec"), namespace)
        else:
            namespace["__file__"] = code_path
            _exec_showing_last_value(source, code_path, namespace)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - report every failure of model code like python would
        sys.stdout.flush()
        import traceback

        # Skip this prelude's own frames so the traceback starts at the model's code.
        frames = error.__traceback__
        while frames is not None and frames.tb_frame.f_globals is globals():
            frames = frames.tb_next
        traceback.print_exception(type(error), error, frames)
        if isinstance(error, MemoryError):
            sys.stderr.write(f"Error: memory limit of {memory_mb} MB exceeded\n")
        return 1
    finally:
        sys.stdout.flush()
    return 0


def _prepare(packages_dir: str) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # keep prints and tracebacks in order
    _signal.signal(_SIGXCPU, _on_cpu_limit)
    _signal.signal(_SIGXFSZ, _signal.SIG_IGN)  # oversized writes raise OSError instead of killing
    _socket.socket = _socket.SocketType = _NoNetworkSocket
    # exit()/quit() come from `site`, which -S skips; models use them anyway.
    builtins.exit = builtins.quit = sys.exit
    if packages_dir:
        sys.path.append(packages_dir)
        # One thread per BLAS pool: the process cap counts threads, and idle pools hold memory.
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
        home = os.environ.get("HOME", ".")
        os.environ["MPLBACKEND"] = "Agg"
        os.environ["MPLCONFIGDIR"] = home
        # The host's /etc/fonts is not visible; an empty config keeps fontconfig from complaining.
        fontconfig = os.path.join(home, ".fontconfig.xml")
        with open(fontconfig, "w", encoding="utf-8") as file:
            file.write("<fontconfig></fontconfig>\n")
        os.environ["FONTCONFIG_FILE"] = fontconfig


def _status_of_exit(code) -> int:
    """What `sys.exit(code)` means as an exit status (python prints a non-int code to stderr)."""
    if code is None or isinstance(code, int):
        return code or 0
    sys.stderr.write(f"{code}\n")
    return 1


def _reap_others(own_pid_namespace: bool) -> None:
    """Kill every other process of the sandbox (a call's leftovers), then collect the children."""
    me = os.getpid()
    if own_pid_namespace:
        try:
            os.kill(-1, 9)  # everyone this process may signal, except itself and the namespace's init
        except OSError:
            pass
    else:  # no pid namespace: only this process's group and children are known to be ours
        group = os.getpgrp()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    fields = file.read().rsplit(b")", 1)[1].split()
                if int(fields[1]) == me or int(fields[2]) == group:
                    os.kill(int(entry), 9)
            except (OSError, ValueError, IndexError):
                pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:  # no children left
            return


def _session(argv: list[str]) -> int:
    control_fd, status_fd = int(argv[2]), int(argv[3])
    memory_mb, cpu_s, file_bytes, open_files, processes, session_cpu_s = (int(value) for value in argv[4:10])
    own_pid_namespace, packages_dir = argv[10] == "1", argv[11]
    os.set_inheritable(control_fd, False)
    os.set_inheritable(status_fd, False)
    _prepare(packages_dir)
    _apply_limits(memory_mb * 2**20, cpu_s, file_bytes, open_files, processes, cpu_hard_s=session_cpu_s)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    control = os.fdopen(control_fd, "r", encoding="utf-8")
    while code_path := control.readline().strip():
        sys.argv = [code_path]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = min(int(usage.ru_utime + usage.ru_stime) + 1 + cpu_s, session_cpu_s)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, session_cpu_s))
        try:
            status = _run(code_path, memory_mb, namespace)
        except SystemExit as stop:
            status = _status_of_exit(stop.code)
        sys.stdout.flush()
        sys.stderr.flush()
        _reap_others(own_pid_namespace)
        os.write(status_fd, f"{status}\n".encode())
    return 0


def main(argv: list[str]) -> int:
    if argv[1] == "--session":
        return _session(argv)
    code_path = argv[1]
    memory_mb, cpu_s, file_bytes, open_files, processes = (int(value) for value in argv[2:7])
    _prepare(argv[7] if len(argv) > 7 else "")
    sys.argv = [code_path]
    _apply_limits(memory_mb * 2**20, cpu_s, file_bytes, open_files, processes)
    return _run(code_path, memory_mb)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

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


def _apply_limits(memory_bytes: int, cpu_s: int, file_bytes: int, open_files: int, processes: int) -> None:
    _set_limit(resource.RLIMIT_AS, memory_bytes)
    # Soft limit sends SIGXCPU (handled below); the hard one, a second later, kills for sure.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    _set_limit(resource.RLIMIT_FSIZE, file_bytes)
    _set_limit(resource.RLIMIT_NOFILE, open_files)
    _set_limit(resource.RLIMIT_NPROC, processes)
    _set_limit(resource.RLIMIT_CORE, 0)


def _on_cpu_limit(signum, frame):
    # The launcher reads this status and writes the message; flushing keeps the output so far.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(CPU_LIMIT_EXIT_STATUS)


def _run(code_path: str, memory_mb: int) -> int:
    with open(code_path, encoding="utf-8") as file:
        source = file.read()
    namespace = {"__name__": "__main__", "__file__": code_path, "__builtins__": builtins}
    try:
        exec(compile(source, code_path, "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - report every failure of model code like python would
        sys.stdout.flush()
        import traceback

        # Skip this prelude's own frame so the traceback starts at the model's code.
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        if isinstance(error, MemoryError):
            sys.stderr.write(f"Error: memory limit of {memory_mb} MB exceeded\n")
        return 1
    finally:
        sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    code_path = argv[1]
    memory_mb, cpu_s, file_bytes, open_files, processes = (int(value) for value in argv[2:7])
    sys.stdout.reconfigure(line_buffering=True)  # keep prints and tracebacks in order
    _signal.signal(_SIGXCPU, _on_cpu_limit)
    _signal.signal(_SIGXFSZ, _signal.SIG_IGN)  # oversized writes raise OSError instead of killing
    _socket.socket = _socket.SocketType = _NoNetworkSocket
    # exit()/quit() come from `site`, which -S skips; models use them anyway.
    builtins.exit = builtins.quit = sys.exit
    sys.argv = [code_path]
    _apply_limits(memory_mb * 2**20, cpu_s, file_bytes, open_files, processes)
    return _run(code_path, memory_mb)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

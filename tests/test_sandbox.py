"""The python tool's sandbox, attacked for real: each attack is contained and reported clearly.

Needs bubblewrap (`apt-get install -y bubblewrap`); the fallback layers are tested at the end.
Limits are small so every case takes a few seconds at most.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools import ToolErrorKind, ToolRegistry, ToolResult
from metis_cli.agent.tools.python_sandbox import PythonLimits, PythonTool

LIMITS = PythonLimits(wall_timeout_s=3.0, cpu_time_s=1, memory_mb=256, output_bytes=4096, max_processes=8)


@pytest.fixture(scope="module")
def tool() -> PythonTool:
    return PythonTool(LIMITS, sandbox="bwrap")  # ToolConfigError says how to install bwrap if missing


@pytest.fixture(autouse=True)
def scratch_root(tmp_path_factory, monkeypatch) -> Path:
    """Every call's temp folder is created here, so each test can check none is left behind."""
    root = tmp_path_factory.mktemp("tool-scratch")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    assert list(root.iterdir()) == [], "the python tool left its temp folder behind"


def run(tool: PythonTool, code: str) -> ToolResult:
    return asyncio.run(tool.call({"code": code}))


def processes_with(marker: str) -> list[str]:
    """Command lines of live host processes containing marker."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and str(os.getpid()) != entry.name:
            found.append(cmdline)
    return found


def test_normal_code_prints(tool):
    result = run(tool, "print(2**10)")
    assert (result.text, result.error) == ("1024", None)
    assert result.runtime_s < 2.0


def test_standard_library_still_works(tool):
    code = (
        "import asyncio, json, socket, ssl, subprocess, multiprocessing as mp\n"
        "a, b = socket.socketpair(); a.sendall(b'hi'); print(b.recv(2).decode())\n"  # local sockets are fine
        "async def seven(): return 7\nprint(asyncio.run(seven()))\n"
        "print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())\n"
        "q = mp.Queue(); p = mp.Process(target=q.put, args=(42,)); p.start(); print(q.get(timeout=5)); p.join()\n"
        "exit(0)"
    )
    result = run(tool, code)
    assert (result.text, result.error) == ("hi\n7\nchild\n42", None)


def test_exception_comes_back_as_a_traceback(tool):
    result = run(tool, "print('before')\n1/0")
    assert result.error == ToolErrorKind.TOOL_ERROR
    assert result.text.startswith("before\nTraceback")
    assert 'File "/sandbox/main.py", line 2' in result.text and "ZeroDivisionError" in result.text


def test_no_network(tool):
    result = run(tool, "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
    assert "network access is disabled" in result.text
    # Past the in-process guard, the network namespace has no route at all.
    bypass = (
        "import socket\n"
        "raw = [c for c in type.mro(socket.socket) if c.__module__ == '_socket'][0]\n"
        "s = raw(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))"
    )
    result = run(tool, bypass)
    assert result.error == ToolErrorKind.TOOL_ERROR
    assert "Network is unreachable" in result.text


def test_host_files_are_invisible(tool, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    code = (
        "import os\n"
        "for path in ['/etc/passwd', '/etc/shadow', %r, %r, os.path.expanduser('~/.ssh')]:\n"
        "    print(path, os.path.exists(path))\n"
        "print(open(%r).read())"
    ) % (str(secret), str(Path(__file__).resolve()), str(secret))
    result = run(tool, code)
    assert "TOPSECRET" not in result.text
    assert result.text.count(" False") == 5
    assert "FileNotFoundError" in result.text


def test_writes_outside_the_folder_fail(tool, tmp_path):
    target = tmp_path / "planted.txt"
    code = (
        "import os\n"
        "open('inside.txt', 'w').write('ok'); print('inside', os.path.exists('inside.txt'))\n"
        "for path in [%r, '/usr/lib/planted.txt', '/planted.txt', '/dev/planted.txt']:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
        "    except OSError as error:\n        print('refused', type(error).__name__)\n"
    ) % str(target)
    result = run(tool, code)
    assert result.text.startswith("inside True")
    assert result.text.count("refused") == 4 and "WROTE" not in result.text
    assert not target.exists() and not Path("/usr/lib/planted.txt").exists()


def test_project_packages_are_not_importable(tool):
    result = run(tool, "import metis_cli")
    assert "ModuleNotFoundError" in result.text


def host_process_count() -> int:
    return len(list(Path("/proc").glob("[0-9]*")))


def test_fork_bomb_is_contained(tool):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    before = host_process_count()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(run, tool, bomb)
        peak = before
        while not call.done():
            peak = max(peak, host_process_count())
            time.sleep(0.05)
        result = call.result()
    assert result.error in (ToolErrorKind.TIMEOUT, ToolErrorKind.CRASHED)
    assert "Error:" in result.text
    assert time.perf_counter() - started < LIMITS.wall_timeout_s + 2
    # Uncapped, a fork bomb makes thousands of processes in these seconds; capped, a handful.
    assert peak - before < 200
    assert host_process_count() < before + 50
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_processes_are_capped(tool):
    code = (
        "import os, time\nn = 0\n"
        "try:\n    for _ in range(50):\n        if os.fork() == 0:\n            time.sleep(2); os._exit(0)\n        n += 1\n"
        "except OSError:\n    pass\nprint(n)"
    )
    result = run(tool, code)
    assert result.error is None
    assert int(result.text) < LIMITS.max_processes


def test_huge_allocation_is_refused(tool):
    result = run(tool, "data = bytearray(10 * 2**30)\nprint('allocated')")
    assert result.error == ToolErrorKind.TOOL_ERROR
    assert "MemoryError" in result.text and "memory limit of 256 MB" in result.text
    assert "allocated" not in result.text


def test_infinite_loop_is_stopped(tool):
    started = time.perf_counter()
    result = run(tool, "while True:\n    pass")
    assert result.error == ToolErrorKind.TIMEOUT
    assert "limit" in result.text and "exceeded" in result.text
    assert time.perf_counter() - started < LIMITS.wall_timeout_s + 1


def test_sleeping_code_hits_the_wall_clock_limit(tool):
    result = run(tool, "import time\nprint('started', flush=True)\ntime.sleep(60)")
    assert result.error == ToolErrorKind.TIMEOUT
    assert result.text.startswith("started\nError: wall-clock limit of 3 s exceeded")


def test_huge_output_is_cut(tool):
    started = time.perf_counter()
    result = run(tool, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)")
    assert result.error == ToolErrorKind.LIMIT_EXCEEDED
    assert result.text.startswith("x" * LIMITS.output_bytes + "\nError: output exceeded 4096 bytes")
    assert len(result.text) < LIMITS.output_bytes + 200
    assert time.perf_counter() - started < 2.0


def test_killing_its_parent_or_everything_leaves_the_host_alone(tool):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        result = run(tool, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still here')")
        assert result.text == "still here"  # its parent is the sandbox's own pid 1, which ignores it
        run(tool, "import os, signal\nos.kill(-1, signal.SIGKILL)")
        assert bystander.poll() is None
        assert run(tool, "print('next call')").text == "next call"
    finally:
        bystander.kill()
        bystander.wait()


def test_leftover_child_processes_are_killed(tool):
    marker = "313.25"  # an unusual sleep length to find the children by
    code = (
        "import os, subprocess, time\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '" + marker + "1'])\n"
        "time.sleep(0.2)\nprint('spawned')"
    )
    result = run(tool, code)
    assert result.text == "spawned"
    time.sleep(0.2)
    assert processes_with(f"sleep {marker}") == []


def test_registry_timeout_stops_the_sandbox_and_cleans_up(tool):
    registry = ToolRegistry([tool], timeout_s=0.5, max_calls_per_rollout=4, max_concurrency=4)
    code = "import os\nos.execvp('sleep', ['sleep', '271.5'])"  # findable on the host by its command line
    call = ParsedToolCall(name="python", arguments={"code": code}, raw="", error=None)
    [result] = registry.execute_many([(call, 0)])
    assert result.error == ToolErrorKind.TIMEOUT
    time.sleep(0.2)
    assert processes_with("sleep 271.5") == []


def test_concurrent_calls_run_side_by_side(tool):
    registry = ToolRegistry([tool], timeout_s=10, max_calls_per_rollout=4, max_concurrency=4)
    code = "import time\ntime.sleep(0.6)\nprint('ok')"
    call = ParsedToolCall(name="python", arguments={"code": code}, raw="", error=None)
    started = time.perf_counter()
    results = registry.execute_many([(call, 0)] * 4)
    assert [r.text for r in results] == ["ok"] * 4
    assert time.perf_counter() - started < 1.8  # ~one call's time, not four (2.4 s)


# -------------------------------------------------------------------------------- fallbacks
def test_without_bwrap_auto_falls_back_and_warns(tmp_path, monkeypatch, caplog):
    only_unshare = tmp_path / "bin"
    only_unshare.mkdir()
    (only_unshare / "unshare").symlink_to("/usr/bin/unshare")
    monkeypatch.setenv("PATH", str(only_unshare))
    with caplog.at_level(logging.WARNING, logger="metis.tools.python"):
        fallback = PythonTool(LIMITS, sandbox="auto")
    assert fallback.isolation.layer == "unshare"
    assert "apt-get install -y bubblewrap" in caplog.text and "bwrap` is not installed" in caplog.text
    assert run(fallback, "print(2**10)").text == "1024"
    bypass = "import socket\nraw = type.mro(socket.socket)[-2]\nraw().connect(('1.1.1.1', 80))"
    assert "Network is unreachable" in run(fallback, bypass).text


def test_sandbox_none_still_runs_with_limits_and_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # a fresh PATH: probed (and warned about) anew
    with caplog.at_level(logging.WARNING, logger="metis.tools.python"):
        unsandboxed = PythonTool(LIMITS, sandbox="none")
    assert unsandboxed.isolation.layer == "none"
    assert "no filesystem isolation" in caplog.text and "no network or pid namespace" in caplog.text
    assert run(unsandboxed, "print(2**10)").text == "1024"
    assert "network access is disabled" in run(unsandboxed, "import socket\nsocket.socket()").text
    assert "MemoryError" in run(unsandboxed, "bytearray(10 * 2**30)").text

"""The persistent python tool (`tools.python.persistent`): one sandboxed session per rollout.

State survives between a rollout's calls and nowhere else; every attack of test_sandbox.py is
still contained, and a hostile session neither escapes nor starves the others. Needs bubblewrap.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_sandbox import processes_with

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools import ToolErrorKind, ToolRegistry, ToolResult
from metis_cli.agent.tools.python_sandbox import SESSION_ENDED_NOTE, PythonLimits, PythonTool
from metis_cli.errors import ToolConfigError

LIMITS = PythonLimits(wall_timeout_s=3.0, cpu_time_s=1, memory_mb=256, output_bytes=4096, max_processes=8)


@pytest.fixture(scope="module")
def tool() -> PythonTool:
    return PythonTool(LIMITS, sandbox="bwrap", persistent=True)


@pytest.fixture(autouse=True)
def scratch_root(tmp_path_factory, monkeypatch, request) -> Path:
    """Sessions' scratch folders go here; once a test has ended its sessions, none is left."""
    root = tmp_path_factory.mktemp("session-scratch")
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    if "tool" in request.fixturenames:
        for key in ("a", "b"):
            request.getfixturevalue("tool").end_session(key)
    assert list(root.iterdir()) == [], "a python session left its scratch folder behind"


def run(tool: PythonTool, code: str, session="a") -> ToolResult:
    return asyncio.run(tool.call({"code": code}, session=session))


def call(code: str) -> ParsedToolCall:
    return ParsedToolCall(name="python", arguments={"code": code}, raw="", error=None)


def test_variables_survive_within_a_session_only(tool):
    assert run(tool, "x = 41\nimport math").text == "(no output; use print() to show results)"
    assert run(tool, "x += 1\nprint(x, math.pi > 3)").text == "42 True"
    assert "NameError" in run(tool, "print(x)", session="b").text  # another rollout's session
    tool.end_session("a")
    assert "NameError" in run(tool, "print(x)").text  # the rollout ended: its state is gone


def test_last_expression_is_shown_like_a_notebook(tool):
    assert run(tool, "y = [1, 2]\ny + [3]").text == "[1, 2, 3]"
    assert run(tool, "print('printed')\nNone").text == "printed"


def test_calls_without_a_session_stay_one_off(tool):
    assert asyncio.run(tool.call({"code": "z = 1"})).error is None
    assert "NameError" in asyncio.run(tool.call({"code": "print(z)"})).text


def test_exception_keeps_the_session(tool):
    run(tool, "kept = 'yes'")
    result = run(tool, "print('before')\n1/0")
    assert result.error == ToolErrorKind.TOOL_ERROR
    assert result.text.startswith("before\nTraceback") and 'File "/sandbox/call_2.py", line 2' in result.text
    assert run(tool, "kept").text == "'yes'"
    assert run(tool, "import sys\nsys.exit(3)").error == ToolErrorKind.TOOL_ERROR
    assert run(tool, "kept").text == "'yes'"  # sys.exit ends the call, not the session


def test_memory_hog_is_refused_and_the_session_lives_on(tool):
    run(tool, "kept = 7")
    result = run(tool, "data = bytearray(10 * 2**30)")
    assert "MemoryError" in result.text and "memory limit of 256 MB" in result.text
    assert run(tool, "kept").text == "7"


def test_infinite_loop_is_stopped_and_the_next_call_starts_fresh(tool):
    run(tool, "kept = 1")
    started = time.perf_counter()
    result = run(tool, "while True:\n    pass")
    assert result.error == ToolErrorKind.TIMEOUT and result.text.endswith(SESSION_ENDED_NOTE)
    assert time.perf_counter() - started < LIMITS.wall_timeout_s + 1
    assert "NameError" in run(tool, "kept").text
    assert run(tool, "print('alive')").text == "alive"


def test_sleeping_call_hits_the_wall_clock_per_call(tool):
    result = run(tool, "import time\nprint('started', flush=True)\ntime.sleep(60)")
    assert result.error == ToolErrorKind.TIMEOUT
    assert result.text.startswith("started\nError: wall-clock limit of 3 s exceeded")


def test_cpu_limit_is_per_call_not_per_session(tool):
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6:\n    pass\nprint('ok')"
    assert [run(tool, burn).text for _ in range(3)] == ["ok"] * 3  # 1.8 s of CPU in all, 0.6 s per call


def test_killing_the_interpreter_ends_the_session(tool):
    result = run(tool, "import os\nos._exit(3)")
    assert result.text.endswith(SESSION_ENDED_NOTE) and result.error == ToolErrorKind.TOOL_ERROR
    result = run(tool, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert "killed by SIGKILL" in result.text and result.text.endswith(SESSION_ENDED_NOTE)
    assert run(tool, "print('fresh')").text == "fresh"


def test_output_flood_is_cut_and_ends_the_session(tool):
    result = run(tool, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)")
    assert result.error == ToolErrorKind.LIMIT_EXCEEDED
    assert result.text.startswith("x" * LIMITS.output_bytes + "\nError: output exceeded 4096 bytes")
    assert run(tool, "print('fresh')").text == "fresh"  # no leftover bytes of the flood


def test_host_files_and_network_stay_out_of_reach(tool, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    code = f"import os\nprint([os.path.exists(p) for p in ['/etc/passwd', {str(secret)!r}, os.path.expanduser('~/.ssh')]])"
    assert run(tool, code).text == "[False, False, False]"
    assert "network access is disabled" in run(tool, "import socket\nsocket.create_connection(('1.1.1.1', 80), 2)").text
    bypass = ("import socket\nraw = [c for c in type.mro(socket.socket) if c.__module__ == '_socket'][0]\n"
              "s = raw(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))")
    assert "Network is unreachable" in run(tool, bypass).text
    assert "ModuleNotFoundError" in run(tool, "import metis_cli").text


def test_fork_bomb_is_contained_and_leftovers_die_between_calls(tool):
    before = len(list(Path("/proc").glob("[0-9]*")))
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run(tool, bomb)
    assert result.error in (ToolErrorKind.TIMEOUT, ToolErrorKind.CRASHED)
    assert len(list(Path("/proc").glob("[0-9]*"))) < before + 50
    assert subprocess.run(["true"]).returncode == 0
    marker = "313.75"
    spawn = (f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
             "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '" + marker + "1'])\n"
             "import time\ntime.sleep(0.2)\nprint('spawned')")
    assert run(tool, spawn).text == "spawned"
    time.sleep(0.2)
    assert processes_with(f"sleep {marker}") == []  # killed when the call returned, the session lives on
    assert run(tool, "print('next')").text == "next"


def test_a_hostile_session_does_not_starve_another():
    registry = ToolRegistry([PythonTool(LIMITS, sandbox="bwrap", persistent=True)], timeout_s=10,
                            max_calls_per_rollout=4, max_concurrency=4)
    spin, quick = call("while True:\n    pass"), call("print('quick')")
    started = time.perf_counter()
    results = registry.execute_many([(spin, 0), (quick, 0)], sessions=["hostile", "victim"])
    assert results[1].text == "quick" and results[1].runtime_s < 1.0
    assert results[0].error == ToolErrorKind.TIMEOUT
    assert time.perf_counter() - started < LIMITS.wall_timeout_s + 1.5
    for key in ("hostile", "victim"):
        registry.end_session(key)


def test_registry_keeps_state_per_session_key_across_batches_in_order():
    registry = ToolRegistry([PythonTool(LIMITS, sandbox="bwrap", persistent=True)], timeout_s=10,
                            max_calls_per_rollout=4, max_concurrency=4)
    # two calls of one rollout in one turn run in order, in one session
    first = registry.execute_many([(call("n = 1"), 0), (call("n += 1\nn"), 1)], sessions=[1, 1])
    assert first[1].text == "2"
    assert registry.execute_many([(call("n * 10"), 2)], sessions=[1])[0].text == "20"  # a new event loop
    assert "NameError" in registry.execute_many([(call("n"), 0)])[0].text  # no key: one-off
    registry.end_session(1)
    registry.end_session(1)  # idempotent
    assert "NameError" in registry.execute_many([(call("n"), 0)], sessions=[1])[0].text
    registry.end_session(1)


def test_registry_timeout_kills_the_session_and_its_processes():
    registry = ToolRegistry([PythonTool(LIMITS, sandbox="bwrap", persistent=True)], timeout_s=0.5,
                            max_calls_per_rollout=4, max_concurrency=4)
    registry.execute_many([(call("kept = 1"), 0)], sessions=["a"])
    [result] = registry.execute_many([(call("import os\nos.execvp('sleep', ['sleep', '271.75'])"), 1)],
                                     sessions=["a"])
    assert result.error == ToolErrorKind.TIMEOUT
    time.sleep(0.2)
    assert processes_with("sleep 271.75") == []
    assert "NameError" in registry.execute_many([(call("kept"), 2)], sessions=["a"])[0].text
    registry.end_session("a")


def test_listed_packages_are_importable_read_only():
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")
    tool = PythonTool(LIMITS, sandbox="bwrap", persistent=True, packages=["numpy", "PIL"])
    assert "numpy, PIL" in tool.description and "persist" in tool.description
    try:
        assert run(tool, "import numpy as np\nint(np.arange(4).sum())").text == "6"
        assert run(tool, "from PIL import Image\nImage.new('RGB', (3, 2)).size").text == "(3, 2)"
        refused = run(tool, "import os, numpy\nopen(os.path.join(os.path.dirname(numpy.__file__), 'x'), 'w')")
        assert "Read-only file system" in refused.text
        assert "ModuleNotFoundError" in run(tool, "import torch").text  # installed, but not listed
    finally:
        tool.end_session("a")
    # one-off calls see the packages too
    assert asyncio.run(tool.call({"code": "import numpy; print(numpy.ones(2).sum())"})).text == "2.0"


def test_unknown_package_is_a_config_error():
    with pytest.raises(ToolConfigError, match="tools.python.packages: 'no_such_pkg'"):
        PythonTool(LIMITS, sandbox="bwrap", packages=["no_such_pkg"])


def test_default_tool_is_unchanged():
    tool = PythonTool(LIMITS, sandbox="bwrap")
    assert "standard library only" in tool.description and "persist" not in tool.description
    assert run(tool, "x = 1").error is None
    assert "NameError" in run(tool, "print(x)").text  # a session key is ignored when not persistent


@pytest.mark.parametrize("layer", ["unshare", "none"])
def test_weaker_layers_keep_state_and_kill_leftovers(layer):
    tool = PythonTool(LIMITS, sandbox=layer, persistent=True)
    try:
        run(tool, "x = 5")
        marker = "419.25"
        assert run(tool, f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nx * 2").text == "10"
        time.sleep(0.2)
        assert processes_with(f"sleep {marker}") == []
        assert run(tool, "while True:\n    pass").error == ToolErrorKind.TIMEOUT
        assert "NameError" in run(tool, "x").text
    finally:
        tool.end_session("a")

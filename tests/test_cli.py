"""CLI conventions: start-up imports, completions, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metis_cli.cli.completion import SHELL_FILES, completion_script
from metis_cli.cli.main import app

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "vllm", "datasets", "peft", "pyarrow", "bm25s", "openai"]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["validate", "--help"], ["validate", "recipes/tiny.yaml"], ["hdpo", "--help"], ["sft", "--help"]],
    ids=" ".join,
)
def test_startup_imports_no_heavy_library(argv):
    code = (
        "import sys\nfrom metis_cli.cli.main import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        f"import json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"{argv} imported {loaded}"


@pytest.mark.parametrize("shell", sorted(SHELL_FILES))
def test_completion_scripts_are_fresh(shell):
    committed = (REPO / "completions" / SHELL_FILES[shell]).read_text()
    assert committed == completion_script(shell), (
        f"completions/{SHELL_FILES[shell]} is stale: regenerate with `metis completion {shell} > completions/{SHELL_FILES[shell]}`"
    )


def test_completion_completes_commands():
    env = {"_METIS_COMPLETE": "complete_bash", "COMP_WORDS": "metis val", "COMP_CWORD": "1", "PATH": ""}
    result = subprocess.run([sys.executable, "-m", "metis_cli"], env=env, capture_output=True, text=True)
    assert "validate" in result.stdout.split()


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["validate", "completion"]:
        assert command in result.output


def test_unknown_option_is_exit_2():
    result = CliRunner().invoke(app, ["validate", "--bogus"])
    assert result.exit_code == 2

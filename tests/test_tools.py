"""Tools and the registry: calculator safety, limits, concurrency, search, and `metis tools`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools import ToolErrorKind, ToolRegistry, ToolResult, tool_spec
from metis_cli.agent.tools.calculator import CalculatorTool
from metis_cli.agent.tools.search import SearchTool
from metis_cli.cli.tools import app as tools_app
from metis_cli.errors import DataError, ToolConfigError
from metis_cli.recipe.schema import PythonToolConfig, SearchToolConfig


def run_tool(tool, arguments: dict) -> ToolResult:
    return asyncio.run(tool.call(arguments))


def parsed(name: str, **arguments) -> ParsedToolCall:
    return ParsedToolCall(name=name, arguments=arguments, raw="", error=None)


class SleepTool:
    """A tool that takes `seconds` of wall-clock time without using CPU."""

    name = "sleep"
    description = "Wait."
    parameters = {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]}

    async def call(self, arguments: dict) -> ToolResult:
        await asyncio.sleep(arguments["seconds"])
        return ToolResult(text="done")


class BrokenTool:
    name = "broken"
    description = "Always fails."
    parameters = {"type": "object", "properties": {}}

    async def call(self, arguments: dict) -> ToolResult:
        raise RuntimeError("disk on fire")


def registry_of(*tools, timeout_s=5.0, max_calls=4, concurrency=8) -> ToolRegistry:
    return ToolRegistry(list(tools), timeout_s=timeout_s, max_calls_per_rollout=max_calls, max_concurrency=concurrency)


# --------------------------------------------------------------------------------- calculator
@pytest.mark.parametrize(
    ("expression", "expected"),
    [("123 * 45", "5535"), ("10 / 2", "5"), ("2**10", "1024"), ("-3 + 4*(2-1)", "1"), ("7 // 2", "3"),
     ("7 % 3", "1"), ("1/3", "0.333333333333"), ("0.1 + 0.2", "0.3"), ("2**-1", "0.5"), ("-2**2", "-4"),
     ("1e3", "1000"), ("  (12)  ", "12"), ("99999999999999999999 + 1", "100000000000000000000")],
)  # fmt: skip
def test_calculator_answers(expression, expected):
    result = run_tool(CalculatorTool(), {"expression": expression})
    assert (result.text, result.error) == (expected, None)


@pytest.mark.parametrize(
    ("expression", "hint"),
    [("__import__('os').system('touch /tmp/metis_calc_pwned')", "function calls"),
     ("9**9**9", "too large"), ("10**5000 * 10**5000", "too large"), ("x + 1", "names"),
     ("open('/etc/passwd')", "function calls"), ("().__class__", "attributes"), ("[1, 2]", "List"),
     ("'a' * 10", "only numbers"), ("lambda: 1", "Lambda"), ("True + 1", "only numbers"),
     ("2^10", "use **"), ("1,000", "commas"), ("(" * 300 + "1" + ")" * 300, "nested"), ("1/0", "division by zero"),
     ("(-8) ** (1/3)", "not a real number"), ("1e308 * 10", "not a finite number"), ("", "empty"),
     ("1+" * 600 + "1", "longer than"), ("0 ** -1", "negative power"), ("2.5 ** 1e6", "too large")],
)  # fmt: skip
def test_calculator_refuses_everything_but_arithmetic(expression, hint):
    started = time.perf_counter()
    result = run_tool(CalculatorTool(), {"expression": expression})
    assert result.error == ToolErrorKind.TOOL_ERROR
    assert hint in result.text
    assert time.perf_counter() - started < 1.0
    assert not Path("/tmp/metis_calc_pwned").exists()


# ----------------------------------------------------------------------------------- registry
def test_specs_are_openai_functions():
    [spec] = registry_of(CalculatorTool()).specs()
    assert spec["type"] == "function"
    assert spec["function"]["name"] == "calculator"
    assert spec["function"]["parameters"]["required"] == ["expression"]
    assert spec == tool_spec(CalculatorTool())


def test_synthetic_task_renders_the_calculator_tools_own_spec():
    from metis_cli.data.synthetic import CALCULATOR_TOOL_SPEC

    assert CALCULATOR_TOOL_SPEC == tool_spec(CalculatorTool())


def test_slow_call_times_out_with_an_observation():
    registry = registry_of(SleepTool(), timeout_s=0.2)
    started = time.perf_counter()
    [result] = registry.execute_many([(parsed("sleep", seconds=30), 0)])
    assert result.error == ToolErrorKind.TIMEOUT
    assert "timed out after 0.2 s" in result.text
    assert time.perf_counter() - started < 2.0


def test_crashing_tool_becomes_a_crashed_observation():
    [result] = registry_of(BrokenTool()).execute_many([(parsed("broken"), 0)])
    assert result.error == ToolErrorKind.CRASHED
    assert "disk on fire" in result.text


def test_calls_beyond_the_rollout_limit_are_refused():
    registry = registry_of(CalculatorTool(), max_calls=2)
    calls = [(parsed("calculator", expression="1+1"), so_far) for so_far in range(4)]
    results = registry.execute_many(calls)
    assert [r.error for r in results] == [None, None, ToolErrorKind.LIMIT_EXCEEDED, ToolErrorKind.LIMIT_EXCEEDED]
    assert "limit of 2" in results[2].text


def test_concurrent_calls_overlap_up_to_max_concurrency():
    calls = [(parsed("sleep", seconds=0.4), 0) for _ in range(8)]
    started = time.perf_counter()
    results = registry_of(SleepTool(), concurrency=8).execute_many(calls)
    all_at_once_s = time.perf_counter() - started
    assert all(r.text == "done" for r in results)
    assert all_at_once_s < 1.2  # one call's time, not eight (3.2 s)

    started = time.perf_counter()
    registry_of(SleepTool(), concurrency=2).execute_many(calls)
    assert time.perf_counter() - started > 1.5  # four waves of two


def test_execute_many_works_inside_a_running_event_loop():
    async def inside() -> list[ToolResult]:
        return registry_of(CalculatorTool()).execute_many([(parsed("calculator", expression="6*7"), 0)])

    assert asyncio.run(inside())[0].text == "42"


def tools_cfg(**overrides) -> SimpleNamespace:
    python = PythonToolConfig(wall_timeout_s=5, cpu_time_s=2, memory_mb=256, output_bytes=4096, max_processes=8,
                              sandbox="auto")  # fmt: skip
    values = dict(enabled=["calculator"], timeout_s=5.0, max_calls_per_rollout=3, max_concurrency=4, python=python,
                  search=SearchToolConfig(corpus=None, top_k=2), costs={})  # fmt: skip
    return SimpleNamespace(**(values | overrides))


def test_from_config_builds_only_enabled_tools(corpus_file):
    cfg = tools_cfg(enabled=["search", "calculator", "python"], search=SearchToolConfig(corpus=str(corpus_file), top_k=2))
    registry = ToolRegistry.from_config(cfg)
    assert registry.names() == ["search", "calculator", "python"]
    assert (registry.timeout_s, registry.max_calls_per_rollout, registry.max_concurrency) == (5.0, 3, 4)
    assert ToolRegistry.from_config(tools_cfg()).names() == ["calculator"]


def test_from_config_accepts_the_recipe_schema():
    from metis_cli.recipe.schema import ToolsConfig

    assert ToolRegistry.from_config(ToolsConfig()).names() == ["calculator"]


def test_unknown_tool_in_config_is_a_config_error():
    with pytest.raises(ToolConfigError, match="tools.enabled: unknown tool 'browser'"):
        ToolRegistry.from_config(tools_cfg(enabled=["browser"]))


@pytest.mark.parametrize("corpus", [None, "/nonexistent/corpus.jsonl"])
def test_search_without_a_corpus_names_the_recipe_field(corpus):
    with pytest.raises(ToolConfigError, match="tools.search.corpus"):
        ToolRegistry.from_config(tools_cfg(enabled=["search"], search=SearchToolConfig(corpus=corpus, top_k=3)))


# ------------------------------------------------------------------------------------- search
@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    rows = [
        {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany, on the river Spree."},
        {"id": "banana", "text": "Bananas are elongated, edible fruit. " * 30},
        {"id": "python", "text": "Python is a programming language created by Guido van Rossum."},
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_search_returns_a_numbered_list_of_the_best_documents(corpus_file):
    tool = SearchTool.from_file(corpus_file, top_k=2)
    result = run_tool(tool, {"query": "What is the capital of France?"})
    lines = result.text.splitlines()
    assert result.error is None
    assert lines[0].startswith("1. [paris] Paris -- Paris is the capital")
    assert lines[1].startswith("2. [berlin]")
    assert len(lines) == 2


def test_search_cuts_long_documents_and_reports_no_results(corpus_file):
    tool = SearchTool.from_file(corpus_file, top_k=3)
    [line] = run_tool(tool, {"query": "banana fruit"}).text.splitlines()
    assert line.startswith("1. [banana]") and line.endswith("...") and len(line) < 400
    assert run_tool(tool, {"query": "quantum chromodynamics"}).text == "No results for 'quantum chromodynamics'."
    assert run_tool(tool, {"query": "   "}).error == ToolErrorKind.TOOL_ERROR


def test_malformed_corpus_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "text": "ok"}\n{"id": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: missing 'text'"):
        SearchTool.from_file(path)


# ---------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_cli_list_shows_enabled_tools_and_limits():
    result = runner.invoke(tools_app, ["list"])
    assert result.exit_code == 0
    assert result.output.startswith("calculator(expression: string)")
    assert "max_calls_per_rollout=4" in result.output


def test_cli_list_json_is_the_spec_list(tmp_path, corpus_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name_or_path: some/model}\n"
        f"tools: {{enabled: [calculator, search, python], search: {{corpus: {corpus_file}}}}}\n",
        encoding="utf-8",
    )
    result = runner.invoke(tools_app, ["list", "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    specs = json.loads(result.stdout)
    assert [spec["function"]["name"] for spec in specs] == ["calculator", "search", "python"]
    called = runner.invoke(tools_app, ["call", "search", '{"query": "capital of Germany"}', "--recipe", str(recipe)])
    assert called.exit_code == 0 and called.output.startswith("1. [berlin]")


def test_cli_call_prints_the_observation():
    result = runner.invoke(tools_app, ["call", "calculator", '{"expression": "123 * 45"}'])
    assert (result.exit_code, result.output) == (0, "5535\n")


@pytest.mark.parametrize(
    ("arguments", "kind"),
    [('{"expression": "1/0"}', ToolErrorKind.TOOL_ERROR), ('{"expr": "1"}', ToolErrorKind.BAD_ARGUMENTS)],
)
def test_cli_call_exits_0_when_the_tool_reports_an_error(arguments, kind):
    result = runner.invoke(tools_app, ["call", "calculator", arguments, "--json"])
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["error"] == kind and payload["text"].startswith("Error: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["call", "browser", "{}"], "unknown tool 'browser'"),
     (["call", "python", '{"code": "print(1)"}'], "'python' is not enabled"),
     (["call", "calculator", "{expression: 1}"], "not valid JSON"),
     (["call", "calculator", "[1]"], "must be a JSON object")],
)  # fmt: skip
def test_cli_call_user_errors_exit_2(args, message):
    result = runner.invoke(tools_app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_search_keeps_numba_out_of_the_process(tmp_path):
    # numba loaded before a vLLM engine starts breaks the engine, so search must not import it.
    import subprocess
    import sys

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "hdpo decouples rewards"}\n{"id": "b", "text": "grpo groups"}\n')
    code = (
        "import sys\nfrom metis_cli.agent.tools.search import SearchTool\n"
        f"tool = SearchTool.from_file({str(corpus)!r}, top_k=1)\n"
        "print('numba' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"

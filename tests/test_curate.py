"""`metis curate` (sft mode) on small hand-made trajectory sets: every filter, the report, the
judge against a real HTTP server on 127.0.0.1, and resuming after Ctrl-C.

The model-sampling filters (tool necessity, RL pass rate) are in test_curate_sampling.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import default_sigint
from test_judge import ScriptedServer
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.data.datasets import load_examples

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "Answer the question. Use the calculator if needed."}
runner = CliRunner()


def call(expression: str, name: str = "calculator") -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": {"expression": expression}})}</tool_call>'


def tool_row(row_id: str, question: str, expression: str, recorded: str, answer: str, **extra) -> dict:
    """A one-call trajectory: call the calculator, get `recorded` back, answer `answer`."""
    return {
        "id": row_id,
        "messages": [
            SYSTEM,
            {"role": "user", "content": question},
            {"role": "assistant", "content": call(expression)},
            {"role": "tool", "name": "calculator", "content": recorded},
            {"role": "assistant", "content": f"<answer>{answer}</answer>"},
        ],
        "answer": answer,
        **extra,
    }


def direct_row(row_id: str, question: str, answer: str) -> dict:
    return {"id": row_id, "answer": answer, "messages": [
        SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": f"<answer>{answer}</answer>"}]}


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Rows as JSON lines; raw_lines puts literal text at given 1-based line numbers."""
    lines = [json.dumps(row) for row in rows]
    for number, text in sorted((raw_lines or {}).items()):
        lines.insert(number - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(tmp_path: Path, data: Path, *, curate: dict | None = None, malformed_rows: str = "skip") -> Path:
    recipe = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run")},
        "model": {"name_or_path": str(tmp_path / "no-model-needed")},
        "data": {"malformed_rows": malformed_rows},
        "tools": {"enabled": ["calculator"]},
        "curate": {
            "input": [{"path": str(data)}],
            "batch_size": 4,
            "filters": {"necessity": {"enabled": False}},
            **(curate or {}),
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def curate(recipe: Path, *args: str):
    result = runner.invoke(app, ["curate", str(recipe), "--json", *args])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


def filter_entry(report: dict, name: str) -> dict:
    return next(entry for entry in report["filters"] if entry["name"] == name)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


HAND_MADE = [
    tool_row("good", "What is 123 * 45?", "123 * 45", "5535", "5535"),
    tool_row("fabricated", "What is 321 * 54?", "321 * 54", "5000", "5000"),  # really 17334
    tool_row("fabricated-then-good-1", "What is 222 * 33?", "222 * 33", "7000", "7000"),
    tool_row("fabricated-then-good-2", "What is 222 * 33?", "222 * 33", "7326", "7326"),
    tool_row("division-by-zero", "What is 12 / 0?", "12 / 0", "Error: division by zero", "none"),
    {**tool_row("unknown-tool", "Weather?", "x", "sunny", "sunny"),
     "messages": [SYSTEM, {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": call("Paris", name="weather")},
                  {"role": "tool", "name": "weather", "content": "sunny"},
                  {"role": "assistant", "content": "<answer>sunny</answer>"}]},
    {**tool_row("bad-json", "What is 2 * 3?", "2 * 3", "6", "6"),
     "messages": [SYSTEM, {"role": "user", "content": "What is 2 * 3?"},
                  {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": </tool_call>'},
                  {"role": "tool", "content": "6"}, {"role": "assistant", "content": "<answer>6</answer>"}]},
    {**tool_row("no-tool-turn", "What is 4 * 5?", "4 * 5", "20", "20"),
     "messages": [SYSTEM, {"role": "user", "content": "What is 4 * 5?"},
                  {"role": "assistant", "content": call("4 * 5")}, {"role": "assistant", "content": "<answer>20</answer>"}]},
    {**direct_row("no-answer-tag", "What is 1 + 1?", "2"),
     "messages": [SYSTEM, {"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "It is 2."}]},
    {**direct_row("no-gold", "What is 2 + 2?", "4"), "answer": None},
    direct_row("direct", "What is 3 + 5?", "8"),
    tool_row("duplicate", "  what is 123 *   45? ", "123 * 45", "5535", "5535"),
]


def test_every_sft_filter_reports_kept_dropped_and_reasons(tmp_path):
    data = write_jsonl(tmp_path / "trajectories.jsonl", HAND_MADE, raw_lines={3: "{not json"})
    result, report = curate(write_recipe(tmp_path, data))
    assert result.exit_code == 0, result.output

    out = tmp_path / "run" / "curated"
    kept = read_jsonl(out / "curated.jsonl")
    assert [row["id"] for row in kept] == ["good", "fabricated-then-good-2", "direct"]
    assert report["rows_read"] == 13 and report["malformed_rows"] == 1 and report["kept"] == 3
    assert f"{data} line 3" in report["malformed"][0]

    validity = filter_entry(report, "validity")
    assert (validity["in"], validity["kept"], validity["dropped"]) == (12, 8, 4)
    assert validity["reasons"] == {"malformed tool-call JSON": 1, "tool call without a tool turn": 1,
                                   "no <answer> in the final turn": 1, "no gold answer": 1}
    execution = filter_entry(report, "execution")
    assert (execution["in"], execution["kept"], execution["dropped"]) == (8, 4, 4)
    assert execution["reasons"] == {"recorded tool output differs from re-execution": 2,
                                    "tool call fails on re-execution": 2}
    assert execution["notes"] == {"no tool calls": 1}
    dedup = filter_entry(report, "dedup")
    assert (dedup["in"], dedup["kept"], dedup["dropped"]) == (4, 3, 1)
    assert {entry["name"]: entry["why"] for entry in report["filters"] if not entry["ran"]} == {
        "necessity": "disabled", "judge": "disabled", "rl_filter": "rl mode only"}

    decisions = {d["id"]: d for d in read_jsonl(out / "decisions.jsonl") if "id" in d}
    fabricated = decisions["fabricated"]
    assert fabricated["dropped_by"] == "execution"
    assert "recorded '5000'" in fabricated["detail"] and "'17334'" in fabricated["detail"]
    assert "division by zero" in decisions["division-by-zero"]["detail"]
    assert decisions["duplicate"]["detail"] == "same prompt as row 'good'"

    assert kept[0]["curation"] == {"source": str(data), "filters": ["validity", "execution", "dedup"]}
    assert json.loads((out / "report.json").read_text()) == report


def test_fabricated_calculator_output_is_dropped_and_execution_can_be_switched_off(tmp_path):
    rows = [tool_row("fabricated", "What is 123 * 45?", "123 * 45", "5000", "5000"),
            tool_row("spaced", "What is 12 * 3?", "12 * 3", "  36\n", "36")]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    result, report = curate(write_recipe(tmp_path, data))
    assert result.exit_code == 0, result.output
    assert report["kept"] == 1
    decisions = read_jsonl(tmp_path / "run" / "curated" / "decisions.jsonl")
    assert decisions[0]["detail"] == ("call 1 calculator({\"expression\": \"123 * 45\"}): recorded '5000', "
                                      "re-execution gives '5535'")

    result, report = curate(write_recipe(tmp_path, data), "--overwrite",
                            "--set", "curate.filters.execution.enabled=false")
    assert result.exit_code == 0, result.output
    assert report["kept"] == 2
    assert {"name": "execution", "ran": False, "why": "disabled"} in report["filters"]


def test_malformed_row_is_an_error_naming_file_and_line_by_default(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", HAND_MADE[:3], raw_lines={2: "{oops"})
    result, _ = curate(write_recipe(tmp_path, data, malformed_rows="error"))
    assert result.exit_code == 2
    assert f"{data} line 2" in result.output and "Traceback" not in result.output


def test_parquet_output_loads_back_with_provenance(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", HAND_MADE[:2])
    result, report = curate(write_recipe(tmp_path, data, curate={"format": "parquet"}))
    assert result.exit_code == 0, result.output
    examples = load_examples(report["files"]["curated"], need_answer=False)
    assert [e.id for e in examples] == ["good"]
    assert examples[0].trajectory[3] == {"role": "tool", "name": "calculator", "content": "5535"}
    assert examples[0].meta["curation"]["filters"] == ["validity", "execution", "dedup"]


def test_finished_output_is_not_overwritten_without_asking(tmp_path):
    recipe = write_recipe(tmp_path, write_jsonl(tmp_path / "t.jsonl", HAND_MADE[:2]))
    assert curate(recipe)[0].exit_code == 0
    result, _ = curate(recipe)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert curate(recipe, "--resume")[1]["kept"] == 1  # nothing left to do, same report
    # Decisions made under other filter settings are not mixed in: --resume refuses.
    result, _ = curate(recipe, "--resume", "--set", "curate.filters.execution.enabled=false")
    assert result.exit_code == 2 and "curate settings changed" in result.output
    # Batch size only changes how rows are grouped, not which are kept.
    assert curate(recipe, "--resume", "--set", "curate.batch_size=1")[0].exit_code == 0


# ------------------------------------------------------------------------------------ judge
def judge_settings(server_url: str, **extra) -> dict:
    return {"filters": {"necessity": {"enabled": False},
                        "judge": {"enabled": True, "base_url": server_url, "model": "judge-model",
                                  "backoff_s": 0.001, "timeout_s": 5.0, "max_concurrency": 1, **extra}}}


def test_judge_keeps_only_rows_it_calls_strategic(tmp_path):
    rows = [tool_row("a", "What is 123 * 45?", "123 * 45", "5535", "5535"),
            tool_row("b", "What is 2 * 3?", "2 * 3", "6", "6"),
            direct_row("c", "What is 3 + 5?", "8")]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    with ScriptedServer([(200, "yes"), (200, "No."), (200, "yes")]) as server:
        result, report = curate(write_recipe(tmp_path, data, curate=judge_settings(server.base_url)))
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 3
        shown = server.requests[0]["body"]["messages"][-1]["content"]
    assert "What is 123 * 45?" in shown and call("123 * 45") in shown and "[tool (calculator)]\n5535" in shown
    judge = filter_entry(report, "judge")
    assert (judge["in"], judge["kept"], judge["dropped"]) == (3, 2, 1)
    assert judge["reasons"] == {"judge: tool use not strategic": 1}
    kept = read_jsonl(tmp_path / "run" / "curated" / "curated.jsonl")
    assert [row["id"] for row in kept] == ["a", "c"]
    assert kept[0]["curation"]["filters"] == ["validity", "execution", "judge", "dedup"]


def test_unreachable_judge_is_an_error_not_a_silent_keep_or_drop(tmp_path):
    with ScriptedServer([(200, "yes")]) as server:
        url = server.base_url  # closed when the block ends: nothing listens there any more
    data = write_jsonl(tmp_path / "t.jsonl", HAND_MADE[:1])
    recipe = write_recipe(tmp_path, data, curate=judge_settings(url, max_retries=1, timeout_s=2.0))
    result, _ = curate(recipe)
    assert result.exit_code == 2, result.output
    assert url in result.output and "curate.filters.judge" in result.output  # found by the preflight
    assert not (tmp_path / "run" / "curated" / "curated.jsonl").exists()


# ----------------------------------------------------------------------------------- resume
class SlowServer(ScriptedServer):
    """A ScriptedServer that waits `delay_s` before each answer (so a run can be interrupted)."""

    def __init__(self, script, delay_s: float):
        super().__init__(script)
        self.delay_s = delay_s
        outer, handler = self, self.httpd.RequestHandlerClass

        class Slow(handler):
            def do_POST(self):
                time.sleep(outer.delay_s)
                super().do_POST()

        self.httpd.RequestHandlerClass = Slow


def test_ctrl_c_then_resume_redoes_nothing_and_gives_identical_output(tmp_path):
    rows = [tool_row(f"r{i}", f"What is {100 + i} * 45?", f"{100 + i} * 45", str((100 + i) * 45), str((100 + i) * 45))
            for i in range(30)]
    rows[7]["messages"][3]["content"] = "1"  # one fabricated output, so something is dropped
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    with SlowServer([(200, "yes")], delay_s=0.1) as server:
        recipe = write_recipe(tmp_path, data, curate={"batch_size": 2, **judge_settings(server.base_url)})
        decisions = tmp_path / "run" / "curated" / "decisions.jsonl"
        process = subprocess.Popen([sys.executable, "-m", "metis_cli", "curate", str(recipe), "--quiet"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=default_sigint)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if decisions.exists() and len(decisions.read_text().splitlines()) >= 4:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert "--resume" in stderr
        decided = len(decisions.read_text().splitlines())
        assert 4 <= decided < 30
        with decisions.open("a") as handle:
            handle.write('{"source": 0, "ordinal": 99, "id": "half-writ')  # as if killed mid-write

        judged_before = len(server.requests)
        server.delay_s = 0.0
        result, report = curate(recipe, "--resume")
        assert result.exit_code == 0, result.output
        judged_after_resume = len(server.requests) - judged_before
        # Every undecided row but the fabricated one (dropped by execution) went to the judge once.
        fabricated_undecided = 1 if decided <= 7 else 0
        assert judged_after_resume == 30 - decided - fabricated_undecided

        reference = tmp_path / "reference"
        result, reference_report = curate(recipe, "--set", f"curate.output={reference}")
        assert result.exit_code == 0, result.output

    out = tmp_path / "run" / "curated"
    assert (out / "curated.jsonl").read_bytes() == (reference / "curated.jsonl").read_bytes()
    assert report["kept"] == reference_report["kept"] == 29
    ids = [d["id"] for d in read_jsonl(out / "decisions.jsonl")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(30))  # each row decided exactly once

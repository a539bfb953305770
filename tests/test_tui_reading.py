"""The dashboard's torch-free plumbing without a terminal: control files, metrics tailing,
rollout files, history, run-folder resolution, rollout and status text, `metis watch` errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from metis_cli.errors import MetisError, RunFolderError
from metis_cli.telemetry import control
from metis_cli.telemetry.history import MetricsHistory
from metis_cli.tui.metrics_tail import LatestRollouts, MetricsTail
from metis_cli.tui.rollout_view import format_rollout
from metis_cli.tui.source import StageLocation, StageSource, find_stage
from metis_cli.tui.summary import StatusFacts, status_line
from tui_fake_run import append_line, hdpo_record, rollout_records, write_hdpo_run, write_sft_run


# -- control files -------------------------------------------------------------------------------


def test_control_request_pending_clear(tmp_path):
    stage_dir = tmp_path / "hdpo"
    stage_dir.mkdir()
    assert control.pending(stage_dir) == set()
    path = control.request(stage_dir, "checkpoint")
    control.request(stage_dir, "checkpoint")  # asking twice is asking once
    assert path == stage_dir / "control" / "checkpoint" and path.stat().st_size == 0
    control.request(stage_dir, "stop")
    assert control.pending(stage_dir) == {"checkpoint", "stop"}
    assert not [name for name in os.listdir(stage_dir / "control") if name.startswith(".")]  # no temp left
    control.clear(stage_dir, "checkpoint")
    control.clear(stage_dir, "checkpoint")  # clearing a handled request is fine
    assert control.pending(stage_dir) == {"stop"}


def test_control_ignores_half_made_requests_and_refuses_bad_input(tmp_path):
    stage_dir = tmp_path / "hdpo"
    (stage_dir / "control").mkdir(parents=True)
    (stage_dir / "control" / ".stop.abc123").write_text("")  # a request still being made
    assert control.pending(stage_dir) == set()
    with pytest.raises(ValueError, match="unknown control request"):
        control.request(stage_dir, "pause")
    with pytest.raises(RunFolderError, match="has not started"):
        control.request(tmp_path / "sft", "checkpoint")
    assert not (tmp_path / "sft").exists()  # must not create a stage folder a trainer would trip on


# -- metrics tail ----------------------------------------------------------------------------------


def test_tail_waits_for_file_and_returns_only_new_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []  # file not there yet
    append_line(path, '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.')
    assert [r["step"] for r in tail.read_new()] == [1, 2]
    assert tail.waiting_for_more
    assert tail.read_new() == []  # nothing completed since
    append_line(path, '5}\n')
    assert tail.read_new() == [{"step": 3, "loss": 0.5}]
    assert tail.corrupt_lines == 0 and not tail.waiting_for_more


def test_tail_skips_and_counts_corrupt_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}\nnot json\n[1, 2]\n\n{"step": 2}\n\xff\n')
    tail = MetricsTail(path)
    assert [r["step"] for r in tail.read_new()] == [1, 2]
    assert tail.corrupt_lines == 3


def test_tail_starts_over_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    tail = MetricsTail(path)
    assert len(tail.read_new()) == 5
    path.write_text('{"step": 1}\n')  # cut back in place, as a resume does
    assert tail.read_new() == [{"step": 1}] and tail.restarts == 1
    replacement = tmp_path / "new.jsonl"  # a fresh file moved over it, longer than what was read
    replacement.write_text("".join(json.dumps({"step": s, "pad": "x" * 20}) + "\n" for s in range(1, 4)))
    os.replace(replacement, path)
    assert [r["step"] for r in tail.read_new()] == [1, 2, 3] and tail.restarts == 2


def test_latest_rollouts_reads_newest_complete_file(tmp_path):
    rollouts_dir = tmp_path / "rollouts"
    reader = LatestRollouts(rollouts_dir)
    assert reader.poll() is None  # no folder yet
    append_line(rollouts_dir / "step_000010.jsonl", "".join(json.dumps(r) + "\n" for r in rollout_records(10)))
    batch = reader.poll()
    assert batch is not None and batch.step == 10 and len(batch.rollouts) == 3
    assert reader.poll() is None  # unchanged
    # A newer file with only half a line: keep showing step 10 until a line is complete.
    append_line(rollouts_dir / "step_000020.jsonl", '{"step": 20, "messages": [')
    assert reader.poll() is None
    append_line(rollouts_dir / "step_000020.jsonl", "]}\n")
    newer = reader.poll()
    assert newer is not None and newer.step == 20 and newer.rollouts == ({"step": 20, "messages": []},)


# -- history ---------------------------------------------------------------------------------------


def test_history_merges_steps_and_derives_eta_and_warnings():
    history = MetricsHistory()
    history.add(hdpo_record(step, 200) for step in range(1, 41))
    history.add([{"stage": "hdpo", "step": 40, "eval/extra/accuracy": 0.5}])  # eval line after its step
    history.add([{"stage": "hdpo", "loss": 1.0}])  # no step: ignored, counted
    assert len(history) == 40 and history.latest_step == 40 and history.records_without_step == 1
    assert history.latest("tool_call_ratio") == hdpo_record(40, 200)["tool_call_ratio"]
    assert history.eval_subsets() == ["easy", "extra", "hard"]
    assert history.eta_s() == pytest.approx(160 * 2.1)
    assert history.warning_totals() == {"timeouts": 1}  # step 37
    assert history.last_checkpoint is None
    steps, values = history.series("tool_call_ratio", max_points=10)
    assert len(steps) == 10 and values[0] > values[-1] - 0.5


def test_history_resumed_steps_replace_earlier_values():
    history = MetricsHistory()
    history.add([{"step": 1, "loss": 3.0, "tool_timeouts": 2}, {"step": 2, "loss": 2.0}])
    history.add([{"step": 1, "loss": 1.5, "tool_timeouts": 0}])  # re-logged after a resume
    assert history.series("loss") == ([1.0, 2.0], [1.5, 2.0])
    assert history.warning_totals() == {}


def test_eta_from_times_when_step_time_is_not_logged():
    history = MetricsHistory()
    history.add({"step": step, "total_steps": 10, "time": 100.0 + 3 * step} for step in range(1, 6))
    assert history.eta_s() == pytest.approx(15.0)


# -- run folder resolution -------------------------------------------------------------------------


def test_find_stage_prefers_metrics_then_hdpo_then_sft(tmp_path):
    assert find_stage(tmp_path / "demo") is None
    write_sft_run(tmp_path / "demo", 3, 10)
    assert find_stage(tmp_path / "demo") == StageLocation(tmp_path / "demo" / "sft", "sft")
    (tmp_path / "demo" / "hdpo").mkdir()
    assert find_stage(tmp_path / "demo") == StageLocation(tmp_path / "demo" / "hdpo", "hdpo")
    append_line(tmp_path / "flat" / "metrics.jsonl", "")
    assert find_stage(tmp_path / "flat") == StageLocation(tmp_path / "flat", None)


def test_following_a_run_moves_from_sft_to_hdpo(tmp_path):
    run_dir = tmp_path / "demo"
    source = StageSource.following(run_dir)
    assert source.poll().records == [] and "demo/{hdpo,sft}/metrics.jsonl" in source.waiting_for()
    write_sft_run(run_dir, 3, 10)
    polled = source.poll()
    assert source.stage == "sft" and len(polled.records) == 3 and polled.reset
    write_hdpo_run(run_dir, 2, 10)
    polled = source.poll()
    assert source.stage == "hdpo" and polled.reset and [r["step"] for r in polled.records] == [1, 2]
    assert polled.rollouts is not None and polled.rollouts.step == 2


# -- text ------------------------------------------------------------------------------------------


def _spans_with_text(text, fragment):
    return [str(span.style) for span in text.spans if fragment in text.plain[span.start : span.end]]


def test_rollout_text_highlights_tool_calls_results_and_answers():
    with_tool, direct, wrong = (format_rollout(r) for r in rollout_records(5))
    assert 'calculator(expression="123 * 45")' in with_tool.plain
    assert _spans_with_text(with_tool, "calculator(") and _spans_with_text(with_tool, "5535")
    assert "✓ correct · 1 tool call" in with_tool.plain and "What is 123 * 45?" in with_tool.plain
    assert "You can call the calculator tool" not in with_tool.plain  # system prompt left out
    assert "0 tool calls" in direct.plain and "answer: 5535" in direct.plain
    assert "✗ wrong" in wrong.plain
    assert any("#d9534f" in style for style in _spans_with_text(wrong, "answer: 5435"))  # red: wrong
    assert any("#7ed957" in style for style in _spans_with_text(direct, "answer: 5535"))  # green: right
    broken_call = {"role": "assistant", "content": "<tool_call>{oops</tool_call>"}
    broken = format_rollout({"correct": None, "messages": [broken_call]})
    assert "? unscored" in broken.plain and "malformed tool call: {oops" in broken.plain


def test_status_line_says_progress_checkpoint_and_warnings():
    history = MetricsHistory()
    history.add(hdpo_record(step, 200) for step in range(1, 101))
    line = status_line(StatusFacts(stage="hdpo", history=history, corrupt_lines=2)).plain
    # Progress, ETA and checkpoint fit in 80 columns; only warnings may be cut on a narrow terminal.
    assert "step 100/200" in line[:80] and "50%" in line[:80] and "ETA 3m30s" in line[:80]
    assert "ckpt @100" in line[:80]
    assert "⚠ 2 timeouts, 2 bad metrics lines" in line
    asked = status_line(StatusFacts(stage="hdpo", history=history, pending_requests={"checkpoint"})).plain
    assert "ckpt requested…" in asked[:80] and "@100" not in asked
    finished = status_line(StatusFacts(stage="hdpo", history=history, finished=True)).plain
    assert "✓ finished" in finished and "ETA" not in finished


# -- entry points --------------------------------------------------------------------------------


def test_watch_command_refuses_a_run_dir_whose_parent_is_missing(tmp_path):
    from metis_cli.cli.watch import watch

    app = typer.Typer()
    app.command()(watch)
    result = CliRunner().invoke(app, [str(tmp_path / "nowhere" / "demo")])
    assert result.exit_code == 2
    assert "nowhere does not exist" in result.output


def test_tui_refuses_without_a_terminal_and_starts_no_training(tmp_path):
    from metis_cli.tui.launch import run_with_dashboard

    with pytest.raises(MetisError, match="interactive terminal"):
        run_with_dashboard(["hdpo", "recipe.yaml"], tmp_path / "run" / "hdpo", "hdpo")
    assert not (tmp_path / "run").exists()


def test_dashboard_imports_no_torch():
    code = (
        "import sys, metis_cli.tui.app, metis_cli.tui.launch, metis_cli.cli.watch; "
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'datasets') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

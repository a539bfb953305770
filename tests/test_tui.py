"""The dashboard as a person uses it (Textual pilot, 80x24), fed by a fake run folder that the
test appends metrics lines to: waiting, new steps appearing, a half-written line, the keys, and
train mode with a real child process that obeys (or ignores) the stop request."""

from __future__ import annotations

import json
import sys
import time

import pytest
from textual.widgets import Static

from metis_cli.telemetry import control
from metis_cli.tui.app import Dashboard
from metis_cli.tui.charts import ChartPanel
from metis_cli.tui.rollout_view import RolloutPanel
from metis_cli.tui.screens import ChoiceScreen, HelpScreen, TrainingExitedScreen
from metis_cli.tui.training_process import TrainingProcess
from metis_cli.tui.views import HdpoView, SftView, WaitingView
from tui_fake_run import append_line, hdpo_record, write_hdpo_run, write_sft_run

SIZE = (80, 24)


def status(app: Dashboard) -> str:
    return str(app.query_one("#status", Static).render())


def chart_text(app: Dashboard, chart_id: str) -> str:
    from textual_plotext import PlotextPlot

    return str(app.query_one(f"#{chart_id}", ChartPanel).query_one(PlotextPlot).render())


async def wait_until(pilot, condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


@pytest.mark.asyncio
async def test_watch_waits_for_the_run_then_shows_new_steps(tmp_path):
    run_dir = tmp_path / "demo"
    app = Dashboard(run_dir=run_dir)
    async with app.run_test(size=SIZE) as pilot:
        waiting = str(app.query_one("#waiting", Static).render())
        assert "waiting for" in waiting and "demo/{hdpo,sft}/metrics.jsonl" in waiting
        stage_dir = write_hdpo_run(run_dir, 30, 200)
        await app.refresh_from_disk()
        await pilot.pause()
        assert app.query(HdpoView) and not app.query(WaitingView)
        assert "step 30/200" in status(app)
        before_chart = chart_text(app, "tool-use")
        before_legend = app.query_one("#tool-use", ChartPanel).legend_text
        for step in range(31, 121):
            append_line(stage_dir / "metrics.jsonl", json.dumps(hdpo_record(step, 200)) + "\n")
        await app.refresh_from_disk()
        await pilot.pause()
        assert "step 120/200" in status(app) and "ckpt @100" in status(app)
        assert chart_text(app, "tool-use") != before_chart
        legend = app.query_one("#tool-use", ChartPanel).legend_text
        assert legend != before_legend and f"{hdpo_record(120, 200)['tool_call_ratio']:.2f}" in legend
        assert "hard" in legend  # eval tool-call ratio per subset
        assert "eval @120" in str(app.query_one("#progress-text", Static).render())


@pytest.mark.asyncio
async def test_half_written_line_waits_for_its_end(tmp_path):
    stage_dir = write_hdpo_run(tmp_path / "demo", 5, 50)
    app = Dashboard(stage_dir, stage="hdpo")
    async with app.run_test(size=SIZE) as pilot:
        line = json.dumps(hdpo_record(6, 50)) + "\n"
        append_line(stage_dir / "metrics.jsonl", line[:40])
        await app.refresh_from_disk()
        assert "step 5/50" in status(app) and "bad metrics" not in status(app)
        append_line(stage_dir / "metrics.jsonl", line[40:])
        await app.refresh_from_disk()
        await pilot.pause()
        assert "step 6/50" in status(app) and "bad metrics" not in status(app)
        append_line(stage_dir / "metrics.jsonl", "{garbage\n")
        await app.refresh_from_disk()
        assert "1 bad metrics line" in status(app)


@pytest.mark.asyncio
async def test_dashboard_polls_by_itself(tmp_path):
    stage_dir = write_hdpo_run(tmp_path / "demo", 3, 50)
    app = Dashboard(stage_dir, stage="hdpo")
    async with app.run_test(size=SIZE) as pilot:
        append_line(stage_dir / "metrics.jsonl", json.dumps(hdpo_record(4, 50)) + "\n")
        await wait_until(pilot, lambda: "step 4/50" in status(app), timeout_s=5)


@pytest.mark.asyncio
async def test_keys_checkpoint_help_panels_zoom_rollouts_quit(tmp_path):
    stage_dir = write_hdpo_run(tmp_path / "demo", 40, 200)
    app = Dashboard(stage_dir, stage="hdpo")
    async with app.run_test(size=SIZE) as pilot:
        assert app.focused.id == "tool-use"
        await pilot.press("c")
        assert control.pending(stage_dir) == {"checkpoint"}
        assert "ckpt requested" in status(app)
        control.clear(stage_dir, "checkpoint")  # as the trainer does

        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("c")  # dashboard keys sleep while help is open
        assert control.pending(stage_dir) == set()
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

        await pilot.press("tab")
        assert app.focused.id == "accuracy"
        await pilot.press("right")
        assert app.focused.id == "efficiency"
        await pilot.press("down")
        assert app.focused.id == "rollouts"
        await pilot.press("left")
        assert app.focused.id == "progress"
        await pilot.press("up")
        assert app.focused.id == "accuracy"
        await pilot.press("up")
        assert app.focused.id == "tool-use"

        await pilot.press("down", "right", "down")
        rollouts = app.query_one(RolloutPanel)
        assert app.focused is rollouts and rollouts.border_title.endswith("1/3")
        await pilot.press("n")
        assert rollouts.border_title.endswith("2/3")
        await pilot.press("z")
        assert app.screen.maximized is rollouts
        await pilot.press("right")  # zoomed in: arrows page through rollouts
        assert rollouts.border_title.endswith("3/3")
        await pilot.press("escape")
        assert app.screen.maximized is None

        await pilot.press("q")
    assert app.return_value == 0
    assert (stage_dir / "metrics.jsonl").exists() and control.pending(stage_dir) == set()


@pytest.mark.asyncio
async def test_sft_stage_shows_the_loss_view(tmp_path):
    write_sft_run(tmp_path / "demo", 60, 100)
    app = Dashboard(run_dir=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.query(SftView) and not app.query("#accuracy")
        legend = app.query_one("#loss", ChartPanel).legend_text
        assert "loss" in legend and "eval loss" in legend
        assert "step 60/100" in status(app) and " sft " in status(app)


@pytest.mark.asyncio
async def test_watching_a_run_folder_moves_on_from_sft_to_hdpo(tmp_path):
    write_sft_run(tmp_path / "demo", 100, 100)
    app = Dashboard(run_dir=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        assert app.query(SftView) and "✓ finished" in status(app)
        write_hdpo_run(tmp_path / "demo", 5, 200)
        await app.refresh_from_disk()
        await pilot.pause()
        assert app.query(HdpoView) and not app.query(SftView)
        assert "step 5/200" in status(app) and " hdpo " in status(app)


@pytest.mark.asyncio
async def test_checkpoint_key_on_a_finished_run_asks_nothing(tmp_path):
    stage_dir = write_hdpo_run(tmp_path / "demo", 20, 20)
    app = Dashboard(stage_dir, stage="hdpo")
    async with app.run_test(size=SIZE) as pilot:
        assert "✓ finished" in status(app)
        await pilot.press("c")
        assert control.pending(stage_dir) == set()


# -- train mode: a real child process standing in for the trainer ---------------------------------

FAKE_TRAINER = r"""
import json, pathlib, sys, time
stage_dir, exit_code, crash_after = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
obeys_stop = sys.argv[4] == "obeys"
stage_dir.mkdir(parents=True, exist_ok=True)
stop = stage_dir / "control" / "stop"
for step in range(1, 10_000):
    record = {"stage": "hdpo", "step": step, "total_steps": 1000, "tool_call_ratio": 0.5}
    if stop.exists() and obeys_stop:
        record["checkpoint"] = f"checkpoints/step_{step:06d}"
        stop.unlink()
    with open(stage_dir / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps(record) + "\n")
    if "checkpoint" in record:
        print("saved and stopped", flush=True)
        sys.exit(exit_code)
    if crash_after and step >= crash_after:
        print("RuntimeError: simulated trainer crash", flush=True)
        sys.exit(exit_code)
    time.sleep(0.05)
"""


def start_fake_trainer(tmp_path, exit_code: int, crash_after: int = 0, obeys_stop: bool = True) -> TrainingProcess:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    stage_dir = tmp_path / "run" / "hdpo"
    obeys = "obeys" if obeys_stop else "ignores"
    command = [sys.executable, str(script), str(stage_dir), str(exit_code), str(crash_after), obeys]
    return TrainingProcess.start(command, stage_dir=stage_dir, log_path=tmp_path / "run" / "train.log")


@pytest.mark.asyncio
async def test_train_mode_q_stops_training_gracefully_and_returns_its_exit_code(tmp_path):
    training = start_fake_trainer(tmp_path, exit_code=0)
    app = Dashboard(training.stage_dir, mode="train", stage="hdpo", training=training)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: "step" in status(app))
            await pilot.press("q")
            assert isinstance(app.screen, ChoiceScreen)
            await pilot.press("escape")  # cancel: training goes on
            assert training.poll() is None and control.pending(training.stage_dir) == set()
            await pilot.press("q", "s")
            await wait_until(pilot, lambda: app.return_value is not None)
    finally:
        training.terminate()
    assert app.return_value == 0 and training.poll() == 0
    records = [json.loads(line) for line in (training.stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert "checkpoint" in records[-1]  # it saved before leaving
    assert "saved and stopped" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.asyncio
async def test_train_mode_says_when_the_trainer_dies(tmp_path):
    training = start_fake_trainer(tmp_path, exit_code=3, crash_after=3)
    app = Dashboard(training.stage_dir, mode="train", stage="hdpo", training=training)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, TrainingExitedScreen))
            await pilot.pause()  # let the modal mount its contents
            shown = " ".join(str(widget.render()) for widget in app.screen.query(Static))
            assert "exited with code 3" in shown and "simulated trainer crash" in shown
            assert "train.log" in shown
            await pilot.press("escape")  # keep looking at the charts
            assert "exited with code 3" in status(app)
            await pilot.press("q")  # nothing left to stop: leaves at once
    finally:
        training.terminate()
    assert app.return_value == 3


@pytest.mark.asyncio
async def test_train_mode_can_kill_a_trainer_that_does_not_stop(tmp_path):
    training = start_fake_trainer(tmp_path, exit_code=0, obeys_stop=False)
    app = Dashboard(training.stage_dir, mode="train", stage="hdpo", training=training)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: "step" in status(app))
            await pilot.press("q", "s")
            await wait_until(pilot, lambda: "stopping" in status(app))
            assert control.pending(training.stage_dir) == {"stop"} and training.poll() is None
            await pilot.press("q")
            assert isinstance(app.screen, ChoiceScreen)
            await pilot.press("k")
            await wait_until(pilot, lambda: app.return_value is not None)
    finally:
        training.terminate()
    assert app.return_value == 128 + 15  # SIGTERM, as a shell reports it

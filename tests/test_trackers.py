"""`run.report_to`: metrics.jsonl rows, the recipe and sampled rollouts reach TensorBoard (read back
with tensorboard's own reader) and W&B (offline, read back from its run file); a tracker that
fails is a warning and the metrics go on."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metis_cli.recipe import validate_data
from metis_cli.telemetry.run import MetricsLog, write_resolved_recipe

REPO = Path(__file__).resolve().parents[1]

RECORDS = [
    {"stage": "hdpo", "step": 0, "total_steps": 2, "time": 1.0, "eval/easy/accuracy": 0.25, "eval/hard/accuracy": 0.0},
    {"stage": "hdpo", "step": 1, "total_steps": 2, "time": 2.0, "loss": 0.5, "accuracy": 0.5, "estimator": "hdpo",
     "kl": float("nan")},
    {"stage": "hdpo", "step": 2, "total_steps": 2, "time": 3.0, "loss": 0.25, "accuracy": 0.75,
     "eval/easy/accuracy": 0.5, "eval/hard/accuracy": 0.125},
]
ROLLOUT = {"step": 1, "prompt_id": "rl-3", "sample": 0, "subset": "hard", "question": "What is 17 * 23?",
           "gold": "391", "messages": [{"role": "user", "content": "What is 17 * 23?"},
                                       {"role": "assistant", "content": "<answer>391</answer>"}],
           "final_answer": "391", "correct": True, "tool_calls": 0, "tool_errors": 0, "r_acc": 1.0, "r_tool": 1.0,
           "adv_acc": 0.5, "adv_tool": 0.0}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def announce(tmp_path: Path, report_to: list[str]):
    recipe = validate_data({"run": {"name": "track-test", "output_dir": str(tmp_path / "run"), "report_to": report_to},
                            "model": {"name_or_path": "unused"}}, source="test")
    write_resolved_recipe(recipe)
    return recipe


def write_stage(stage_dir: Path) -> MetricsLog:
    log = MetricsLog(stage_dir / "metrics.jsonl")
    log.append(RECORDS[0])
    (stage_dir / "rollouts").mkdir()
    (stage_dir / "rollouts" / "step_000001.jsonl").write_text(json.dumps(ROLLOUT) + "\n")
    for record in RECORDS[1:]:
        log.append(record)
    return log


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tb_text(events, tag: str) -> dict[int, str]:
    from tensorboard.util.tensor_util import make_ndarray

    return {e.step: make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors(f"{tag}/text_summary")}


def wandb_records(stage_dir: Path) -> list:
    """The records of W&B's run file: 7-byte header, then 32 KiB blocks of (crc, length, type) chunks."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(stage_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, position, pending, records = Path(path).read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_tensorboard_gets_every_numeric_field_the_recipe_and_the_rollouts(tmp_path):
    announce(tmp_path, ["tensorboard"])
    stage_dir = tmp_path / "run" / "hdpo"
    log = write_stage(stage_dir)
    assert log.trackers is not None and log.trackers.trackers == []  # closed after the last step
    events = tensorboard_events(stage_dir / "tensorboard")
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {"loss": [(1, 0.5), (2, 0.25)], "accuracy": [(1, 0.5), (2, 0.75)],
                       "eval/easy/accuracy": [(0, 0.25), (2, 0.5)], "eval/hard/accuracy": [(0, 0.0), (2, 0.125)]}
    assert "name: track-test" in tb_text(events, "recipe")[0]
    rollouts = tb_text(events, "rollouts")
    assert list(rollouts) == [1] and "What is 17 * 23?" in rollouts[1] and "correct=True" in rollouts[1]
    assert [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


VL_ROLLOUT = {**ROLLOUT, "question": "What colour is the mark?", "images": [[256, 256], [64, 64]], "messages": [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the mark?"}]},
    {"role": "assistant", "content": '<tool_call>{"name": "zoom_in", "arguments": {}}</tool_call>'},
    {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed in."}]},
    {"role": "assistant", "content": "<answer>red</answer>"}]}


def test_image_parts_of_a_rollout_reach_tensorboard_as_their_sizes_not_a_repr(tmp_path):
    announce(tmp_path, ["tensorboard"])
    stage_dir = tmp_path / "run" / "hdpo"
    log = MetricsLog(stage_dir / "metrics.jsonl")
    log.append(RECORDS[0])
    (stage_dir / "rollouts").mkdir()
    (stage_dir / "rollouts" / "step_000001.jsonl").write_text(json.dumps(VL_ROLLOUT) + "\n")
    for record in RECORDS[1:]:
        log.append(record)
    [text] = tb_text(tensorboard_events(stage_dir / "tensorboard"), "rollouts").values()
    assert "**user**: [image 256x256] What colour is the mark?" in text
    assert "**tool**: [image 64x64] Zoomed in." in text  # sizes follow the order of appearance
    assert "'type'" not in text and "{" not in text.split("**tool**")[1]


def test_wandb_offline_gets_the_rows_the_config_and_a_rollout_table(tmp_path, offline_wandb):
    announce(tmp_path, ["wandb"])
    stage_dir = tmp_path / "run" / "hdpo"
    write_stage(stage_dir)
    records = wandb_records(stage_dir)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h.get("loss"), h.get("eval/easy/accuracy")) for h in history] == [
        (0, None, 0.25), (1, 0.5, None), (2, 0.25, 0.5)]
    assert "rollouts/path" in history[1] and "kl" not in history[1]  # NaN is "not measured", not a point
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run"]["name"] == "track-test" and run.display_name == "track-test-hdpo"
    [table] = glob.glob(str(stage_dir / "wandb" / "offline-run-*" / "files" / "media" / "table" / "rollouts_*.json"))
    table = json.loads(Path(table).read_text())
    assert "transcript" in table["columns"] and table["data"][0][table["columns"].index("question")] == "What is 17 * 23?"
    assert (stage_dir / "wandb_run_id").read_text().strip() == run.run_id


def test_a_tracker_that_cannot_start_is_a_warning_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    announce(tmp_path, ["wandb", "tensorboard"])
    with caplog.at_level(logging.WARNING, logger="metis.trackers"):
        write_stage(tmp_path / "run" / "hdpo")
    [warning] = [r.getMessage() for r in caplog.records]
    assert "wandb is off" in warning and "WANDB_API_KEY" in warning and "WANDB_MODE=offline" in warning
    assert tensorboard_events(tmp_path / "run" / "hdpo" / "tensorboard").Tags()["scalars"]


def test_a_tracker_that_is_not_installed_names_the_extra(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    announce(tmp_path, ["wandb"])
    with caplog.at_level(logging.WARNING, logger="metis.trackers"):
        log = MetricsLog(tmp_path / "run" / "hdpo" / "metrics.jsonl")
    assert "metis-cli[track]" in caplog.text and log.trackers.names == []


def test_a_tracker_that_fails_later_is_dropped_and_metrics_go_on(tmp_path, monkeypatch, caplog):
    from metis_cli.telemetry.trackers import TensorBoardTracker

    announce(tmp_path, ["tensorboard"])
    log = MetricsLog(tmp_path / "run" / "sft" / "metrics.jsonl")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log_scalars", broken)
    with caplog.at_level(logging.WARNING, logger="metis.trackers"):
        log.append({"stage": "sft", "step": 1, "total_steps": 3, "loss": 1.0})
        log.append({"stage": "sft", "step": 2, "total_steps": 3, "loss": 0.5})
    assert caplog.text.count("tensorboard failed") == 1 and "disk full" in caplog.text
    assert len((tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()) == 2


def test_no_report_to_opens_nothing(tmp_path):
    announce(tmp_path, [])
    assert MetricsLog(tmp_path / "run" / "sft" / "metrics.jsonl").trackers is None
    assert not (tmp_path / "run" / "sft" / "tensorboard").exists()


@pytest.mark.slow
def test_a_real_run_logs_each_step_of_both_stages_to_tensorboard_and_wandb(tmp_path, offline_wandb):
    from metis_cli.cli.main import app
    from tests.test_training import cli, read_metrics, small_overrides

    os.chdir(REPO)
    overrides = small_overrides(tmp_path, **{"run.report_to": "[tensorboard, wandb]"})
    result = CliRunner().invoke(app, ["run", "recipes/tiny.yaml", "--quiet", *cli(overrides)])
    assert result.exit_code == 0, result.output
    sft_rows, hdpo_rows = (read_metrics(tmp_path / stage / "metrics.jsonl") for stage in ("sft", "hdpo"))
    sft_events, hdpo_events = (tensorboard_events(tmp_path / stage / "tensorboard") for stage in ("sft", "hdpo"))
    assert [(e.step, round(e.value, 5)) for e in sft_events.Scalars("loss")] == \
        [(r["step"], round(r["loss"], 5)) for r in sft_rows]
    assert [(e.step, e.value) for e in hdpo_events.Scalars("eval/hard/tool_call_ratio")] == \
        [(r["step"], r["eval/hard/tool_call_ratio"]) for r in hdpo_rows if "eval/hard/tool_call_ratio" in r]
    saved = sorted(int(path.stem.split("_")[1]) for path in (tmp_path / "hdpo" / "rollouts").glob("*.jsonl"))
    assert sorted(tb_text(hdpo_events, "rollouts")) == saved and saved
    for stage, rows in (("sft", sft_rows), ("hdpo", hdpo_rows)):
        history = [r for r in wandb_records(tmp_path / stage) if r.WhichOneof("record_type") == "history"]
        assert len(history) == len(rows), stage
    card = (tmp_path / "hdpo" / "final" / "README.md").read_text()  # the same real run shows its model card
    assert "(hdpo)" in card and "| hard | " in card and "| `sft.lr` |" in (tmp_path / "sft" / "final" / "README.md").read_text()

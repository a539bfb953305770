"""The rollout browser on vision-language rollouts: the sample line an hdpo step writes carries
the image sizes (never pixels), image parts show as `[image WxH]` (`[image]` when a record has no
sizes), and the dashboard's rollout panel renders them (one SVG snapshot)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from textual.widgets import Static

from metis_cli.agent.rollout_types import Rollout
from metis_cli.algo.types import Advantages
from metis_cli.stages.hdpo_step import sample_record
from metis_cli.tui.app import Dashboard
from metis_cli.tui.rollout_view import RolloutPanel, format_rollout, image_mark
from tui_fake_run import append_line, write_hdpo_run

ZOOM_CALL = '<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 64, 64], "image_index": 0}}</tool_call>'
MESSAGES = [
    {"role": "system", "content": "You can zoom into the image."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is in the corner?"}]},
    {"role": "assistant", "content": f"Too small to read. {ZOOM_CALL}"},
    {"role": "tool", "name": "zoom_in", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed into image 1."}]},
    {"role": "assistant", "content": "<answer>7</answer>"},
]


def vision_record(step: int = 3) -> dict:
    """What `sample_record` writes for a rollout that zoomed once (256x256 prompt image, 64x64 crop)."""
    rollout = Rollout(0, 1, [1, 2, 3], 2, [0, 0, 1], [0.0, 0.0, -0.5], [dict(m) for m in MESSAGES], tool_calls=1,
                      images=[Image.new("RGB", (256, 256)), Image.new("RGB", (64, 64))])
    example = SimpleNamespace(id="vl-1", subset="hard", question="What digit is in the corner?", answer="7")
    score = SimpleNamespace(answer="7", correct=True, r_acc=1.0, r_tool=0.5)
    return sample_record(step, 0, [rollout], [score], Advantages(acc=torch.tensor([0.5])), [example])


def test_a_saved_sample_carries_image_sizes_and_the_browser_shows_them():
    line = json.dumps(vision_record())  # a sample line is JSON: no PIL image may be left in it
    record = json.loads(line)
    assert record["images"] == [[256, 256], [64, 64]]
    assert record["messages"][1]["content"][0] == {"type": "image"}
    text = format_rollout(record).plain
    assert "Q [image 256x256] What digit is in the corner?" in text
    assert "tool ↳ [image 64x64] Zoomed into image 1." in text
    assert "⚙ zoom_in(bbox_2d=[0, 0, 64, 64], image_index=0)" in text and "answer: 7" in text


def test_image_parts_without_sizes_show_as_image():
    record = {"correct": None, "question": "What digit?", "messages": MESSAGES}  # an older sample: no `images`
    text = format_rollout(record).plain
    assert "Q [image] What digit is in the corner?" in text and "tool ↳ [image] Zoomed" in text
    short = {**record, "images": [[256, 256]]}  # fewer sizes than image parts
    text = format_rollout(short).plain
    assert "[image 256x256] What digit" in text and "tool ↳ [image] Zoomed" in text
    assert image_mark(["wide", 3]) == "[image]" and image_mark([5, 7]) == "[image 5x7]"


def test_text_only_records_read_as_before():
    record = {"correct": True, "question": "What is 2 + 2?", "images": [],
              "messages": [{"role": "user", "content": "What is 2 + 2?"},
                           {"role": "assistant", "content": "<answer>4</answer>"}]}
    text = format_rollout(record).plain
    assert "Q What is 2 + 2?" in text and "[image" not in text


def write_vision_run(run_dir, step: int = 40):
    stage_dir = write_hdpo_run(run_dir, step, 100, rollouts=False)
    lines = "".join(json.dumps(vision_record(step) | {"sample": sample}) + "\n" for sample in range(2))
    append_line(stage_dir / "rollouts" / f"step_{step:06d}.jsonl", lines)


@pytest.mark.asyncio
async def test_the_rollout_panel_shows_image_marks(tmp_path):
    write_vision_run(tmp_path / "demo")
    app = Dashboard(run_dir=tmp_path / "demo")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        panel = app.query_one(RolloutPanel)
        shown = str(panel.query_one("#rollout-text", Static).render())
        assert "[image 256x256]" in shown and "[image 64x64]" in shown
        assert panel.border_title.endswith("1/2")


def test_rollout_panel_with_images_100x30(snap_compare, tmp_path):
    write_vision_run(tmp_path / "demo")

    async def maximize_rollouts(pilot) -> None:
        await pilot.pause()
        pilot.app.screen.maximize(pilot.app.query_one(RolloutPanel))
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert snap_compare(Dashboard(run_dir=tmp_path / "demo"), terminal_size=(100, 30), run_before=maximize_rollouts)

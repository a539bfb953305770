"""`metis curate` on rows with images: the tiny vision task's zoom trajectories (data/synthetic_vl.py)
as JSONL + PNG files and as parquet with embedded bytes. Checks what a user relies on: a zoom whose
recorded crop is not what the tool returns is dropped, dedup tells images apart by their bytes (not
their file names), and the curated file, JSONL or parquet, reads back through the normal loader
with the very same conversations and pixels. One test samples the tiny Qwen3-VL (necessity filter).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from test_curate import filter_entry, read_jsonl
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.curate.judge import transcript
from metis_cli.data import synthetic_vl
from metis_cli.data.datasets import load_examples
from metis_cli.data.synthetic import answer_text

runner = CliRunner()
ZOOM_TOOLS = {"enabled": ["zoom_in"], "zoom_in": {"min_pixels": synthetic_vl.ZOOM_PIXELS,
                                                  "max_pixels": synthetic_vl.ZOOM_PIXELS}}
TEXT_ROW = {"id": "text-only", "answer": "yellow", "messages": [
    {"role": "system", "content": synthetic_vl.SYSTEM_PROMPT},
    {"role": "user", "content": "What colour is a ripe banana?"},
    {"role": "assistant", "content": answer_text("yellow")}]}


@pytest.fixture
def vision_jsonl(tmp_path) -> Path:
    """Four zoom trajectories (two easy ones share their question text, not their image), a
    re-cased copy of the first whose PNGs are copies under other names, and a text-only row. The
    fourth trajectory's recorded zoom is overwritten with a grey square: a fabricated tool output."""
    path = synthetic_vl.write_set(synthetic_vl.cold_start_trajectories(4, seed=5), tmp_path / "in" / "cold.jsonl")
    rows = read_jsonl(path)
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path.parent / rows[3]["images"][1], format="PNG")
    copies = []
    for name in rows[0]["images"]:
        copy = name.replace(rows[0]["id"], "copy")
        shutil.copy(path.parent / name, path.parent / copy)
        copies.append(copy)
    user = rows[0]["messages"][1]
    question = user["content"][1]["text"]
    recased = {**user, "content": [user["content"][0], {"type": "text", "text": f"  {question.upper()} "}]}
    dup = {**rows[0], "id": "dup", "images": copies,
           "messages": [rows[0]["messages"][0], recased, *rows[0]["messages"][2:]]}
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, dup, TEXT_ROW]))
    return path


def write_recipe(tmp_path: Path, data: Path, *, output: str = "curated", model: Path | None = None,
                 output_format: str = "jsonl") -> Path:
    filters = {"necessity": {"k": 2}} if model is not None else {"necessity": {"enabled": False}}
    recipe = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run"), "threads": 1},
        "model": {"name_or_path": str(model or tmp_path / "no-model-needed"), "dtype": "float32"},
        "tools": ZOOM_TOOLS,
        "rollout": {"max_turns": 2, "max_new_tokens": 6, "max_total_tokens": 240, "batch_size": 16},
        "reward": {"checker": "exact"},
        "curate": {"input": [{"path": str(data)}], "batch_size": 4, "filters": filters,
                   "format": output_format, "output": str(tmp_path / output)},
    }
    path = tmp_path / f"{output}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_curate(recipe: Path) -> dict:
    result = runner.invoke(app, ["curate", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def pixels(example) -> list[bytes]:
    return [image.tobytes() for image in example.load_images()]


def assert_same_rows(curated: list, originals: dict) -> None:
    """Each curated example holds its input row's conversation and pixels."""
    for example in curated:
        original = originals[example.id]
        assert (example.messages, example.trajectory, example.answer) == (
            original.messages, original.trajectory, original.answer)
        assert len(example.images) == len(original.images) and pixels(example) == pixels(original)


def test_image_trajectories_are_curated_and_read_back_by_the_loader(tmp_path, vision_jsonl, vl_dir):
    report = run_curate(write_recipe(tmp_path, vision_jsonl, model=vl_dir))

    assert report["rows_read"] == 6 and report["kept"] == 4
    assert filter_entry(report, "execution")["reasons"] == {"recorded tool output differs from re-execution": 1}
    assert filter_entry(report, "execution")["notes"] == {"no tool calls": 1}  # the text-only row
    necessity = filter_entry(report, "necessity")  # the random model sampled the 4 zoom prompts, tools off
    assert (necessity["in"], necessity["dropped"], necessity["pass_rate_mean"]) == (5, 0, 0.0)
    assert necessity["notes"] == {"no tool calls": 1}
    assert filter_entry(report, "dedup")["reasons"] == {"duplicate prompt": 1}
    decisions = {d["id"]: d for d in read_jsonl(tmp_path / "curated" / "decisions.jsonl")}
    assert decisions["vl-cold-start-5-3"]["dropped_by"] == "execution"
    assert "image 0 differs" in decisions["vl-cold-start-5-3"]["detail"]
    assert decisions["dup"]["detail"] == "same prompt as row 'vl-cold-start-5-0'"

    curated_path = tmp_path / "curated" / "curated.jsonl"
    rows = read_jsonl(curated_path)
    assert [row["id"] for row in rows] == ["vl-cold-start-5-0", "vl-cold-start-5-1", "vl-cold-start-5-2", "text-only"]
    questions = [row["messages"][1]["content"][1]["text"] for row in rows[:3]]
    assert len(set(questions)) < 3  # two easy rows: same text, other images, both kept
    for row in rows[:3]:
        assert len(row["images"]) == 2 and all(image.startswith("../in/cold_images/") for image in row["images"])
    assert "images" not in rows[3]
    originals = {e.id: e for e in load_examples(vision_jsonl, need_answer=False)}
    curated = load_examples(curated_path, need_answer=False)
    assert_same_rows(curated, originals)
    assert curated[0].meta["curation"]["filters"] == ["validity", "execution", "necessity", "dedup"]


def test_embedded_image_bytes_round_trip_through_parquet_and_jsonl(tmp_path, vision_jsonl):
    """Parquet input with {bytes, path} images (how `datasets` and verl data keep them): parquet
    output embeds the bytes again, JSONL output keeps them as data URLs; both load back."""
    rows = read_jsonl(vision_jsonl)
    for row in rows:  # one type per parquet column: every content a list of parts
        row["messages"] = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str)
                           else m for m in row["messages"]]
        if "images" in row:
            row["images"] = [{"bytes": (vision_jsonl.parent / name).read_bytes(), "path": None}
                             for name in row["images"]]
    data = tmp_path / "in" / "embedded.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    originals = {e.id: e for e in load_examples(vision_jsonl, need_answer=False)}

    for output_format in ("parquet", "jsonl"):
        report = run_curate(write_recipe(tmp_path, data, output=f"out-{output_format}", output_format=output_format))
        assert report["kept"] == 4 and filter_entry(report, "dedup")["reasons"] == {"duplicate prompt": 1}
        assert filter_entry(report, "execution")["dropped"] == 1
        curated = load_examples(tmp_path / f"out-{output_format}" / f"curated.{output_format}", need_answer=False)
        assert [e.id for e in curated] == ["vl-cold-start-5-0", "vl-cold-start-5-1", "vl-cold-start-5-2", "text-only"]
        assert_same_rows(curated, originals)
        assert curated[3].messages[1]["content"] == "What colour is a ripe banana?"  # text stays a string

    table = pq.read_table(tmp_path / "out-parquet" / "curated.parquet").to_pylist()
    assert table[0]["images"][0]["bytes"] == rows[0]["images"][0]["bytes"]
    lines = read_jsonl(tmp_path / "out-jsonl" / "curated.jsonl")
    assert all(image.startswith("data:image/png;base64,") for image in lines[0]["images"])


def test_the_judge_is_shown_image_parts_as_marks():
    reply = [{"role": "assistant", "content": synthetic_vl.zoom_call([0, 0, 64, 64])},
             {"role": "tool", "name": "zoom_in", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed."}]}]
    assert transcript(reply).endswith("[tool (zoom_in)]\n[image] Zoomed.")

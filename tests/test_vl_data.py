"""Rows with images: every accepted layout becomes string-or-parts contents plus `Example.images`
(sources in order of appearance, checked at load time, decoded only by `load_images`), bad images
are data errors naming the file, row and image, and the synthetic vision sets land on disk."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from metis_cli.data.datasets import load_examples
from metis_cli.errors import DataError

SYSTEM = {"role": "system", "content": "Answer about the image."}
IMAGE = {"type": "image"}


def png(path: Path | None = None, size=(48, 40), colour=(30, 140, 200)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def test_openai_content_parts_move_their_images_into_example_images(tmp_path):
    (tmp_path / "pics").mkdir()
    png(tmp_path / "pics" / "a.png", size=(64, 48))
    png(tmp_path / "pics" / "b.png", size=(50, 50))
    embedded = png(size=(40, 40))
    user = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(embedded), "detail": "high"}},
        text("Compare "), {"type": "image", "image": "pics/a.png"},
        text(" with "), {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'pics' / 'b.png'}"}},
        text(". Which is wider?"),
    ]}
    row = {"id": "cmp", "messages": [{"role": "system", "content": [text("Answer "), text("briefly.")]}, user],
           "answer": "a"}
    (example,) = load_examples(write_jsonl(tmp_path / "rl.jsonl", [row]))

    assert example.messages[0] == {"role": "system", "content": "Answer briefly."}  # text-only: a string
    assert example.messages[1]["content"] == [IMAGE, text("Compare "), IMAGE, text(" with "), IMAGE,
                                              text(". Which is wider?")]
    assert example.images == [data_url(embedded), str(tmp_path / "pics" / "a.png"), str(tmp_path / "pics" / "b.png")]
    assert example.question == "Compare  with . Which is wider?"
    assert [image.size for image in example.load_images()] == [(40, 40), (64, 48), (50, 50)]
    assert all(image.mode == "RGB" for image in example.load_images())
    assert [image.size for image in example.load_images(max_pixels=32 * 32)] == [(32, 32), (43, 32), (32, 32)]


def test_image_parts_take_the_rows_images_in_order_over_the_whole_trajectory(tmp_path):
    # a cold-start row: the prompt's image, then the image a zoom_in call returned
    (tmp_path / "imgs").mkdir()
    png(tmp_path / "imgs" / "0.png", size=(64, 64))
    png(tmp_path / "imgs" / "1.png", size=(32, 32))
    call = '<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 16, 16]}}</tool_call>'
    messages = [
        SYSTEM, {"role": "user", "content": [IMAGE, text("What digit is in the corner?")]},
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "zoom_in", "content": [IMAGE, text("Zoomed in.")]},
        {"role": "assistant", "content": "<answer>7</answer>"},
    ]
    rows = [{"id": "cs-0", "messages": messages, "images": ["imgs/0.png", "imgs/1.png"], "answer": "7"},
            {"id": "rl-0", "messages": messages[:2], "images": ["imgs/0.png"], "answer": "7"}]
    sft, rl = load_examples(write_jsonl(tmp_path / "cold.jsonl", rows))

    assert sft.images == [str(tmp_path / "imgs" / "0.png"), str(tmp_path / "imgs" / "1.png")]
    assert sft.messages == messages[:2] and sft.trajectory == messages
    assert sft.question == "What digit is in the corner?"
    assert [image.size for image in sft.load_images()] == [(64, 64), (32, 32)]
    assert rl.trajectory is None and rl.images == [str(tmp_path / "imgs" / "0.png")]


def test_image_placeholders_in_strings_split_like_verl_when_the_row_has_images(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    row = {"id": "p", "messages": [SYSTEM, {"role": "user", "content": "<image>\nLeft is <image>, right?"}],
           "images": ["a.png", "b.png"], "answer": "yes"}
    text_row = {"id": "t", "messages": [{"role": "user", "content": "Is <image> an HTML tag?"}], "answer": "no"}
    with_images, text_only = load_examples(write_jsonl(tmp_path / "rl.jsonl", [row, text_row]))

    assert with_images.messages[0] == SYSTEM
    assert with_images.messages[1]["content"] == [IMAGE, text("\nLeft is "), IMAGE, text(", right?")]
    assert with_images.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert with_images.question == "Left is , right?"
    # no `images` field: a text row, kept byte for byte
    assert text_only.messages == text_row["messages"] and text_only.images == []


def test_inline_images_and_placeholders_interleave_in_order_of_appearance(tmp_path):
    png(tmp_path / "p.png", size=(33, 33))
    inline = png(size=(40, 40))
    row = {"id": "mix", "answer": "1", "images": ["p.png"], "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(inline)}}, IMAGE, text("?")]}]}
    (example,) = load_examples(write_jsonl(tmp_path / "rl.jsonl", [row]))
    assert example.images == [data_url(inline), str(tmp_path / "p.png")]
    assert [image.size for image in example.load_images()] == [(40, 40), (33, 33)]


def verl_features():
    import datasets

    return datasets.Features({
        "data_source": datasets.Value("string"),
        "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "images": datasets.List(datasets.Image()),
        "reward_model": {"style": datasets.Value("string"), "ground_truth": datasets.Value("string")},
        "extra_info": {"index": datasets.Value("int64")},
    })


def verl_rows(tmp_path: Path) -> list[dict]:
    """verl's preprocessing output: PIL images (stored as bytes) and image files (stored as paths)."""
    from PIL import Image

    png(tmp_path / "geo.png", size=(60, 40))
    prompt = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "<image>Find x."}]
    return [
        {"data_source": "geo3k", "prompt": prompt, "images": [Image.new("RGB", (36, 36), (9, 9, 9))],
         "reward_model": {"style": "rule", "ground_truth": "3"}, "extra_info": {"index": 0}},
        {"data_source": "geo3k", "prompt": prompt, "images": [str(tmp_path / "geo.png")],
         "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 1}},
    ]


def test_verl_parquet_written_with_the_datasets_image_feature(tmp_path):
    import datasets

    path = tmp_path / "geo3k_train.parquet"
    datasets.Dataset.from_list(verl_rows(tmp_path), features=verl_features()).to_parquet(str(path))
    embedded, on_disk = load_examples(path)

    assert embedded.messages == [{"role": "system", "content": "Think first."},
                                 {"role": "user", "content": [IMAGE, text("Find x.")]}]
    assert isinstance(embedded.images[0], bytes)  # the struct's bytes, not a decoded image
    assert on_disk.images == [str(tmp_path / "geo.png")]
    assert (embedded.id, embedded.answer, embedded.subset) == ("0", "3", "geo3k")
    assert [image.size for image in embedded.load_images() + on_disk.load_images()] == [(36, 36), (60, 40)]


def test_saved_datasets_keep_image_columns_undecoded(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(verl_rows(tmp_path), features=verl_features()).save_to_disk(str(folder))
    embedded, on_disk = load_examples(folder)
    # save_to_disk embeds image files: both come back as the stored bytes, not as PIL images
    assert all(isinstance(e.images[0], bytes) for e in (embedded, on_disk))
    assert [image.size for image in embedded.load_images() + on_disk.load_images()] == [(36, 36), (60, 40)]


def test_verl_relative_image_paths_are_relative_to_the_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data" / "images").mkdir(parents=True)
    png(tmp_path / "data" / "images" / "q.png")
    row = {"data_source": "vstar", "prompt": [{"role": "user", "content": "<image>Colour?"}],
           "images": [{"bytes": None, "path": "images/q.png"}],
           "reward_model": {"ground_truth": "red"}, "extra_info": {"index": 5}}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "data" / "rl.parquet")
    (example,) = load_examples(tmp_path / "data" / "rl.parquet")
    assert example.images == [str(tmp_path / "data" / "images" / "q.png")]


@pytest.mark.parametrize(("messages", "images", "counts"), [
    ([{"role": "user", "content": "<image> and <image>?"}], ["a.png"], "2 image placeholders but 1 image"),
    ([{"role": "user", "content": [IMAGE, text("?")]}], ["a.png", "a.png"], "1 image placeholder but 2 images"),
    ([{"role": "user", "content": [IMAGE, text("?")]}], None, "1 image placeholder but 0 images"),
])
def test_placeholder_count_must_match_the_rows_images(tmp_path, messages, images, counts):
    png(tmp_path / "a.png")
    row = {"id": "x", "messages": messages, "answer": "1"}
    if images is not None:
        row["images"] = images
    with pytest.raises(DataError, match=rf"rl\.jsonl line 1: row 'x' has {counts}"):
        load_examples(write_jsonl(tmp_path / "rl.jsonl", [row]))


def bad_image_rows(tmp_path: Path) -> list[tuple[dict, str]]:
    """(row, what its error must say) for each way an image can be unusable."""
    good = tmp_path / "good.png"
    png(good)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(png(size=(64, 64))[:60])
    (tmp_path / "thin.png").write_bytes(png(size=(402, 2)))
    cases = [("missing.png", "image file not found: .*missing.png"),
             ("corrupt.png", "corrupt.png\\): not a readable image"),
             ("empty.png", "empty.png is empty \\(0 bytes\\)"),
             ("truncated.png", "truncated.png\\): not a readable image"),
             ("thin.png", "aspect ratio of 201"),
             ("data:image/png;base64,@@@", "not valid base64")]
    rows = []
    for number, (name, problem) in enumerate(cases):
        row = {"id": f"bad-{number}", "answer": "1", "images": ["good.png", name],
               "messages": [{"role": "user", "content": [IMAGE, IMAGE, text("?")]}]}
        rows.append((row, rf"row 'bad-{number}' images\[1\].*{problem}"))
    return rows


def test_missing_empty_and_corrupt_images_are_errors_naming_file_row_and_image(tmp_path):
    for row, problem in bad_image_rows(tmp_path):
        path = write_jsonl(tmp_path / "rl.jsonl", [row])
        with pytest.raises(DataError, match=rf"rl\.jsonl line 1: {problem}"):
            load_examples(path)


def test_skip_mode_drops_rows_with_bad_images_and_reports_them(tmp_path):
    cases = bad_image_rows(tmp_path)
    good = {"id": "ok", "answer": "1", "images": ["good.png"], "messages": [{"role": "user", "content": "<image>?"}]}
    path = write_jsonl(tmp_path / "rl.jsonl", [good] + [row for row, _ in cases] + [good])
    skipped: list[str] = []
    examples = load_examples(path, malformed_rows="skip", skipped=skipped)
    assert [e.id for e in examples] == ["ok", "ok"]
    assert len(skipped) == len(cases)
    assert all("images[1]" in message for message in skipped)


def test_bad_content_parts_are_errors_naming_the_message_and_part(tmp_path):
    bad_parts = [
        ([{"type": "image_url", "image_url": {}}], "content part 1 \\(image_url\\) needs `image_url.url`"),
        ([text("a"), {"type": "text", "text": 3}], "content part 2 \\(text\\) needs a string `text`"),
        (["just a string"], "content part 1 must be an object"),
        ([{"type": "image", "image": "http://example.com/a.png"}], "web address"),
    ]
    for parts, problem in bad_parts:
        row = {"id": "r", "answer": "1", "messages": [SYSTEM, {"role": "user", "content": parts}]}
        with pytest.raises(DataError, match=rf"rl\.jsonl line 1: .*{problem}"):
            load_examples(write_jsonl(tmp_path / "rl.jsonl", [row]))


def test_assistant_text_parts_with_native_tool_calls_become_one_string(tmp_path):
    messages = [{"role": "user", "content": "Zoom."},
                {"role": "assistant", "content": [text("Looking closer.")], "tool_calls": [
                    {"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 8, 8]}}}]},
                {"role": "tool", "content": "done"}, {"role": "assistant", "content": "<answer>1</answer>"}]
    (example,) = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"messages": messages, "answer": "1"}]))
    assert example.trajectory[1]["content"] == (
        'Looking closer.\n<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 8, 8]}}</tool_call>')


def vision_recipe(tmp_path: Path, **synthetic):
    from metis_cli.recipe.load import validate_data

    sizes = {"knowledge_examples": 3, "cold_start_examples": 4, "rl_prompts": 3, "eval_per_subset": 2}
    return validate_data({"run": {"output_dir": str(tmp_path)}, "model": {"name_or_path": "m"},
                          "data": {"synthetic": {"task": "vision", **sizes, **synthetic}}})


def test_synthetic_vision_sets_are_written_with_their_pngs_and_load(tmp_path):
    from metis_cli.data.sources import load_source, materialize_synthetic
    from metis_cli.recipe.schema import DataSource

    recipe = vision_recipe(tmp_path)
    paths = {name: materialize_synthetic(name, recipe) for name in ("knowledge", "cold_start", "rl", "eval")}
    assert "eval" in paths["eval"].name and all(p.parent == tmp_path / "data" for p in paths.values())
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        folder = path.with_name(f"{path.stem}_images")
        assert sorted(p.name for p in folder.iterdir()) == sorted(Path(i).name for r in rows for i in r["images"])
        examples = load_source(DataSource(path=f"synthetic:{name}"), recipe)
        assert len(examples) == len(rows)
        assert all(Path(image).parent == folder for e in examples for image in e.images)
    cold = load_source(DataSource(path="synthetic:cold_start"), recipe)
    assert all(len(e.images) == 2 and e.trajectory[3]["content"][0] == IMAGE for e in cold)
    assert [image.size for image in cold[0].load_images()] == [(256, 256), (64, 64)]
    evals = load_source(DataSource(path="synthetic:eval"), recipe)
    assert [e.subset for e in evals] == ["easy", "easy", "hard", "hard"]
    assert evals[0].question == "What colour is the large shape?"
    assert materialize_synthetic("eval", recipe) == paths["eval"]  # written once


def test_the_task_is_part_of_the_digest_but_arithmetic_file_names_are_unchanged(tmp_path):
    from metis_cli.data.sources import materialize_synthetic
    from metis_cli.recipe.load import validate_data

    arithmetic = validate_data({"run": {"output_dir": str(tmp_path)}, "model": {"name_or_path": "m"},
                                "data": {"synthetic": {"cold_start_examples": 5, "rl_prompts": 3}}})
    # the names written before the vision task existed (recorded from that code)
    assert materialize_synthetic("cold_start", arithmetic).name == "cold_start-d3bae873.jsonl"
    assert materialize_synthetic("rl", arithmetic).name == "rl-25ea754c.jsonl"
    vision = vision_recipe(tmp_path, cold_start_examples=5, rl_prompts=3)
    assert materialize_synthetic("rl", vision).name != "rl-25ea754c.jsonl"
    assert not list((tmp_path / "data").glob("rl-25ea754c_images"))


def test_an_unknown_task_is_a_recipe_error(tmp_path):
    from metis_cli.errors import RecipeError

    with pytest.raises(RecipeError, match=r"data\.synthetic\.task"):
        vision_recipe(tmp_path, task="audio")

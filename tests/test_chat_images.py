"""`metis chat` with images on the tiny Qwen3-VL: `--image` and `/image` through the real HF
backend, a scripted zoom_in conversation whose images stay in order across questions, the sizes
in `--once --json` and `/save`, and the errors a user can make (text-only model, bad image)."""

from __future__ import annotations

import io
import json
import random

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from metis_cli.agent.backend import Generation
from metis_cli.cli.main import app
from metis_cli.data import synthetic_vl
from metis_cli.data.datasets import load_examples
from metis_cli.recipe import validate_data
from metis_cli.stages.chat import open_session
from metis_cli.stages.chat_repl import answer_once

ZOOM = {"enabled": ["zoom_in"], "zoom_in": {"min_pixels": 4096, "max_pixels": 4096}}  # crops come back 64x64


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    """Two task images of different sizes (256x256 and 96x160)."""
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    first, second = synthetic_vl.draw_image(rng)[0], synthetic_vl.draw_image(rng)[0].resize((96, 160))
    first.save(folder / "shape.png")
    second.save(folder / "tall.png")
    return folder / "shape.png", folder / "tall.png"


def chat_recipe(tmp_path, model_dir) -> str:
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "run"), "threads": 1},
                                    "model": {"name_or_path": str(model_dir)}, "tools": ZOOM,
                                    "chat": {"max_turns": 3, "max_new_tokens": 6}}))
    return str(path)


def image_parts(message: dict) -> int:
    content = message["content"]
    return 0 if isinstance(content, str) else sum(part["type"] == "image" for part in content)


# ------------------------------------------------------------------------------ real backend
def test_once_json_with_images_runs_the_real_backend(tmp_path, vl_dir, image_paths):
    shape, tall = image_paths
    result = CliRunner().invoke(app, ["chat", "--model", str(vl_dir), "--recipe", chat_recipe(tmp_path, vl_dir),
                                      "--image", str(shape), "--image", str(tall), "--once", "What colour?", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    user = payload["messages"][1]
    assert user == {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                {"type": "text", "text": "What colour?"}]}
    assert payload["images"][:2] == [[256, 256], [96, 160]]  # then any image a zoom returned
    assert payload["generated_tokens"] > 0 and "base64" not in result.stdout


def test_repl_image_command_attaches_to_the_next_question_and_saves_sizes(tmp_path, vl_dir, image_paths):
    shape, tall = image_paths
    saved = tmp_path / "out" / "talk.jsonl"
    script = (f"/help\n/image {tmp_path / 'missing.png'}\n/image {tall}\nFirst question?\n"
              f"Second question, no image.\n/save {saved}\n/quit\n")
    result = CliRunner().invoke(app, ["chat", "--model", str(vl_dir), "--recipe", chat_recipe(tmp_path, vl_dir),
                                      "--image", str(shape)], input=script)
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())  # rich wraps long lines
    assert "/image PATH" in output and "attach an image to the next question" in output  # /help
    assert "[image 256x256 attached]" in output and "[image 96x160 attached]" in output
    assert "image file not found" in output  # a bad /image is shown and the session goes on
    row = json.loads(saved.read_text())
    users = [m for m in row["messages"] if m["role"] == "user"]
    assert [image_parts(m) for m in users] == [2, 0]  # both images went with the first question only
    assert row["image_sizes"][:2] == [[256, 256], [96, 160]]
    assert len(row["images"]) == len(row["image_sizes"]) == sum(image_parts(m) for m in row["messages"])
    assert all((saved.parent / name).is_file() for name in row["images"])
    assert "base64" not in saved.read_text()
    example = load_examples(saved, need_answer=False)[0]  # the saved row is data metis reads back
    assert [image.size for image in example.load_images()][:2] == [(256, 256), (96, 160)]


# ------------------------------------------------------------------------------ scripted zoom
class ScriptedZoom:
    """Writes fixed turns instead of sampling: a zoom into the top-left corner, an answer, then
    (for the second question) an answer; records the prompt's image pads and the images given."""

    TURNS = [synthetic_vl.zoom_call([0, 0, 64, 64]), "<answer>7</answer><|im_end|>", "<answer>red</answer><|im_end|>"]

    def __init__(self, tokenizer, vision):
        self.tokenizer, self.vision, self.turn, self.seen = tokenizer, vision, 0, []

    def generate(self, prompts, params, images=None):
        self.seen.append(([self.vision.count_images(p) for p in prompts], [[im.size for im in row] for row in images]))
        ids = self.tokenizer.encode(self.TURNS[self.turn], add_special_tokens=False)
        self.turn += 1
        return [Generation(ids, [0.0] * len(ids), "stop")]

    def update_weights(self, model):
        pass

    def close(self):
        pass


@pytest.fixture
def zoom_session(vl_dir):
    recipe = validate_data({"model": {"name_or_path": str(vl_dir)}, "run": {"output_dir": ".", "threads": 1},
                            "tools": ZOOM, "chat": {"max_turns": 3, "max_new_tokens": 40}})
    session = open_session(str(vl_dir), recipe, quiet=True)
    backend = ScriptedZoom(session.agent.tokenizer, session.vision)
    session.engine.backend = backend
    return session, backend


def test_every_image_of_the_conversation_stays_in_order_across_questions(zoom_session, image_paths):
    session, backend = zoom_session
    shape = session.load_image(str(image_paths[0]), option="--image")
    tall = session.load_image(str(image_paths[1]), option="/image")

    first = session.ask("What digit is in the corner?", images=[shape])
    assert first.finish_reason == "answer" and first.answer == "7" and first.T == 1
    assert first.tool_calls[0].images == [[64, 64]] and first.tool_calls[0].tool_error is None
    assert first.images == [[256, 256], [64, 64]]
    tool_turn = session.messages[-2]
    assert tool_turn["role"] == "tool" and tool_turn["content"][0] == {"type": "image"}

    second = session.ask("And its colour?", images=[tall])
    assert second.answer == "red" and second.images == [[256, 256], [64, 64], [96, 160]]
    # Each call saw as many image pads as images, all of them in order of appearance.
    assert backend.seen == [([1], [[(256, 256)]]), ([2], [[(256, 256), (64, 64)]]),
                            ([3], [[(256, 256), (64, 64), (96, 160)]])]
    assert [image_parts(m) for m in session.messages] == [0, 1, 0, 1, 0, 1, 0]

    session.reset()
    assert session.images == [] and len(session.messages) == 1


def test_once_json_gives_each_tool_calls_image_sizes(zoom_session, image_paths):
    session, _ = zoom_session
    shape = session.load_image(str(image_paths[0]), option="--image")
    out = io.StringIO()
    answer_once(session, "What digit is in the corner?", json_output=True, console=Console(file=io.StringIO()),
                stdout=out, images=[shape])
    payload = json.loads(out.getvalue())
    call = payload["tool_calls"][0]
    assert call["name"] == "zoom_in" and call["arguments"]["bbox_2d"] == [0, 0, 64, 64]
    assert call["images"] == [[64, 64]] and payload["images"] == [[256, 256], [64, 64]]
    assert payload["answer"] == "7"


def test_the_terminal_shows_attached_and_returned_images(zoom_session, image_paths):
    session, _ = zoom_session
    shape = session.load_image(str(image_paths[0]), option="--image")
    screen = io.StringIO()
    answer_once(session, "What digit is in the corner?", json_output=False,
                console=Console(file=screen, width=100, highlight=False), images=[shape])
    text = screen.getvalue()
    assert "[image 256x256 attached]" in text
    panel = text[text.index("zoom_in ("):]  # the tool call's panel: its crop comes back 64x64
    assert "[image 64x64]" in panel and "answer: 7" in text


# ------------------------------------------------------------------------------ mistakes
def test_text_only_model_with_an_image_is_exit_2(tmp_path, tiny_model_dir, image_paths):
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--image", str(image_paths[0]),
                                      "--once", "What colour?"])
    assert result.exit_code == 2, result.output
    error = " ".join(result.stderr.split())
    assert "--image" in error and str(tiny_model_dir) in error and "text-only" in error


def test_text_only_model_refuses_image_command_and_goes_on(tiny_model_dir, image_paths):
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir)],
                                input=f"/image {image_paths[0]}\n/quit\n")
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())
    assert "/image" in output and "text-only" in output and "attached" not in output


@pytest.mark.parametrize("bad", ["missing", "corrupt", "empty"])
def test_a_bad_image_is_a_data_error_before_the_model_loads(tmp_path, bad):
    path = tmp_path / f"{bad}.png"
    if bad == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif bad == "empty":
        path.write_bytes(b"")
    # The model folder does not exist: the image is read (and refused) first.
    result = CliRunner().invoke(app, ["chat", "--model", str(tmp_path / "no-model"), "--image", str(path),
                                      "--once", "hi"])
    assert result.exit_code == 2, result.output
    expected = {"missing": "image file not found", "corrupt": "not a readable image", "empty": "is empty"}[bad]
    error = " ".join(result.stderr.split())
    assert f"--image {path}" in error and expected in error

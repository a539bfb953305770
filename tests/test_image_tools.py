"""Image tools: zoom_in crops what it is asked to and refuses bad boxes with observations the model
sees; image_search returns captioned images; the registry passes the conversation's images only
to tools that ask for them and sizes what tools return; `metis tools call --image`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools import ToolContext, ToolErrorKind, ToolRegistry, ToolResult, tool_spec
from metis_cli.agent.tools.calculator import CalculatorTool
from metis_cli.agent.tools.image_search import ImageSearchTool, load_image_corpus
from metis_cli.agent.tools.zoom import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ZoomInTool
from metis_cli.cli.tools import app as tools_app
from metis_cli.data import synthetic_vl
from metis_cli.data.images import zoom
from metis_cli.errors import ToolConfigError
from metis_cli.recipe.schema import ToolsConfig

RED, BLUE = (200, 10, 10), (10, 10, 200)


def parsed(name: str, **arguments) -> ParsedToolCall:
    return ParsedToolCall(name=name, arguments=arguments, raw="", error=None)


def registry_of(*tools) -> ToolRegistry:
    return ToolRegistry(list(tools), timeout_s=5.0, max_calls_per_rollout=4, max_concurrency=4)


def run(registry: ToolRegistry, call: ParsedToolCall, images=()) -> ToolResult:
    return registry.execute_many([(call, 0)], contexts=[ToolContext(images=tuple(images))])[0]


@pytest.fixture
def halves() -> Image.Image:
    """200x100: red left half, blue right half."""
    image = Image.new("RGB", (200, 100), RED)
    image.paste(BLUE, (100, 0, 200, 100))
    return image


def colours(image: Image.Image) -> set:
    return {colour for _, colour in image.getcolors(maxcolors=image.width * image.height)}


# -------------------------------------------------------------------------------------- zoom_in
def test_zoom_returns_the_box_enlarged_as_the_next_image(halves):
    registry = registry_of(ZoomInTool(min_pixels=200 * 200, max_pixels=400 * 400))
    result = run(registry, parsed("zoom_in", bbox_2d=[120, 10, 170, 60], image_index=1), [halves, halves])
    assert result.ok and result.text == "Zoomed in on [120, 10, 170, 60] of image 1; this is image 2."
    [zoomed] = result.images
    assert zoomed.size == (200, 200) and colours(zoomed) == {BLUE}


def test_zoom_relative_coordinates_are_thousandths_of_each_side(halves):
    registry = registry_of(ZoomInTool(coordinates="relative", min_pixels=1, max_pixels=10**6))
    result = run(registry, parsed("zoom_in", bbox_2d=[0, 0, 500, 1000]), [halves])
    assert result.images[0].size == (100, 100) and colours(result.images[0]) == {RED}
    assert result.text.startswith("Zoomed in on [0, 0, 500, 1000] of image 0")
    refused = run(registry, parsed("zoom_in", bbox_2d=[0, 0, 1500, 1000]), [halves])
    assert refused.error == ToolErrorKind.TOOL_ERROR and "within 0-1000" in refused.text


@pytest.mark.parametrize(("arguments", "kind", "message"), [
    ({"bbox_2d": [150, 10, 100, 60]}, ToolErrorKind.TOOL_ERROR, "x1 < x2"),
    ({"bbox_2d": [300, 300, 400, 400]}, ToolErrorKind.TOOL_ERROR, "outside the image, which is 200x100 pixels"),
    ({"bbox_2d": [0, 0, 10, 10], "image_index": 3}, ToolErrorKind.TOOL_ERROR,
     "image_index 3 does not exist; the conversation has 1 image(s), numbered 0 to 0"),
    ({"bbox_2d": [0, 0, 10]}, ToolErrorKind.BAD_ARGUMENTS, "invalid arguments for zoom_in"),
    ({"bbox_2d": [0, 0, 10, 10], "image_index": -1}, ToolErrorKind.BAD_ARGUMENTS, "invalid arguments"),
    ({"box": [0, 0, 10, 10]}, ToolErrorKind.BAD_ARGUMENTS, "invalid arguments"),
])
def test_bad_zoom_calls_are_observations_the_model_sees(halves, arguments, kind, message):
    result = run(registry_of(ZoomInTool()), parsed("zoom_in", **arguments), [halves])
    assert result.error == kind and result.text.startswith("Error: ") and message in result.text
    assert not result.images


def test_zoom_without_any_image_says_so():
    result = run(registry_of(ZoomInTool()), parsed("zoom_in", bbox_2d=[0, 0, 10, 10]))
    assert result.error == ToolErrorKind.TOOL_ERROR and "no image in this conversation" in result.text


def test_zoom_accepts_a_label_and_widens_tiny_boxes_like_the_official_tool(halves):
    result = run(registry_of(ZoomInTool(min_pixels=1, max_pixels=10**6)),
                 parsed("zoom_in", bbox_2d=[99, 50, 101, 52], label="the border"), [halves])
    assert result.ok and result.images[0].size == (32, 32) and colours(result.images[0]) == {RED, BLUE}


def test_zoom_spec_is_the_one_the_synthetic_task_renders():
    assert tool_spec(ZoomInTool()) == synthetic_vl.ZOOM_IN_TOOL_SPEC


def test_recipe_defaults_are_the_tools_defaults():
    config = ToolsConfig(enabled=["zoom_in"])
    assert (config.zoom_in.min_pixels, config.zoom_in.max_pixels) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    tool = ToolRegistry.from_config(config).get("zoom_in")
    assert (tool.coordinates, tool.min_pixels, tool.max_pixels) == ("pixels", DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


def test_cold_start_observation_is_what_the_tool_returns():
    """Execution consistency: re-running a cold-start zoom gives the recorded text and image."""
    row = synthetic_vl.cold_start_trajectories(1, seed=3, hard_share=1.0)[0]
    call = json.loads(row["messages"][2]["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
    pixels = synthetic_vl.ZOOM_PIXELS
    result = run(registry_of(ZoomInTool(min_pixels=pixels, max_pixels=pixels)), parsed("zoom_in", **call["arguments"]),
                 row["images"][:1])
    assert result.text == row["messages"][3]["content"][1]["text"]
    assert result.images[0].tobytes() == row["images"][1].tobytes()


# ------------------------------------------------------------------------------------- registry
class ReturnsImage:
    name = "returns_image"
    description = "Returns a fixed image."
    parameters = {"type": "object", "properties": {}}

    def __init__(self, image):
        self.image = image

    async def call(self, arguments: dict) -> ToolResult:
        return ToolResult(text="here", images=[self.image])


def test_tools_without_context_work_unchanged_when_images_are_passed(halves):
    result = run(registry_of(CalculatorTool()), parsed("calculator", expression="6*7"), [halves])
    assert result.ok and result.text == "42" and result.images == []


def test_returned_images_are_sized_for_the_processor_or_refused():
    small = run(registry_of(ReturnsImage(Image.new("RGBA", (8, 16)))), parsed("returns_image"))
    assert small.ok and small.images[0].size == (32, 64) and small.images[0].mode == "RGB"
    thin = run(registry_of(ReturnsImage(Image.new("RGB", (2010, 10)))), parsed("returns_image"))
    assert thin.error == ToolErrorKind.TOOL_ERROR and "unusable image" in thin.text and "aspect ratio" in thin.text


def test_contexts_must_match_the_calls():
    registry = registry_of(CalculatorTool())
    with pytest.raises(ValueError, match="1 calls"):
        registry.execute_many([(parsed("calculator", expression="1"), 0)], contexts=[])


# --------------------------------------------------------------------------------- image_search
@pytest.fixture
def corpus_jsonl(tmp_path: Path) -> Path:
    rows = [("cat", "a grey cat sleeping on a sofa", RED), ("boat", "a red boat on a lake", BLUE),
            ("dog", "a dog running on the beach", (0, 200, 0))]
    lines = []
    for name, caption, colour in rows:
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{name}.png")
        lines.append(json.dumps({"id": name, "image": f"{name}.png", "caption": caption}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus


def test_image_search_returns_the_best_captioned_images(corpus_jsonl, halves):
    tool = ImageSearchTool.from_corpus(corpus_jsonl, top_k=2)
    result = run(registry_of(tool), parsed("image_search", query="boat lake"), [halves])
    assert result.ok and result.text == "1. [boat] a red boat on a lake (image 1)"
    assert [colours(image) for image in result.images] == [{BLUE}]
    nothing = run(registry_of(tool), parsed("image_search", query="spaceship"))
    assert nothing.ok and nothing.text == "No images match 'spaceship'." and not nothing.images


def test_image_search_folder_corpus_uses_caption_files_or_file_names(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 40), RED).save(tmp_path / "sub" / "red_apple.png")
    Image.new("RGB", (40, 40), BLUE).save(tmp_path / "sky.jpg")
    (tmp_path / "sky.txt").write_text("a clear blue sky\n", encoding="utf-8")
    entries = load_image_corpus(tmp_path)
    assert [(entry.id, entry.caption) for entry in entries] == [("sky.jpg", "a clear blue sky"),
                                                               ("sub/red_apple.png", "red apple")]
    result = run(registry_of(ImageSearchTool(entries, max_pixels=32 * 32)), parsed("image_search", query="apple"))
    assert result.text == "1. [sub/red_apple.png] red apple (image 0)" and result.images[0].size == (32, 32)


def test_image_search_reports_an_unreadable_corpus_image_without_failing(corpus_jsonl):
    (corpus_jsonl.parent / "boat.png").write_bytes(b"broken")
    result = run(registry_of(ImageSearchTool.from_corpus(corpus_jsonl)), parsed("image_search", query="boat"))
    assert result.ok and result.text == "1. [boat] a red boat on a lake (image unreadable)" and not result.images


@pytest.mark.parametrize(("corpus_text", "message"), [
    ('{"image": "missing.png", "caption": "x"}\n', "image file not found"),
    ('{"caption": "x"}\n', 'expected {"image": PATH, "caption": TEXT'),
    ("{not json\n", "invalid JSON"),
    ("\n", "has no images"),
])
def test_bad_image_corpus_names_the_recipe_field_and_line(tmp_path, corpus_text, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(corpus_text, encoding="utf-8")
    with pytest.raises(ToolConfigError, match="tools.image_search.corpus") as raised:
        ToolRegistry.from_config(ToolsConfig(enabled=["image_search"], image_search={"corpus": str(corpus)}))
    assert message in str(raised.value)


# ------------------------------------------------------------------------------------------ CLI
runner = CliRunner()


def test_cli_call_with_images_prints_and_saves_what_the_tool_returns(tmp_path, halves):
    halves.save(tmp_path / "halves.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name_or_path: some/model}\n"
                      "tools: {enabled: [zoom_in], zoom_in: {min_pixels: 2500, max_pixels: 2500}}\n", encoding="utf-8")
    arguments = '{"bbox_2d": [100, 0, 200, 100]}'
    result = runner.invoke(tools_app, ["call", "zoom_in", arguments, "--recipe", str(recipe),
                                       "--image", str(tmp_path / "halves.png"), "--save-images", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = tmp_path / "out" / "image_1.png"
    assert result.output.splitlines() == ["Zoomed in on [100, 0, 200, 100] of image 0; this is image 1.",
                                          f"[image 1 50x50] -> {saved}"]
    assert colours(Image.open(saved).convert("RGB")) == {BLUE}
    as_json = runner.invoke(tools_app, ["call", "zoom_in", arguments, "--recipe", str(recipe), "--json",
                                        "--image", str(tmp_path / "halves.png")])
    assert json.loads(as_json.stdout)["images"] == [{"index": 1, "width": 50, "height": 50}]


def test_cli_call_with_a_missing_image_is_a_user_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name_or_path: some/model}\ntools: {enabled: [zoom_in]}\n", encoding="utf-8")
    result = runner.invoke(tools_app, ["call", "zoom_in", '{"bbox_2d": [0, 0, 9, 9]}', "--recipe", str(recipe),
                                       "--image", str(tmp_path / "nope.png")])
    assert result.exit_code == 2 and "--image images[0]: image file not found" in result.output


# ------------------------------------------------------------------------ python sandbox images
def sandbox_tool(**options):
    from metis_cli.agent.tools.python_sandbox import PythonLimits, PythonTool

    limits = PythonLimits(wall_timeout_s=5.0, cpu_time_s=2, memory_mb=256, output_bytes=4096, max_processes=8)
    return PythonTool(limits, sandbox="bwrap", packages=["PIL"], images=True, **options)


def run_code(tool, code: str, images=(), session=None) -> ToolResult:
    import asyncio

    return asyncio.run(tool.call({"code": code}, session=session, context=ToolContext(images=tuple(images))))


def test_python_code_reads_the_images_and_its_saved_images_come_back(halves):
    tool = sandbox_tool()
    assert "image_1.png" in tool.description and "outputs/" in tool.description
    code = ("import os\nfrom PIL import Image\nprint(sorted(n for n in os.listdir('.') if n[0] != '.'))\n"
            "Image.open('image_2.png').crop((100, 0, 200, 100)).save('outputs/right.png')")
    result = run_code(tool, code, [halves, halves])
    assert result.ok, result.text
    assert result.text == "['image_1.png', 'image_2.png', 'main.py', 'outputs']\n(outputs/ shown as image 2)"
    assert [image.size for image in result.images] == [(100, 100)] and colours(result.images[0]) == {BLUE}


def test_python_returned_images_are_count_and_pixel_limited(halves):
    tool = sandbox_tool(max_images=2, max_image_pixels=50 * 50)
    code = ("from PIL import Image\nfor i in range(3): Image.new('RGB', (400, 400)).save(f'outputs/{i}.png')\n"
            "open('outputs/notes.txt', 'w').write('hello')")
    result = run_code(tool, code, [halves])
    assert [image.size for image in result.images] == [(50, 50), (50, 50)]
    assert "outputs/: only the first 2 images are shown" in result.text and "(outputs/ shown as images 1 to 2)" in result.text


def test_python_cannot_make_the_host_read_or_write_through_links(tmp_path, halves):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), RED).save(secret)
    secret_folder = tmp_path / "folder"
    secret_folder.mkdir()
    Image.new("RGB", (40, 40), RED).save(secret_folder / "x.png")
    linked = run_code(sandbox_tool(), f"import os\nos.symlink({str(secret)!r}, 'outputs/leak.png')", [halves])
    assert linked.images == [] and "outputs/leak.png not shown: links are not followed" in linked.text
    swapped = run_code(sandbox_tool(), f"import os\nos.rmdir('outputs')\nos.symlink({str(secret_folder)!r}, 'outputs')")
    assert swapped.ok and swapped.images == [] and (secret_folder / "x.png").exists()
    # a persistent session that turns image_1.png into a link: the next call's write replaces the link
    tool = sandbox_tool(persistent=True)
    try:
        run_code(tool, f"import os\nos.remove('image_1.png')\nos.symlink({str(secret)!r}, 'image_1.png')",
                 [halves], session="a")
        after = run_code(tool, "import os\nprint(os.path.islink('image_1.png'))", [halves], session="a")
    finally:
        tool.end_session("a")
    assert after.text == "False" and colours(Image.open(secret).convert("RGB")) == {RED}


def test_python_session_returns_each_saved_image_once(halves):
    tool = sandbox_tool(persistent=True)
    try:
        first = run_code(tool, "from PIL import Image\nImage.open('image_1.png').save('outputs/a.png')", [halves],
                         session="a")
        second = run_code(tool, "1 + 1", [halves, first.images[0]], session="a")
    finally:
        tool.end_session("a")
    assert len(first.images) == 1 and second.images == [] and second.text == "2"


def test_python_without_images_sees_no_files_and_gets_no_context(halves):
    from metis_cli.agent.tools.python_sandbox import PythonLimits, PythonTool

    tool = PythonTool(PythonLimits(), sandbox="bwrap")
    assert not tool.needs_context and "image_1.png" not in tool.description
    result = run(registry_of(tool), parsed("python", code="import os\nprint(sorted(os.listdir('.')))"), [halves])
    assert result.text == "['main.py']" and result.images == []

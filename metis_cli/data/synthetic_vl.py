"""The synthetic vision task behind the tiny vision default: images drawn here, questions, answers.

Each image is a `canvas_size` square (256 px) with one large coloured shape in the middle and
one small checkered mark (two colours, 2 px cells) in one corner, with a little grain over
all. Two kinds of question, so "when to zoom" has a right answer:
- `easy`: "What colour is the large shape?" The shape fills nearly half the side, so its colour
  survives the processor's downscaling (the tiny model sees 64x64 pixels).
- `hard`: "What colour is the top-left cell of the mark in the top left corner?" Shrunk 4x, the
  mark is a 2x2 px blend of its two colours (which one is top-left is lost); `zoom_in` on the
  32 px corner box returns it enlarged 2x: the mark fills the zoomed image's first vision patch,
  each cell 4x4 px. (Digits in a
  tiny font were tried first: the random 2-layer vision tower did not learn to read them in a
  CPU-sized cold start, while colours take ~100 steps.)

It owns the drawing, the questions, the system prompt and the `zoom_in` tool spec the task is
rendered with, and the four generators (knowledge, cold start, rl, eval) with `write_set`, which
writes a set as JSONL plus the PNG files beside it. It does not tokenize or run tools; the crop
of a cold-start zoom is data/images.py's `zoom`, the same code the tool runs.

Rows use the messages layout, images in a row's `images` list in order of appearance and marked
by `{"type": "image"}` content parts: `{"id", "messages", "images", "answer", "subset"}`. Eval
images are drawn from their own seed stream, so no training image is an eval image.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from metis_cli.data import images as image_ops
from metis_cli.data.synthetic import answer_text, write_jsonl
from metis_cli.host import available_cores

Subset = Literal["easy", "hard"]

DIGEST_REVISIONS = {"cold_start": "direct"}
"""A tag added to a set's file digest when its rows changed for the same recipe parameters, so
older files are not reused: the cold start once ignored `direct_answer_share`."""

SYSTEM_PROMPT = "Answer the question about the image. Use zoom_in to look closer if needed."
CANVAS_SIZE = 256
ZOOM_PIXELS = 64 * 64
"""The tiny task's zoom output size: the crop is scaled to exactly this many pixels (the tool's
`min_pixels` and `max_pixels` in recipes/tiny-vl.yaml), what the tiny processor takes unshrunk."""

ZOOM_IN_TOOL_SPEC: dict = {
    "type": "function",
    "function": {
        "name": "zoom_in",
        "description": "Crop a region of an image and return it enlarged.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                            "description": "The region [x1, y1, x2, y2] in pixels of the image."},
                "image_index": {"type": "integer", "minimum": 0,
                                "description": "Which image of the conversation (0 = the first)."},
                "label": {"type": "string", "description": "What the region shows (optional)."},
            },
            "required": ["bbox_2d"],
            "additionalProperties": False,
        },
    },
}
"""zoom_in as the chat template sees it, written out here so the data layer needs no tool code;
tests/test_image_tools.py checks it equals `agent.tools.zoom.ZoomInTool`'s spec (pixel
coordinates). The tiny vision tokenizer's merges are trained on this text."""

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "pink": (235, 90, 200), "orange": (245, 130, 30),
}
"""Six colours far apart in RGB (every pair >= 70 levels, pink >= 168 from all): with purple
(140, 60, 180) in pink's place the random vision tower confused blue and purple in ~10% of easy
answers on some seeds."""
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
SHAPE_SIZE = (0.42, 0.46)
"""The large shape's side (or diameter) as a share of the canvas side, drawn uniformly: large
enough that its colour dominates the 64x64 view (the random vision tower learns it in ~100 SFT
steps; at 31-41% it took several hundred), small enough to leave the corners free."""
MARK_PX = 8
MARK_CELL = 2
"""The checkered mark: MARK_PX x MARK_PX px of MARK_CELL px square cells in two colours (a 4x4
checker), on the 4 px grid. Shrunk 4x to 64x64 each 4x4 block holds two cells of each colour, so
the mark becomes one blend that says nothing about which colour is in the top-left cell."""
CORNER_BOX = 32
"""The hard question's zoom box side (px), the mark at the box's top-left corner whichever corner
of the image the box is in. `zoom_in` enlarges the box 2x to 64x64, so the mark fills exactly the
zoomed image's first 16x16 px vision patch and its top-left cell is that patch's top-left 4x4 px,
the same place for every corner: the read is one fixed linear feature of one patch. (Measured
worse, README: a 64 px box returned 1:1, one-pixel cells; the mark inset 4 px from the image's
outer corner, so it straddled four patches at a corner-dependent place; the mark centred in the
box. data/images.MIN_SIDE = 32 is the smallest box the tool crops.)"""
GRAIN = 24
"""Per-pixel noise (uniform +-GRAIN per channel) over the whole image, like sensor grain: what
little of the mark's order survives the 4x shrink (filter leakage at its edges) drowns in it,
while the zoomed cells (colours 100+ levels apart) stay plain."""


def easy_question() -> str:
    return "What colour is the large shape?"


def hard_question(corner: str) -> str:
    return f"What colour is the top-left cell of the mark in the {corner} corner?"


def corner_box(corner: str, canvas_size: int = CANVAS_SIZE) -> list[int]:
    """The CORNER_BOX square at `corner`, where the mark is drawn: the hard question's zoom."""
    side = CORNER_BOX
    x1 = 0 if corner.endswith("left") else canvas_size - side
    y1 = 0 if corner.startswith("top") else canvas_size - side
    return [x1, y1, x1 + side, y1 + side]


def centre_box(canvas_size: int = CANVAS_SIZE) -> list[int]:
    """The middle half of the image, where the shape is: the blind zoom of an easy question."""
    return [canvas_size // 4, canvas_size // 4, canvas_size * 3 // 4, canvas_size * 3 // 4]


def zoom_call(bbox: list[int], image_index: int = 0) -> str:
    """The assistant text of one zoom_in call, exactly as the rollout parser expects it."""
    call = {"name": "zoom_in", "arguments": {"bbox_2d": bbox, "image_index": image_index}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def draw_image(rng: random.Random, canvas_size: int = CANVAS_SIZE):
    """(image, facts): one task image and what is on it ({colour, shape, corner, mark}; mark is
    the colour of the mark's top-left cell, mark_other its other colour)."""
    from PIL import Image, ImageDraw

    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    corner = rng.choice(CORNERS)
    mark, mark_other = rng.sample(sorted(COLOURS), 2)
    image = Image.new("RGB", (canvas_size, canvas_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    # The shape stays inside the middle (corners free for the mark): SHAPE_SIZE of the side,
    # centre within 4% of the middle.
    size = rng.uniform(*SHAPE_SIZE) * canvas_size
    centre_x, centre_y = (canvas_size / 2 + rng.uniform(-0.04, 0.04) * canvas_size for _ in range(2))
    box = (centre_x - size / 2, centre_y - size / 2, centre_x + size / 2, centre_y + size / 2)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(centre_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    _draw_mark(image, mark, mark_other, corner_box(corner, canvas_size))
    image = _with_grain(image, rng)
    return image, {"colour": colour, "shape": shape, "corner": corner, "mark": mark, "mark_other": mark_other}


def knowledge_examples(n: int, seed: int, canvas_size: int = CANVAS_SIZE, closeup_share: float = 0.0,
                       zoom_pixels: int = ZOOM_PIXELS) -> list[dict]:
    """`n` questions answered directly, what a real vision model perceives without a tool: easy
    ones on the whole image, and `closeup_share` of them hard ones on a close-up (the image is the
    corner box enlarged, exactly what `zoom_in` returns, so the mark is plain). A pretrained VLM
    reads a plain mark; the random tiny one learns it here, and the cold start only has to teach
    when to zoom. Which rows are close-ups comes from its own seed stream, so the images (and,
    with `closeup_share` 0, the rows) are those of the set without close-ups."""
    rng = random.Random(f"vl-knowledge-{seed}")
    closeups = set(random.Random(f"vl-knowledge-plan-{seed}").sample(range(n), round(n * closeup_share)))
    rows = []
    for index in range(n):
        image, facts = draw_image(rng, canvas_size)
        subset, question, answer = "easy", easy_question(), facts["colour"]
        if index in closeups:
            subset, question, answer = "hard", hard_question(facts["corner"]), facts["mark"]
            (image, _), _ = _zoom_for(subset, image, facts, canvas_size, zoom_pixels)
        rows.append(_direct_row(f"vl-knowledge-{seed}-{index}", subset, question, answer, image))
    return rows


def cold_start_trajectories(n: int, seed: int, hard_share: float = 0.5, direct_answer_share: float = 0.0,
                            canvas_size: int = CANVAS_SIZE, zoom_pixels: int = ZOOM_PIXELS) -> list[dict]:
    """`n` conversations that zoom (blind tool use): hard ones into the named corner, easy ones
    into the middle, then answer; `direct_answer_share` of the easy ones are answered without the
    tool instead (the rare direct answers of a real cold start, which make the choice depend on
    the question before RL starts). The zoomed image is the second of the row's images, made by
    the same `zoom` the tool runs. Which easy rows are direct comes from its own seed stream, so
    the images are those of the set without direct answers."""
    planned = _planned("cold-start", n, seed, hard_share, canvas_size)
    easy = [index for index, row in enumerate(planned) if row[1] == "easy"]
    direct = set(random.Random(f"vl-cold-start-direct-{seed}").sample(easy, round(len(easy) * direct_answer_share)))
    rows = []
    for index, (row_id, subset, image, facts, question, answer) in enumerate(planned):
        if index in direct:
            rows.append(_direct_row(row_id, subset, question, answer, image))
            continue
        (zoomed, box), bbox = _zoom_for(subset, image, facts, canvas_size, zoom_pixels)
        turns = [
            {"role": "assistant", "content": zoom_call(bbox)},
            {"role": "tool", "name": "zoom_in",
             "content": [{"type": "image"}, {"type": "text", "text": image_ops.zoom_text(box, 0, 1)}]},
            {"role": "assistant", "content": answer_text(answer)},
        ]
        rows.append(_row(row_id, subset, question, answer, [image, zoomed], turns))
    return rows


def _zoom_for(subset: Subset, image, facts: dict, canvas_size: int, zoom_pixels: int):
    """((zoomed image, box as zoomed), requested box) of the zoom a question needs: the named
    corner for a hard one, the middle for an easy one; the same `zoom` the tool runs."""
    bbox = corner_box(facts["corner"], canvas_size) if subset == "hard" else centre_box(canvas_size)
    return image_ops.zoom(image, bbox, min_pixels=zoom_pixels, max_pixels=zoom_pixels), bbox


def rl_prompts(n: int, seed: int, hard_share: float = 0.5, canvas_size: int = CANVAS_SIZE) -> list[dict]:
    """`n` RL prompts (system + user with the image), `hard_share` of them hard."""
    return [_row(row_id, subset, question, answer, [image], [])
            for row_id, subset, image, _, question, answer in _planned("rl", n, seed, hard_share, canvas_size)]


def eval_prompts(n_per_subset: int, seed: int, canvas_size: int = CANVAS_SIZE) -> list[dict]:
    """`n_per_subset` easy then `n_per_subset` hard held-out prompts (own seed stream)."""
    rng = random.Random(f"vl-eval-{seed}")
    rows = []
    for subset in ("easy", "hard"):
        for index in range(n_per_subset):
            image, facts = draw_image(rng, canvas_size)
            question, answer = _question_answer(subset, facts)
            rows.append(_row(f"vl-eval-{subset}-{seed}-{index}", subset, question, answer, [image], []))
    return rows


def write_set(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` (images as PIL images) to the JSONL `path`, their PNGs to `<stem>_images/`
    beside it, and rows' `images` as paths relative to the file. Both appear whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_name(f"{path.stem}_images")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=path.parent))
    staging.chmod(0o755)
    try:
        written, files = [], []
        for row in rows:
            names = [f"{row['id']}-{index}.png" for index in range(len(row["images"]))]
            files += [(image, staging / name) for image, name in zip(row["images"], names)]
            written.append({**row, "images": [f"{folder.name}/{name}" for name in names]})
        # PNG stays lossless at any level; level 1 writes the grainy images ~3x faster than the
        # default 6 (~12% larger), and Pillow's encoder releases the GIL, so a thread per core.
        with ThreadPoolExecutor(max_workers=available_cores()) as pool:
            list(pool.map(lambda job: job[0].save(job[1], format="PNG", compress_level=1), files))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return write_jsonl(written, path)


def _planned(stream: str, n: int, seed: int, hard_share: float, canvas_size: int) -> list[tuple]:
    """`n` drawn rows of the seeded `stream` ("cold-start", "rl") as (row id, subset, image, facts,
    question, answer): which rows are hard comes from the stream's plan seed, the images, in row
    order, from its own seed, so each generator's data depends only on its stream and seed."""
    subsets = _subsets(n, hard_share, random.Random(f"vl-{stream}-plan-{seed}"))
    rng = random.Random(f"vl-{stream}-{seed}")
    planned = []
    for index, subset in enumerate(subsets):
        image, facts = draw_image(rng, canvas_size)
        planned.append((f"vl-{stream}-{seed}-{index}", subset, image, facts, *_question_answer(subset, facts)))
    return planned


def _question_answer(subset: Subset, facts: dict) -> tuple[str, str]:
    if subset == "easy":
        return easy_question(), facts["colour"]
    return hard_question(facts["corner"]), facts["mark"]


def _subsets(n: int, hard_share: float, rng: random.Random) -> list[Subset]:
    if n < 0 or not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"need n >= 0 and hard_share within [0, 1], got n={n}, hard_share={hard_share}")
    n_hard = round(n * hard_share)
    subsets: list[Subset] = ["hard"] * n_hard + ["easy"] * (n - n_hard)
    rng.shuffle(subsets)
    return subsets


def _draw_mark(image, first: str, second: str, region: list[int]) -> None:
    """The checkered mark at `region`'s top-left corner (CORNER_BOX): the cell at (column, row) is
    `first` where column + row is even (the top-left cell), else `second`."""
    left, top = region[:2]
    for dy in range(MARK_PX):
        for dx in range(MARK_PX):
            even = (dx // MARK_CELL + dy // MARK_CELL) % 2 == 0
            image.putpixel((left + dx, top + dy), COLOURS[first if even else second])


def _with_grain(image, rng: random.Random):
    """`image` plus uniform per-pixel noise of +-GRAIN per channel, seeded from `rng`."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(rng.getrandbits(64)).integers(-GRAIN, GRAIN + 1, size=(*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8), mode="RGB")


def _direct_row(row_id: str, subset: Subset, question: str, answer: str, image) -> dict:
    """A question on one image answered without the tool."""
    return _row(row_id, subset, question, answer, [image], [{"role": "assistant", "content": answer_text(answer)}])


def _row(row_id: str, subset: Subset, question: str, answer: str, row_images: list, turns: list[dict]) -> dict:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, user, *turns]
    return {"id": row_id, "messages": messages, "images": row_images, "answer": answer, "subset": subset}

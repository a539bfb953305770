"""Chat messages as plain text for people to read: image parts as `[image WxH]`, never pixels.

A saved rollout record (hdpo's samples, `metis chat --json` rows) keeps its messages with image
content parts and the sizes of its images, in order of appearance, under `images`
([[width, height], ...]). `message_text` renders one message's content with each image part as
`image_mark` of the next size; the TUI's rollout browser (tui/rollout_view.py) and the trackers'
rollout tables (telemetry/trackers.py) show the same text.

Must not touch: what a record holds (stages/hdpo_step.py writes it) or how a browser styles it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

IMAGE_MARK = re.compile(r"\[image(?: \d+x\d+)?\]")
"""What `image_mark` writes (the TUI highlights it)."""


def image_mark(size) -> str:
    """`[image WxH]` for a [width, height] pair, `[image]` for anything else (size unknown)."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(side, int) for side in size):
        return f"[image {size[0]}x{size[1]}]"
    return "[image]"


def image_sizes(record: dict) -> Iterator:
    """The record's image sizes in order, then None forever (more image parts than sizes)."""
    sizes = record.get("images")
    yield from sizes if isinstance(sizes, list) else []
    while True:
        yield None


def message_text(message: dict, sizes: Iterator | None = None) -> str:
    """A chat message's content as text: string content, or a list's text parts with each image
    part as `image_mark` of the next size from `sizes` (`[image]` without them)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    pieces = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("image", "image_url") or "image" in part:
            pieces.append(image_mark(next(sizes) if sizes is not None else None) + " ")
        else:
            pieces.append(str(part.get("text", "")))
    return "".join(pieces)

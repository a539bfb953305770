"""Message contents as metis keeps them: a string, or a list of text and image parts.

A loaded message's content is either a string (every text-only message, exactly as written) or a
list of parts, each `{"type": "text", "text": str}` or `{"type": "image"}`. An image part carries
no payload: the image itself is the row's next entry of `Example.images`, numbered in order of
appearance over the whole conversation. Rows bring images in three layouts (docs/formats.md):
- OpenAI chat content parts: `{"type": "image_url", "image_url": {"url": ...}}` and
  `{"type": "image", "image": PATH}` carry their own image (an inline source); `{"type": "text"}`;
- `{"type": "image"}` parts without a payload, standing for the row's `images` in order;
- string contents with `<image>` placeholders when the row has an `images` field (verl's
  layout): split at each `<image>` as verl's own dataset code does, empty pieces dropped.
A list made only of text parts becomes the string of its texts (text-only stays a string).

It owns the shape of a content and the count of placeholders against `images`; it does not read
or check image data (data/images.py) or decide what a row means otherwise (data/datasets.py).
"""

from __future__ import annotations

import re
from typing import Any

from metis_cli.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")
PART_TYPES = ("text", "image", "image_url")

Content = str | list[dict]
Slot = Any
"""One image part's source in order: the inline source it carried, or None for a placeholder
that takes the row's next `images` entry."""


def parse_content(content: Any, label: str, *, split_placeholders: bool) -> tuple[Content, list[Slot]]:
    """(content as metis keeps it, one slot per image part in order). `label` names the message
    in errors; `split_placeholders`: the row has an `images` field, so `<image>` in a string marks
    an image."""
    if isinstance(content, str):
        if not split_placeholders or IMAGE_PLACEHOLDER not in content:
            return content, []
        parts = _split_text(content)
        return parts, [None] * sum(part["type"] == "image" for part in parts)
    if hasattr(content, "tolist"):  # numpy arrays from pandas-built parquet
        content = content.tolist()
    if not isinstance(content, list) or not content:
        raise DataError(
            f"{label} content must be a string or a non-empty list of content parts "
            f"({', '.join(PART_TYPES)}), got {type(content).__name__}"
        )
    parts, slots = [], []
    for number, raw in enumerate(content, start=1):
        part, slot = _parse_part(raw, f"{label} content part {number}")
        parts.append(part)
        if part["type"] == "image":
            slots.append(slot)
    if not slots:
        return "".join(part["text"] for part in parts), []
    return parts, slots


def fill_slots(slots: list[Slot], row_images: list, row_label: str) -> list:
    """The row's image sources in order of appearance: inline sources where a part carried one,
    the row's `images` in order for the placeholders; a DataError naming the row when the
    number of placeholders is not the number of `images`."""
    placeholders = sum(slot is None for slot in slots)
    if placeholders != len(row_images):
        raise DataError(
            f"{row_label} has {_count(placeholders, 'image placeholder')} but {_count(len(row_images), 'image')}; "
            "each `<image>` or payload-less image part stands for one entry of `images`, in order"
        )
    remaining = iter(row_images)
    return [next(remaining) if slot is None else slot for slot in slots]


def image_count(content: Content) -> int:
    """How many image parts a content holds."""
    return 0 if isinstance(content, str) else sum(part["type"] == "image" for part in content)


def content_text(content: Content) -> str:
    """A content's text: the string itself, or its text parts joined (what a judge is shown)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text").strip()


def _split_text(text: str) -> list[dict]:
    """verl's rule (verl/utils/dataset/rl_dataset.py `_build_messages`): split at each
    placeholder, drop empty pieces, keep the rest verbatim."""
    pieces = [piece for piece in _PLACEHOLDER_SPLIT.split(text) if piece != ""]
    return [{"type": "image"} if piece == IMAGE_PLACEHOLDER else {"type": "text", "text": piece}
            for piece in pieces]


def _parse_part(raw: Any, label: str) -> tuple[dict, Slot]:
    if not isinstance(raw, dict):
        raise DataError(f"{label} must be an object with a `type`, got {type(raw).__name__}")
    # Table formats give every part every key seen in the column, filled with None.
    part = {key: value for key, value in raw.items() if value is not None}
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise DataError(f"{label} (text) needs a string `text`")
        return {"type": "text", "text": part["text"]}, None
    if kind == "image":
        return {"type": "image"}, part.get("image")
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url.strip():
            raise DataError(f"{label} (image_url) needs `image_url.url`: a data:image/...;base64 URL, "
                            "a path or a file:// URL")
        return {"type": "image"}, url
    raise DataError(f"{label} has type {kind!r}; content parts must be one of {', '.join(PART_TYPES)}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"

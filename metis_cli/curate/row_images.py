"""A curated row's images: their identity for dedup, and how they are stored in the outputs.

A loaded row keeps each image as an absolute path, encoded bytes or a data URL (data/datasets.py
`Example.images`; a PIL image where a caller built the Example itself). Here:
- `image_identity`: a hash of the encoded bytes, so the same picture read from two files (or
  once embedded, once as a file) is one image to dedup, and two pictures are never one;
- `stored_image`: the JSON form decisions.jsonl keeps (a path stays an absolute path; bytes and
  PIL images become `data:image/...;base64` URLs);
- `output_image`: the form the curated file keeps, which `load_examples` reads back: in JSONL a
  path relative to the output folder (or the data URL), in parquet verl's / `datasets`'
  `{"bytes", "path"}` struct with the bytes embedded, so the file stands on its own.

Must not touch: checking or decoding images for a model (data/images.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from typing import Any

from metis_cli.data.images import encoded_bytes

_DATA_URL_PREFIX = "data:"


def image_identity(source: Any) -> str:
    """A short hash of the image's encoded bytes (what dedup compares)."""
    return hashlib.blake2b(encoded_bytes(source), digest_size=12).hexdigest()


def stored_image(source: Any) -> str:
    """The image as decisions.jsonl keeps it: an absolute path, or a data URL."""
    if isinstance(source, Path):
        return str(source)
    if isinstance(source, str):
        return source
    data = encoded_bytes(source)
    return f"data:{_mime_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


def output_image(stored: str, folder: Path, output_format: str) -> str | dict:
    """A stored image as the curated file in `folder` keeps it (module docstring)."""
    is_path = not stored.startswith(_DATA_URL_PREFIX)
    relative = os.path.relpath(stored, folder) if is_path else None
    if output_format == "jsonl":
        return relative if is_path else stored
    return {"bytes": encoded_bytes(stored), "path": relative}


def _mime_type(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError):
        kind = None
    return Image.MIME.get(kind or "", "application/octet-stream")

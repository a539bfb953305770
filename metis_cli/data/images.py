"""Images as a vision-language processor takes them: read from wherever a row keeps them, checked,
converted to RGB and sized; and the crop-and-enlarge of the `zoom_in` tool.

Sources an image may come as (`load_image`):
- a path (relative paths are relative to the data file's folder), or a `file://` URL;
- a `data:image/...;base64,...` URL (OpenAI `image_url` content parts);
- bytes, or a `{"bytes": ..., "path": ...}` struct (how `datasets`' Image feature stores images
  in parquet and verl data): the bytes when present, else the path;
- a PIL image.

Every problem (missing file, corrupt or empty data, an impossible size) is a `DataError` that
names the row and the image (`where`), raised before any training starts (`check_image`, which
data loading runs on every row's images without decoding them). Sizes follow the
official Qwen-VL tool code: each side at least `MIN_SIDE` pixels (smaller images are enlarged),
an aspect ratio of at most `MAX_ASPECT_RATIO` (the processor refuses more), and at most
`max_pixels` pixels when given (larger images are shrunk, aspect kept).

Must not touch: tokenizing or placeholder expansion (the processor, model/processor.py) or where
images sit in a conversation (data/chat.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path
from typing import Any

from metis_cli.errors import DataError

MIN_SIDE = 32
MAX_ASPECT_RATIO = 200
_WHITE = (255, 255, 255)


def load_image(source: Any, *, where: str, base_dir: str | Path | None = None, max_pixels: int | None = None):
    """The RGB PIL image `source` holds, sized by `fit_image`; a DataError naming `where` if it
    cannot be read."""
    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    else:
        data, label = _image_bytes(source, where, base_dir)
        image = _decode(data, f"{where} ({label})")
    return fit_image(to_rgb(image), where=where, max_pixels=max_pixels)


def load_images(sources: list, *, where: str, base_dir: str | Path | None = None,
                max_pixels: int | None = None) -> list:
    """`load_image` for each of a row's images; `where` names the row (e.g. "rl.jsonl row 'a-3'")."""
    if not isinstance(sources, (list, tuple)):
        raise DataError(f"{where}: `images` must be a list (of paths, data URLs or {{bytes, path}} structs), "
                        f"got {type(sources).__name__}")
    return [load_image(source, where=f"{where} images[{index}]", base_dir=base_dir, max_pixels=max_pixels)
            for index, source in enumerate(sources)]


def to_rgb(image):
    """`image` as 8-bit RGB, upright (EXIF orientation applied); transparency becomes white."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode.startswith(("I", "F")):  # 16/32-bit grey: scale to 8 bits instead of clipping
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0.0
        scaled = np.zeros_like(values) if top <= 0 else np.clip(values / top * 255.0, 0, 255)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_image(image, *, where: str, max_pixels: int | None = None, min_side: int = MIN_SIDE):
    """`image` resized so each side is >= `min_side` and the area <= `max_pixels` (aspect kept;
    the minimum side wins where both cannot hold). Refuses an empty image or an aspect ratio
    over MAX_ASPECT_RATIO."""
    from PIL import Image

    width, height = image.size
    _check_size(width, height, where)
    scale = 1.0
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    scale = max(scale, min_side / min(width, height))
    if scale == 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def check_image(source: Any, *, where: str, base_dir: str | Path | None = None) -> str | bytes:
    """`source` as a loaded row keeps it: an absolute path, bytes or a data URL (never decoded
    pixels, so a large set does not sit in memory). Checked cheaply first: the data is there and
    non-empty, PIL opens and `verify()`s it, and its size is one `fit_image` takes; else a
    DataError naming `where`, so a bad image stops a run before training starts."""
    from PIL import Image, UnidentifiedImageError

    kept = _kept_source(source, where, base_dir)
    data, label = _image_bytes(kept, where, None)
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()
    except Image.DecompressionBombError as error:
        raise DataError(f"{where} ({label}): {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{where} ({label}): not a readable image ({type(error).__name__}: {error})") from None
    _check_size(*size, where=f"{where} ({label})")
    return kept


def _kept_source(source: Any, where: str, base_dir: str | Path | None) -> Any:
    """A {bytes, path} struct as its bytes (else its path); a path made absolute against
    `base_dir`; anything else as given (`_image_bytes` refuses what is not an image source)."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"])
        if source.get("path"):
            return _kept_source(source["path"], where, base_dir)
        raise DataError(f"{where}: the image struct has neither bytes nor a path")
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str) and source.strip() and not source.startswith(("data:", "http://", "https://")):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return str(path.absolute())
    return source


def _check_size(width: int, height: int, where: str) -> None:
    if width == 0 or height == 0:
        raise DataError(f"{where}: the image is empty ({width}x{height} pixels)")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT_RATIO:
        raise DataError(f"{where}: the image is {width}x{height} pixels, an aspect ratio of {aspect:.0f}; "
                        f"vision processors take at most {MAX_ASPECT_RATIO} (crop or pad it)")


def zoom(image, bbox: list, *, min_pixels: int, max_pixels: int) -> tuple[Any, tuple[int, int, int, int]]:
    """Crop `bbox` = [x1, y1, x2, y2] (pixels of `image`) and enlarge the crop to at least
    `min_pixels` (at most `max_pixels`) pixels, aspect kept. Returns (image, the box cropped).

    Like the official tool code, a box is clipped to the image, and one thinner than MIN_SIDE is
    widened around its centre. A ValueError says what is wrong with a box that cannot be cropped.
    """
    from PIL import Image

    box = crop_box(bbox, image.size)
    crop = image.crop(box)
    area = crop.width * crop.height
    target = min(max(area, min_pixels), max_pixels)
    if target != area:
        scale = math.sqrt(target / area)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                           Image.Resampling.BICUBIC)
    return crop, box


def crop_box(bbox: list, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The integer box `bbox` stands for inside an image of `size` (see `zoom`)."""
    width, height = size
    x1, y1, x2, y2 = (float(value) for value in bbox)
    if not all(math.isfinite(value) for value in (x1, y1, x2, y2)):
        raise ValueError(f"bbox_2d {_show(bbox)} must hold four finite numbers")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox_2d {_show(bbox)} is not [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ValueError(f"bbox_2d {_show(bbox)} lies outside the image, which is {width}x{height} pixels")
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    left, right = _widen(left, right, width)
    top, bottom = _widen(top, bottom, height)
    if max(right - left, bottom - top) / min(right - left, bottom - top) > MAX_ASPECT_RATIO:
        raise ValueError(f"bbox_2d {_show(bbox)} is too thin (aspect ratio over {MAX_ASPECT_RATIO})")
    return left, top, right, bottom


def zoom_text(box: tuple[int, int, int, int], image_index: int, result_index: int) -> str:
    """The observation text of a zoom (the tool and the synthetic cold start write the same)."""
    x1, y1, x2, y2 = box
    return f"Zoomed in on [{x1}, {y1}, {x2}, {y2}] of image {image_index}; this is image {result_index}."


def _widen(low: int, high: int, limit: int) -> tuple[int, int]:
    """[low, high) widened around its centre to MIN_SIDE (or the whole side, if shorter)."""
    if high - low >= MIN_SIDE:
        return low, high
    if limit <= MIN_SIDE:
        return 0, limit
    low = min(max(0, (low + high - MIN_SIDE) // 2), limit - MIN_SIDE)
    return low, low + MIN_SIDE


def _show(bbox: list) -> str:
    return "[" + ", ".join(f"{value:g}" for value in bbox) + "]"


def encoded_bytes(source: Any, where: str = "image", base_dir: str | Path | None = None) -> bytes:
    """The encoded image (PNG, JPEG, ...) an image source holds: a path, a data URL, bytes, a
    `{bytes, path}` struct or a PIL image (encoded as PNG). A DataError names `where` for a
    source that is empty, missing or not an image source; the bytes are not decoded here."""
    return _image_bytes(source, where, base_dir)[0]


def _image_bytes(source: Any, where: str, base_dir: str | Path | None) -> tuple[bytes, str]:
    """(encoded image bytes, a short label of where they came from)."""
    if hasattr(source, "save") and hasattr(source, "size"):  # a PIL image
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue(), "PIL image"
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"]), "embedded bytes"
        if source.get("path"):
            return _image_bytes(source["path"], where, base_dir)
        raise DataError(f"{where}: the image struct has neither bytes nor a path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not source:
            raise DataError(f"{where}: the image is empty (0 bytes)")
        return bytes(source), "embedded bytes"
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise DataError(f"{where}: an image must be a path, a data URL, bytes or a {{bytes, path}} struct, "
                        f"got {type(source).__name__}")
    if not source.strip():
        raise DataError(f"{where}: the image path is empty")
    if source.startswith("data:"):
        return _data_url_bytes(source, where), "data URL"
    if source.startswith(("http://", "https://")):
        raise DataError(f"{where}: {source[:80]} is a web address; metis does not download images, "
                        "save it and give its path")
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path} (paths are relative to the data file's folder)")
    data = path.read_bytes()
    if not data:
        raise DataError(f"{where}: the image file {path} is empty (0 bytes)")
    return data, str(path)


def _data_url_bytes(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise DataError(f"{where}: a data URL must look like data:image/png;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: the data URL's base64 payload is not valid base64") from None
    if not data:
        raise DataError(f"{where}: the data URL holds no data")
    return data


def _decode(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not mid-training
    except Image.DecompressionBombError as error:
        raise DataError(f"{where}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{where}: not a readable image ({type(error).__name__}: {error})") from None
    return image

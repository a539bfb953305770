"""Images as rows keep them: every source form loads to the same RGB image, every broken image is a
DataError naming the row and the image, and sizes end up where a vision processor accepts them."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from metis_cli.data.images import MIN_SIDE, crop_box, fit_image, load_image, load_images, to_rgb, zoom, zoom_text
from metis_cli.errors import DataError

ROW = "rl.jsonl row 'a-3'"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def picture():
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    image.paste((200, 10, 10), (0, 0, 32, 48))  # left half red
    return image


def test_every_source_form_gives_the_same_pixels(tmp_path, picture):
    data = png_bytes(picture)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(data)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = ["pics/a.png", str(tmp_path / "pics" / "a.png"), f"file://{tmp_path}/pics/a.png", data_url, data,
               {"bytes": data, "path": "ignored.png"}, {"bytes": None, "path": "pics/a.png"}, picture]
    loaded = load_images(sources, where=ROW, base_dir=tmp_path)
    assert all(image.mode == "RGB" and image.tobytes() == picture.tobytes() for image in loaded)


@pytest.mark.parametrize(("source", "problem"), [
    ("pics/missing.png", "image file not found"),
    ("", "image path is empty"),
    (b"", "empty (0 bytes)"),
    (b"not an image at all", "not a readable image"),
    ({"bytes": None, "path": None}, "neither bytes nor a path"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png,rawdata", "must look like data:image/png;base64"),
    ("https://example.com/cat.png", "does not download images"),
    (42, "got int"),
])
def test_broken_images_name_the_row_and_the_image(tmp_path, source, problem):
    with pytest.raises(DataError, match=re.escape(problem)) as raised:
        load_images([source], where=ROW, base_dir=tmp_path)
    assert str(raised.value).startswith(f"{ROW} images[0]")


def test_truncated_and_empty_files_fail_before_training(tmp_path, picture):
    data = png_bytes(picture)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"images\[1\] \(.*cut.png\): not a readable image"):
        load_images([picture, "cut.png"], where=ROW, base_dir=tmp_path)
    with pytest.raises(DataError, match="empty.png is empty"):
        load_images(["empty.png"], where=ROW, base_dir=tmp_path)


def test_images_must_be_a_list(tmp_path):
    with pytest.raises(DataError, match="`images` must be a list"):
        load_images("a.png", where=ROW, base_dir=tmp_path)


def test_transparency_becomes_white_and_every_mode_becomes_rgb():
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    clear.putpixel((0, 0), (0, 0, 255, 255))
    flat = to_rgb(clear)
    assert flat.mode == "RGB" and flat.getpixel((1, 1)) == (255, 255, 255) and flat.getpixel((0, 0)) == (0, 0, 255)
    deep = Image.new("I;16", (40, 40), 0)
    deep.putpixel((0, 0), 65535)
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255) and to_rgb(deep).getpixel((1, 1)) == (0, 0, 0)
    for mode in ("L", "1", "P", "CMYK", "LA"):
        assert to_rgb(Image.new(mode, (40, 40))).mode == "RGB"


def test_sizes_follow_the_processor_limits():
    assert fit_image(Image.new("RGB", (10, 40)), where=ROW).size == (MIN_SIDE, 128)
    assert fit_image(Image.new("RGB", (400, 100)), where=ROW, max_pixels=10_000).size == (200, 50)
    assert fit_image(Image.new("RGB", (64, 64)), where=ROW, max_pixels=64 * 64).size == (64, 64)
    # the minimum side wins over max_pixels
    assert fit_image(Image.new("RGB", (3200, 20)), where=ROW, max_pixels=1000).size[1] == MIN_SIDE
    with pytest.raises(DataError, match="aspect ratio of 300; vision processors take at most 200"):
        fit_image(Image.new("RGB", (3000, 10)), where=ROW)
    with pytest.raises(DataError, match="aspect ratio"):
        load_image(png_bytes(Image.new("RGB", (3000, 10))), where=ROW)


def test_max_pixels_is_honoured_when_loading(tmp_path):
    image = load_image(png_bytes(Image.new("RGB", (512, 256))), where=ROW, max_pixels=128 * 64)
    assert image.size == (128, 64)


def test_zoom_crops_the_box_and_enlarges_it(picture):
    zoomed, box = zoom(picture, [0, 0, 32, 32], min_pixels=128 * 128, max_pixels=256 * 256)
    assert box == (0, 0, 32, 32) and zoomed.size == (128, 128)
    assert [colour for _, colour in zoomed.getcolors()] == [(200, 10, 10)]  # only the red half
    big, _ = zoom(Image.new("RGB", (1000, 1000)), [0, 0, 1000, 1000], min_pixels=100, max_pixels=200 * 200)
    assert big.size == (200, 200)


def test_boxes_are_clipped_widened_or_refused():
    size = (64, 48)
    assert crop_box([-10, -5, 40, 60], size) == (0, 0, 40, 48)  # clipped to the image
    assert crop_box([30, 10, 34.5, 50], size) == (16, 10, 48, 48)  # 5 px wide: widened around its centre to 32
    assert crop_box([0.4, 0, 1.2, 48], (20, 48)) == (0, 0, 20, 48)  # image narrower than 32: its whole width
    for bbox, problem in (([40, 0, 10, 10], "x1 < x2"), ([100, 100, 120, 120], "outside the image, which is 64x48"),
                          ([0, 0, float("nan"), 4], "finite")):
        with pytest.raises(ValueError, match=problem):
            crop_box(bbox, size)


def test_zoom_text_names_the_box_and_the_new_image():
    assert zoom_text((0, 0, 64, 64), 0, 1) == "Zoomed in on [0, 0, 64, 64] of image 0; this is image 1."

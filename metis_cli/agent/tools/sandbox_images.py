"""Images in and out of the python sandbox (`tools.python.images`).

In: before each call the conversation's images are written as `image_1.png`, `image_2.png`, ...
into the call's working folder (the code's current folder), with an empty `outputs/` beside them.
Out: after the call, images the code saved directly under `outputs/` come back to the model, at
most `max_images`, each shrunk to at most `max_pixels`; the files are removed once read, so a
persistent session returns each image once.

Everything under the working folder was written by untrusted code, so the host never follows a
link there: names are opened relative to a folder descriptor with O_NOFOLLOW (a symlinked
`outputs/` or `image_1.png` is refused, never read or written through), only regular files of at
most `max_file_bytes` are read, and an image is decoded only when its header says at most
MAX_DECODE_PIXELS pixels.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

INPUT_NAME = "image_{}.png"
OUTPUT_FOLDER = "outputs"
MAX_DECODE_PIXELS = 50_000_000
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the host


def write_inputs(folder: str | Path, images) -> list[str]:
    """Write `images` as image_1.png, ... into `folder` and make an empty outputs/; returns notes
    for the model about anything that could not be written (a name the code took over)."""
    notes = []
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for number, image in enumerate(images, start=1):
            name = INPUT_NAME.format(number)
            _remove(name, folder_fd)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            try:
                handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder_fd)
            except OSError:
                notes.append(f"{name} could not be written (something else has that name)")
                continue
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getvalue())
        try:
            os.mkdir(OUTPUT_FOLDER, 0o755, dir_fd=folder_fd)
        except FileExistsError:
            pass  # a persistent session's, emptied after each call
    finally:
        os.close(folder_fd)
    return notes


def collect_outputs(folder: str | Path, *, max_images: int, max_pixels: int, max_file_bytes: int):
    """(images, notes): the images saved under `folder`/outputs/ in name order, each removed after
    reading; notes say what was skipped and why."""
    from metis_cli.data.images import fit_image, to_rgb
    from metis_cli.errors import DataError

    try:
        outputs_fd = os.open(Path(folder) / OUTPUT_FOLDER, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return [], []  # no outputs/ folder (or not a real one): nothing to show
    images, notes = [], []
    try:
        names = sorted(entry.name for entry in os.scandir(outputs_fd))
        for name in names:
            if len(images) == max_images:
                notes.append(f"outputs/: only the first {max_images} images are shown")
                break
            try:
                image = _read_image(name, outputs_fd, max_file_bytes)
                images.append(fit_image(to_rgb(image), where=f"outputs/{name}", max_pixels=max_pixels))
            except (DataError, OSError, ValueError) as problem:
                notes.append(f"outputs/{name} not shown: {_reason(problem)}")
        for name in names:
            _remove(name, outputs_fd)
    finally:
        os.close(outputs_fd)
    return images, notes


def _read_image(name: str, folder_fd: int, max_file_bytes: int):
    from PIL import Image

    handle = os.open(name, _READ_FLAGS, dir_fd=folder_fd)  # ELOOP for a symlink
    with os.fdopen(handle, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > max_file_bytes:
            raise ValueError(f"larger than {max_file_bytes} bytes")
        data = file.read(max_file_bytes + 1)
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, Image.DecompressionBombError, SyntaxError):
        raise ValueError("not an image Pillow can read") from None
    if image.width * image.height > MAX_DECODE_PIXELS:
        raise ValueError(f"{image.width}x{image.height} pixels is too large")
    image.load()
    return image


def _remove(name: str, folder_fd: int) -> None:
    """Remove `name` (a file, a link, or a folder the code made) from the folder, never following links."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        import shutil

        shutil.rmtree(name, dir_fd=folder_fd, ignore_errors=True)
    else:
        os.unlink(name, dir_fd=folder_fd)


def _reason(problem: Exception) -> str:
    if isinstance(problem, OSError) and problem.errno is not None:
        return "links are not followed" if problem.errno == errno.ELOOP else os.strerror(problem.errno)
    text = str(problem)
    return text.split(": ", 1)[-1] if text.startswith("outputs/") else text

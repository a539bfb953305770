"""Writing files so that a failure leaves nothing half-written and says what went wrong.

`write_atomic`: readers (the dashboard, a resumed run, a crashed run's next start) see the old
file or the new one, never half of one. `storage_errors` / `storage_error_from`: an OSError of
the storage (no space, permission denied, read-only file system; `errors.STORAGE_FIXES`) at a
write site becomes a `StorageError` naming the path, which the CLI prints as one line with exit
code 2 instead of "a bug in metis" (docs/faults.md).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from metis_cli.errors import STORAGE_FIXES, StorageError

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # Rust writers (safetensors): "... (os error 28)"
# torch.save reports a short write (the disk filled up under it) only as a RuntimeError.
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")


def storage_error_from(error: BaseException, path: str | Path | None, *,
                       then: str = "then --resume") -> StorageError | None:
    """The StorageError that `error`, raised while writing `path`, stands for; None when it is
    not a storage failure (then it is a bug, and is re-raised as it is)."""
    if isinstance(error, StorageError):
        return error
    number = _error_number(error)
    if number is None:
        return None
    return StorageError(number, str(path) if path is not None else None, then=then)


def _error_number(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno if error.errno in STORAGE_FIXES else None
    text = str(error)
    found = _OS_ERROR_IN_TEXT.search(text)
    if found and int(found.group(1)) in STORAGE_FIXES:
        return int(found.group(1))
    if isinstance(error, RuntimeError) and any(marker in text for marker in _SHORT_WRITE):
        return errno.ENOSPC
    return None


@contextmanager
def storage_errors(path: str | Path, *, then: str = "then --resume") -> Iterator[None]:
    """Inside the block, a storage failure is raised as a StorageError naming `path`."""
    try:
        yield
    except Exception as error:
        translated = storage_error_from(error, path, then=then)
        if translated is None or translated is error:
            raise
        raise translated from error


def write_atomic(path: Path, text: str, *, then: str = "then --resume") -> None:
    """Write `text` to a temp file beside `path`, then rename it into place. On a storage failure
    the temp file is removed and a StorageError naming `path` is raised."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with storage_errors(path, then=then):
        try:
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, path)
        except BaseException:
            with suppress(OSError):
                partial.unlink(missing_ok=True)
            raise


def append_whole(path: Path, text: str, *, fsync: bool = False, then: str = "then --resume") -> None:
    """Append `text` to `path` completely or not at all: on a failure the file is cut back to its
    old length (a full disk still allows shrinking), so readers never see half a line, and a
    storage failure is raised as a StorageError naming `path`. A Ctrl-C that lands after every
    byte is written (while fsync waits) keeps the text: it is whole, and a reader may already
    have seen it, so cutting it back would make a file seem to shrink."""
    data = memoryview(text.encode("utf-8"))
    with storage_errors(path, then=then), open(path, "ab", buffering=0) as handle:
        start = handle.seek(0, os.SEEK_END)
        written = 0
        try:
            while written < len(data):
                written += handle.write(data[written:])
            if fsync:
                os.fsync(handle.fileno())
        except BaseException as error:
            if written < len(data) or not isinstance(error, KeyboardInterrupt):
                with suppress(OSError):
                    handle.truncate(start)
            raise

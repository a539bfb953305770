"""User-facing error types.

Every mistake a user can cause and fix (bad recipe field, missing file, malformed dataset row,
unknown tool) is raised as a `MetisError` subclass whose message names the file, field or row and
says how to fix it. The CLI prints the message without a traceback and exits with code 2
(`METIS_DEBUG=1` shows the traceback). Anything else is a bug: exit code 1.
"""

from __future__ import annotations

import errno
import os


class MetisError(Exception):
    """A mistake the user can fix; `str(error)` is the one line the CLI prints."""

    exit_code = 2


class RecipeError(MetisError):
    """The recipe YAML or a `--set` override is invalid. Holds every problem found at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            super().__init__(f"{head}{self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{head}{len(self.problems)} problems:\n{lines}")


class DataError(MetisError):
    """A dataset file or row is missing or malformed (message names file and row)."""


class ModelError(MetisError):
    """A model or checkpoint folder is missing or cannot be loaded."""


class ToolConfigError(MetisError):
    """An unknown tool name, bad tool arguments JSON on the CLI, or a bad tool setting."""


class RunFolderError(MetisError):
    """The run folder is in a state the command refuses to touch (e.g. a finished run)."""


class HubError(MetisError):
    """The Hugging Face Hub cannot be reached, or refuses the token or the repo (`metis push`)."""


class EndpointError(MetisError):
    """An outside service the recipe names (an LLM judge, a web search API) is unreachable, rejects
    the key, does not serve the model, or stopped answering during a run. The message names the
    recipe field and the URL (docs/faults.md)."""


class StorageError(MetisError, OSError):
    """Writing a file failed for a reason outside metis: no space left, permission denied, a
    read-only file system. The message names the path, says what the error number means and how
    to go on (docs/faults.md). Also an OSError, so code that tolerates an unwritable file (a
    cache) still does."""

    def __init__(self, error_number: int, path: str | None, *, then: str = "then --resume"):
        meaning = os.strerror(error_number)
        super().__init__(error_number, meaning, path)
        where = f"writing {path}" if path else "while writing"
        fix = STORAGE_FIXES.get(error_number, "check the disk")
        self.message = f"{meaning[:1].lower()}{meaning[1:]} {where}; {fix}, {then}"

    def __str__(self) -> str:
        return self.message


STORAGE_FIXES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space or raise the disk quota",
    errno.EACCES: "make that folder writable",
    errno.EPERM: "make that folder writable",
    errno.EROFS: "the file system is read-only: remount it read-write",
    errno.EIO: "check the disk",
}
"""The error numbers that mean "the storage failed", not "metis did something wrong", and what to do."""

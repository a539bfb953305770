"""User-facing error types.

Every mistake a user can cause and fix (bad recipe field, missing file, malformed dataset row,
unknown tool) is raised as a `MetisError` subclass whose message names the file, field or row and
says how to fix it. The CLI prints the message without a traceback and exits with code 2
(`METIS_DEBUG=1` shows the traceback). Anything else is a bug: exit code 1.
"""

from __future__ import annotations


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

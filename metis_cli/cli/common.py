"""What every command shares: option types, the error boundary, and JSON/quiet output.

Exit codes: 0 ok, 2 user error (`MetisError`, bad flags) or a fault outside metis (a full disk,
a dead judge: docs/faults.md), 1 internal bug. A user error prints one line (what, where, how to
fix) to stderr and no traceback; `METIS_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from metis_cli.errors import MetisError
from metis_cli.files import storage_error_from

RecipeArg = Annotated[
    Path, typer.Argument(help="Recipe YAML file, or a built-in recipe's name (metis recipes list).", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe field: section.field=value (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final result.")]


def _debug() -> bool:
    return os.environ.get("METIS_DEBUG", "") not in ("", "0")


def error_line(message: str) -> None:
    """Print a user-facing error to stderr (rich markup off: messages may contain brackets)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def cli_command(function: Callable) -> Callable:
    """Wrap a command: MetisError -> message + exit 2; unexpected exception -> exit 1."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MetisError as error:
            if _debug():
                traceback.print_exc()
            error_line(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the boundary that turns bugs into exit 1
            if _debug():
                traceback.print_exc()
            storage = storage_error_from(error, getattr(error, "filename", None))
            if storage is not None:  # a full disk or a read-only folder no write site named
                error_line(str(storage))
                raise typer.Exit(storage.exit_code) from None
            error_line(
                f"internal error: {type(error).__name__}: {error}. This is a bug in metis; "
                "rerun with METIS_DEBUG=1 for the traceback and report it."
            )
            raise typer.Exit(1) from None

    return wrapper


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()

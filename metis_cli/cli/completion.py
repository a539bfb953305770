"""`metis completion SHELL`: print the shell completion script (completions/ holds generated copies).

The scripts are shims: on every Tab the shell re-runs `metis` with `_METIS_COMPLETE` set, which
is why importing `metis_cli.cli` must stay free of torch and friends.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from metis_cli.cli.common import cli_command

SHELL_FILES = {"bash": "metis.bash", "zsh": "_metis", "fish": "metis.fish"}


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion_script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="metis", complete_var="_METIS_COMPLETE", shell=shell).rstrip() + "\n"


@cli_command
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the completion script for SHELL (e.g. `metis completion bash > ~/.local/share/bash-completion/completions/metis`)."""
    typer.echo(completion_script(shell.value), nl=False)

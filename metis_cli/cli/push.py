"""`metis push`: upload a final model folder and its model card to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import cli_command

ModelDirArg = Annotated[Path, typer.Argument(help="Model folder to upload, e.g. runs/NAME/hdpo/final.",
                                             show_default=False)]
RepoIdOpt = Annotated[str, typer.Option("--repo-id", help="Hub repo ORG/NAME; created if missing.", show_default=False)]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repo private (an existing one keeps its setting).")]


@cli_command
def push(model_dir: ModelDirArg, repo_id: RepoIdOpt, private: PrivateOpt = False) -> None:
    """Upload a model folder with a refreshed model card (README.md) to the Hugging Face Hub."""
    from metis_cli.stages.push import push as upload

    url = upload(model_dir, repo_id, private=private)
    typer.echo(f"metis push: {model_dir} -> {url}")

"""The `metis` Typer app: registers every command; heavy imports happen inside commands only."""

from __future__ import annotations

import typer

from metis_cli import __version__
from metis_cli.cli.chat import chat
from metis_cli.cli.completion import completion
from metis_cli.cli.curate import curate
from metis_cli.cli.eval import eval_command
from metis_cli.cli.plan import plan
from metis_cli.cli.push import push
from metis_cli.cli.serve import serve
from metis_cli.cli.sweep import sweep
from metis_cli.cli.train import hdpo, run, sft
from metis_cli.cli import recipes as recipes_cli
from metis_cli.cli import tools as tools_cli
from metis_cli.cli.validate import validate
from metis_cli.cli.watch import watch

app = typer.Typer(
    name="metis",
    help="Train tool-using LLM agents that know when NOT to call a tool (HDPO).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"metis {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Train tool-using LLM agents that know when NOT to call a tool (HDPO).

    Pipeline, one recipe for all stages: curate -> sft -> hdpo -> eval -> chat.
    """


app.command()(curate)
app.command()(run)
app.command()(sft)
app.command()(hdpo)
app.command()(sweep)
app.command(name="eval")(eval_command)
app.command()(chat)
app.command()(serve)
app.command()(push)
app.command()(validate)
app.command()(plan)
app.add_typer(tools_cli.app, name="tools")
app.add_typer(recipes_cli.app, name="recipes")
app.command()(watch)
app.command()(completion)


def main() -> None:
    """Console-script entry point."""
    app()

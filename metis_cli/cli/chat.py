"""`metis chat`: talk to a model with its tools (REPL), or answer questions once for scripts;
`--image` shows a vision-language model images with the first question."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, SetOpt, cli_command
from metis_cli.errors import MetisError, ModelError

ChatModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model folder, checkpoint or LoRA adapter. Default with --recipe: the "
                 "newest of its eval.models that exists."),
]
ChatRecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", help="Recipe for tools, tool limits and chat settings. Default: calculator, "
                 "greedy, the built-in chat settings."),
]
OnceOpt = Annotated[
    str | None,
    typer.Option("--once", help="Answer this question and exit; '-' reads one question per stdin line "
                 "(each in a fresh conversation)."),
]
ImageOpt = Annotated[
    list[Path] | None,
    typer.Option("--image", help="An image for the first question (repeatable, in order; with --once - "
                 "every question gets them). Needs a vision-language model. In the REPL: /image PATH."),
]


@cli_command
def chat(model: ChatModelOpt = None, recipe: ChatRecipeOpt = None, once: OnceOpt = None,
         image: ImageOpt = None, overrides: SetOpt = None, json_output: JsonOpt = False) -> None:
    """Chat with a model and its tools: streamed text, a panel per tool call, /help for commands."""
    if json_output and once is None:
        raise MetisError("--json needs --once QUESTION (the interactive chat has no JSON form)")
    if overrides and recipe is None:
        raise MetisError("--set needs --recipe RECIPE (without one, chat uses the built-in settings)")
    loaded = recipe_or_defaults(model, recipe, overrides)
    model_path = model or _default_model(loaded)
    from rich.console import Console

    from metis_cli.data.images import load_image
    from metis_cli.stages.chat import open_session
    from metis_cli.stages.chat_repl import Repl, answer_once

    # With --json, stdout carries only JSON; everything for people goes to stderr.
    console = Console(stderr=json_output, highlight=False)
    # Read the images before loading the model: a wrong path fails in a moment.
    images = [load_image(str(path), where=f"--image {path}") for path in image or []]
    session = open_session(model_path, loaded, quiet=json_output)
    if images:
        session.require_vision("--image")
    if once is not None:
        answer_once(session, once, json_output=json_output, console=console, images=images)
        return
    Repl(session, console, images).loop()


def recipe_or_defaults(model: str | None, recipe: Path | None, overrides: list[str] | None):
    """The recipe `metis chat` and `metis serve` run with: `recipe` with its --set `overrides`, or
    without one the built-in settings (calculator, greedy) for `model`."""
    from metis_cli.recipe import load_recipe, validate_data

    if recipe is not None:
        return load_recipe(recipe, overrides or [])
    if model is None:
        raise ModelError("metis chat needs --model PATH (or --recipe RECIPE to use its trained models)")
    return validate_data({"run": {"output_dir": "."}, "model": {"name_or_path": model}}, source="metis chat defaults")


def _default_model(recipe) -> str:
    for path in reversed(recipe.eval.models):
        if (Path(path) / "config.json").exists() or (Path(path) / "adapter_config.json").exists():
            return path
    raise ModelError(f"none of the recipe's eval.models exists yet ({', '.join(recipe.eval.models)}); "
                     "train first or pass --model PATH")

"""`metis tools list|call`: see the tools a recipe gives the model, and call one by hand.

`call` goes through the same registry path as a rollout (argument schema check, timeout,
sandbox), so what it prints is exactly the observation the model would see. `--image PATH`
(repeatable) gives image tools a conversation's images (image 0, 1, ...); images a tool returns
are listed by size and written out with `--save-images DIR`. A tool that reports
an error still exits 0; an unknown tool or invalid ARGS_JSON is a user error (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from metis_cli.cli.common import JsonOpt, cli_command, print_json
from metis_cli.errors import ToolConfigError

app = typer.Typer(
    help="List the tools a recipe enables and call one by hand, as the model would.",
    no_args_is_help=True,
)

RecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", "-r", help="Recipe YAML whose `tools` section to use (default: built-in defaults)."),
]


def _tools_config(recipe: Path | None) -> Any:
    if recipe is None:
        from metis_cli.recipe.schema import ToolsConfig

        return ToolsConfig()
    from metis_cli.recipe import load_recipe

    return load_recipe(recipe, overrides=[]).tools


def _signature(parameters: dict) -> str:
    properties = parameters.get("properties", {})
    return ", ".join(f"{name}: {spec.get('type', 'any')}" for name, spec in properties.items())


@app.command("list")
@cli_command
def list_tools(recipe: RecipeOpt = None, json_output: JsonOpt = False) -> None:
    """List the enabled tools (with --json: the OpenAI function specs chat templates render)."""
    from metis_cli.agent.tools import ToolRegistry

    tools_cfg = _tools_config(recipe)
    registry = ToolRegistry.from_config(tools_cfg)
    if json_output:
        print_json(registry.specs())
        return
    for name in registry.names():
        tool = registry.get(name)
        typer.echo(f"{name}({_signature(tool.parameters)})")
        typer.echo(f"    {tool.description}")
        isolation = getattr(tool, "isolation", None)
        if isolation is not None:
            typer.echo(f"    {isolation.describe()}")
    typer.echo(
        f"limits: timeout_s={tools_cfg.timeout_s:g} max_calls_per_rollout={tools_cfg.max_calls_per_rollout} "
        f"max_concurrency={tools_cfg.max_concurrency}"
    )


def _parse_arguments(arguments_json: str) -> dict:
    try:
        arguments = json.loads(arguments_json)
    except json.JSONDecodeError as error:
        raise ToolConfigError(
            f"ARGS_JSON is not valid JSON ({error.msg} at character {error.pos}); "
            """quote it for the shell, e.g. '{"expression": "123 * 45"}'"""
        ) from None
    if not isinstance(arguments, dict):
        raise ToolConfigError(f"ARGS_JSON must be a JSON object of arguments, got {type(arguments).__name__}")
    return arguments


def _context(paths: list[Path]):
    from metis_cli.agent.tools import ToolContext
    from metis_cli.data.images import load_images

    return ToolContext(images=tuple(load_images([str(path) for path in paths], where="--image")))


def _returned_images(images: list, first_index: int, folder: Path | None) -> list[dict]:
    """Size (and saved path) of each returned image; indices continue the conversation's."""
    if folder is not None and images:
        folder.mkdir(parents=True, exist_ok=True)
    described = []
    for index, returned in enumerate(images, start=first_index):
        entry = {"index": index, "width": returned.width, "height": returned.height}
        if folder is not None:
            path = folder / f"image_{index}.png"
            returned.save(path, format="PNG")
            entry["path"] = str(path)
        described.append(entry)
    return described


@app.command("call")
@cli_command
def call_tool(
    name: Annotated[str, typer.Argument(help="Tool name, e.g. calculator.", show_default=False)],
    arguments_json: Annotated[
        str, typer.Argument(metavar="ARGS_JSON", help="""Arguments as a JSON object, e.g. '{"expression": "2+2"}'.""")
    ],
    recipe: RecipeOpt = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="An image of the conversation (repeatable; image_index 0 is the first)."),
    ] = None,
    save_images: Annotated[
        Path | None, typer.Option("--save-images", help="Folder to write the images the tool returns to (PNG).")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Call tool NAME with ARGS_JSON and print the observation the model would see."""
    from metis_cli.agent.parser import ParsedToolCall
    from metis_cli.agent.tools import BUILTIN_TOOLS, ToolRegistry

    arguments = _parse_arguments(arguments_json)
    tools_cfg = _tools_config(recipe)
    registry = ToolRegistry.from_config(tools_cfg)
    if name not in registry.names():
        enabled = ", ".join(registry.names()) or "none"
        if name in BUILTIN_TOOLS:
            where = f"in {recipe}" if recipe else "by default (pass --recipe with it in tools.enabled)"
            raise ToolConfigError(f"tool {name!r} is not enabled {where}; tools.enabled is [{enabled}]")
        raise ToolConfigError(f"unknown tool {name!r}; enabled tools: {enabled}")
    call = ParsedToolCall(name=name, arguments=arguments, raw=arguments_json, error=None)
    context = _context(image or [])
    [result] = registry.execute_many([(call, 0)], contexts=[context])
    returned = _returned_images(result.images, len(context.images), save_images)
    if json_output:
        print_json(
            {"tool": name, "arguments": arguments, "text": result.text, "error": result.error,
             "runtime_s": round(result.runtime_s, 4), "images": returned}
        )  # fmt: skip
        return
    typer.echo(result.text)
    for shown in returned:
        saved = f" -> {shown['path']}" if "path" in shown else ""
        typer.echo(f"[image {shown['index']} {shown['width']}x{shown['height']}]{saved}")
    if result.error is not None:
        typer.echo(f"(tool error: {result.error}, {result.runtime_s:.2f} s)", err=True)

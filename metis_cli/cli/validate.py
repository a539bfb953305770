"""`metis validate`: check a recipe without building anything; report every problem at once."""

from __future__ import annotations

from metis_cli.cli.common import JsonOpt, QuietOpt, RecipeArg, SetOpt, cli_command, print_json
from metis_cli.errors import RecipeError

import typer


@cli_command
def validate(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    print_resolved: bool = typer.Option(False, "--print", help="Print the resolved recipe (YAML, or JSON with --json)."),
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Validate RECIPE: types, ranges, unknown keys, interpolation, files it names."""
    from metis_cli.recipe import load_recipe, recipe_to_yaml

    try:
        resolved = load_recipe(recipe, overrides or [])
    except RecipeError as error:
        if json_output:
            print_json({"recipe": str(recipe), "valid": False, "problems": error.problems})
            raise typer.Exit(2) from None
        raise
    if json_output:
        payload: dict = {"recipe": str(recipe), "valid": True, "problems": []}
        if print_resolved:
            payload["resolved"] = resolved.model_dump(mode="json")
        print_json(payload)
    elif print_resolved:
        typer.echo(recipe_to_yaml(resolved), nl=False)
    elif not quiet:
        typer.echo(f"{recipe}: OK")

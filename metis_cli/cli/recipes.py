"""`metis recipes list|copy`: the recipes shipped with metis, and a copy of one to edit.

Every command that takes a RECIPE also takes a built-in recipe's bare name (`metis run tiny`);
`copy` writes one where you can change it, with the data files it names through `${recipe_dir}`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, cli_command, print_json
from metis_cli.errors import RecipeError

app = typer.Typer(help="The built-in recipes: list them, copy one to edit.", no_args_is_help=True)


def _summary(path: Path) -> str:
    """A recipe's first comment line (its one-line description)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@app.command("list")
@cli_command
def list_recipes(json_output: JsonOpt = False) -> None:
    """Name, description and location of every built-in recipe."""
    from metis_cli.recipe.load import builtin_recipes

    rows = [{"name": name, "description": _summary(path), "path": str(path)} for name, path in builtin_recipes().items()]
    if json_output:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in recipes (use the name as RECIPE, or `metis recipes copy NAME`)")
    for column in ("name", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["description"])
    Console().print(table)


@app.command("copy")
@cli_command
def copy_recipe(
    name: Annotated[str, typer.Argument(help="Built-in recipe name (see `metis recipes list`).", show_default=False)],
    dest: Annotated[Path | None, typer.Argument(help="File to write (default: ./NAME.yaml).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
) -> None:
    """Copy a built-in recipe (and the data files it ships with) to edit and run as your own."""
    from metis_cli.recipe.load import BUILTIN_RECIPES, RECIPE_DIR_KEY, builtin_recipes

    recipes = builtin_recipes()
    if name not in recipes:
        raise RecipeError([f"no built-in recipe named {name!r}; built-in: {', '.join(recipes)}"])
    dest = dest or Path(f"{name}.yaml")
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    if dest.exists() and not force:
        raise RecipeError([f"{dest} already exists; pass --force to overwrite it"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = recipes[name].read_text(encoding="utf-8")
    dest.write_text(text, encoding="utf-8")
    copied = [str(dest)]
    shipped = BUILTIN_RECIPES / "data"
    if "${" + RECIPE_DIR_KEY + "}" in text and shipped.is_dir():
        for source in sorted(shipped.iterdir()):
            target = dest.parent / "data" / source.name
            if source.is_file() and f"/data/{source.name}" in text and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                copied.append(str(target))
    typer.echo("wrote " + ", ".join(copied) + f"; run it with: metis run {dest}")

"""Built-in recipes: usable by name from any folder (a pipx install has no recipes/ folder),
listed and copied by `metis recipes`, and `${recipe_dir}` naming files shipped next to a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.errors import RecipeError
from metis_cli.recipe import load_recipe, validate_data
from metis_cli.recipe.load import BUILTIN_RECIPES

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_the_repository_recipes_are_the_packaged_ones():
    assert (REPO / "recipes").resolve() == BUILTIN_RECIPES
    assert {p.name for p in BUILTIN_RECIPES.glob("*.yaml")} >= {"tiny.yaml", "8b.yaml"}


def test_a_builtin_recipe_runs_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("tiny").hdpo.estimator == "hdpo"
    corpus = Path(load_recipe("8b").tools.search.corpus)
    assert corpus.is_file() and corpus.parent.parent == BUILTIN_RECIPES
    result = runner.invoke(app, ["validate", "missing-recipe"])
    assert result.exit_code == 2 and "built-in recipe: 8b, 8b-official, tiny" in result.output


def test_a_file_named_like_a_builtin_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("model: {name_or_path: mine}\n")
    assert load_recipe("tiny").model.name_or_path == "mine"


def test_recipes_list_and_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = json.loads(runner.invoke(app, ["recipes", "list", "--json"]).output)
    assert {row["name"] for row in listed} >= {"tiny", "8b"} and all(row["description"] for row in listed)

    result = runner.invoke(app, ["recipes", "copy", "8b", "mine/paper.yaml"])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "mine" / "paper.yaml"
    assert copied.read_text() == (BUILTIN_RECIPES / "8b.yaml").read_text()
    # the copy's ${recipe_dir} is its own folder, where the shipped corpus was copied too
    assert Path(load_recipe(copied).tools.search.corpus) == (tmp_path / "mine" / "data" / "search_corpus.jsonl").resolve()

    again = runner.invoke(app, ["recipes", "copy", "8b", "mine/paper.yaml"])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["recipes", "copy", "8b", "mine/paper.yaml", "--force"]).exit_code == 0
    unknown = runner.invoke(app, ["recipes", "copy", "nope"])
    assert unknown.exit_code == 2 and "built-in: " in unknown.output
    assert runner.invoke(app, ["recipes", "copy", "tiny"]).exit_code == 0 and (tmp_path / "tiny.yaml").is_file()


def test_recipe_dir_needs_a_recipe_file():
    with pytest.raises(RecipeError, match=r"\$\{recipe_dir\} needs a recipe file"):
        validate_data({"model": {"name_or_path": "m"}, "run": {"output_dir": "${recipe_dir}/runs"}})

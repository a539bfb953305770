"""Recipe: the one YAML every stage reads. Schema in `schema`, loading/validation in `load`."""

from metis_cli.recipe.load import load_recipe, recipe_to_yaml, validate_data
from metis_cli.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "recipe_to_yaml", "validate_data"]

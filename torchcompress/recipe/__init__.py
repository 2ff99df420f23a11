"""Recipes: YAML stages, validation, the runner and its report."""

from .runner import Report, compress  # noqa: F401
from .schema import Recipe, Stage, load_recipe, parse_recipe  # noqa: F401

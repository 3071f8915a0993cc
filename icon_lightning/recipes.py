"""Recipes: YAML files that name the loss (and its p, q) by ``class_path``, parsed by jsonargparse.

A recipe is a fragment of the full run config (``model.loss``), so the same file composes with the data
and trainer configs of the LightningCLI. Here it is parsed on its own: unknown keys and wrong types are
rejected by jsonargparse with its message.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from icon_lightning.loss import Objective

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel; `configs/` at the top links here
RECIPE_DIR = CONFIG_DIR / "recipes"


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe name (``infonce``) from the package's configs/recipes/, or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []
        raise FileNotFoundError(f"recipe: no file at {path}; expected a YAML path or one of {known}")
    return path


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_config(name_or_path: str | Path) -> dict:
    """A recipe's ``model.loss`` as plain data (``class_path`` / ``init_args``), to edit and ``build_objective``."""
    return yaml.safe_load(recipe_path(name_or_path).read_text())["model"]["loss"]


def build_objective(config: dict) -> Objective:
    """Instantiate a ``model.loss`` config (as in a recipe), checked by jsonargparse like a recipe file."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.loss", type=Objective, required=True)
    return parser.instantiate(parser.parse_object({"model": {"loss": config}})).model.loss


def load_recipe(name_or_path: str | Path) -> Objective:
    """Instantiate the ``model.loss`` of a recipe file."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model.loss", type=Objective, required=True)
    cfg = parser.parse_path(str(recipe_path(name_or_path)))
    return parser.instantiate(cfg).model.loss

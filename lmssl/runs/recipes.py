"""Find the recipes shipped with lmssl (the top-level ``recipes/`` folder)."""

from __future__ import annotations

from pathlib import Path

from lmssl.errors import UserError

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipes_dir() -> Path:
    try:
        from importlib.resources import files

        d = Path(str(files("lmssl._recipes")))
        if d.is_dir():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return REPO_RECIPES


def recipe_path(name: str) -> Path:
    """``gpt_tiny`` -> the shipped ``gpt_tiny.yaml``; a clear error for anything else."""
    d = recipes_dir()
    path = d / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.is_file():
        return path
    names = sorted(p.stem for p in d.glob("*.yaml"))
    raise UserError(f"recipe '{name}' not found; pass a YAML path or one of: {', '.join(names)}")

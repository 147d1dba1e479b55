"""Every shipped pretraining recipe parses into a valid config, and every registered objective
ships a CPU recipe (the GPU and Hub recipes are never run here: no GPU, no network)."""

from __future__ import annotations

import pytest

from lmssl import objectives
from lmssl.config import load_config
from tests.conftest import ROOT

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("finetune"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses(recipe):
    cfg = load_config(recipe)
    assert cfg.objective in objectives.names()
    assert cfg.train.output_dir.endswith(recipe.stem), "a recipe writes to runs/<its name>"

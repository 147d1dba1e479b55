"""The package list in pyproject.toml is explicit (tokenizer/ and recipes/ are mapped into
the package), so every lmssl subpackage must be named there or a wheel would miss it."""

import tomllib

from tests.conftest import ROOT


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lmssl").rglob("__init__.py")}
    missing = found - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_shipped_tokenizer_and_recipes_resolve():
    from lmssl.data.tokenizer import default_tokenizer_path
    from lmssl.runs.recipes import recipe_path

    assert (default_tokenizer_path() / "tokenizer.json").is_file()
    assert recipe_path("gpt_tiny").is_file()

"""Where objectives are found: the registry every other layer reads by name.

An objective registers itself when its module is imported
(:func:`lmssl.objectives.register`); :func:`discover` imports every module of the
``lmssl.objectives`` package and every plug-in that a separately installed package
advertises under the entry-point group ``lmssl.objectives``, so adding a method is adding
one file (or one installed package), and no list anywhere names them.

This module sits at the bottom of the import graph: :mod:`lmssl.config` asks it for the
config section of each objective, the trainer, probes and exporters for the objective
class. The objective modules are imported by name here, at the first lookup, not at
import time.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import sys
from typing import Any

from lmssl.errors import UserError

ENTRY_POINT_GROUP = "lmssl.objectives"

OBJECTIVES: dict[str, Any] = {}  # name -> objective class (lmssl.objectives.Objective subclass)
_discovered = False


def add(cls: Any) -> None:
    """Record ``cls`` under ``cls.name`` (called by ``lmssl.objectives.register``)."""
    name = cls.name
    previous = OBJECTIVES.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"objective name '{name}' is registered twice: {previous.__module__}.{previous.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}")
    OBJECTIVES[name] = cls


def discover() -> dict[str, Any]:
    """Import the built-in objective modules and installed plug-ins once; return the registry."""
    global _discovered
    if not _discovered:
        _discovered = True
        package = importlib.import_module("lmssl.objectives")
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"lmssl.objectives.{info.name}")
        for entry in _entry_points():
            try:
                entry.load()
            except Exception as e:  # a broken plug-in must not take the built-in objectives down
                print(f"lmssl: warning: objective plug-in '{entry.name}' ({entry.value}) failed to load: "
                      f"{type(e).__name__}: {e}", file=sys.stderr)
    return OBJECTIVES


def _entry_points() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def get(name: str) -> Any:
    """The objective class registered as ``name``; one line naming the valid ones otherwise."""
    found = discover()
    if name not in found:
        near = difflib.get_close_matches(str(name), found, n=2)
        raise UserError(f"unknown objective '{name}'; choose one of: {', '.join(sorted(found))}"
                        + (f" (closest: {', '.join(near)})" if near else ""))
    return found[name]


def sections() -> dict[str, type]:
    """Objective name -> the dataclass of its YAML section (objectives without one left out)."""
    return {name: cls.Config for name, cls in sorted(discover().items()) if cls.Config is not None}

"""Export runs to folders that stock ``transformers`` loads, push them to the Hub, write model cards.

- :mod:`lmssl.export.transformers_map`: per (objective, family) converters to transformers classes
- :mod:`lmssl.export.core`: :func:`export_run` (convert, save, reload and compare, card)
- :mod:`lmssl.export.native`: the lmssl-format export for runs with no exact twin
- :mod:`lmssl.export.card`, :mod:`lmssl.export.hub`: model card and Hub upload
- :mod:`lmssl.export.cli`: ``lmssl export RUN_DIR OUT_DIR``
"""

from lmssl.export.core import ExportResult, export_run
from lmssl.export.transformers_map import REGISTRY, backbone_converter, register

__all__ = ["export_run", "ExportResult", "register", "backbone_converter", "REGISTRY"]

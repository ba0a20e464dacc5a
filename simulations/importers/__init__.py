"""Corpus importers: public emotion corpora to federation folders, one device per identity."""

from simulations.importers.base import CorpusImporter, CorpusImportError, ImportContext, SourceSample
from simulations.importers.build import DEFAULT_MAX_FILE_BYTES, import_corpus
from simulations.importers.registry import IMPORTERS, get_importer
from simulations.importers.report import ImportReport

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "IMPORTERS",
    "CorpusImportError",
    "CorpusImporter",
    "ImportContext",
    "ImportReport",
    "SourceSample",
    "get_importer",
    "import_corpus",
]

"""Corpus importers: public emotion corpora to federation folders, one device per identity."""

from corpora.base import CorpusImporter, CorpusImportError, ImportContext, SourceSample
from corpora.build import DEFAULT_MAX_FILE_BYTES, import_corpus
from corpora.registry import IMPORTERS, get_importer
from corpora.report import ImportReport

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

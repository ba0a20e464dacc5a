"""The importers by corpus name."""

from __future__ import annotations

from types import MappingProxyType

from corpora.base import CorpusImporter
from corpora.ckplus import CKPlusImporter
from corpora.crema_d import CremaDImporter
from corpora.dair_emotion import DairEmotionImporter
from corpora.emodb import EmoDBImporter
from corpora.fer2013 import FER2013Importer
from corpora.goemotions import GoEmotionsImporter
from corpora.isear import ISEARImporter
from corpora.meld import MELDImporter
from corpora.ravdess import RAVDESSImporter
from corpora.tess import TESSImporter

__all__ = ["IMPORTERS", "get_importer"]

IMPORTERS: MappingProxyType[str, CorpusImporter] = MappingProxyType(
    {
        importer.name: importer
        for importer in (
            RAVDESSImporter(),
            CremaDImporter(),
            TESSImporter(),
            EmoDBImporter(),
            FER2013Importer(),
            CKPlusImporter(),
            DairEmotionImporter(),
            GoEmotionsImporter(),
            ISEARImporter(),
            MELDImporter(),
        )
    }
)
# Spellings people type for the same corpora.
_ALIASES = {
    "cremad": "crema-d",
    "ck+": "ckplus",
    "ck-plus": "ckplus",
    "dair-ai": "dair-emotion",
    "dair": "dair-emotion",
    "emotion": "dair-emotion",
    "go-emotions": "goemotions",
}


def get_importer(name: str) -> CorpusImporter:
    """The importer registered as ``name`` (case, ``_`` for ``-`` and common aliases accepted).

    Raises
    ------
    ValueError
        If no importer is registered under ``name``; the message lists the known ones.
    """
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in IMPORTERS:
        raise ValueError(f"Unknown corpus {name!r}. Known: {', '.join(IMPORTERS)}.")
    return IMPORTERS[key]

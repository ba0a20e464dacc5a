"""The importers by corpus name."""

from __future__ import annotations

from types import MappingProxyType

from simulations.importers.base import CorpusImporter
from simulations.importers.ckplus import CKPlusImporter
from simulations.importers.crema_d import CremaDImporter
from simulations.importers.dair_emotion import DairEmotionImporter
from simulations.importers.emodb import EmoDBImporter
from simulations.importers.fer2013 import FER2013Importer
from simulations.importers.goemotions import GoEmotionsImporter
from simulations.importers.isear import ISEARImporter
from simulations.importers.meld import MELDImporter
from simulations.importers.ravdess import RAVDESSImporter
from simulations.importers.tess import TESSImporter

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

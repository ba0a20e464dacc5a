"""dair-ai "emotion" (CARER): English tweets with six emotions, no identities.

Saravia et al. (2018), "CARER: Contextualized Affect Representations for Emotion
Recognition", EMNLP. ``train.txt``, ``val.txt``, ``test.txt`` hold ``text;label`` lines
(sadness, joy, love, anger, fear, surprise; ClassLabel ids 0-5 also accepted). Love and joy
both become happy. ``val`` and ``test`` are the held-out population.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from corpora.base import CorpusImporter, ImportContext, SourceSample

__all__ = ["DairEmotionImporter"]

_SPLITS = {"train": False, "val": True, "validation": True, "test": True}


class DairEmotionImporter(CorpusImporter):
    """``train.txt``, ``val.txt``, ``test.txt`` of ``text;label`` lines; Dirichlet devices."""

    name = "dair-emotion"
    label_corpus = "dair_emotion"
    layout = "train.txt, val.txt, test.txt with 'text;label' lines"
    identity_kind = ""

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per line of every split file found."""
        files = [p for p in ctx.files(src, {".txt"}) if p.stem.lower() in _SPLITS]
        for path in files:
            heldout = _SPLITS[path.stem.lower()]
            name = self.relative(path, src)
            for number, line in enumerate(ctx.lines(path), start=1):
                if not line.strip():
                    continue
                text, sep, raw = line.rpartition(";")
                if not sep:
                    ctx.skip("malformed line (no ';label')")
                    continue
                raw = raw.strip()
                label = ctx.label(raw)
                if label is None:
                    continue
                yield SourceSample(
                    key=f"{name}:{number}", label=label, raw_label=raw, heldout=heldout, text=text
                )

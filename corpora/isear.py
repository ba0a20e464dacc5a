"""ISEAR: International Survey on Emotion Antecedents and Reactions, ~7,600 situations.

Scherer & Wallbott (1994), https://www.unige.ch/cisa/research/materials-and-online-research/research-material/.
Respondents described situations in which they felt joy, fear, anger, sadness, disgust,
shame and guilt. Public CSV copies differ: ``|``-, ``;``- or ``,``-separated, quoted with
``"`` or ``|``, with the emotion as name (``Field1``) or code (``EMOT`` 1-7), the text in
``SIT``, the respondent in ``ID``; or header-less ``label,text`` rows. Shame and guilt have
no shared emotion and are dropped. With an ``ID`` column every respondent is an identity
(a device); without one, devices are Dirichlet label-skewed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from corpora.base import CorpusImporter, ImportContext, SourceSample

__all__ = ["ISEARImporter"]

# Codebook values of EMOT.
EMOT_CODES = {"1": "joy", "2": "fear", "3": "anger", "4": "sadness", "5": "disgust", "6": "shame", "7": "guilt"}
_LABEL_COLUMNS = ("field1", "emotion", "label", "emot")
_TEXT_COLUMNS = ("sit", "text", "situation", "content", "sentence")


class ISEARImporter(CorpusImporter):
    """An ISEAR csv (``Field1``/``EMOT``, ``SIT``, optional ``ID``); devices per respondent."""

    name = "isear"
    label_corpus = "isear"
    layout = "a csv with columns Field1 (emotion), SIT (text) and optionally ID"
    identity_kind = "respondent"
    # A respondent wrote one situation per emotion, five of which map; pool the rest.
    min_identity_samples = 3

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per situation of every ISEAR csv found."""
        for path in ctx.files(src, {".csv", ".tsv"}):
            yield from self._scan_file(path, src, ctx)

    def _scan_file(self, path: Path, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        rows = ctx.csv_rows(path)
        first = next(rows, None)
        if first is None:
            return
        header = [name.strip().lower() for name in first]
        label_col = next((header.index(c) for c in _LABEL_COLUMNS if c in header), None)
        text_col = next((header.index(c) for c in _TEXT_COLUMNS if c in header), None)
        id_col = header.index("id") if "id" in header else None
        coded = label_col is not None and header[label_col] == "emot"
        if label_col is None or text_col is None:
            if len(first) >= 2 and first[0].strip().lower() in ctx.mapping:
                # Header-less "label,text" rows: the first row is data.
                label_col, text_col, id_col = 0, 1, None
                rows = _chain(first, rows)
            else:
                ctx.skip("file without ISEAR columns")
                return
        rel = self.relative(path, src)
        needed = max(c for c in (label_col, text_col, id_col) if c is not None)
        for number, row in enumerate(rows, start=2):
            if len(row) <= needed:
                ctx.skip("malformed csv row")
                continue
            raw = row[label_col].strip().lower()
            if coded:
                raw = EMOT_CODES.get(raw, raw)
            label = ctx.label(raw)
            if label is None:
                continue
            respondent = row[id_col].strip() if id_col is not None else ""
            yield SourceSample(
                key=f"{rel}:{number}",
                label=label,
                raw_label=raw,
                identity=respondent or None,
                text=row[text_col],
            )


def _chain(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest

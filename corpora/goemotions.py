"""GoEmotions: 58k Reddit comments with 27 emotions plus neutral, no identities.

Demszky et al. (2020), "GoEmotions: A Dataset of Fine-Grained Emotions", ACL. The
simplified release ``data/{train,dev,test}.tsv`` holds ``text<TAB>label_ids<TAB>id`` with
comma-separated ids into ``emotions.txt`` (the standard 28-name order when it is absent).
Labels go through the authors' Ekman grouping (``models.labels``). A multi-label row is
kept only when all its labels fall into one Ekman class; otherwise it is skipped as
``multi-label, conflicting``. ``dev`` and ``test`` are the held-out population.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from corpora.base import CorpusImporter, ImportContext, SourceSample

__all__ = ["GOEMOTIONS_NAMES", "GoEmotionsImporter"]

# data/emotions.txt of the release, in id order.
GOEMOTIONS_NAMES = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip


class GoEmotionsImporter(CorpusImporter):
    """``train.tsv``, ``dev.tsv``, ``test.tsv`` (+ ``emotions.txt``); Dirichlet devices."""

    name = "goemotions"
    label_corpus = "goemotions"
    layout = "train.tsv, dev.tsv, test.tsv with 'text<TAB>label_ids<TAB>id' lines"
    identity_kind = ""

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per usable row of every TSV file found."""
        names = self._names(src, ctx)
        for path in ctx.files(src, {".tsv"}):
            stem = path.stem.lower()
            heldout = any(part in stem for part in ("dev", "val", "test"))
            rel = self.relative(path, src)
            for number, line in enumerate(ctx.lines(path), start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2:
                    ctx.skip("malformed line (no label column)")
                    continue
                text, ids = fields[0], fields[1]
                raws = [_name(part, names) for part in ids.split(",") if part.strip()]
                if not raws or any(raw is None for raw in raws):
                    ctx.skip("unknown label")
                    continue
                targets = {ctx.mapping.get(raw) for raw in raws if raw is not None}
                if len(targets) > 1:
                    ctx.skip("multi-label, conflicting")
                    continue
                label = ctx.label(raws[0])
                if label is None:
                    continue
                raw = str(raws[0])
                if len(raws) > 1:
                    ctx.note("multi-label row, all labels in one Ekman class")
                    for other in raws[1:]:
                        ctx.label(other)
                    raw = f"multi-label ({targets.pop()})"
                key = f"{rel}:{number}" if len(fields) < 3 or not fields[2].strip() else fields[2].strip()
                yield SourceSample(key=key, label=label, raw_label=raw, heldout=heldout, text=text)

    def _names(self, src: Path, ctx: ImportContext) -> tuple[str, ...]:
        """Label names by id from ``emotions.txt``, else the standard order."""
        lists = [p for p in ctx.files(src, {".txt"}) if p.name.lower() == "emotions.txt"]
        if lists:
            names = tuple(line.strip().lower() for line in ctx.lines(lists[0]) if line.strip())
            if names:
                return names
        return GOEMOTIONS_NAMES


def _name(part: str, names: tuple[str, ...]) -> str | None:
    """The label name of one id (or a name written out), None if unknown."""
    part = part.strip().lower()
    if part.isdigit():
        return names[int(part)] if int(part) < len(names) else None
    return part if part in names else None

"""FER2013: 35,887 grey 48×48 faces from the ICML 2013 challenge, no identities.

Goodfellow et al. (2013), "Challenges in Representation Learning", arXiv:1307.0414. Two
forms are read: the original ``fer2013.csv`` (``emotion,pixels,Usage``; emotion ids 0
angry … 6 neutral; Usage Training, PublicTest, PrivateTest; also the ``icml_face_data.csv``
variant with spaces in the header), and image folders ``train|validation|test/<emotion>/``.
PublicTest/PrivateTest rows and validation/test folders are the official evaluation split,
used as held-out population.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from corpora.base import (
    IMAGE_EXTENSIONS,
    CorpusImporter,
    ImportContext,
    MediaRef,
    SourceSample,
)

__all__ = ["FER2013Importer"]

# Column "emotion" of the csv.
EMOTION_IDS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_TRAIN_SPLITS = {"train", "training"}
_EVAL_SPLITS = {"test", "val", "valid", "validation", "publictest", "privatetest"}


class FER2013Importer(CorpusImporter):
    """``fer2013.csv`` or ``train|validation|test/<emotion>/*.jpg``; Dirichlet devices."""

    name = "fer2013"
    label_corpus = "fer2013"
    layout = "fer2013.csv (emotion,pixels,Usage) or train|validation|test/<emotion>/*.jpg folders"
    identity_kind = ""

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per face, from the csv if there is one, else from the folders."""
        tables = [p for p in ctx.files(src, {".csv"}) if _is_fer_csv(p, ctx)]
        if tables:
            if len(tables) > 1:
                ctx.note("further FER2013 csv files ignored", len(tables) - 1)
            yield from self._scan_csv(tables[0], src, ctx)
        else:
            yield from self._scan_folders(src, ctx)

    def _scan_csv(self, path: Path, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        rows = ctx.csv_rows(path)
        header = [name.strip().lower() for name in next(rows, [])]
        col = {name: header.index(name) for name in ("emotion", "pixels", "usage") if name in header}
        name = self.relative(path, src)
        for line, row in enumerate(rows, start=2):
            if len(row) <= max(col.values()):
                ctx.skip("malformed csv row")
                continue
            raw = row[col["emotion"]]
            raw_name = EMOTION_IDS[int(raw)] if raw.isdigit() and int(raw) < len(EMOTION_IDS) else raw
            label = ctx.label(raw_name)
            if label is None:
                continue
            pixels = _parse_pixels(row[col["pixels"]])
            if pixels is None:
                ctx.skip("face: pixels not a square 8-bit image")
                continue
            usage = row[col["usage"]].strip().lower() if "usage" in col else "training"
            if usage not in _TRAIN_SPLITS and usage not in _EVAL_SPLITS:
                ctx.note("unknown Usage value, read as Training")
            yield SourceSample(
                key=f"{name}:{line}",
                label=label,
                raw_label=raw_name,
                heldout=usage in _EVAL_SPLITS,
                face=pixels,
            )

    def _scan_folders(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        for path in ctx.files(src, IMAGE_EXTENSIONS):
            emotion = path.parent.name.strip().lower()
            label = ctx.label(emotion)
            if label is None:
                continue
            split = path.parent.parent.name.strip().lower() if path.parent != src else ""
            yield SourceSample(
                key=self.relative(path, src),
                label=label,
                raw_label=emotion,
                heldout=split in _EVAL_SPLITS,
                face=MediaRef(path, "image"),
            )


def _is_fer_csv(path: Path, ctx: ImportContext) -> bool:
    """Whether a csv file has the FER2013 columns (read from its header only)."""
    header = next(ctx.csv_rows(path), [])
    names = {name.strip().lower() for name in header}
    return {"emotion", "pixels"} <= names


def _parse_pixels(text: str) -> np.ndarray | None:
    """Space-separated grey values of a square image, (S, S) uint8; None if malformed."""
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        return None
    side = math.isqrt(values.size)
    if values.size == 0 or side * side != values.size or values.min() < 0 or values.max() > 255:
        return None
    return values.astype(np.uint8).reshape(side, side)  # (S, S)

"""MELD: Multimodal EmotionLines Dataset, 13k utterances from the TV series *Friends*.

Poria et al. (2019), "MELD: A Multimodal Multi-Party Dataset for Emotion Recognition in
Conversations", ACL. ``{train,dev,test}_sent_emo.csv`` hold ``Utterance``, ``Speaker``,
``Emotion`` (neutral, joy, sadness, anger, fear, disgust, surprise), ``Dialogue_ID`` and
``Utterance_ID``; the clips ``dia{D}_utt{U}.mp4`` of each split (``train_splits/``,
``dev_splits_complete/``, ``output_repeated_splits_test/``) give the face modality through
their middle frame when present. Speakers are identities: the six main characters speak
most lines, and the hundreds of speakers with fewer than 20 lines share one ``other``
device. Speakers recur across the official splits, so held-out speakers replace them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from corpora.base import (
    VIDEO_EXTENSIONS,
    CorpusImporter,
    ImportContext,
    MediaRef,
    SourceSample,
)

__all__ = ["MELDImporter"]

_CLIP = re.compile(r"^dia(\d+)_utt(\d+)$", re.IGNORECASE)
_SPLITS = ("train", "dev", "test")
_COLUMNS = ("utterance", "speaker", "emotion", "dialogue_id", "utterance_id")


def _split_of(parts: tuple[str, ...]) -> str | None:
    """The official split a path belongs to, from its folder or file names."""
    for part in reversed(parts):
        lowered = part.lower()
        for split in _SPLITS:
            if split in lowered:
                return split
    return None


class MELDImporter(CorpusImporter):
    """``*_sent_emo.csv`` (+ ``dia{D}_utt{U}.mp4`` clips); one device per speaker."""

    name = "meld"
    label_corpus = "meld"
    layout = "train_sent_emo.csv, dev_sent_emo.csv, test_sent_emo.csv (and dia{D}_utt{U}.mp4 clips)"
    min_identity_samples = 20

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per utterance of every ``*_sent_emo.csv`` found."""
        tables: list[Path] = []
        clips: dict[tuple[str | None, int, int], Path] = {}
        for path in ctx.files(src, VIDEO_EXTENSIONS | {".csv"}):
            if path.suffix.lower() == ".csv":
                if path.stem.lower().endswith("sent_emo"):
                    tables.append(path)
                continue
            match = _CLIP.match(path.stem)
            if match is None:
                continue  # MELD ships other videos (final_videos_*); not utterances
            split = _split_of(path.relative_to(src).parts[:-1])
            clips.setdefault((split, int(match.group(1)), int(match.group(2))), path)
        for table in tables:
            yield from self._scan_table(table, _split_of((table.stem,)), clips, src, ctx)

    def _scan_table(
        self,
        path: Path,
        split: str | None,
        clips: dict[tuple[str | None, int, int], Path],
        src: Path,
        ctx: ImportContext,
    ) -> Iterator[SourceSample]:
        rows = ctx.csv_rows(path)
        header = [name.strip().lower().replace(" ", "_") for name in next(rows, [])]
        if not all(column in header for column in _COLUMNS):
            ctx.skip("csv without the MELD columns")
            return
        col = {column: header.index(column) for column in _COLUMNS}
        needed = max(col.values())
        for row in rows:
            if len(row) <= needed:
                ctx.skip("malformed csv row")
                continue
            raw = row[col["emotion"]].strip().lower()
            label = ctx.label(raw)
            if label is None:
                continue
            speaker = " ".join(row[col["speaker"]].split())
            try:
                dialogue, utterance = int(row[col["dialogue_id"]]), int(row[col["utterance_id"]])
            except ValueError:
                ctx.skip("malformed csv row")
                continue
            clip = clips.get((split, dialogue, utterance)) or clips.get((None, dialogue, utterance))
            if clips and clip is None:
                ctx.note("utterance without a video clip (text only)")
            yield SourceSample(
                key=f"{split or path.stem}/dia{dialogue}_utt{utterance}",
                label=label,
                raw_label=raw,
                identity=speaker or None,
                face=None if clip is None else MediaRef(clip, "video"),
                text=row[col["utterance"]],
            )

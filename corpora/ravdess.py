"""RAVDESS: 24 actors, speech and song, audio-only WAV and audio-visual MP4 clips.

Livingstone & Russo (2018), https://zenodo.org/record/1188976. File names are seven
two-digit fields ``MM-VV-EE-II-SS-RR-AA``: modality (01 audio-video, 02 video-only,
03 audio-only), vocal channel (01 speech, 02 song), emotion, intensity, statement,
repetition, actor. The audio-only WAV and the video of the same take differ only in
``MM``, so they are joined into one sample: voice from the WAV, face from the middle frame
of the video (audio-video preferred over video-only).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from corpora.base import (
    AUDIO_EXTENSIONS,
    VIDEO_EXTENSIONS,
    CorpusImporter,
    ImportContext,
    MediaRef,
    SourceSample,
)

__all__ = ["RAVDESSImporter"]

_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
# Emotion field; "calm" merges into neutral through models.labels.
EMOTION_CODES = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}


class RAVDESSImporter(CorpusImporter):
    """``Actor_XX/MM-VV-EE-II-SS-RR-AA.wav|mp4``; one device per actor."""

    name = "ravdess"
    label_corpus = "ravdess"
    layout = "Actor_XX/MM-VV-EE-II-SS-RR-AA.wav (and .mp4 video clips)"
    identity_kind = "actor"

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per take, joining its audio file and video clip."""
        takes: dict[tuple[str, ...], dict[str, Path]] = {}
        for path in ctx.files(src, AUDIO_EXTENSIONS | VIDEO_EXTENSIONS):
            match = _NAME.match(path.stem)
            if match is None:
                ctx.skip("file name not in the RAVDESS pattern")
                continue
            modality, *fields = match.groups()
            if modality not in ("01", "02", "03"):
                ctx.skip("unknown RAVDESS modality code")
                continue
            slots = takes.setdefault(tuple(fields), {})
            if modality in slots:
                ctx.note("duplicate RAVDESS file ignored")
                continue
            slots[modality] = path
        for take, slots in takes.items():
            channel, emotion, intensity, statement, repetition, actor = take
            label = ctx.label(EMOTION_CODES.get(emotion, f"code {emotion}"))
            if label is None:
                continue
            video = slots.get("01") or slots.get("02")
            audio = slots.get("03")
            main = audio or video
            if main is None:  # cannot happen: a take exists because one file named it
                continue
            yield SourceSample(
                key=self.relative(main, src),
                label=label,
                raw_label=EMOTION_CODES[emotion],
                identity=f"Actor_{actor}",
                face=None if video is None else MediaRef(video, "video"),
                voice=audio,
            )

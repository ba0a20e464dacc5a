"""CREMA-D: 91 actors, six emotions, audio (AudioWAV, AudioMP3) and video (VideoFlash).

Cao et al. (2014), https://github.com/CheyneyComputerScience/CREMA-D. File names are
``<actor>_<sentence>_<emotion>_<level>``, e.g. ``1001_DFA_ANG_XX``. Files of the same take
are joined into one sample: voice from the audio (WAV preferred over MP3), face from the
middle frame of the video clip when there is one.
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

__all__ = ["CremaDImporter"]

_NAME = re.compile(r"^(\d{4})_([A-Za-z]{3})_([A-Za-z]{3})_([A-Za-z]{1,2})$")


class CremaDImporter(CorpusImporter):
    """``AudioWAV/1001_DFA_ANG_XX.wav`` (+ ``VideoFlash/*.flv``); one device per actor."""

    name = "crema-d"
    label_corpus = "crema_d"
    layout = "AudioWAV/1001_DFA_ANG_XX.wav (and VideoFlash/*.flv clips)"
    identity_kind = "actor"

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per take, joining its audio file and video clip."""
        audio: dict[str, Path] = {}
        video: dict[str, Path] = {}
        for path in ctx.files(src, AUDIO_EXTENSIONS | VIDEO_EXTENSIONS):
            if _NAME.match(path.stem) is None:
                ctx.skip("file name not in the CREMA-D pattern")
                continue
            take = path.stem.upper()
            slots = video if path.suffix.lower() in VIDEO_EXTENSIONS else audio
            if take in slots:
                # AudioWAV and AudioMP3 hold the same takes; keep the lossless one.
                if path.suffix.lower() == ".wav" and slots[take].suffix.lower() != ".wav":
                    slots[take] = path
                ctx.note("second copy of a CREMA-D take ignored")
                continue
            slots[take] = path
        for take in sorted(audio.keys() | video.keys()):
            actor, _sentence, emotion, _level = take.split("_")
            label = ctx.label(emotion)
            if label is None:
                continue
            main = audio.get(take) or video[take]
            clip = video.get(take)
            yield SourceSample(
                key=self.relative(main, src),
                label=label,
                raw_label=emotion,
                identity=actor,
                face=None if clip is None else MediaRef(clip, "video"),
                voice=audio.get(take),
            )

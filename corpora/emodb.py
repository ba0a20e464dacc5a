"""EmoDB: Berlin Database of Emotional Speech, 10 speakers, 535 utterances.

Burkhardt et al. (2005), http://emodb.bilderbar.info. File names ``03a01Fa.wav``: speaker
(2 digits), text (letter and 2 digits), emotion (German initial: W Wut/anger, L
Langeweile/boredom, E Ekel/disgust, A Angst/fear, F Freude/happiness, T Trauer/sadness,
N neutral), version letter. Boredom has no shared emotion and is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from corpora.base import AUDIO_EXTENSIONS, CorpusImporter, ImportContext, SourceSample

__all__ = ["EmoDBImporter"]

_NAME = re.compile(r"^(\d{2})([a-z]\d{2})([A-Za-z])([a-z]?)$")
EMOTION_LETTERS = {
    "W": "anger",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "happiness",
    "T": "sadness",
    "N": "neutral",
}


class EmoDBImporter(CorpusImporter):
    """``wav/03a01Fa.wav``; one device per speaker."""

    name = "emodb"
    label_corpus = "emodb"
    layout = "wav/03a01Fa.wav (speaker, text, emotion letter, version)"

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per utterance."""
        for path in ctx.files(src, AUDIO_EXTENSIONS):
            match = _NAME.match(path.stem)
            if match is None:
                ctx.skip("file name not in the EmoDB pattern")
                continue
            speaker, _text, letter, _version = match.groups()
            emotion = EMOTION_LETTERS.get(letter.upper(), f"letter {letter}")
            label = ctx.label(emotion)
            if label is None:
                continue
            yield SourceSample(
                key=self.relative(path, src),
                label=label,
                raw_label=emotion,
                identity=speaker,
                voice=path,
            )

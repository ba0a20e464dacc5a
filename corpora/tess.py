"""TESS: Toronto emotional speech set, two actresses (OAF older, YAF younger), 200 words each.

Dupuis & Pichora-Fuller (2010), https://doi.org/10.5683/SP2/E8H2MF. Folders
``OAF_<emotion>`` / ``YAF_<emotion>``, sometimes nested under ``TESS Toronto emotional
speech set data/`` (some public copies hold that tree twice; a repeated file name is
counted once). The folder name gives speaker and emotion; a file outside such a folder
falls back to its own name, ``OAF_back_angry.wav``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from corpora.base import AUDIO_EXTENSIONS, CorpusImporter, ImportContext, SourceSample

__all__ = ["TESSImporter"]

_FOLDER = re.compile(r"^(OAF|YAF)_(.+)$", re.IGNORECASE)
_FILE = re.compile(r"^(OAF|YAF)_.+_([A-Za-z]+)$", re.IGNORECASE)


class TESSImporter(CorpusImporter):
    """``OAF_angry/*.wav``, ``YAF_pleasant_surprise/*.wav``; one device per speaker."""

    name = "tess"
    label_corpus = "tess"
    layout = "OAF_<emotion>/*.wav and YAF_<emotion>/*.wav folders"

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per word recording."""
        seen: set[tuple[str, str]] = set()
        for path in ctx.files(src, AUDIO_EXTENSIONS):
            folder = _FOLDER.match(path.parent.name)
            if folder is not None:
                speaker, emotion = folder.group(1), folder.group(2)
            elif (named := _FILE.match(path.stem)) is not None:
                speaker, emotion = named.group(1), named.group(2)
            else:
                ctx.skip("file not in an OAF_/YAF_ folder or name")
                continue
            speaker = speaker.upper()
            if (speaker, path.name.lower()) in seen:
                ctx.note("duplicate TESS file (nested copy) ignored")
                continue
            seen.add((speaker, path.name.lower()))
            emotion = emotion.strip().lower()
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

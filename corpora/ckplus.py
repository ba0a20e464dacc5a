"""CK+: extended Cohn-Kanade, 123 subjects, posed expression sequences, 48×48 folder form.

Lucey et al. (2010), "The Extended Cohn-Kanade Dataset (CK+)", CVPR workshops. The common
48×48 export (``CK+48``) holds the last frames of each labelled sequence in
``<emotion>/S005_001_00000011.png``; the subject is the ``S###`` part of the name.
Contempt has no shared emotion and is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from corpora.base import (
    IMAGE_EXTENSIONS,
    CorpusImporter,
    ImportContext,
    MediaRef,
    SourceSample,
)

__all__ = ["CKPlusImporter"]

_SUBJECT = re.compile(r"(?<![A-Za-z0-9])(S\d{3})(?!\d)", re.IGNORECASE)


class CKPlusImporter(CorpusImporter):
    """``<emotion>/S005_001_00000011.png``; one device per subject."""

    name = "ckplus"
    label_corpus = "ck_plus"
    layout = "<emotion>/S005_001_00000011.png (anger, contempt, disgust, fear, happy, sadness, surprise)"
    identity_kind = "subject"
    # A subject has a few sequences of three frames each; fewer than that is not a device.
    min_identity_samples = 3

    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield one sample per image."""
        for path in ctx.files(src, IMAGE_EXTENSIONS):
            emotion = path.parent.name.strip().lower()
            label = ctx.label(emotion)
            if label is None:
                continue
            subject = _SUBJECT.search(path.stem)
            if subject is None:
                ctx.skip("no subject (S###) in the file name")
                continue
            yield SourceSample(
                key=self.relative(path, src),
                label=label,
                raw_label=emotion,
                identity=subject.group(1).upper(),
                face=MediaRef(path, "image"),
            )

"""What a corpus importer yields, the context it records skips into, and its base class.

An importer only *reads* its corpus: it walks the source folder, parses names and index
files, maps labels onto the shared set and yields one :class:`SourceSample` per
observation, with references to the media files (decoded later, by :mod:`.media`). It
records what it cannot use in the :class:`ImportContext`, counted by reason, and never
raises for a bad file or line.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from corpora.textfiles import iter_lines, open_csv
from models.labels import CORPUS_LABEL_MAPS, EMOTIONS

__all__ = [
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "CorpusImportError",
    "CorpusImporter",
    "ImportContext",
    "MediaRef",
    "SourceSample",
    "natural_key",
]

# Candidate files are chosen by extension, then decoded by content: a ".mp3" that holds
# WAV data is read as WAV, and random bytes named ".wav" are skipped as undecodable.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".au", ".w64", ".rf64"}
)
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".gif"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".flv", ".avi", ".mov", ".mkv", ".webm", ".m4v"})

# Distinct unknown label values kept for the report; a corrupt column could hold thousands.
_MAX_UNKNOWN_LABELS = 20


class CorpusImportError(ValueError):
    """A corpus cannot be imported as a whole (nothing found, nothing usable, too few samples)."""


@dataclass(frozen=True)
class MediaRef:
    """A media file of a sample; ``kind`` says how to decode it for the face modality."""

    path: Path
    kind: Literal["image", "video"]


@dataclass
class SourceSample:
    """One observation of a corpus, before its media are decoded.

    Attributes
    ----------
    key : str
        Where it comes from, unique within the corpus (a relative path, ``file:line``);
        written as ``origin`` into ``samples.jsonl``.
    label : int
        Class id in :data:`models.labels.EMOTIONS`.
    raw_label : str
        The label as the corpus names it (``calm``, ``love``), for the report.
    identity : str or None
        Speaker, actor or subject; None where the corpus has no identities.
    heldout : bool
        True for samples of the corpus's official evaluation split (FER2013 PublicTest,
        dair-ai val/test), which serve as held-out population when there are no identities.
    face : MediaRef, np.ndarray or None
        An image or video file, or grey pixels (FER2013 csv) of shape (H, W) uint8.
    voice : Path or None
        An audio file.
    text : str or None
        Utterance text.
    """

    key: str
    label: int
    raw_label: str
    identity: str | None = None
    heldout: bool = False
    face: MediaRef | np.ndarray | None = None
    voice: Path | None = None
    text: str | None = None


class ImportContext:
    """Counters an importer records into while it scans a corpus.

    Parameters
    ----------
    corpus : str
        Registered name of the corpus, for messages.
    label_corpus : str
        Key of :data:`models.labels.CORPUS_LABEL_MAPS` that maps its labels.
    """

    def __init__(self, corpus: str, label_corpus: str) -> None:
        if label_corpus not in CORPUS_LABEL_MAPS:
            raise ValueError(
                f"Unknown label corpus {label_corpus!r}; known: {', '.join(sorted(CORPUS_LABEL_MAPS))}."
            )
        self.corpus = corpus
        self.mapping = CORPUS_LABEL_MAPS[label_corpus]
        self.skipped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.unknown_labels: Counter[str] = Counter()
        self.dropped_labels: Counter[str] = Counter()
        self.seen_labels: dict[str, str | None] = {}

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` skipped files or rows under ``reason``."""
        self.skipped[reason] += count

    def note(self, what: str, count: int = 1) -> None:
        """Count something that was converted or repaired rather than skipped."""
        self.notes[what] += count

    def label(self, raw: object) -> int | None:
        """Map a raw corpus label onto a class id, counting drops and unknown labels.

        Returns
        -------
        int or None
            The class id, or None when the sample must be skipped (the reason is counted).
        """
        name = str(raw).strip()
        key = name.lower()
        if key not in self.mapping:
            self.skip("unknown label")
            if key in self.unknown_labels or len(self.unknown_labels) < _MAX_UNKNOWN_LABELS:
                self.unknown_labels[name[:40]] += 1
            return None
        emotion = self.mapping[key]
        self.seen_labels[key] = emotion
        if emotion is None:
            self.dropped_labels[key] += 1
            self.skip(f"label {key!r} dropped (no shared emotion)")
            return None
        return EMOTIONS.index(emotion)

    def lines(self, path: Path) -> Iterator[str]:
        """The decoded lines of an index file; an unreadable file is counted and yields none."""
        try:
            yield from iter_lines(path, self.notes)
        except OSError:
            self.skip("unreadable index file")

    def csv_rows(self, path: Path) -> Iterator[list[str]]:
        """The rows of a CSV file of any dialect, header first; unreadable: counted, none."""
        try:
            yield from open_csv(path, self.notes)
        except OSError:
            self.skip("unreadable index file")

    def files(self, root: Path, extensions: Iterable[str] | None = None) -> list[Path]:
        """All files under ``root`` in a stable order, optionally only those with ``extensions``.

        Hidden files and folders and macOS metadata (``__MACOSX``, ``._name``) are passed
        over and counted as a note: archives made on a Mac carry a ``._`` twin of every file.
        """
        wanted = None if extensions is None else {e.lower() for e in extensions}
        found: list[Path] = []
        for folder, dirs, names in os.walk(root):
            hidden_dirs = [d for d in dirs if d.startswith(".") or d == "__MACOSX"]
            if hidden_dirs:
                self.note("hidden or macOS metadata folders ignored", len(hidden_dirs))
            dirs[:] = sorted((d for d in dirs if d not in hidden_dirs), key=natural_key)
            for name in sorted(names, key=natural_key):
                if name.startswith("."):
                    self.note("hidden or macOS metadata files ignored")
                    continue
                path = Path(folder) / name
                if wanted is None or path.suffix.lower() in wanted:
                    found.append(path)
        return found


class CorpusImporter(ABC):
    """Reads one public corpus in its usual distributed form.

    Subclasses set the class attributes and implement :meth:`scan`.

    Attributes
    ----------
    name : str
        Registry name (``ravdess``, ``crema-d``).
    label_corpus : str
        Key of :data:`models.labels.CORPUS_LABEL_MAPS` for its labels.
    layout : str
        The expected layout, shown when nothing is found.
    identity_kind : str
        What an identity is in this corpus (``actor``, ``speaker``), for the report.
    min_identity_samples : int
        Identities with fewer usable samples are pooled into one ``other`` device.
    """

    name: str = ""
    label_corpus: str = ""
    layout: str = ""
    identity_kind: str = "speaker"
    min_identity_samples: int = 4

    @abstractmethod
    def scan(self, src: Path, ctx: ImportContext) -> Iterator[SourceSample]:
        """Yield the samples found under ``src``; record what is skipped in ``ctx``."""

    def relative(self, path: Path, src: Path) -> str:
        """``path`` relative to ``src`` with forward slashes, for sample keys."""
        try:
            return path.relative_to(src).as_posix()
        except ValueError:
            return path.as_posix()


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers numerically: ``Actor_2`` before ``Actor_10``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.lower())
        for part in _DIGITS.split(text)
        if part
    )

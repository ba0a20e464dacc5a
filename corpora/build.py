"""Import a public corpus into a federation folder: scan, decode, lay out, write atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from corpora.base import CorpusImportError, ImportContext, SourceSample
from corpora.folder import FEDERATION_FORMAT, SAMPLES_FILE, check_output_folder, staged_folder, write_index
from corpora.layout import POOLED_IDENTITY, DevicePlan, plan_dirichlet, plan_identity
from corpora.media import (
    MediaSkip,
    write_image,
    write_pixels,
    write_video_frame,
    write_voice,
)
from corpora.registry import get_importer
from corpora.report import ImportReport
from corpora.textfiles import clean_text
from models.labels import EMOTIONS

__all__ = ["DEFAULT_MAX_FILE_BYTES", "PROGRESS_EVERY", "import_corpus"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 50 * 2**20
# Progress is reported every this many samples read.
PROGRESS_EVERY = 2000
# Decoding and encoding in OpenCV, libsndfile and torch release the GIL, so a few threads
# overlap file I/O with codec work; results are merged in input order, so the output does
# not depend on the thread count.
_WORKERS = min(4, os.cpu_count() or 1)
_CHUNK = 256


@dataclass
class _Kept:
    """A sample whose media are decoded and staged."""

    sid: str
    key: str
    label: int
    raw_label: str
    identity: str | None
    heldout: bool
    face: bool
    voice: bool
    text: str | None


@dataclass(frozen=True)
class _Layout:
    """The samples that made it onto a device, the device plans, and how they were made."""

    kept: list[_Kept]
    plans: list[DevicePlan]
    partition: str
    heldout_source: str
    pooled: list[str]


def import_corpus(
    corpus: str,
    src: Path,
    out: Path,
    *,
    heldout_share: float = 0.2,
    test_share: float = 0.2,
    devices: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    min_identity_samples: int | None = None,
) -> ImportReport:
    """Import the corpus in ``src`` into the federation folder ``out``.

    Media are decoded by content (audio to mono 16-bit WAV at 16 kHz, images and video
    middle frames to PNG) and labels mapped onto the shared seven emotions. Where the
    corpus has identities there is one device per identity and a share of identities is
    held out on test-only devices; otherwise devices are Dirichlet label-skewed and the
    held-out population is the corpus's evaluation split or a share of the samples (see
    :mod:`corpora.layout`). The folder is built next to ``out`` under a
    temporary name and renamed into place: ``out`` is complete or absent.

    Parameters
    ----------
    corpus : str
        A key of :data:`corpora.IMPORTERS`.
    src : Path
        The corpus folder, as distributed.
    out : Path
        Federation folder to write; must not exist or be empty.
    heldout_share : float, default 0.2
        Share of identities (or samples) held out, in [0, 1).
    test_share : float, default 0.2
        Local test share of each training device, in [0, 1).
    devices : int or None
        Training devices; None: one per identity, or 10 for corpora without identities.
    alpha : float, default 0.5
        Dirichlet concentration for corpora without identities.
    seed : int, default 0
        Seed of every random choice; the same inputs give the same folder.
    progress : callable, optional
        Called with a one-line message every few thousand samples and per phase.
    max_file_bytes : int, default 50 MiB
        Larger media files are skipped.
    min_identity_samples : int or None
        Identities with fewer usable samples are pooled into an ``other`` device; None
        uses the corpus's default.

    Returns
    -------
    ImportReport
        What was written, merged, dropped and skipped; also in ``federation.json``.

    Raises
    ------
    ValueError
        If ``corpus`` is unknown or a parameter is out of range.
    FileNotFoundError
        If ``src`` is not a folder.
    FileExistsError
        If ``out`` exists and is not an empty folder.
    CorpusImportError
        If nothing of the corpus is found or usable, or too little for the devices.
    """
    importer = get_importer(corpus)
    _check_params(heldout_share, test_share, devices, alpha, max_file_bytes, min_identity_samples)
    min_samples = importer.min_identity_samples if min_identity_samples is None else min_identity_samples
    src, out = Path(src), Path(out)
    _check_folders(src, out)

    say = progress or (lambda message: None)
    started = time.perf_counter()
    ctx = ImportContext(importer.name, importer.label_corpus)
    rng = np.random.default_rng(seed)
    with staged_folder(out) as tmp:
        staging = tmp / ".staging"
        staging.mkdir()
        say(f"{importer.name}: reading {src}")
        kept, read = _convert_all(importer.scan(src, ctx), staging, ctx, max_file_bytes, say, importer.name)
        if read == 0 and not ctx.skipped:
            raise CorpusImportError(
                f"no {importer.name} files found under {src}; expected {importer.layout}"
            )
        if not kept:
            raise CorpusImportError(
                f"nothing usable in {src} ({read} samples read): {_reasons(ctx.skipped)}"
            )
        layout = _lay_out(kept, ctx, heldout_share, test_share, devices, alpha, min_samples, rng)
        plans, partition = layout.plans, layout.partition
        say(f"{importer.name}: writing {len(plans)} device folders")
        report = _write(tmp, staging, layout.kept, plans, ctx, importer.name, src, out, partition)
        report.pooled_identities = layout.pooled
        report.seconds = time.perf_counter() - started
        settings = {
            "heldout_share": heldout_share, "test_share": test_share, "devices": devices, "alpha": alpha,
            "min_identity_samples": min_samples, "max_file_bytes": max_file_bytes,
        }
        index = _index(importer.name, ctx, layout, report, seed, settings)
        write_index(tmp, index)
    logger.info(
        "Imported %s: %d samples on %d devices (+%d held out) into %s",
        importer.name, report.samples, len(report.devices), len(report.heldout), out,
    )
    say(f"{importer.name}: done, {report.samples} samples in {report.seconds:.1f} s")
    return report


def _check_folders(src: Path, out: Path) -> None:
    """The corpus folder exists; the output folder is new or empty and not inside it."""
    if not src.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {src}")
    check_output_folder(out)
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise ValueError(f"the output folder {out} must not lie inside the corpus folder {src}.")


def _index(
    name: str, ctx: ImportContext, layout: _Layout, report: ImportReport, seed: int, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """``federation.json`` of an imported corpus: devices, label set, settings and the report."""
    plans, partition = layout.plans, layout.partition
    return {
        "format": FEDERATION_FORMAT,
        "source": name,
        # The emotions the corpus's label map can produce (public, not read from the data).
        "labels": [e for e in EMOTIONS if e in set(ctx.mapping.values())],
        "devices": [p.name for p in plans if not p.heldout],
        "heldout": [p.name for p in plans if p.heldout],
        "identities": {p.name: p.identities for p in plans if p.identities},
        "seed": seed,
        "import": {
            "partition": partition,
            "heldout_share": settings["heldout_share"],
            "heldout_source": layout.heldout_source,
            "test_share": settings["test_share"],
            "devices": settings["devices"],
            "alpha": settings["alpha"] if partition == "dirichlet" else None,
            "min_identity_samples": settings["min_identity_samples"] if partition == "identity" else None,
            "max_file_bytes": settings["max_file_bytes"],
        },
        "label_mapping": dict(sorted(ctx.seen_labels.items())),
        "report": report.to_dict(),
    }


def _check_params(
    heldout_share: float,
    test_share: float,
    devices: int | None,
    alpha: float,
    max_file_bytes: int,
    min_identity_samples: int | None,
) -> None:
    for name, value in (("heldout_share", heldout_share), ("test_share", test_share)):
        if not (isinstance(value, int | float) and 0 <= value < 1):
            raise ValueError(f"{name} must be in [0, 1). Found {value!r}.")
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices must be a positive integer or None. Found {devices!r}.")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number. Found {alpha!r}.")
    if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be a positive integer. Found {max_file_bytes!r}.")
    if min_identity_samples is not None and (
        not isinstance(min_identity_samples, int) or min_identity_samples < 1
    ):
        raise ValueError(
            f"min_identity_samples must be a positive integer or None. Found {min_identity_samples!r}."
        )


def _convert_all(
    samples: Iterable[SourceSample],
    staging: Path,
    ctx: ImportContext,
    max_bytes: int,
    say: Callable[[str], None],
    name: str,
) -> tuple[list[_Kept], int]:
    """Decode and stage every sample's media; returns the usable ones and the count read."""
    kept: list[_Kept] = []
    read = 0
    numbered: Iterator[tuple[int, SourceSample]] = enumerate(samples)
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        while chunk := list(islice(numbered, _CHUNK)):
            results = pool.map(lambda item: _convert(item[1], f"s{item[0]:06d}", staging, max_bytes), chunk)
            for result, skips, notes in results:
                ctx.skipped.update(skips)
                ctx.notes.update(notes)
                if result is not None:
                    kept.append(result)
            before, read = read, read + len(chunk)
            if read // PROGRESS_EVERY > before // PROGRESS_EVERY:
                say(f"{name}: {read} samples read, {len(kept)} usable")
    return kept, read


def _convert(
    sample: SourceSample, sid: str, staging: Path, max_bytes: int
) -> tuple[_Kept | None, Counter[str], Counter[str]]:
    """Decode one sample's media into the staging folder (thread-safe: no shared state)."""
    skips: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    face = voice = False
    if sample.face is not None:
        dest = staging / f"{sid}.png"
        try:
            if isinstance(sample.face, np.ndarray):
                write_pixels(sample.face, dest, notes=notes)
            elif sample.face.kind == "video":
                write_video_frame(sample.face.path, dest, max_bytes=max_bytes, notes=notes)
            else:
                write_image(sample.face.path, dest, max_bytes=max_bytes, notes=notes)
            face = True
        except MediaSkip as skip:
            skips[f"face: {skip.reason}"] += 1
    if sample.voice is not None:
        try:
            write_voice(sample.voice, staging / f"{sid}.wav", max_bytes=max_bytes, notes=notes)
            voice = True
        except MediaSkip as skip:
            skips[f"voice: {skip.reason}"] += 1
    text = None
    if sample.text is not None:
        text = clean_text(sample.text, notes) or None
        if text is None:
            skips["text: empty"] += 1
    given = sum(x is not None for x in (sample.face, sample.voice, sample.text))
    if not (face or voice or text):
        if given > 1:  # with one modality its own reason says it all
            skips["sample: no usable modality"] += 1
        return None, skips, notes
    kept = _Kept(sid, sample.key, sample.label, sample.raw_label, sample.identity, sample.heldout, face, voice, text)
    return kept, skips, notes


def _lay_out(
    kept: list[_Kept],
    ctx: ImportContext,
    heldout_share: float,
    test_share: float,
    devices: int | None,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
) -> _Layout:
    """Choose the layout from the samples and plan the device folders."""
    with_identity = sum(k.identity is not None for k in kept)
    if with_identity:
        if with_identity < len(kept):
            ctx.skip("sample: no identity", len(kept) - with_identity)
            kept = [k for k in kept if k.identity is not None]
        labels = np.array([k.label for k in kept], dtype=np.int64)
        plans, pooled, dropped = plan_identity(
            [k.identity or "" for k in kept],
            labels,
            heldout_share=heldout_share,
            test_share=test_share,
            devices=devices,
            min_identity_samples=min_samples,
            rng=rng,
        )
        if pooled:
            ctx.note(f"identities with fewer than {min_samples} samples pooled into 'other'", len(pooled))
        if dropped.size:
            ctx.skip(f"identity below {min_samples} samples, too few to pool", int(dropped.size))
        partition, source = "identity", "held-out identities"
    else:
        labels = np.array([k.label for k in kept], dtype=np.int64)
        official = np.array([k.heldout for k in kept], dtype=bool)
        if heldout_share <= 0 and official.any():
            ctx.note("official evaluation split merged into training (heldout_share=0)", int(official.sum()))
        plans, source = plan_dirichlet(
            labels,
            official,
            heldout_share=heldout_share,
            test_share=test_share,
            devices=devices,
            alpha=alpha,
            rng=rng,
        )
        partition, pooled = "dirichlet", []
    if not any(not p.heldout for p in plans):
        raise CorpusImportError(f"no training device could be formed: {_reasons(ctx.skipped)}")
    return _Layout(kept, plans, partition, source, pooled)


def _write(
    tmp: Path,
    staging: Path,
    kept: list[_Kept],
    plans: list[DevicePlan],
    ctx: ImportContext,
    corpus: str,
    src: Path,
    out: Path,
    partition: str,
) -> ImportReport:
    """Move staged media into the device folders, write each ``samples.jsonl``, count."""
    report = ImportReport(corpus=corpus, source=str(src), out=str(out), partition=partition)
    labels: Counter[str] = Counter()
    raw: Counter[str] = Counter()
    raw_to: dict[str, str] = {}
    modalities: Counter[str] = Counter({"face": 0, "voice": 0, "text": 0})
    identities: set[str] = set()
    for plan in plans:
        folder = tmp / plan.name
        folder.mkdir()
        lines = []
        for index, is_test in zip(plan.members.tolist(), plan.test.tolist(), strict=True):
            sample = kept[index]
            face = voice = None
            if sample.face:
                face = f"face/{sample.sid}.png"
                (folder / "face").mkdir(exist_ok=True)
                os.replace(staging / f"{sample.sid}.png", folder / face)
                modalities["face"] += 1
            if sample.voice:
                voice = f"voice/{sample.sid}.wav"
                (folder / "voice").mkdir(exist_ok=True)
                os.replace(staging / f"{sample.sid}.wav", folder / voice)
                modalities["voice"] += 1
            if sample.text is not None:
                modalities["text"] += 1
            record = {
                "id": sample.sid,
                "label": EMOTIONS[sample.label],
                "split": "test" if is_test else "train",
                "user": sample.identity,
                "face": face,
                "voice": voice,
                "text": sample.text,
                "origin": sample.key,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
            labels[EMOTIONS[sample.label]] += 1
            key = sample.raw_label.strip().lower()
            raw[key] += 1
            raw_to[key] = EMOTIONS[sample.label]
        (folder / SAMPLES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        n_test = int(plan.test.sum())
        if plan.heldout:
            report.heldout[plan.name] = int(plan.members.size)
            report.heldout_identities.extend(i for i in plan.identities if i != POOLED_IDENTITY)
        else:
            report.devices[plan.name] = {"train": int(plan.members.size) - n_test, "test": n_test}
        identities.update(plan.identities)
    shutil.rmtree(staging)
    report.samples = sum(labels.values())
    report.identities = len(identities - {POOLED_IDENTITY}) if partition == "identity" else 0
    report.labels = {name: labels[name] for name in EMOTIONS if labels[name]}
    table: dict[str, dict[str, Any]] = {key: {"to": raw_to[key], "samples": n} for key, n in raw.items()}
    for key, n in ctx.dropped_labels.items():
        table[key] = {"to": None, "samples": n}
    report.label_table = dict(sorted(table.items()))
    report.modalities = dict(modalities)
    report.skipped = Counter(ctx.skipped)
    report.notes = Counter(ctx.notes)
    report.unknown_labels = Counter(ctx.unknown_labels)
    return report


def _reasons(skipped: Counter[str]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.most_common(6)) or "no samples at all"

"""Multimodal pairing: devices carrying face, voice and text from three different corpora.

No public corpus records one person's face, voice and text for every emotion, so the
fused model cannot be trained on real signals of all three from one corpus. This module
builds a *paired* federation from three imported federation folders (one per modality):
device k of the result is made from device k of the anchor folder (the voice corpus by
default, which has speakers), and every anchor sample is joined with a sample of the same
label from the other two corpora's device k (cycled when those hold fewer devices), drawn
from the same split (train with train, test with test) and without replacement while
same-label samples remain; a label device k lacks is drawn from the corpus's other
devices of the same group (counted). Held-out devices are paired only with held-out material, so
held-out people stay unseen by training.

The result is labelled as paired everywhere: ``federation.json`` has ``"source":
"paired"`` and a ``pairing`` section naming the three corpora and the rule, every sample
line carries ``"paired": true`` and the origin of each modality, and the report says
that the modalities of one sample come from different people, matched only by label.
A modality with no same-label sample on the matching device stays missing and is counted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corpora.folder import (
    FEDERATION_FORMAT,
    SAMPLES_FILE,
    check_output_folder,
    device_file,
    read_federation,
    staged_folder,
    write_index,
)

__all__ = ["MODALITY_KEYS", "PairingReport", "pair_federations"]

MODALITY_KEYS = ("face", "voice", "text")
PAIRING_RULE = (
    "modalities of one sample come from different corpora and people, matched by emotion label "
    "within a device and split; not recordings of one person"
)


@dataclass
class PairingReport:
    """What a pairing wrote: counts only."""

    sources: dict[str, str]
    anchor: str
    out: str
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    heldout: dict[str, int] = field(default_factory=dict)
    modalities: Counter[str] = field(default_factory=Counter)
    missing: Counter[str] = field(default_factory=Counter)  # modality -> samples left without it
    reused: Counter[str] = field(default_factory=Counter)  # modality -> draws that repeat a sample
    from_other_devices: Counter[str] = field(default_factory=Counter)  # drawn from another device of the group
    labels: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> source samples or media not used

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also written into ``federation.json``)."""
        return {
            "paired": True,
            "rule": PAIRING_RULE,
            "sources": self.sources,
            "anchor": self.anchor,
            "devices": self.devices,
            "heldout": self.heldout,
            "samples": sum(self.labels.values()),
            "labels": dict(self.labels),
            "modalities": dict(self.modalities),
            "missing": dict(self.missing),
            "reused": dict(self.reused),
            "from_other_devices": dict(self.from_other_devices),
            "skipped": dict(self.skipped),
        }

    def format_text(self) -> str:
        """Human-readable summary, as the CLI prints it."""
        n = sum(self.labels.values())
        lines = [
            f"paired federation (face: {self.sources['face']}, voice: {self.sources['voice']}, "
            f"text: {self.sources['text']}; anchor {self.anchor}) written to {self.out}",
            f"  PAIRED DATA: {PAIRING_RULE}",
            f"  samples:    {n} on {len(self.devices)} training devices (+{len(self.heldout)} held out)",
            "  modalities: " + ", ".join(f"{m} {self.modalities[m]}" for m in MODALITY_KEYS),
            "  labels:     " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())),
        ]
        if self.missing:
            lines.append("  missing (no same-label sample on the matching device): "
                         + ", ".join(f"{m} {k}" for m, k in sorted(self.missing.items())))
        if self.from_other_devices:
            lines.append("  from another device (label absent on the matching one): "
                         + ", ".join(f"{m} {k}" for m, k in sorted(self.from_other_devices.items())))
        if self.skipped:
            lines.append("  skipped in the sources: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.reused:
            lines.append("  drawn again (fewer same-label samples than the anchor has): "
                         + ", ".join(f"{m} {k}" for m, k in sorted(self.reused.items())))
        return "\n".join(lines)


class _SampleReader:
    """Reads each source device's ``samples.jsonl`` once, keeping only usable media.

    A line that is not a JSON object is skipped; a face or voice path that leaves its
    device folder or names no file, or an empty text, is dropped from its record. Both
    are counted in ``skipped`` by reason, once per source device.
    """

    def __init__(self, skipped: Counter[str]) -> None:
        self.skipped = skipped
        self._cache: dict[Path, list[dict[str, Any]]] = {}

    def read(self, device: Path) -> list[dict[str, Any]]:
        if device not in self._cache:
            self._cache[device] = self._load(device)
        return self._cache[device]

    def _load(self, device: Path) -> list[dict[str, Any]]:
        path = device / SAMPLES_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            self.skipped["unreadable samples.jsonl"] += 1
            return []
        records = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                self.skipped["bad samples.jsonl line"] += 1
                continue
            for modality in ("face", "voice"):
                if record.get(modality) is not None and device_file(device, record[modality], self.skipped, modality) is None:
                    record[modality] = None
            text_value = record.get("text")
            if text_value is not None and not (isinstance(text_value, str) and text_value.strip()):
                self.skipped["text: empty or not a string"] += 1
                record["text"] = None
            records.append(record)
        return records


class _Pool:
    """Same-label, same-split samples of one modality on some source devices, drawn in turn."""

    def __init__(self, devices: list[Path], modality: str, rng: np.random.Generator, reader: _SampleReader) -> None:
        self.by_key: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
        for device in devices:
            for record in reader.read(device):
                if record.get(modality):
                    key = (str(record.get("label")), str(record.get("split", "train")))
                    self.by_key[key].append((device, record))
        for key in sorted(self.by_key):
            order = rng.permutation(len(self.by_key[key]))
            self.by_key[key] = [self.by_key[key][i] for i in order]
        self.used: Counter[tuple[str, str]] = Counter()

    def draw(self, label: str, split: str) -> tuple[tuple[Path, dict[str, Any]] | None, bool]:
        """A (device, sample) of this label and split (None if none) and whether it repeats one."""
        items = self.by_key.get((label, split))
        if not items:
            return None, False
        i = self.used[(label, split)]
        self.used[(label, split)] += 1
        return items[i % len(items)], i >= len(items)


def pair_federations(
    sources: Mapping[str, str | Path], out: str | Path, *, anchor: str = "voice", seed: int = 0
) -> PairingReport:
    """Build a paired multimodal federation from three imported federation folders.

    Parameters
    ----------
    sources : Mapping[str, str | Path]
        ``{"face": DIR, "voice": DIR, "text": DIR}``: federation folders written by
        ``emofed data import``, each giving that modality.
    out : str or Path
        Folder to write; must not exist or be empty. Written atomically.
    anchor : str, default "voice"
        The modality whose devices (and held-out devices) define the result's devices.
    seed : int, default 0
        Seed of the draw order.

    Returns
    -------
    PairingReport
        Counts of what was written; also in ``federation.json`` under ``pairing``.

    Raises
    ------
    ValueError
        If ``sources`` does not name exactly face, voice and text, ``anchor`` is not one
        of them, or a folder is not a federation folder.
    FileExistsError
        If ``out`` exists and is not an empty folder.
    """
    if set(sources) != set(MODALITY_KEYS):
        raise ValueError(f"sources must name exactly {', '.join(MODALITY_KEYS)}. Found {sorted(sources)}.")
    if anchor not in MODALITY_KEYS:
        raise ValueError(f"anchor must be one of {', '.join(MODALITY_KEYS)}. Found {anchor!r}.")
    folders = {m: Path(p) for m, p in sources.items()}
    metas = {m: read_federation(folder) for m, folder in folders.items()}
    out = Path(out)
    check_output_folder(out)
    rng = np.random.default_rng(seed)
    report = PairingReport(
        sources={m: str(metas[m].get("source", folders[m].name)) for m in MODALITY_KEYS}, anchor=anchor, out=str(out)
    )
    reader = _SampleReader(report.skipped)
    with staged_folder(out) as tmp:
        written: dict[str, list[str]] = {"devices": [], "heldout": []}
        for group in ("devices", "heldout"):
            # Fallback pools: the whole group of a corpus, for labels device k lacks.
            fallback = {
                m: _Pool([folders[m] / d for d in metas[m].get(group, [])], m, rng, reader)
                for m in MODALITY_KEYS
                if m != anchor
            }
            for k, name in enumerate(metas[anchor].get(group, [])):
                others: dict[str, tuple[_Pool, _Pool]] = {}
                for modality in MODALITY_KEYS:
                    if modality == anchor:
                        continue
                    candidates = metas[modality].get(group, [])
                    if not candidates:
                        continue  # that corpus has no such devices: the modality stays missing
                    device = folders[modality] / candidates[k % len(candidates)]
                    others[modality] = (_Pool([device], modality, rng, reader), fallback[modality])
                _pair_device(folders[anchor] / name, tmp / name, anchor, others, report, reader, group == "heldout")
                written[group].append(name)
        index = {
            "format": FEDERATION_FORMAT,
            "source": "paired",
            "labels": metas[anchor].get("labels"),
            "devices": written["devices"],
            "heldout": written["heldout"],
            "identities": metas[anchor].get("identities", {}),
            "seed": seed,
            "pairing": report.to_dict(),
        }
        write_index(tmp, index)
    return report


def _place(src_device: Path, rel: str, dst_device: Path, tag: str) -> str:
    """Hard-link (or copy) one medium into the new device folder; its new relative path."""
    new_rel = f"{Path(rel).parent}/{tag}-{Path(rel).name}"
    dst = dst_device / new_rel
    if dst.exists():  # the same source sample drawn again for this device
        return new_rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src_device / rel, dst)
    except OSError:
        shutil.copy2(src_device / rel, dst)
    return new_rel


def _pair_device(
    anchor_device: Path,
    dst: Path,
    anchor: str,
    others: Mapping[str, tuple[_Pool, _Pool]],
    report: PairingReport,
    reader: _SampleReader,
    heldout: bool,
) -> None:
    dst.mkdir()
    lines = []
    counts: Counter[str] = Counter()
    for record in reader.read(anchor_device):
        if not record.get(anchor):
            continue
        label, split = str(record.get("label")), "test" if heldout else str(record.get("split", "train"))
        paired: dict[str, Any] = dict.fromkeys(MODALITY_KEYS)
        origin: dict[str, Any] = {}
        paired[anchor] = record[anchor] if anchor == "text" else _place(anchor_device, record[anchor], dst, anchor)
        origin[anchor] = {"device": anchor_device.name, "id": record.get("id"), "user": record.get("user")}
        for modality, (pool, fallback) in others.items():
            split_in = str(record.get("split", "train"))
            picked, again = pool.draw(label, split_in)
            if picked is None:
                picked, again = fallback.draw(label, split_in)
                report.from_other_devices[modality] += int(picked is not None)
            if picked is None:
                report.missing[modality] += 1
                continue
            device, drawn = picked
            report.reused[modality] += int(again)
            paired[modality] = drawn[modality] if modality == "text" else _place(device, drawn[modality], dst, modality)
            origin[modality] = {"device": device.name, "id": drawn.get("id"), "user": drawn.get("user")}
        for modality in MODALITY_KEYS:
            if modality not in others and modality != anchor:
                report.missing[modality] += 1
            if paired[modality] is not None:
                report.modalities[modality] += 1
        line = {
            "id": f"{anchor_device.name}-{record.get('id')}",
            "label": label,
            "split": split,
            "user": record.get("user"),
            **paired,
            "paired": True,
            "origin": origin,
        }
        lines.append(json.dumps(line, ensure_ascii=False))
        counts[split] += 1
        report.labels[label] += 1
    (dst / SAMPLES_FILE).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    if heldout:
        report.heldout[dst.name] = counts["test"]
    else:
        report.devices[dst.name] = {"train": counts["train"], "test": counts["test"]}

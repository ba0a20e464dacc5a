"""What an import kept, merged, dropped and skipped: counts only, never data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ImportReport"]


@dataclass
class ImportReport:
    """Summary of one corpus import, also written into ``federation.json`` as ``report``.

    Attributes
    ----------
    corpus : str
        Registered importer name.
    source, out : str
        Corpus folder read and federation folder written.
    partition : str
        ``identity`` (one device per speaker/actor/subject) or ``dirichlet`` (label skew).
    samples : int
        Samples written, all devices together.
    devices : dict[str, dict[str, int]]
        Training device -> ``{"train": n, "test": n}``.
    heldout : dict[str, int]
        Held-out device -> samples (all of split ``test``).
    identities : int
        Identities written (0 for ``dirichlet``).
    heldout_identities : list[str]
        Identities on held-out devices.
    pooled_identities : list[str]
        Identities below the minimum sample count, pooled into the ``other`` group.
    labels : dict[str, int]
        Shared label -> samples written.
    label_table : dict[str, dict[str, Any]]
        Raw corpus label -> ``{"to": shared label or None, "samples": n}``; ``samples`` is
        the count written (mapped) or dropped (``to`` None).
    modalities : dict[str, int]
        ``face`` / ``voice`` / ``text`` -> samples written with that modality.
    skipped : Counter[str]
        Reason -> files, rows or samples skipped.
    notes : Counter[str]
        What was converted or repaired and kept (resampled, re-encoded, pooled).
    unknown_labels : Counter[str]
        Up to 20 distinct unknown label values seen, with counts.
    seconds : float
        Wall time of the import.
    """

    corpus: str
    source: str
    out: str
    partition: str = ""
    samples: int = 0
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    heldout: dict[str, int] = field(default_factory=dict)
    identities: int = 0
    heldout_identities: list[str] = field(default_factory=list)
    pooled_identities: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    label_table: dict[str, dict[str, Any]] = field(default_factory=dict)
    modalities: dict[str, int] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    unknown_labels: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def merged(self) -> dict[str, list[str]]:
        """Shared label -> the raw labels merged into it, where there are several."""
        by_target: dict[str, list[str]] = {}
        for raw, row in self.label_table.items():
            if row["to"] is not None:
                by_target.setdefault(row["to"], []).append(raw)
        return {to: sorted(raws) for to, raws in sorted(by_target.items()) if len(raws) > 1}

    @property
    def dropped_labels(self) -> dict[str, int]:
        """Raw label -> samples dropped because it has no shared emotion."""
        return {raw: row["samples"] for raw, row in self.label_table.items() if row["to"] is None}

    @property
    def total_skipped(self) -> int:
        """All skips together."""
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "corpus": self.corpus,
            "source": self.source,
            "partition": self.partition,
            "samples": self.samples,
            "devices": self.devices,
            "heldout": self.heldout,
            "identities": self.identities,
            "heldout_identities": self.heldout_identities,
            "pooled_identities": self.pooled_identities,
            "labels": self.labels,
            "label_table": self.label_table,
            "merged": self.merged,
            "dropped_labels": self.dropped_labels,
            "modalities": self.modalities,
            "skipped": dict(self.skipped.most_common()),
            "notes": dict(self.notes.most_common()),
            "unknown_labels": dict(self.unknown_labels.most_common()),
            "seconds": round(self.seconds, 2),
        }

    def format_text(self) -> str:
        """A human-readable, multi-line report."""
        train = sum(d["train"] for d in self.devices.values())
        test = sum(d["test"] for d in self.devices.values())
        held = sum(self.heldout.values())
        lines = [
            f"imported {self.corpus} from {self.source} into {self.out} in {self.seconds:.1f} s",
            f"  samples:    {self.samples} ({train} train, {test} local test, {held} held out)",
            f"  devices:    {len(self.devices)} training, {len(self.heldout)} held out "
            f"({self.partition} partition)",
        ]
        if self.identities:
            lines.append(
                f"  identities: {self.identities}, {len(self.heldout_identities)} held out"
                + (f": {', '.join(self.heldout_identities[:10])}" if self.heldout_identities else "")
                + (f"; {len(self.pooled_identities)} pooled into 'other'" if self.pooled_identities else "")
            )
        sizes = [d["train"] + d["test"] for d in self.devices.values()]
        if sizes:
            lines.append(f"  per device: {min(sizes)}..{max(sizes)} samples")
        modalities = ", ".join(f"{m} {n}" for m, n in self.modalities.items() if n)
        lines.append(f"  modalities: {modalities or 'none'}")
        lines.append("  labels (corpus -> shared: samples):")
        merged = {raw for raws in self.merged.values() for raw in raws}
        order = sorted(
            self.label_table.items(),
            key=lambda item: (item[1]["to"] is None, str(item[1]["to"]), item[0]),
        )
        for raw, row in order:
            target = row["to"] or "dropped"
            mark = "  (merged)" if raw in merged else ""
            lines.append(f"    {raw:>20} -> {target:<10} {row['samples']:>7}{mark}")
        if self.skipped:
            lines.append(f"  skipped ({self.total_skipped}):")
            lines.extend(f"    {n:>7}  {reason}" for reason, n in self.skipped.most_common())
        if self.unknown_labels:
            shown = ", ".join(f"{label!r} ({n})" for label, n in self.unknown_labels.most_common(10))
            lines.append(f"  unknown labels: {shown}")
        if self.notes:
            lines.append("  converted or repaired:")
            lines.extend(f"    {n:>7}  {what}" for what, n in self.notes.most_common())
        return "\n".join(lines)

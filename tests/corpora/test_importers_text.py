"""Tests of the text and conversation importers: dair-ai emotion, GoEmotions, ISEAR, MELD."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from corpora import import_corpus
from corpora.folder import read_device_folder, read_federation


def _load(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    meta = read_federation(out)
    records = {
        device: [json.loads(line) for line in (out / device / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        for device in meta["devices"] + meta["heldout"]
    }
    return meta, records


def _all(records: dict[str, list[dict]]) -> list[dict]:
    return [r for recs in records.values() for r in recs]


# --- dair-ai emotion -----------------------------------------------------------------

DAIR_LABELS = ("sadness", "joy", "love", "anger", "fear", "surprise")


def test_dair_emotion_import(tmp_path):
    """Love and joy merge into happy; bad lines are skipped by reason; val is held out."""
    root = tmp_path / "dair"
    root.mkdir()
    lines = [f"i feel {label} number {i};{label}".encode() for label in DAIR_LABELS for i in range(5)]
    lines += [b"caf\xe9 was lovely;joy", b";sadness", b"hello there;boredom", b"no separator here", b""]
    (root / "train.txt").write_bytes(b"\n".join(lines) + b"\n")
    (root / "val.txt").write_text("\n".join(f"held {label};{label}" for label in DAIR_LABELS) + "\n", encoding="utf-8")
    out = tmp_path / "fed"
    report = import_corpus("dair-emotion", root, out, devices=3, seed=0)
    meta, records = _load(out)
    assert report.samples == 37
    assert report.merged == {"happy": ["joy", "love"]}
    assert report.label_table["joy"] == {"to": "happy", "samples": 7}
    assert report.label_table["love"] == {"to": "happy", "samples": 6}
    assert report.labels["happy"] == 13
    assert report.skipped == {"text: empty": 1, "unknown label": 1, "malformed line (no ';label')": 1}
    assert report.unknown_labels == {"boredom": 1}
    assert report.notes["text: line not UTF-8, read as cp1252"] == 1
    assert len(meta["devices"]) == 3 and meta["identities"] == {}
    held = [r for d in meta["heldout"] for r in records[d]]
    assert sorted(r["text"] for r in held) == sorted(f"held {label}" for label in DAIR_LABELS)
    assert "café was lovely" in {r["text"] for r in _all(records)}
    train, test, skipped = read_device_folder(out / meta["devices"][0])
    assert not skipped and all(isinstance(s.text, str) and s.face is None for s in train + test)


# --- GoEmotions ----------------------------------------------------------------------


def test_goemotions_import(tmp_path):
    """Ekman grouping; a multi-label row is kept only when its labels agree."""
    root = tmp_path / "goemotions" / "data"
    root.mkdir(parents=True)
    rows = [
        ("great job", "0"), ("lol", "1"), ("so annoying", "3"), ("ugh gross", "11"), ("scary", "14"),
        ("sad day", "25"), ("wow", "26"), ("ok", "27"), ("haha love it", "1,18"),
        ("happy but sad", "17,25"), ("mystery", "99"), ("  ", "27"),
    ]  # fmt: skip
    lines = [f"{text}\t{ids}\tc{i}" for i, (text, ids) in enumerate(rows)] + ["no label column"]
    (root / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "dev.tsv").write_text("fine\t27\td1\nso mad\t2\td2\n", encoding="utf-8")
    out = tmp_path / "fed"
    report = import_corpus("goemotions", tmp_path / "goemotions", out, devices=2, seed=0)
    meta, records = _load(out)
    assert report.samples == 11
    assert report.skipped == {
        "multi-label, conflicting": 1,
        "unknown label": 1,
        "text: empty": 1,
        "malformed line (no label column)": 1,
    }
    assert report.notes["multi-label row, all labels in one Ekman class"] == 1
    assert report.label_table["multi-label (happy)"] == {"to": "happy", "samples": 1}
    assert report.labels == {
        "neutral": 2, "happy": 3, "sad": 1, "angry": 2, "fearful": 1, "disgusted": 1, "surprised": 1,
    }  # fmt: skip
    assert report.merged["angry"] == ["anger", "annoyance"]
    by_origin = {r["origin"]: r for r in _all(records)}
    assert by_origin["c8"]["label"] == "happy" and "c9" not in by_origin
    assert sorted(r["origin"] for d in meta["heldout"] for r in records[d]) == ["d1", "d2"]


def test_goemotions_reads_emotions_txt(tmp_path):
    """Label ids are looked up in emotions.txt when it is there."""
    root = tmp_path / "go"
    root.mkdir()
    (root / "emotions.txt").write_text("fear\njoy\n", encoding="utf-8")
    (root / "train.tsv").write_text("a\t0\nb\t1\nc\t0\nd\t1\ne\t2\n", encoding="utf-8")
    report = import_corpus("goemotions", root, tmp_path / "fed", devices=2, heldout_share=0.0)
    assert report.labels == {"happy": 2, "fearful": 2}
    assert report.skipped == {"unknown label": 1}
    assert report.heldout == {}


# --- ISEAR ---------------------------------------------------------------------------

ISEAR_LABELS = ("joy", "fear", "anger", "sadness", "disgust", "shame", "guilt")


def _isear_pipe_with_ids() -> str:
    rows = ["ID|CITY|Field1|SIT|"]
    rows += [
        f"{rid}|1|{label}|When I felt {label}, it was {rid}.|"
        for rid in (101, 102, 103, 104)
        for label in ISEAR_LABELS
    ]
    rows.append("105|1|love|Unknown label.|")
    return "\n".join(rows) + "\n"


def _isear_semicolon_codes() -> str:
    rows = ["EMOT;SIT"] + [f"{code};Situation {code}, take {k}" for k in range(3) for code in range(1, 8)]
    return "\n".join(rows) + "\n"


def _isear_headerless() -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for k in range(3):
        for label in ISEAR_LABELS:
            writer.writerow([label, f"When {label} came, take {k}, I left."])
    return buffer.getvalue()


def _isear_bar_quoted() -> str:
    rows = ["|ID|,|Field1|,|SIT|"]
    rows += [f"|{rid}|,|{label}|,|Felt {label}, then {rid}.|" for rid in (7, 8, 9) for label in ISEAR_LABELS]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize(
    ("make", "samples", "partition", "devices"),
    [
        (_isear_pipe_with_ids, 20, "identity", None),
        (_isear_semicolon_codes, 15, "dirichlet", 2),
        (_isear_headerless, 15, "dirichlet", 2),
        (_isear_bar_quoted, 15, "identity", None),
    ],
    ids=["pipe-with-ids", "semicolon-codes", "headerless", "bar-quoted"],
)
def test_isear_variants(tmp_path, make, samples, partition, devices):
    """Every public CSV variant is read; shame and guilt are dropped; IDs become devices."""
    root = tmp_path / "isear"
    root.mkdir()
    (root / "isear.csv").write_text(make(), encoding="utf-8")
    out = tmp_path / "fed"
    report = import_corpus("isear", root, out, devices=devices, seed=0)
    meta, records = _load(out)
    assert report.samples == samples
    assert report.partition == partition
    per_label = samples // 5
    assert report.dropped_labels == {"guilt": per_label, "shame": per_label}
    assert report.labels == dict.fromkeys(("happy", "sad", "angry", "fearful", "disgusted"), per_label)
    texts = {r["text"] for r in _all(records)}
    assert all(text and "|" not in text and not text.startswith('"') for text in texts)
    assert any("," in text for text in texts)
    if partition == "identity":
        respondents = {r["user"] for r in _all(records)}
        assert len(meta["devices"]) + len(meta["heldout"]) == len(respondents)
        assert not {i for d in meta["devices"] for i in meta["identities"][d]} & {
            i for d in meta["heldout"] for i in meta["identities"][d]
        }
    else:
        assert len(meta["devices"]) == 2 and meta["heldout"] == ["heldout-000"]


# --- MELD ----------------------------------------------------------------------------

MELD_HEADER = [
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
    "Season", "Episode", "StartTime", "EndTime",
]  # fmt: skip
MELD_EMOTIONS = ("neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise")


def _meld_csv(path: Path, rows: list[tuple[str, str, str, int, int]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(MELD_HEADER)
    for n, (text, speaker, emotion, dialogue, utterance) in enumerate(rows, start=1):
        times = ["00:00:01,000", "00:00:02,000"]
        writer.writerow([n, text, speaker, emotion, "neutral", dialogue, utterance, 1, 1, *times])
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _clip(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.full((48, 64, 3), 70, dtype=np.uint8))
    writer.release()


def test_meld_import(tmp_path):
    """Speakers are identities, rare speakers share 'other', clips give faces, C1 text repaired."""
    root = tmp_path / "MELD.Raw"
    root.mkdir()
    speakers = ["Ross"] * 25 + ["Rachel"] * 24 + ["Monica"] * 22 + ["Joey"] * 20 + ["Mr. Heckles"] * 3 + ["Janice"] * 2
    rows = [
        (f"Line {i} of {who}.", who, MELD_EMOTIONS[i % 7], i // 10, i % 10) for i, who in enumerate(speakers)
    ]
    rows[0] = ("I don\x92t know, Ross.", "Ross", "neutral", 0, 0)
    rows += [("Odd label.", "Ross", "happy", 50, 0), ("Nobody said it.", "", "joy", 50, 1)]
    _meld_csv(root / "train_sent_emo.csv", rows)
    _meld_csv(root / "dev_sent_emo.csv", [("Dev one.", "Ross", "joy", 0, 0), ("Dev two.", "Ross", "anger", 0, 1)])
    _clip(root / "train_splits" / "dia0_utt0.mp4")
    _clip(root / "dev_splits_complete" / "dia0_utt1.mp4")
    out = tmp_path / "fed"
    report = import_corpus("meld", root, out, seed=0)
    meta, records = _load(out)
    assert report.samples == 98
    assert report.skipped == {"unknown label": 1, "sample: no identity": 1}
    assert report.pooled_identities == ["Janice", "Mr. Heckles"]
    assert report.label_table["joy"]["to"] == "happy" and report.merged == {}
    assert report.modalities == {"face": 2, "voice": 0, "text": 98}
    assert report.notes["text: C1 control characters repaired as cp1252 punctuation"] == 1
    assert len(meta["devices"]) + len(meta["heldout"]) == 5 and len(meta["heldout"]) == 1
    assert ["other", "Janice", "Mr. Heckles"] in meta["identities"].values()
    by_origin = {r["origin"]: r for r in _all(records)}
    assert by_origin["train/dia0_utt0"]["text"] == "I don\u2019t know, Ross."
    assert by_origin["train/dia0_utt0"]["face"] and by_origin["dev/dia0_utt1"]["face"]
    assert by_origin["dev/dia0_utt0"]["face"] is None
    assert sum(r["user"] == "Ross" for r in by_origin.values()) == 27
    ross = next(d for d, ids in meta["identities"].items() if ids == ["Ross"])
    train, test, skipped = read_device_folder(out / ross)
    assert not skipped and sum(s.face is not None for s in train + test) == 2

"""Multimodal pairing of three imported corpora: same label, same split, labelled as paired."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_importers import _make_emodb

from cli.main import main
from corpora import import_corpus
from corpora.folder import read_device_folder, read_federation
from corpora.pairing import PAIRING_RULE, pair_federations

FER_FOLDERS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
DAIR = {"anger": "angry", "fear": "fearful", "joy": "happy", "sadness": "sad", "surprise": "surprised"}


def _make_fer_folder(root: Path, per_label: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_label), ("validation", 2)):
        for emotion in FER_FOLDERS:
            for i in range(n):
                path = root / split / emotion / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), rng.integers(0, 255, (48, 48), dtype=np.uint8))
    return root


def _make_dair(root: Path, per_label: int = 6) -> Path:
    root.mkdir(parents=True)
    train = [f"feeling number {i} of {label};{label}" for label in DAIR for i in range(per_label)]
    (root / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (root / "val.txt").write_text("\n".join(f"held {i} {lab};{lab}" for lab in DAIR for i in range(2)) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FER-style faces, EmoDB voices (5 speakers) and dair-ai texts, each imported."""
    root = tmp_path_factory.mktemp("pairing")
    folders = {"face": root / "face", "voice": root / "voice", "text": root / "text"}
    import_corpus("fer2013", _make_fer_folder(root / "fer"), folders["face"], devices=4, seed=0)
    import_corpus("emodb", _make_emodb(root / "emodb"), folders["voice"], heldout_share=0.2, seed=0)
    import_corpus("dair_emotion", _make_dair(root / "dair"), folders["text"], devices=4, seed=0)
    return folders


def _origin_record(folder: Path, device: str, sample_id: str) -> dict:
    for line in (folder / device / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["id"] == sample_id:
            return record
    raise AssertionError(f"{sample_id} not on {device}")


def test_pairing_matches_labels_and_splits(imported: dict[str, Path], tmp_path: Path) -> None:
    """Every paired modality comes from a same-label, same-split sample of its corpus's device."""
    out = tmp_path / "paired"
    report = pair_federations(imported, out, seed=1)
    meta = read_federation(out)
    voice_meta = read_federation(imported["voice"])
    assert meta["source"] == "paired" and meta["pairing"]["paired"] is True
    assert meta["pairing"]["rule"] == PAIRING_RULE and meta["pairing"]["sources"] == {
        "face": "fer2013", "voice": "emodb", "text": "dair-emotion"
    }
    assert meta["devices"] == voice_meta["devices"] and meta["heldout"] == voice_meta["heldout"]
    checked = 0
    for group in ("devices", "heldout"):
        for device in meta[group]:
            for line in (out / device / "samples.jsonl").read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                assert record["paired"] is True and record["voice"]
                for modality in ("face", "text"):
                    origin = record["origin"].get(modality)
                    if origin is None:
                        assert record[modality] is None
                        continue
                    src = _origin_record(imported[modality], origin["device"], origin["id"])
                    assert src["label"] == record["label"]
                    assert src["split"] == ("test" if group == "heldout" else record["split"])
                    assert origin["device"].startswith("heldout" if group == "heldout" else "device")
                    checked += 1
    assert checked > 20
    # dair-ai has no neutral or disgust text: those samples lack text, and that is counted.
    labels = report.labels
    assert report.missing["text"] >= labels["neutral"] + labels["disgusted"] > 0
    assert report.modalities["voice"] == sum(labels.values())
    # FER has every label somewhere: a label a device lacks comes from another device.
    assert report.missing["face"] == 0 and report.modalities["face"] == sum(labels.values())


def test_paired_folder_reads_as_three_modalities(imported: dict[str, Path], tmp_path: Path) -> None:
    """A device of the paired folder reads back with face, voice and text on most samples."""
    out = tmp_path / "paired"
    pair_federations(imported, out, seed=1)
    train, test, skipped = read_device_folder(out / "device-000")
    samples = train + test
    assert samples and not skipped
    assert all(s.voice is not None for s in samples)
    records = [json.loads(line) for line in (out / "device-000" / "samples.jsonl").read_text().splitlines()]
    assert sum(s.face is not None for s in samples) == sum(r["face"] is not None for r in records) > 0
    assert sum(s.text is not None for s in samples) == sum(r["text"] is not None for r in records) > 0


def test_pairing_is_seeded(imported: dict[str, Path], tmp_path: Path) -> None:
    """The same seed gives the same pairs; another seed other pairs."""
    a, b, c = (tmp_path / n for n in "abc")
    pair_federations(imported, a, seed=3)
    pair_federations(imported, b, seed=3)
    pair_federations(imported, c, seed=4)
    def read(folder: Path) -> str:
        return "".join((folder / d / "samples.jsonl").read_text(encoding="utf-8") for d in read_federation(folder)["devices"])

    assert read(a) == read(b) and read(a) != read(c)


def test_pair_command_prints_the_paired_label(imported: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`emofed data pair` writes the folder, says PAIRED DATA; bad input is a one-line error."""
    out = tmp_path / "paired"
    argv = ["data", "pair", "--face", str(imported["face"]), "--voice", str(imported["voice"]),
            "--text", str(imported["text"]), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "PAIRED DATA:" in printed and f"data.path={out}" in printed
    assert main(argv) == 2  # the output folder is no longer empty
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty folder" in err
    assert main([*argv[:2], "--face", str(tmp_path), *argv[4:-1], str(tmp_path / "other")]) == 2
    assert "federation.json is missing" in capsys.readouterr().err

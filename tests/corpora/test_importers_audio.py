"""Tests of the speech-corpus importers: RAVDESS, CREMA-D, TESS and EmoDB."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from corpora import import_corpus
from corpora.folder import read_device_folder, read_federation
from corpora.media import TARGET_RATE
from models.labels import EMOTIONS


def _write_wav(path: Path, *, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16", fmt: str = "WAV") -> Path:
    t = np.arange(round(rate * 0.2)) / rate
    wave = 0.4 * np.sin(2 * np.pi * 300 * t)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate, subtype=subtype, format=fmt)
    return path


def _write_clip(path: Path, level: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = {".mp4": "mp4v", ".avi": "MJPG", ".flv": "FLV1"}[path.suffix]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (64, 48))
    for _ in range(5):
        writer.write(np.full((48, 64, 3), level, dtype=np.uint8))
    writer.release()
    return path


def _load(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    meta = read_federation(out)
    records = {
        device: [json.loads(line) for line in (out / device / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        for device in meta["devices"] + meta["heldout"]
    }
    return meta, records


def _check_identity_layout(meta: dict, records: dict[str, list[dict]]) -> None:
    """Shared checks: identities per device, held-out ones disjoint and test-only."""
    identities = meta["identities"]
    assert set(identities) == set(meta["devices"]) | set(meta["heldout"])
    assert not set(meta["devices"]) & set(meta["heldout"])
    train_ids = {i for d in meta["devices"] for i in identities[d]}
    held_ids = {i for d in meta["heldout"] for i in identities[d]}
    assert not train_ids & held_ids
    for device, recs in records.items():
        assert {r["user"] for r in recs} <= set(identities[device])
        if device in meta["heldout"]:
            assert {r["split"] for r in recs} == {"test"}
        else:
            assert {r["split"] for r in recs} == {"train", "test"}


# --- EmoDB ---------------------------------------------------------------------------


def _make_emodb(root: Path) -> Path:
    rates = (8000, 16000, 22050, 44100, 96000)
    subtypes = ("PCM_16", "PCM_24", "FLOAT", "PCM_32", "PCM_16")
    for s, speaker in enumerate(("03", "08", "09", "10", "11")):
        for letter in "WLEAFTN":
            path = root / "wav" / f"{speaker}a01{letter}a.wav"
            _write_wav(path, rate=rates[s], subtype=subtypes[s], channels=1 + s % 2)
    wav = root / "wav"
    _write_wav(wav / "03b01Fa.mp3")  # WAV data behind an .mp3 name: decoded by content
    (wav / "08b01Wa.wav").write_bytes(np.random.default_rng(0).bytes(3000))  # random bytes
    (wav / "09b01Ta.wav").write_bytes(b"")  # zero bytes
    _write_wav(wav / "10b01Nb.wav").write_bytes((wav / "10b01Nb.wav").read_bytes()[:30])  # cut header
    _write_wav(wav / "11b01Xa.wav")  # unknown emotion letter
    _write_wav(wav / "recording.wav")  # not an EmoDB name
    _write_wav(wav / "._03a01Fa.wav")  # macOS metadata twin
    (root / "erklaerung.txt").write_text("Erklärung\n", encoding="utf-8")
    return root


def test_emodb_import(tmp_path):
    """Boredom dropped, broken files skipped by reason, one device per speaker, 16 kHz mono."""
    out = tmp_path / "fed"
    report = import_corpus("emodb", _make_emodb(tmp_path / "emodb"), out, seed=0)
    meta, records = _load(out)
    assert report.samples == 31  # 5 speakers x 6 emotions + the .mp3
    assert report.skipped == {
        "label 'boredom' dropped (no shared emotion)": 5,
        "voice: undecodable audio": 2,
        "voice: empty file": 1,
        "unknown label": 1,
        "file name not in the EmoDB pattern": 1,
    }
    assert report.dropped_labels == {"boredom": 5}
    assert report.labels == {"neutral": 5, "happy": 6, "sad": 5, "angry": 5, "fearful": 5, "disgusted": 5}
    assert report.notes["voice: .mp3 file holding WAV data, decoded by content"] == 1
    assert report.notes["hidden or macOS metadata files ignored"] == 1
    assert report.notes["voice: resampled 8000 Hz -> 16000 Hz"] == 6
    assert meta["source"] == "emodb"
    assert len(meta["devices"]) == 4 and len(meta["heldout"]) == 1  # round(0.2 * 5)
    assert sorted(i for ids in meta["identities"].values() for i in ids) == ["03", "08", "09", "10", "11"]
    assert meta["label_mapping"]["boredom"] is None
    assert meta["report"]["skipped"]["voice: empty file"] == 1
    _check_identity_layout(meta, records)
    assert sum(len(r) for r in records.values()) == 31
    for device in meta["devices"] + meta["heldout"]:
        train, test, skipped = read_device_folder(out / device)
        assert not skipped
        assert len(train) + len(test) == len(records[device])
        for sample in train + test:
            assert sample.voice_rate == TARGET_RATE and sample.voice.ndim == 1
    one = next(r for recs in records.values() for r in recs if r["origin"] == "wav/03b01Fa.mp3")
    assert one["label"] == "happy" and one["user"] == "03"


# --- RAVDESS -------------------------------------------------------------------------


def _make_ravdess(root: Path) -> Path:
    for a in (1, 2, 3, 4):
        actor = root / f"Actor_{a:02d}"
        for e in range(1, 9):
            _write_wav(actor / f"03-01-{e:02d}-01-01-01-{a:02d}.wav", rate=48000, channels=2)
        _write_wav(actor / f"03-02-03-02-02-02-{a:02d}.wav", rate=48000)  # song
    # Audio-video clip of a take that also has its audio-only file, and a video-only take.
    _write_clip(root / "Actor_01" / "01-01-05-01-01-01-01.mp4", level=120)
    _write_clip(root / "Actor_01" / "02-01-06-02-01-02-01.mp4", level=60)
    _write_wav(root / "Actor_02" / "03-01-09-01-01-01-02.wav")  # emotion code 09
    _write_wav(root / "Actor_02" / "05-01-01-01-01-01-02.wav")  # modality 05
    _write_wav(root / "Actor_02" / "notes.wav")
    return root


def test_ravdess_import(tmp_path):
    """Calm merges into neutral, audio and video of one take join, actors are identities."""
    out = tmp_path / "fed"
    report = import_corpus("ravdess", _make_ravdess(tmp_path / "ravdess"), out, seed=0)
    meta, records = _load(out)
    assert report.samples == 4 * 9 + 1
    assert report.merged == {"neutral": ["calm", "neutral"]}
    assert report.label_table["calm"] == {"to": "neutral", "samples": 4}
    assert report.labels["neutral"] == 8 and report.labels["happy"] == 8
    assert report.skipped == {
        "unknown label": 1,
        "unknown RAVDESS modality code": 1,
        "file name not in the RAVDESS pattern": 1,
    }
    assert report.modalities == {"face": 2, "voice": 36, "text": 0}
    assert len(meta["devices"]) == 3 and len(meta["heldout"]) == 1
    assert sorted(i for ids in meta["identities"].values() for i in ids) == [f"Actor_{a:02d}" for a in (1, 2, 3, 4)]
    _check_identity_layout(meta, records)
    flat = {r["origin"]: (device, r) for device, recs in records.items() for r in recs}
    device, joined = flat["Actor_01/03-01-05-01-01-01-01.wav"]
    assert joined["label"] == "angry" and joined["face"] and joined["voice"]
    face = cv2.imread(str(out / device / joined["face"]))
    assert abs(float(face.mean()) - 120) < 8
    _, video_only = flat["Actor_01/02-01-06-02-01-02-01.mp4"]
    assert video_only["label"] == "fearful" and video_only["voice"] is None and video_only["face"]
    train, test, skipped = read_device_folder(out / device)
    assert not skipped and any(s.face is not None and s.voice is not None for s in train + test)


# --- CREMA-D -------------------------------------------------------------------------


def _make_crema(root: Path) -> Path:
    for speaker in (1001, 1002, 1003, 1004, 1005):
        for emotion in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"):
            _write_wav(root / "AudioWAV" / f"{speaker}_DFA_{emotion}_XX.wav", rate=16000)
    _write_wav(root / "AudioMP3" / "1001_DFA_ANG_XX.mp3", fmt="MP3", subtype="MPEG_LAYER_III")  # second copy of a take
    _write_clip(root / "VideoFlash" / "1001_DFA_ANG_XX.flv", level=90)
    _write_wav(root / "AudioWAV" / "1002_DFA_BOR_XX.wav")  # no such emotion
    (root / "AudioWAV" / "1003_IEO_HAP_HI.wav").write_bytes(b"\x00" * 64)  # undecodable
    return root


def test_crema_d_import(tmp_path):
    """Six emotions map one to one, audio and flv join, every actor is one device."""
    out = tmp_path / "fed"
    report = import_corpus("crema-d", _make_crema(tmp_path / "crema"), out, seed=2)
    meta, records = _load(out)
    assert report.samples == 30
    assert report.labels == dict.fromkeys(("neutral", "happy", "sad", "angry", "fearful", "disgusted"), 5)
    assert report.merged == {}
    assert report.skipped == {"unknown label": 1, "voice: undecodable audio": 1}
    assert report.notes["second copy of a CREMA-D take ignored"] == 1
    assert report.modalities["face"] == 1
    assert len(meta["devices"]) == 4 and len(meta["heldout"]) == 1
    _check_identity_layout(meta, records)
    joined = [r for recs in records.values() for r in recs if r["face"]]
    assert len(joined) == 1 and joined[0]["user"] == "1001" and joined[0]["voice"]
    assert joined[0]["origin"] == "AudioWAV/1001_DFA_ANG_XX.wav"


# --- TESS ----------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_tess_import(tmp_path, nested):
    """Folder names give speaker and emotion; ps is surprised; a nested copy counts once."""
    root = tmp_path / "tess"
    base = root / "TESS Toronto emotional speech set data" if nested else root
    folders = {
        "OAF": ("angry", "disgust", "Fear", "happy", "neutral", "Pleasant_surprise", "Sad"),
        "YAF": ("angry", "disgust", "fear", "happy", "neutral", "pleasant_surprised", "sad"),
    }
    for speaker, emotions in folders.items():
        for emotion in emotions:
            for word in ("back", "bar"):
                _write_wav(base / f"{speaker}_{emotion}" / f"{speaker}_{word}_{emotion.lower()}.wav", rate=24414)
    if nested:  # Kaggle's copy holds the tree twice
        _write_wav(base / "TESS Toronto emotional speech set data" / "OAF_angry" / "OAF_back_angry.wav")
    _write_wav(root / "YAF_goose_ps.wav")  # outside the folders: name gives speaker and emotion
    _write_wav(root / "misc" / "hello.wav")
    out = tmp_path / "fed"
    report = import_corpus("tess", root, out)
    meta, records = _load(out)
    assert report.samples == 29
    assert report.labels["surprised"] == 5
    assert report.label_table["ps"] == {"to": "surprised", "samples": 1}
    assert report.merged["surprised"] == ["pleasant_surprise", "pleasant_surprised", "ps"]
    assert report.skipped == {"file not in an OAF_/YAF_ folder or name": 1}
    assert report.notes.get("duplicate TESS file (nested copy) ignored", 0) == (1 if nested else 0)
    # Two speakers: round(0.2 * 2) = 0 held out, both train.
    assert meta["heldout"] == [] and len(meta["devices"]) == 2
    assert sorted(meta["identities"].values()) == [["OAF"], ["YAF"]]
    _check_identity_layout(meta, records)
    assert {r["label"] for recs in records.values() for r in recs} == set(EMOTIONS)

"""Tests of the corpus-import machinery: registry, layout, media decoding, atomic writing, CLI."""

from __future__ import annotations

import argparse
import codecs
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from cli.data import add_import_parser
from corpora import IMPORTERS, CorpusImportError, get_importer, import_corpus
from corpora import build as build_module
from corpora.folder import read_device_folder, read_federation
from corpora.layout import plan_dirichlet, plan_identity, stratified_mask
from corpora.media import (
    TARGET_RATE,
    MediaSkip,
    resampling_rate,
    write_image,
    write_video_frame,
    write_voice,
)
from corpora.textfiles import clean_text, iter_lines, open_csv, sniff_dialect

MB = 2**20


def _write_wav(
    path: Path,
    *,
    rate: int = 16000,
    seconds: float = 0.25,
    channels: int = 1,
    subtype: str = "PCM_16",
    freq: float = 440.0,
) -> Path:
    t = np.arange(round(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate, subtype=subtype, format="WAV")
    return path


def _make_emodb(root: Path, speakers: tuple[str, ...] = ("03", "08", "09", "10", "11")) -> Path:
    """A tiny EmoDB: every speaker says one text in each of the 7 emotions."""
    for s, speaker in enumerate(speakers):
        for letter in "WLEAFTN":
            _write_wav(root / "wav" / f"{speaker}a01{letter}a.wav", rate=(8000, 16000, 22050)[s % 3])
    return root


def _records(out: Path) -> dict[str, list[dict]]:
    meta = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    return {
        device: [json.loads(line) for line in (out / device / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        for device in meta["devices"] + meta["heldout"]
    }


def _dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[np.argmax(spectrum)])


# --- registry ------------------------------------------------------------------------


def test_registry_holds_every_corpus():
    """Every supported corpus is registered under its command-line name."""
    assert set(IMPORTERS) == {
        "ravdess", "crema-d", "tess", "emodb", "fer2013", "ckplus",
        "dair-emotion", "goemotions", "isear", "meld",
    }  # fmt: skip
    assert get_importer("CREMA_D") is IMPORTERS["crema-d"]
    assert get_importer("ck+") is IMPORTERS["ckplus"]


def test_unknown_corpus_lists_known_ones():
    """An unknown name raises ValueError naming the registered corpora."""
    with pytest.raises(ValueError, match="Unknown corpus 'iemocap'.*ravdess.*meld"):
        get_importer("iemocap")


@pytest.mark.parametrize("name", sorted(IMPORTERS))
def test_every_importer_reports_an_empty_folder(tmp_path, name):
    """Every importer fails clearly on a folder without its files and writes nothing."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.md").write_text("nothing here\n", encoding="utf-8")
    with pytest.raises(CorpusImportError, match=f"no {name} files found.*expected"):
        import_corpus(name, tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- layout --------------------------------------------------------------------------


def test_stratified_mask_takes_the_share_of_every_label():
    """20 % of 50 samples of 5 labels, 10 each: exactly 2 of every label."""
    labels = np.repeat(np.arange(5), 10)
    mask = stratified_mask(labels, 0.2, np.random.default_rng(0))
    assert mask.sum() == 10
    assert np.bincount(labels[mask], minlength=5).tolist() == [2, 2, 2, 2, 2]


@pytest.mark.parametrize("n", [2, 3, 7])
def test_stratified_mask_keeps_both_sides(n):
    """Small devices still get one test and one training sample."""
    mask = stratified_mask(np.zeros(n, dtype=int), 0.2, np.random.default_rng(1))
    assert mask.sum() == max(1, round(0.2 * n))
    assert 0 < mask.sum() < n


def test_plan_identity_holds_out_whole_identities():
    """Held-out identities are disjoint from training ones; small identities are pooled."""
    ids = [f"spk{i}" for i in range(10) for _ in range(6)] + ["tiny1", "tiny2", "tiny2"]
    labels = np.arange(len(ids)) % 7
    plans, pooled, dropped = plan_identity(
        ids, labels, heldout_share=0.2, test_share=0.25, devices=None,
        min_identity_samples=4, rng=np.random.default_rng(0),
    )  # fmt: skip
    assert pooled == ["tiny1", "tiny2"]
    assert dropped.size == 0
    train = [p for p in plans if not p.heldout]
    held = [p for p in plans if p.heldout]
    assert len(held) == 2  # round(0.2 * 11 groups)
    assert len(train) == 9
    train_ids = {i for p in train for i in p.identities}
    held_ids = {i for p in held for i in p.identities}
    assert not train_ids & held_ids
    assert all(p.test.all() for p in held)
    covered = np.sort(np.concatenate([p.members for p in plans]))
    np.testing.assert_array_equal(covered, np.arange(len(ids)))
    expected_tests = {6: 2, 3: 1}  # round half up of 0.25 * n; the pool 'other' has 3
    assert sorted(p.members.size for p in plans) == [3] + [6] * 10
    for plan in train:
        assert plan.test.sum() == expected_tests[plan.members.size]


def test_plan_identity_groups_identities_onto_fewer_devices():
    """devices=3 deals 8 training identities onto 3 devices, each identity on one device."""
    ids = [f"spk{i}" for i in range(8) for _ in range(5)]
    plans, _, _ = plan_identity(
        ids, np.zeros(len(ids), dtype=int), heldout_share=0.0, test_share=0.2, devices=3,
        min_identity_samples=2, rng=np.random.default_rng(0),
    )  # fmt: skip
    assert [p.name for p in plans] == ["device-000", "device-001", "device-002"]
    assert sorted(i for p in plans for i in p.identities) == sorted(set(ids))
    assert sorted(p.members.size for p in plans) == [10, 15, 15]
    with pytest.raises(CorpusImportError, match="devices=9 but only 8"):
        plan_identity(
            ids, np.zeros(len(ids), dtype=int), heldout_share=0.0, test_share=0.2, devices=9,
            min_identity_samples=2, rng=np.random.default_rng(0),
        )  # fmt: skip


def test_plan_dirichlet_uses_the_official_split_as_held_out():
    """Samples of the corpus's evaluation split, and only they, land on held-out devices."""
    labels = np.arange(100) % 7
    official = np.arange(100) >= 80
    plans, source = plan_dirichlet(
        labels, official, heldout_share=0.2, test_share=0.2, devices=4, alpha=0.5,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    assert source == "the corpus's official evaluation split"
    held = np.concatenate([p.members for p in plans if p.heldout])
    np.testing.assert_array_equal(np.sort(held), np.arange(80, 100))
    assert sum(not p.heldout for p in plans) == 4
    assert sum(p.heldout for p in plans) == 1  # 20 held-out samples, 20 per training device


# --- media ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "subtype", "channels"),
    [(8000, "PCM_16", 1), (22050, "PCM_24", 2), (44100, "FLOAT", 1), (96000, "PCM_32", 2), (16000, "DOUBLE", 1)],
)
def test_write_voice_resamples_to_mono_16k(tmp_path, rate, subtype, channels):
    """Any rate, sample format and channel count becomes mono PCM 16 at 16 kHz, pitch kept."""
    src = _write_wav(tmp_path / "in.wav", rate=rate, seconds=0.5, channels=channels, subtype=subtype)
    notes: Counter[str] = Counter()
    write_voice(src, tmp_path / "out.wav", max_bytes=MB, notes=notes)
    info = soundfile.info(str(tmp_path / "out.wav"))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (TARGET_RATE, 1, "PCM_16", "WAV")
    assert abs(info.frames - 0.5 * TARGET_RATE) <= 1
    wave, _ = soundfile.read(str(tmp_path / "out.wav"))
    assert abs(_dominant_frequency(wave, TARGET_RATE) - 440.0) < 4.0
    assert np.abs(wave).max() == pytest.approx(0.5, abs=0.02)
    assert (f"voice: resampled {rate} Hz -> 16000 Hz" in notes) == (rate != TARGET_RATE)
    assert ("voice: multichannel mixed to mono" in notes) == (channels > 1)


def test_odd_rates_resample_through_a_close_round_rate(tmp_path):
    """TESS's 24414 Hz is resampled as 24400 Hz (cheap kernel), pitch within 0.1 %."""
    assert resampling_rate(24414) == 24400
    assert [resampling_rate(r) for r in (8000, 11025, 22050, 44100, 48000)] == [8000, 11025, 22050, 44100, 48000]
    src = _write_wav(tmp_path / "in.wav", rate=24414, seconds=1.0, freq=1000.0)
    notes: Counter[str] = Counter()
    write_voice(src, tmp_path / "out.wav", max_bytes=MB, notes=notes)
    wave, rate = soundfile.read(str(tmp_path / "out.wav"))
    assert rate == TARGET_RATE and wave.size == 16010  # ceil(24414 * 16000 / 24400)
    assert abs(_dominant_frequency(wave, TARGET_RATE) - 1000.0) < 2.0
    assert notes["voice: 24414 Hz resampled as 24400 Hz (under 0.5 % pitch shift)"] == 1


def test_write_voice_decodes_by_content_not_extension(tmp_path):
    """A WAV named .mp3 is decoded as WAV, and the mismatch is counted."""
    src = _write_wav(tmp_path / "clip.mp3", rate=22050)
    notes: Counter[str] = Counter()
    write_voice(src, tmp_path / "out.wav", max_bytes=MB, notes=notes)
    assert soundfile.info(str(tmp_path / "out.wav")).samplerate == TARGET_RATE
    assert notes["voice: .mp3 file holding WAV data, decoded by content"] == 1


def _truncated_header(path: Path) -> Path:
    _write_wav(path)
    path.write_bytes(path.read_bytes()[:30])
    return path


def _nan_float(path: Path) -> Path:
    soundfile.write(str(path), np.full(4000, np.nan), 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)), "undecodable audio"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (_truncated_header, "undecodable audio"),
        (_nan_float, "non-finite audio samples"),
        (lambda p: _write_wav(p, seconds=0.02), "audio shorter than 0.1 s"),
        (lambda p: _write_wav(p, seconds=2.0, rate=96000), "file over size limit"),
    ],
    ids=["random bytes", "zero bytes", "cut header", "nan", "too short", "too large"],
)
def test_write_voice_skips_unusable_audio(tmp_path, make, reason):
    """Corrupt, empty, truncated, non-finite, too short and oversized audio raise MediaSkip."""
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(MediaSkip) as caught:
        write_voice(path, tmp_path / "out.wav", max_bytes=200_000, notes=Counter())
    assert caught.value.reason == reason
    assert not (tmp_path / "out.wav").exists()


def test_write_voice_keeps_the_readable_part_of_a_cut_file(tmp_path):
    """A WAV cut in the middle of its data decodes to the frames that are there."""
    path = _write_wav(tmp_path / "cut.wav", rate=16000, seconds=1.0)
    path.write_bytes(path.read_bytes()[: 44 + 2 * 8000])
    write_voice(path, tmp_path / "out.wav", max_bytes=MB, notes=Counter())
    assert soundfile.info(str(tmp_path / "out.wav")).frames == 8000


@pytest.mark.parametrize(
    ("shape", "written_shape"),
    [((48, 48), (48, 48)), ((1000, 800, 3), (640, 512, 3)), ((30, 40, 4), (30, 40, 3))],
)
def test_write_image_any_size_and_colour(tmp_path, shape, written_shape):
    """Grey stays grey, colour stays colour, alpha is dropped, big images are downscaled."""
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    if shape[0] > 100:
        image = cv2.GaussianBlur(image, (0, 0), 8)  # keeps the PNG small
    src = tmp_path / "gesicht-ü.png"  # non-ASCII name: decoded from bytes
    ok, encoded = cv2.imencode(".png", image)
    src.write_bytes(encoded.tobytes())
    write_image(src, tmp_path / "out.png", max_bytes=MB, notes=Counter())
    written = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == written_shape
    if shape == (48, 48):
        np.testing.assert_array_equal(written, image)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"\xff\xd8\xff" + b"\x00" * 500, "undecodable image"), (b"", "empty file"), (b"GIF89a", "undecodable image")],
)
def test_write_image_skips_undecodable(tmp_path, payload, reason):
    """Broken JPEGs, empty files and unsupported formats are skipped with a reason."""
    src = tmp_path / "face.jpg"
    src.write_bytes(payload)
    with pytest.raises(MediaSkip) as caught:
        write_image(src, tmp_path / "out.png", max_bytes=MB, notes=Counter())
    assert caught.value.reason == reason


def test_write_video_frame_takes_the_middle_frame(tmp_path):
    """The written face of a 9-frame clip is its 5th frame (grey level 80)."""
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(9):
        writer.write(np.full((48, 64, 3), i * 20, dtype=np.uint8))
    writer.release()
    write_video_frame(clip, tmp_path / "out.png", max_bytes=MB, notes=Counter())
    frame = cv2.imread(str(tmp_path / "out.png"))
    assert frame.shape == (48, 64, 3)
    assert abs(float(frame.mean()) - 80) < 5
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 50)
    with pytest.raises(MediaSkip, match="undecodable video"):
        write_video_frame(bad, tmp_path / "bad.png", max_bytes=MB, notes=Counter())


# --- text files ----------------------------------------------------------------------


def test_iter_lines_falls_back_per_line(tmp_path):
    """UTF-8 with BOM, a cp1252 line and a byte cp1252 lacks are read; fallbacks are counted."""
    path = tmp_path / "t.txt"
    path.write_bytes(codecs.BOM_UTF8 + "naïve;joy\n".encode() + b"caf\xe9;joy\r\n" + b"x\x81y;joy\n")
    notes: Counter[str] = Counter()
    assert list(iter_lines(path, notes)) == ["naïve;joy", "café;joy", "x\x81y;joy"]
    assert notes == Counter({"text: line not UTF-8, read as cp1252": 1, "text: line not UTF-8, read as Latin-1": 1})


def test_iter_lines_reads_utf16(tmp_path):
    """A UTF-16 file with byte-order mark is decoded whole."""
    path = tmp_path / "t.csv"
    path.write_text("a;b\nfröhlich;joy\n", encoding="utf-16")
    assert list(iter_lines(path, Counter())) == ["a;b", "fröhlich;joy"]


def test_clean_text_repairs_c1_characters():
    """C1 controls are cp1252 punctuation read as Latin-1; whitespace is collapsed."""
    notes: Counter[str] = Counter()
    assert clean_text("  I don\x92t  know\x85 ", notes) == "I don\u2019t know\u2026"
    assert sum(notes.values()) == 1
    assert clean_text(" \t ", Counter()) == ""


def test_open_csv_passes_over_a_malformed_line(tmp_path):
    """A field over the csv module's limit costs one row, not the rest of the file."""
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1," + "x" * 200_000 + "\n2,ok\n\n3,fine\n", encoding="utf-8")
    notes: Counter[str] = Counter()
    assert list(open_csv(path, notes)) == [["a", "b"], ["2", "ok"], ["3", "fine"]]
    assert notes == Counter({"text: malformed CSV line passed over": 1})


@pytest.mark.parametrize(
    ("header", "dialect"),
    [
        ("ID|CITY|Field1|SIT|", ("|", '"')),
        ("Field1;SIT;ID", (";", '"')),
        ('"Field1","SIT"', (",", '"')),
        ("|ID|,|Field1|,|SIT|", (",", "|")),
        ("text\tlabel", ("\t", '"')),
    ],
)
def test_sniff_dialect(header, dialect):
    """Delimiter and quote of the CSV variants of public corpus copies."""
    assert sniff_dialect(header) == dialect


# --- import_corpus -------------------------------------------------------------------


def test_import_is_deterministic_and_readable(tmp_path):
    """The same seed gives the same folder, which corpora.folder reads."""
    src = _make_emodb(tmp_path / "emodb")
    import_corpus("emodb", src, tmp_path / "a", seed=3)
    import_corpus("emodb", src, tmp_path / "b", seed=3)
    assert _records(tmp_path / "a") == _records(tmp_path / "b")
    meta = read_federation(tmp_path / "a")
    train, test, skipped = read_device_folder(tmp_path / "a" / meta["devices"][0])
    assert len(train) + len(test) == 6 and not skipped
    assert all(sample.voice_rate == TARGET_RATE for sample in train + test)


def test_output_folder_is_refused_when_not_empty(tmp_path):
    """An existing non-empty output is left untouched; an empty one is filled."""
    src = _make_emodb(tmp_path / "emodb")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        import_corpus("emodb", src, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    import_corpus("emodb", src, tmp_path / "empty")
    assert (tmp_path / "empty" / "federation.json").is_file()
    with pytest.raises(ValueError, match="must not lie inside the corpus folder"):
        import_corpus("emodb", src, src / "fed")


def test_error_midway_leaves_no_output(tmp_path, monkeypatch):
    """A failure after some files were written removes the temporary folder: no output at all."""
    src = _make_emodb(tmp_path / "emodb")
    calls = {"n": 0}
    real = build_module.write_voice

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "write_voice", failing)
    with pytest.raises(OSError, match="No space left"):
        import_corpus("emodb", src, tmp_path / "out")
    assert calls["n"] >= 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emodb"]


def test_progress_callback_failure_leaves_no_output(tmp_path):
    """An interrupt raised from the progress callback also leaves nothing behind."""
    src = _make_emodb(tmp_path / "emodb")
    messages: list[str] = []

    def progress(message: str) -> None:
        messages.append(message)
        if "writing" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_corpus("emodb", src, tmp_path / "out", progress=progress)
    assert messages[0].startswith("emodb: reading")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emodb"]


def test_progress_reports_counts(tmp_path, monkeypatch):
    """Progress names the phase and the samples read and usable so far."""
    monkeypatch.setattr(build_module, "PROGRESS_EVERY", 10)
    monkeypatch.setattr(build_module, "_CHUNK", 10)
    messages: list[str] = []
    import_corpus("emodb", _make_emodb(tmp_path / "emodb"), tmp_path / "out", progress=messages.append)
    assert messages[1:4] == [
        "emodb: 10 samples read, 10 usable",
        "emodb: 20 samples read, 20 usable",
        "emodb: 30 samples read, 30 usable",
    ]
    assert messages[4] == "emodb: writing 5 device folders"
    assert messages[-1].startswith("emodb: done, 30 samples in ")


def test_corpus_with_nothing_usable_fails_clearly(tmp_path):
    """Only undecodable files: a CorpusImportError that says why, and no output."""
    wav = tmp_path / "emodb" / "wav"
    wav.mkdir(parents=True)
    for name in ("03a01Fa.wav", "03a01Wa.wav"):
        (wav / name).write_bytes(b"RIFF garbage")
    with pytest.raises(CorpusImportError, match="nothing usable.*2 voice: undecodable audio"):
        import_corpus("emodb", tmp_path / "emodb", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heldout_share": 1.0}, "heldout_share must be in"),
        ({"test_share": -0.1}, "test_share must be in"),
        ({"devices": 0}, "devices must be a positive integer"),
        ({"alpha": 0.0}, "alpha must be a positive finite number"),
        ({"max_file_bytes": 0}, "max_file_bytes must be a positive integer"),
    ],
)
def test_parameters_are_checked(tmp_path, kwargs, message):
    """Out-of-range parameters raise ValueError naming the parameter and the value."""
    with pytest.raises(ValueError, match=message):
        import_corpus("emodb", tmp_path, tmp_path / "out", **kwargs)


# --- command line ----------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emofed data")
    add_import_parser(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_unknown_corpus_is_a_one_line_error(tmp_path, capsys):
    """An unknown corpus exits 2 with one error line listing the known corpora."""
    (tmp_path / "src").mkdir()
    assert _run_cli(["import", "iemocap", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("emofed: error: Unknown corpus 'iemocap'") and "ravdess" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing source", "output not empty", "nothing found"])
def test_cli_bad_input_exits_2(tmp_path, capsys, case):
    """Missing source, non-empty output and a wrong folder are one-line errors, exit 2."""
    src = tmp_path / "src"
    out = tmp_path / "out"
    if case != "missing source":
        src.mkdir()
    if case == "output not empty":
        _make_emodb(src)
        out.mkdir()
        (out / "x").write_text("x", encoding="utf-8")
    assert _run_cli(["import", "emodb", str(src), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("emofed: error: ")
    expected = {
        "missing source": "corpus folder not found",
        "output not empty": "not an empty folder",
        "nothing found": "no emodb files found",
    }
    assert expected[case] in err


def test_cli_imports_and_prints_the_report(tmp_path, capsys):
    """A good import exits 0 and prints the counts, merges and drops."""
    src = _make_emodb(tmp_path / "emodb")
    out = tmp_path / "out"
    assert _run_cli(["import", "emodb", str(src), "--out", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "emofed | emodb: reading" in printed
    assert "samples:    30 (" in printed
    assert "boredom -> dropped" in printed
    assert f"data.path={out}" in printed
    assert read_federation(out)["source"] == "emodb"

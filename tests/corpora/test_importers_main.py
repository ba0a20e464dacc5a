"""`emofed data import` through the `emofed` command itself."""

from __future__ import annotations

from pathlib import Path

from test_importers import _make_emodb

from cli.main import build_parser, main
from corpora.folder import read_device_folder, read_federation


def test_emofed_data_import_writes_a_federation(tmp_path: Path, capsys) -> None:
    """`emofed data import emodb SRC --out DIR` exits 0, prints the report and writes the folder."""
    src = _make_emodb(tmp_path / "emodb")
    out = tmp_path / "fed"
    assert main(["data", "import", "emodb", str(src), "--out", str(out), "--heldout-share", "0.2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "samples:    30 (" in printed and "boredom -> dropped" in printed
    assert f"emofed simulate data.source=folder data.path={out}" in printed
    meta = read_federation(out)
    assert meta["source"] == "emodb" and len(meta["devices"]) == 4 and len(meta["heldout"]) == 1
    assert meta["seed"] == 3
    heldout_people = meta["identities"][meta["heldout"][0]]
    train_people = {p for d in meta["devices"] for p in meta["identities"][d]}
    assert heldout_people and not set(heldout_people) & train_people
    train, test, skipped = read_device_folder(out / meta["heldout"][0])
    assert not train and len(test) == 6 and not skipped


def test_emofed_data_import_errors_are_one_line(tmp_path: Path, capsys) -> None:
    """An unknown corpus and a missing folder exit 2 with one `emofed: error:` line."""
    (tmp_path / "src").mkdir()
    assert main(["data", "import", "iemocap", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    assert main(["data", "import", "emodb", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("emofed: error: ") for line in err)
    assert "Unknown corpus 'iemocap'" in err[0] and "corpus folder not found" in err[1]
    assert not (tmp_path / "o").exists()


def test_data_import_help_lists_every_corpus() -> None:
    """The `data import` help names every registered corpus."""
    from corpora import IMPORTERS

    parser = build_parser()
    data = next(a for a in parser._subparsers._group_actions[0].choices["data"]._actions if a.dest == "data_command")
    text = data.choices["import"].format_help()
    assert all(name in text for name in IMPORTERS)
    assert len(IMPORTERS) == 10

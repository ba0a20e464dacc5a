"""`emofed pretrain`: the public feature space from public synthetic people or a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from models.features import PublicFeatureSpace


def test_pretrain_on_public_synthetic_people_writes_a_space_a_run_can_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small public population gives a loadable space that records its provenance."""
    out = tmp_path / "space.json"
    code = main(["pretrain", "--synthetic", "3", "--samples", "14", "--seed", "7", "--components", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    space = PublicFeatureSpace.load(out)
    assert {m: space.dim(m) for m in ("face", "voice", "text")} == {"face": 4, "voice": 4, "text": 4}
    assert space.provenance == {"source": "synthetic", "people": 3, "seed": 7, "samples": 42}
    assert "model.features.public=" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--synthetic", "1"], "--synthetic must be at least 2 people, found 1"),
        (["--synthetic", "3", "--components", "0"], "--components must be at least 1, found 0"),
        (["--data", "/nonexistent/folder"], "data folder not found: /nonexistent/folder"),
    ],
)
def test_bad_pretrain_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Bad arguments fail with one line naming what was wrong, and write nothing."""
    out = tmp_path / "space.json"
    assert main(["pretrain", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"emofed: error: {message}"
    assert not out.exists()


def test_a_run_whose_devices_are_the_public_people_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """The packaged space was fitted on seed 1000003's people: a synthetic run with that seed stops."""
    assert main(["simulate", "seed=1000003"]) == 2
    assert "is the seed of the public synthetic people" in capsys.readouterr().err

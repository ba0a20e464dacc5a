"""Configuration: YAML + overrides into validated, frozen dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emofed.config import ConfigError, EmofedConfig, from_json, load_config, to_json, to_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_default_yaml_loads_and_matches_documented_defaults() -> None:
    """configs/default.yaml resolves to 24 devices, 10 rounds, FedAvg."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert (cfg.devices, cfg.rounds, cfg.strategy.name) == (24, 10, "fedavg")
    assert cfg.data.source == "synthetic" and cfg.model.text.mode == "frozen"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_is_valid(name: str) -> None:
    """Every YAML file in configs/ passes validation."""
    assert isinstance(load_config(ROOT / "configs" / name), EmofedConfig)


def test_overrides_apply_with_types() -> None:
    """The issue's example overrides land as typed values."""
    cfg = load_config(None, ["rounds=10", "devices=50", "data.dirichlet_alpha=0.3"])
    assert (cfg.rounds, cfg.devices, cfg.data.dirichlet_alpha) == (10, 50, 0.3)
    assert isinstance(cfg.data.dirichlet_alpha, float)


def test_config_is_frozen() -> None:
    """Code inside takes frozen dataclasses."""
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.alpah=1", "unknown key 'data.alpah'"),
        ("roundz=3", "unknown key 'roundz'"),
        ("rounds=abc", "bad value for 'rounds'"),
        ("rounds=0", "'rounds' must be in [1, 100000]. Found 0."),
        ("data.label_noise=1.5", "'data.label_noise' must be in [0.0, 1.0]. Found 1.5."),
        ("strategy.name=fedsgd", "'strategy.name' must be one of fedavg, fedprox, fedadam"),
        ("model.text.mode=thawed", "'model.text.mode' must be one of"),
        ("data.source=folder", "'data.path' must name a federation folder"),
        ("rounds", "is not of the form key=value"),
    ],
)
def test_bad_overrides_give_one_line_errors(override: str, fragment: str) -> None:
    """Unknown keys, wrong types and out-of-range values name the key, in one line."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path) -> None:
    """A typo in a YAML file is reported with the file and the key."""
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 2\ntrain:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.lr_rate'"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    """A missing file or invalid YAML is a clear error, not a traceback."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_json_round_trip_and_yaml() -> None:
    """The config the server sends to devices rebuilds the same config."""
    cfg = load_config(None, ["rounds=7", "model.text.mode=top", "output.name=x"])
    assert from_json(to_json(cfg)) == cfg
    assert "rounds: 7" in to_yaml(cfg)


def test_from_json_rejects_garbage() -> None:
    """A malformed config in a message is a ConfigError."""
    with pytest.raises(ConfigError, match="malformed"):
        from_json("{not json")
    with pytest.raises(ConfigError, match="unknown key 'evil'"):
        from_json('{"evil": 1}')

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


def test_default_runs_with_privacy_on() -> None:
    """The default simulation trains with device-level DP at the balanced preset."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.privacy.preset == "balanced"
    assert cfg.privacy.device.enabled and cfg.privacy.device.epsilon == 3.0
    assert cfg.privacy.delta < 1 / (10 * cfg.data.samples_per_device)


@pytest.mark.parametrize(
    ("preset", "device", "epsilon"),
    [("off", False, None), ("research", True, 8.0), ("balanced", True, 3.0), ("strict", True, 1.0)],
)
def test_each_preset_is_one_override(preset: str, device: bool, epsilon: float | None) -> None:
    """`privacy.preset=NAME` alone selects a preset (a bare `off` is not read as false)."""
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"privacy.preset={preset}"])
    assert cfg.privacy.preset == preset and cfg.privacy.device.enabled is device
    assert not cfg.privacy.user.enabled
    if epsilon is not None:
        assert cfg.privacy.device.epsilon == cfg.privacy.user.epsilon == epsilon
        assert cfg.privacy.delta <= 1e-5


def test_explicit_keys_win_over_the_preset(tmp_path: Path) -> None:
    """A preset only gives defaults: keys in the file or on the command line win."""
    path = tmp_path / "run.yaml"
    path.write_text("privacy:\n  preset: strict\n  device:\n    epsilon: 2.0\n")
    cfg = load_config(path, ["privacy.user.enabled=true"])
    assert (cfg.privacy.device.epsilon, cfg.privacy.user.epsilon) == (2.0, 1.0)
    assert cfg.privacy.user.enabled and cfg.privacy.delta == 1e-6


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["privacy.preset=loose"], "'privacy.preset' must be one of balanced, off, research, strict"),
        (["privacy.accountant=moments"], "'privacy.accountant' must be one of"),
        (["privacy.device.epsilon=0"], "'privacy.device.epsilon' must be in"),
        (["privacy.user.clipping=median"], "'privacy.user.clipping' must be one of fixed, adaptive"),
        (["privacy.device.budget=3"], "unknown key 'privacy.device.budget'"),
        (["privacy.user.enabled=true", "privacy.delta=0.01"], "well below 1/devices"),
    ],
)
def test_bad_privacy_settings_are_named(overrides: list[str], fragment: str) -> None:
    """Every wrong privacy setting stops with one line naming the key."""
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_privacy_presets_round_trip_through_json() -> None:
    """Devices rebuild exactly the resolved privacy settings; the preset is not re-applied."""
    cfg = load_config(None, ["privacy.preset=research", "privacy.device.epsilon=5"])
    again = from_json(to_json(cfg))
    assert again == cfg and again.privacy.device.epsilon == 5.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.secagg.num_shares=2.5"], "whole count >= 3"),
        (["privacy.secagg.reconstruction_threshold=1.5"], "whole count >= 2"),
        (["privacy.secagg.num_shares=4", "privacy.secagg.reconstruction_threshold=4"], "below num_shares=4"),
        (["strategy.min_train_devices=1"], "at least 2 with secure aggregation"),
    ],
)
def test_secagg_settings_are_checked(overrides: list[str], message: str) -> None:
    """Shares, threshold and the minimum number of devices are checked with one-line errors."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.secagg.enabled=true", *overrides])


def test_secagg_counts_and_shares_accepted() -> None:
    """Counts and shares both load, and secure aggregation is off by default."""
    assert not load_config(None, []).privacy.secagg.enabled
    cfg = load_config(
        None, ["privacy.secagg.enabled=true", "privacy.secagg.num_shares=5", "privacy.secagg.reconstruction_threshold=3"]
    )
    assert (cfg.privacy.secagg.num_shares, cfg.privacy.secagg.reconstruction_threshold) == (5, 3)


def test_shared_checks_name_the_key_the_range_and_the_value() -> None:
    """check_values and check_subset (used by every loader) give the one-line wording."""
    from omegaconf import OmegaConf

    from emofed.config import check_subset, check_values

    node = OmegaConf.create({"a": {"b": 5, "c": "x"}})
    with pytest.raises(ConfigError, match=r"^'a.b' must be in \[0, 3\]. Found 5.$"):
        check_values(node, choices={}, ranges={"a.b": (0, 3)})
    with pytest.raises(ConfigError, match=r"^'a.c' must be one of y, z. Found 'x'.$"):
        check_values(node, choices={"a.c": ("y", "z")}, ranges={})
    check_values(node, choices={"a.c": ("x",)}, ranges={"a.b": (None, 5)})
    with pytest.raises(ConfigError, match=r"^'k' must name only p, q. Found 'r'.$"):
        check_subset("k", ["p", "r"], ["p", "q"])

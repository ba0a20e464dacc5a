"""Typed, validated configuration for every emofed command (omegaconf structured configs)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


@dataclass(frozen=True)
class FaceModelConfig:
    """Face branch: OpenCV crop to a grey square, then a small CNN."""

    image_size: int = 48
    width: int = 16  # channels of the first conv block; doubles per block
    min_face_size: int = 24  # Haar detector minSize, in pixels


@dataclass(frozen=True)
class VoiceModelConfig:
    """Voice branch: mono 16 kHz log-mel spectrogram, then a small CNN."""

    sample_rate: int = 16000
    clip_seconds: float = 1.0
    n_mels: int = 64
    n_fft: int = 400
    hop_length: int = 160
    width: int = 16


@dataclass(frozen=True)
class TextModelConfig:
    """Text branch: a local transformers encoder with a classification head."""

    encoder_path: str | None = None  # None: the packaged all-MiniLM-L6-v2
    mode: str = "frozen"  # frozen | top | lora | full
    trainable_layers: int = 1  # mode=top: how many of the last encoder layers train
    lora_rank: int = 4  # mode=lora
    max_length: int = 32


@dataclass(frozen=True)
class FusionConfig:
    """How the per-modality embeddings are combined."""

    kind: str = "gated"
    modality_dropout: float = 0.4  # training-time chance of hiding a present modality
    # Per-modality losses keep face and voice learning while text, the quickest
    # learner, would otherwise carry the fused prediction alone.
    aux_weight: float = 1.0


@dataclass(frozen=True)
class FeaturesConfig:
    """model.kind=features: fixed extractors per modality and the public space over them."""

    face: str = "hog"  # models.features.FACE_FEATURES
    voice: str = "mel-stats"  # models.features.VOICE_FEATURES
    text: str = "minilm"  # models.features.TEXT_FEATURES
    public: str | None = None  # `emofed pretrain` output; None: the packaged synthetic one


@dataclass(frozen=True)
class ModelConfig:
    """The multimodal emotion network."""

    # features: fixed extractors + small private heads (learns under DP);
    # cnn: end-to-end CNNs and a text projection (non-private research).
    kind: str = "features"
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    # The corpus's label set (public: what its label map can produce); logits of other
    # emotions are switched off. None: all seven. Set from a federation folder's index.
    labels: list[str] | None = None
    embed_dim: int = 64
    dropout: float = 0.1
    face: FaceModelConfig = field(default_factory=FaceModelConfig)
    voice: VoiceModelConfig = field(default_factory=VoiceModelConfig)
    text: TextModelConfig = field(default_factory=TextModelConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass(frozen=True)
class DataConfig:
    """Where each device's data comes from and how the federation is split."""

    source: str = "synthetic"  # synthetic | folder
    path: str | None = None  # source=folder: a federation folder
    partition: str = "natural"  # natural (one device per user) | dirichlet (label skew)
    dirichlet_alpha: float = 1.0
    samples_per_device: int = 60
    test_fraction: float = 0.25
    p_no_camera: float = 0.15  # share of devices without a camera
    p_no_microphone: float = 0.15  # share of devices without a microphone
    p_missing_text: float = 0.2  # share of samples without text
    label_noise: float = 0.05  # share of training labels replaced at random
    voice_sample_rate: int = 22050  # rate of generated audio (resampled on device)


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each device, sent by the server every round."""

    local_epochs: int = 3
    batch_size: int = 16
    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.003
    momentum: float = 0.9  # optimizer=sgd
    weight_decay: float = 0.0
    max_grad_norm: float | None = 5.0  # plain gradient clipping for stability; None: off


# Modules of the network of which a device can keep its own version (all of them act on
# the modality embeddings, so fine-tuning them never runs the encoders backwards).
PERSONAL_LAYERS: tuple[str, ...] = ("head", "aux_heads", "fusion")


@dataclass(frozen=True)
class PersonalConfig:
    """Personal layers: each device's own version of some modules, never sent anywhere.

    The global model keeps every module; a device fine-tunes its own copy of the listed
    ones on its training split (Ditto: Li et al., 2021, "Ditto: Fair and Robust Federated
    Learning Through Personalization", eq. 2, with a proximal pull towards the global
    version) and keeps it in its encrypted store.
    """

    enabled: bool = True
    layers: list[str] = field(default_factory=lambda: ["head"])  # subset of PERSONAL_LAYERS
    epochs: int = 5  # fine-tuning epochs over the training split at every evaluation
    lr: float = 0.01  # Adam learning rate of the fine-tuning
    prox: float = 1.0  # lambda of the proximal term (lambda/2)||v - w_global||^2; 0: none


@dataclass(frozen=True)
class PolicyRunConfig:
    """The emotion-management policy's federated prior, built after training (``server.policy``).

    Each device shares its bandit's summary statistics once, privatised on the device
    (record-level Gaussian noise at ``epsilon``, in its ledger) under device-level DP; the
    server averages them into a prior mean per action. Simulated devices then play four
    policies against their simulated person, and the run reports reward and regret.
    """

    enabled: bool = True
    history: int = 2000  # decisions with feedback each simulated person gave before the prior (about three weeks)
    decisions: int = 300  # decisions per person and policy in the evaluation
    epsilon: float | None = None  # device-level DP: epsilon of the one release; None: privacy.device.epsilon / 3
    noise_multiplier: float | None = None  # None: calibrated to `epsilon`
    prior_strength: float = 3.0  # pseudo-observations the prior mean is worth, per action
    config_dir: str | None = None  # actions/messages/expressions.yaml; None: configs/policy


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation (Flower strategies)."""

    name: str = "fedavg"  # fedavg | fedprox | fedadam
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_devices: int = 2
    min_evaluate_devices: int = 2
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.01  # fedadam: eta
    beta_1: float = 0.9  # fedadam
    beta_2: float = 0.99  # fedadam
    tau: float = 0.001  # fedadam
    round_timeout_s: float = 600.0


@dataclass(frozen=True)
class DeviceDPConfig:
    """Sample-level DP-SGD on every device (Opacus, Poisson sampling of the local data)."""

    enabled: bool = True
    epsilon: float = 3.0  # each device's budget over the whole run: hard stop and calibration target
    noise_multiplier: float | None = None  # None: calibrated so the planned rounds spend `epsilon`
    max_grad_norm: float = 1.0  # per-sample gradient clipping norm


@dataclass(frozen=True)
class UserDPConfig:
    """User-level DP on the aggregate: each device's update clipped, Gaussian noise on the mean."""

    enabled: bool = False
    epsilon: float = 3.0  # the federation's budget over the whole run: hard stop and target
    noise_multiplier: float | None = None  # None: calibrated so the planned rounds spend `epsilon`
    clipping: str = "fixed"  # fixed | adaptive (Andrew et al. 2021)
    clipping_norm: float = 1.0  # the norm, or the starting norm when adaptive
    target_quantile: float = 0.5  # adaptive: share of updates that should stay unclipped
    clip_lr: float = 0.2  # adaptive: geometric learning rate of the norm
    clipped_count_stddev: float | None = None  # adaptive: noise on the count; None: max(m/20, sigma)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+): the server learns only the sum of updates."""

    enabled: bool = False
    # Shares of each device's secrets: a value in (0, 1] is a share of the sampled devices,
    # a value >= 3 a count (Flower's SecAggPlusWorkflow num_shares).
    num_shares: float = 1.0
    # Shares needed to reconstruct: (0, 1] a share of num_shares, >= 2 a count.
    reconstruction_threshold: float = 0.6
    # Updates are quantised coordinate-wise in [-clipping_range, clipping_range]; with
    # user-level DP the clipping norm is used instead (no coordinate of a clipped update exceeds it).
    clipping_range: float = 1.0
    max_weight: float = 1000.0  # largest example count a device may weigh its update with
    quantization_range: int = 4_194_304  # 2**22 levels per coordinate


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: presets, the two DP levels, accounting and the ledger."""

    preset: str = "balanced"  # a file in configs/privacy/ giving defaults for this section
    delta: float = 1e-5  # for every scope; must be well below 1 / number of records
    accountant: str = "opacus_rdp"  # accountant for budget decisions and recorded epsilons
    secure_mode: bool = False  # noise from the OS entropy pool, robust to floating-point attacks
    server_key: str | None = None  # server ledger key; None: <output.dir>/.keys/server-ledger.key
    device: DeviceDPConfig = field(default_factory=DeviceDPConfig)
    user: UserDPConfig = field(default_factory=UserDPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass(frozen=True)
class SimulationConfig:
    """Flower's simulation runtime (Ray) on this machine."""

    cpus_per_device: int = 1  # Ray CPUs reserved per simulated device (sets concurrency)
    gpus_per_device: float = 0.0
    startup_timeout_s: float = 60.0


@dataclass(frozen=True)
class OutputConfig:
    """Where runs are written."""

    dir: str = "runs"
    name: str | None = None  # default: <UTC timestamp>-<strategy>


@dataclass(frozen=True)
class RuntimeConfig:
    """Where tensors live and how many threads a device uses."""

    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # torch intra-op threads per simulated device


@dataclass(frozen=True)
class EmofedConfig:
    """One emofed run: a federation, a model and how to train it."""

    seed: int = 42
    devices: int = 24
    rounds: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    policy: PolicyRunConfig = field(default_factory=PolicyRunConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Key of the resolved configuration (JSON) in the ConfigRecord of every round's message.
MESSAGE_CONFIG_KEY = "emofed-config"


class ConfigError(ValueError):
    """A configuration that cannot be run; the message is one line naming the key."""


# Allowed values, checked once at the edge. Ranges are inclusive; None: unbounded.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "folder"),
    "data.partition": ("natural", "dirichlet"),
    "model.kind": ("features", "cnn"),
    "model.text.mode": ("frozen", "top", "lora", "full"),
    "model.fusion.kind": ("gated", "mean"),
    "train.optimizer": ("adam", "sgd"),
    "strategy.name": ("fedavg", "fedprox", "fedadam"),
    "runtime.device": ("auto", "cpu", "cuda"),
    "privacy.accountant": ("opacus_rdp", "opacus_prv", "dpa_pld", "dpa_rdp"),
    "privacy.user.clipping": ("fixed", "adaptive"),
}
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**32 - 1),
    "devices": (1, 100_000),
    "rounds": (1, 100_000),
    "data.dirichlet_alpha": (1e-3, 1e6),
    "data.samples_per_device": (4, 1_000_000),
    "data.test_fraction": (0.05, 0.9),
    "data.p_no_camera": (0.0, 1.0),
    "data.p_no_microphone": (0.0, 1.0),
    "data.p_missing_text": (0.0, 1.0),
    "data.label_noise": (0.0, 1.0),
    "data.voice_sample_rate": (4000, 192_000),
    "model.embed_dim": (4, 4096),
    "model.dropout": (0.0, 0.9),
    "model.face.image_size": (16, 256),
    "model.face.width": (2, 512),
    "model.face.min_face_size": (8, 1024),
    "model.voice.sample_rate": (4000, 96_000),
    "model.voice.clip_seconds": (0.1, 30.0),
    "model.voice.n_mels": (8, 256),
    "model.voice.n_fft": (64, 8192),
    "model.voice.hop_length": (16, 4096),
    "model.voice.width": (2, 512),
    "model.text.trainable_layers": (1, 48),
    "model.text.lora_rank": (1, 256),
    "model.text.max_length": (4, 512),
    "model.fusion.modality_dropout": (0.0, 0.95),
    "model.fusion.aux_weight": (0.0, 10.0),
    "train.local_epochs": (1, 1000),
    "train.batch_size": (1, 65_536),
    "train.lr": (1e-7, 1000.0),
    "train.momentum": (0.0, 0.999),
    "train.weight_decay": (0.0, 1.0),
    "train.max_grad_norm": (1e-6, 1e6),
    "strategy.fraction_train": (0.0, 1.0),
    "strategy.fraction_evaluate": (0.0, 1.0),
    "strategy.min_train_devices": (1, 100_000),
    "strategy.min_evaluate_devices": (0, 100_000),
    "strategy.proximal_mu": (0.0, 100.0),
    "strategy.server_lr": (1e-7, 10.0),
    "strategy.beta_1": (0.0, 0.9999),
    "strategy.beta_2": (0.0, 0.99999),
    "strategy.tau": (1e-12, 1.0),
    "strategy.round_timeout_s": (1.0, 86_400.0),
    "personal.epochs": (1, 1000),
    "personal.lr": (1e-7, 10.0),
    "personal.prox": (0.0, 100.0),
    "policy.history": (1, 1_000_000),
    "policy.decisions": (10, 1_000_000),
    "policy.epsilon": (0.01, 1000.0),
    "policy.noise_multiplier": (0.01, 10_000.0),
    "policy.prior_strength": (0.0, 1e6),
    "simulation.cpus_per_device": (1, 1024),
    "simulation.gpus_per_device": (0.0, 64.0),
    "simulation.startup_timeout_s": (5.0, 3600.0),
    "runtime.threads": (1, 1024),
    "privacy.delta": (1e-15, 0.1),
    "privacy.device.epsilon": (0.01, 1000.0),
    "privacy.device.noise_multiplier": (0.01, 10_000.0),
    "privacy.device.max_grad_norm": (1e-6, 1e6),
    "privacy.user.epsilon": (0.01, 1000.0),
    "privacy.user.noise_multiplier": (0.01, 10_000.0),
    "privacy.user.clipping_norm": (1e-6, 1e6),
    "privacy.user.target_quantile": (0.0, 1.0),
    "privacy.user.clip_lr": (1e-4, 10.0),
    "privacy.user.clipped_count_stddev": (1e-6, 1e6),
    "privacy.secagg.num_shares": (1e-3, 100_000),
    "privacy.secagg.reconstruction_threshold": (1e-3, 100_000),
    "privacy.secagg.clipping_range": (1e-6, 1e6),
    "privacy.secagg.max_weight": (1.0, 1e9),
    "privacy.secagg.quantization_range": (2, 2**30),
}

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "privacy"


def privacy_presets() -> list[str]:
    """Names of the privacy presets shipped in ``configs/privacy/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _unfreeze(node: DictConfig) -> None:
    # Frozen dataclasses make every node read-only; merging overrides needs them open.
    OmegaConf.set_readonly(node, None)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _unfreeze(child)


def _known_keys(prefix: str, schema: type = EmofedConfig) -> list[str]:
    root = OmegaConf.structured(schema)
    node = OmegaConf.select(root, prefix) if prefix else root
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def one_line_error(
    err: OmegaConfBaseException, source: str, schema: type = EmofedConfig
) -> ConfigError:
    """The one-line :class:`ConfigError` of an omegaconf error while reading ``schema``.

    An unknown key lists the known keys beside it (of the dataclass that holds it, for
    an item of a list); any other error (a wrong type, an unparsable value) names the key.
    """
    key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError):
        parent = key.rpartition(".")[0]
        owner = getattr(err, "object_type", None)
        known = _known_keys(parent, schema) if parent or owner in (None, schema) else []
        if parent:
            where = f"under '{parent}'"
        elif owner is None or owner is schema:
            where = "at the top level"
        else:
            where = f"in {getattr(owner, '__name__', owner)}"
        if not known and is_dataclass(owner):
            known = [f.name for f in fields(owner)]
        return ConfigError(f"{source}: unknown key '{key}' (known keys {where}: {', '.join(known)})")
    detail = str(err).splitlines()[0]
    return ConfigError(f"{source}: bad value for '{key}': {detail}")


def _one_line(err: OmegaConfBaseException, source: str) -> ConfigError:
    return one_line_error(err, source, EmofedConfig)


def check_values(
    cfg: DictConfig,
    *,
    choices: Mapping[str, Sequence[str]],
    ranges: Mapping[str, tuple[float | None, float | None]],
) -> None:
    """Check dotted keys of ``cfg`` against allowed values and inclusive ranges (None: unbounded).

    Raises
    ------
    ConfigError
        One line naming the first key out of its choices or range, what is allowed and
        the value found.
    """
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"'{key}' must be one of {', '.join(allowed)}. Found {value!r}."
            )
    for key, (low, high) in ranges.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"'{key}' must be in [{low}, {high}]. Found {value!r}.")


def check_subset(key: str, names: Sequence[str], known: Sequence[str]) -> None:
    """Refuse a name in ``names`` that is not in ``known``.

    Raises
    ------
    ConfigError
        One line naming ``key``, the known names and the first unknown one.
    """
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"'{key}' must name only {', '.join(known)}. Found {unknown[0]!r}.")


def _check_ranges(cfg: DictConfig) -> None:
    check_values(cfg, choices=_CHOICES, ranges=_RANGES)


def _check_consistency(cfg: EmofedConfig) -> None:
    layers = set(cfg.personal.layers)
    if cfg.model.kind == "features" and cfg.personal.enabled and layers <= set(PERSONAL_LAYERS) and layers - {"head"}:
        raise ConfigError(
            "'personal.layers' may only hold 'head' with model.kind=features (its heads have no "
            f"aux_heads or fusion gates). Found {list(cfg.personal.layers)}."
        )
    if cfg.model.labels is not None:
        from models.labels import EMOTIONS

        check_subset("model.labels", cfg.model.labels, EMOTIONS)
        if len(set(cfg.model.labels)) < 2:
            raise ConfigError(f"'model.labels' must name at least two emotions. Found {list(cfg.model.labels)}.")
    if cfg.data.source == "folder" and not cfg.data.path:
        raise ConfigError("'data.path' must name a federation folder when data.source=folder.")
    if cfg.data.source == "synthetic" and cfg.data.p_no_camera + cfg.data.p_no_microphone > 1.0:
        raise ConfigError(
            "'data.p_no_camera' + 'data.p_no_microphone' must be at most 1 so every "
            f"device keeps a camera or a microphone. Found {cfg.data.p_no_camera} + "
            f"{cfg.data.p_no_microphone}."
        )
    if cfg.model.voice.n_fft // 2 + 1 < cfg.model.voice.n_mels:
        raise ConfigError(
            f"'model.voice.n_mels' must be at most n_fft // 2 + 1 = "
            f"{cfg.model.voice.n_fft // 2 + 1}. Found {cfg.model.voice.n_mels}."
        )
    if cfg.privacy.user.enabled and cfg.privacy.delta * cfg.devices > 0.1:
        raise ConfigError(
            f"'privacy.delta' must be well below 1/devices for user-level DP "
            f"(at most {0.1 / cfg.devices:.3g} with devices={cfg.devices}). Found {cfg.privacy.delta}."
        )
    _check_secagg(cfg)
    _check_personal(cfg)
    _check_policy(cfg)
    if cfg.strategy.min_train_devices > cfg.devices:
        raise ConfigError(
            f"'strategy.min_train_devices' must be at most devices={cfg.devices}. "
            f"Found {cfg.strategy.min_train_devices}."
        )


def _check_personal(cfg: EmofedConfig) -> None:
    layers = cfg.personal.layers
    for layer in layers:
        if layer not in PERSONAL_LAYERS:
            raise ConfigError(
                f"'personal.layers' items must be among {', '.join(PERSONAL_LAYERS)}. Found {layer!r}."
            )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"'personal.layers' must not repeat a layer. Found {list(layers)}.")
    if cfg.personal.enabled and not layers:
        raise ConfigError("'personal.layers' must name at least one layer when personal.enabled=true. Found [].")
    if cfg.personal.enabled and "fusion" in layers and cfg.model.fusion.kind == "mean":
        raise ConfigError(
            "'personal.layers' may not hold 'fusion' with model.fusion.kind=mean (it has no weights). "
            f"Found {list(layers)}."
        )


def _check_policy(cfg: EmofedConfig) -> None:
    if not cfg.policy.enabled:
        return
    p = cfg.privacy
    epsilon = cfg.policy.epsilon
    if p.device.enabled and p.device.noise_multiplier is None and epsilon is not None and epsilon >= p.device.epsilon:
        raise ConfigError(
            f"'policy.epsilon' must be below privacy.device.epsilon={p.device.epsilon:g}: the policy "
            f"release and DP-SGD share the device's budget. Found {epsilon:g}."
        )


def _check_secagg(cfg: EmofedConfig) -> None:
    sa = cfg.privacy.secagg
    if not sa.enabled:
        return
    for key, value, low in (
        ("num_shares", sa.num_shares, 3),
        ("reconstruction_threshold", sa.reconstruction_threshold, 2),
    ):
        if value > 1 and (value != int(value) or value < low):
            raise ConfigError(
                f"'privacy.secagg.{key}' must be a share in (0, 1] or a whole count >= {low}. Found {value!r}."
            )
    if sa.num_shares > 1 and sa.reconstruction_threshold > 1 and sa.reconstruction_threshold >= sa.num_shares:
        raise ConfigError(
            f"'privacy.secagg.reconstruction_threshold' must be below num_shares={sa.num_shares:g}. "
            f"Found {sa.reconstruction_threshold:g}."
        )
    if cfg.strategy.min_train_devices < 2:
        raise ConfigError(
            "'strategy.min_train_devices' must be at least 2 with secure aggregation "
            f"(a sum of one update is that update). Found {cfg.strategy.min_train_devices}."
        )


def merge_layers(
    schema: DictConfig, layers: Sequence[tuple[str, DictConfig]], cls: type = EmofedConfig
) -> DictConfig:
    """Merge (source, layer) pairs from :func:`read_layers` into the structured config of ``cls``.

    Raises
    ------
    ConfigError
        On an unknown key or a value of the wrong type; one line naming the source and the key.
    """
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise one_line_error(err, source, cls) from None
    return merged


def _merge(schema: DictConfig, layers: Sequence[tuple[str, DictConfig]]) -> DictConfig:
    return merge_layers(schema, layers, EmofedConfig)


def _preset_layer(name: str) -> tuple[str, DictConfig]:
    known = privacy_presets()
    if name not in known:
        raise ConfigError(f"'privacy.preset' must be one of {', '.join(known)}. Found {name!r}.")
    path = PRESET_DIR / f"{name}.yaml"
    layer = OmegaConf.load(path)
    if not isinstance(layer, DictConfig) or set(layer) - {"privacy"}:
        raise ConfigError(f"{path}: a privacy preset may only set keys under 'privacy'")
    return str(path), layer


def open_schema(cls: type) -> DictConfig:
    """The structured config of dataclass ``cls``, writable so that YAML layers can merge in."""
    schema = OmegaConf.structured(cls)
    _unfreeze(schema)
    return schema


def read_layers(paths: Sequence[Path], overrides: Sequence[str]) -> list[tuple[str, DictConfig]]:
    """Load YAML files and dotted ``key=value`` overrides as (source, layer) pairs, in order.

    Raises
    ------
    ConfigError
        On a missing file, invalid YAML, a file whose top level is not a mapping, or an
        override not of the form ``key=value``; one line naming the file or override.
    """
    layers: list[tuple[str, DictConfig]] = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{path}: not valid YAML: {first}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        layers.append((str(path), loaded))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from None
    return layers


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> EmofedConfig:
    """Resolve a YAML file and ``key=value`` overrides into a validated config.

    Parameters
    ----------
    path : str or Path, optional
        A YAML file (e.g. ``configs/default.yaml``); None uses the built-in defaults.
    overrides : sequence of str
        Dotted ``key=value`` overrides, applied after the file.

    Returns
    -------
    EmofedConfig
        The frozen, validated configuration.

    Raises
    ------
    ConfigError
        On a missing or unreadable file, an unknown key, a wrong type or a value out
        of range; the message is one line naming the key.
    """
    schema = open_schema(EmofedConfig)
    layers = read_layers([Path(path)] if path is not None else [], overrides)
    merged = _merge(schema, layers)
    # The preset gives defaults for the privacy section; keys set in the file or on the
    # command line win over it, wherever the preset itself was chosen.
    preset = merged.privacy.preset
    if preset == "False":  # YAML 1.1 reads a bare `off` as false; the preset is meant
        preset = "off"
        layers = [*layers, ("privacy.preset", OmegaConf.create({"privacy": {"preset": "off"}}))]
    merged = _merge(schema, [_preset_layer(preset), *layers])
    _check_ranges(merged)
    cfg = OmegaConf.to_object(merged)
    if not isinstance(cfg, EmofedConfig):  # pragma: no cover - omegaconf contract
        raise ConfigError("configuration did not resolve to EmofedConfig")
    _check_consistency(cfg)
    return cfg


def to_dict(cfg: EmofedConfig) -> dict[str, Any]:
    """Plain nested dict of a config (for JSON, YAML and Flower messages)."""
    return asdict(cfg)


def to_yaml(cfg: EmofedConfig) -> str:
    """The resolved configuration as YAML, as written into every run directory."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def from_json(text: str) -> EmofedConfig:
    """Rebuild a config sent as JSON (e.g. in a Flower ConfigRecord), re-validated.

    Raises
    ------
    ConfigError
        If the JSON is malformed or holds an invalid configuration.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"configuration JSON is malformed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("configuration JSON must be an object")
    schema = OmegaConf.structured(EmofedConfig)
    _unfreeze(schema)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _one_line(err, "configuration JSON") from None
    _check_ranges(merged)
    cfg = OmegaConf.to_object(merged)
    _check_consistency(cfg)
    return cfg  # type: ignore[return-value]


def to_json(cfg: EmofedConfig) -> str:
    """Compact JSON of a config, the form the server sends to devices."""
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))


def fingerprint(section: Any) -> str:
    """Short stable hash of a config section (e.g. to key caches of device data)."""
    blob = json.dumps(asdict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

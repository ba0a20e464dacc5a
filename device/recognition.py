"""The device's network at run time: global weights, personal layers, and one window's recognition.

:func:`load_global_model` builds the network of a run (``emofed simulate`` or a deployment)
from its ``model.safetensors`` and configuration; :func:`apply_personal_layers` replaces the
modules the device personalised (``client.personal``, kept in its encrypted store).
:class:`Recogniser` preprocesses one window's frame, audio and text as in training
(``models``) and returns the fused emotion probabilities over the modalities that carry a
signal: a frame with a detected face, audio above a silence level, a non-blank text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import torch
from torch.utils.data import TensorDataset

from device.personal import load_personal, personal_keys
from device.store import EncryptedStore, StoreError
from emofed.config import ConfigError, EmofedConfig, ModelConfig, from_json, load_config
from models.errors import UnusableInput
from models.face import FacePreprocessor
from models.features import FeatureExtractor
from models.fusion import MODALITIES, MultimodalEmotionNet, build_model
from models.state import set_state, shared_state_keys
from models.text import TextPreprocessor
from models.voice import VoicePreprocessor

__all__ = [
    "MODEL_FILE",
    "LoadedModel",
    "ModelLoadError",
    "Prepared",
    "Recogniser",
    "apply_personal_layers",
    "load_global_model",
]

MODEL_FILE = "model.safetensors"  # same name as server.rundir.MODEL_FILE


class ModelLoadError(RuntimeError):
    """The device's model cannot be built or loaded; the message is one line."""


@dataclass
class LoadedModel:
    """The device's network and where its weights came from."""

    model: MultimodalEmotionNet
    config: EmofedConfig
    source: Path
    global_keys: list[str] = field(default_factory=list)  # weights read from the global file
    personal: list[str] = field(default_factory=list)  # personal weights applied from the store


def _model_file(source: Path) -> Path:
    path = source / MODEL_FILE if source.is_dir() else source
    if not path.is_file():
        raise ModelLoadError(
            f"--model {source}: no {MODEL_FILE} there (give a run directory or a weights file)"
        )
    return path


def _model_config(path: Path, metadata: Mapping[str, str]) -> EmofedConfig:
    try:
        if "config" in metadata:
            return from_json(metadata["config"])
        beside = path.parent / "config.yaml"
        if beside.is_file():
            return load_config(beside)
    except ConfigError as err:
        raise ModelLoadError(f"--model {path}: its configuration is invalid: {err}") from None
    raise ModelLoadError(f"--model {path}: no configuration in its metadata and no config.yaml beside it")


def _personal_weights(store: EncryptedStore, loaded: LoadedModel) -> dict[str, np.ndarray]:
    """The personal layers federated personalisation keeps in the store (:mod:`device.personal`)."""
    personal_cfg = loaded.config.personal
    if not personal_cfg.enabled:
        return {}
    try:
        arrays = load_personal(store, personal_keys(loaded.model, personal_cfg.layers))
    except (ValueError, StoreError) as err:
        raise ModelLoadError(f"personal layers in the device store: {err}") from None
    return dict(arrays) if arrays else {}


def load_global_model(source: Path) -> LoadedModel:
    """Build the network of a run and load its global weights.

    Parameters
    ----------
    source : Path
        A run directory (``model.safetensors`` and ``config.yaml``) or a weights file whose
        metadata holds the configuration (as ``emofed simulate`` writes it).

    Raises
    ------
    ModelLoadError
        If the file is not a weights file of this network.
    """
    path = _model_file(Path(source))
    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(f"--model {path}: not a readable safetensors weights file ({detail})") from None
    config = _model_config(path, metadata)
    try:
        model = build_model(config.model, device="cpu")
    except (ValueError, FileNotFoundError) as err:
        raise ModelLoadError(f"--model {path}: cannot build its network: {err}") from None
    try:
        set_state(model, arrays, keys=list(arrays))
    except ValueError as err:
        raise ModelLoadError(f"--model {path}: weights do not fit the network: {err}") from None
    model.eval()
    return LoadedModel(model=model, config=config, source=path, global_keys=list(arrays))


def apply_personal_layers(loaded: LoadedModel, store: EncryptedStore | None) -> LoadedModel:
    """Replace global weights by the personal layers kept in the device's store, if any.

    Raises
    ------
    ModelLoadError
        If the personal layers do not fit the network, or a trainable weight is in neither
        the global file nor the store.
    """
    model = loaded.model
    personal = _personal_weights(store, loaded) if store is not None else {}
    if personal:
        try:
            set_state(model, personal, keys=list(personal))
        except ValueError as err:
            raise ModelLoadError(f"personal layers in the device store do not fit the model: {err}") from None
        loaded.personal = list(personal)
    missing = [k for k in shared_state_keys(model) if k not in loaded.global_keys and k not in personal]
    if missing:
        raise ModelLoadError(
            f"--model {loaded.source}: no weights for {missing[0]} ({len(missing)} arrays) in the "
            "file or in the device store's personal layers"
        )
    model.eval()
    return loaded


@dataclass
class Prepared:
    """One window's network inputs (batch of one) and which modalities they hold."""

    face: torch.Tensor  # (1, 1, S, S)
    voice: torch.Tensor  # (1, 1, n_mels, frames)
    text_ids: torch.Tensor  # (1, L)
    text_mask: torch.Tensor  # (1, L)
    present: list[str]
    notes: list[str]  # why a given modality was not used (no_face, silent, unusable)


class Recogniser:
    """Preprocess one window and classify it with the device's network.

    Parameters
    ----------
    model : MultimodalEmotionNet
        In eval mode.
    config : ModelConfig
        Its configuration (preprocessing settings).
    silence_db : float
        Audio with an RMS below this level (dBFS) is treated as no voice.
    """

    def __init__(self, model: MultimodalEmotionNet, config: ModelConfig, *, silence_db: float) -> None:
        self.model = model
        self.face = FacePreprocessor(config.face)
        self.voice = VoicePreprocessor(config.voice)
        self.text = TextPreprocessor(config.text)
        self.silence_db = silence_db
        self.max_length = config.text.max_length
        # model.kind=features: the same fixed extractors and public projection as in training.
        self.features = FeatureExtractor(config) if getattr(config, "kind", "cnn") == "features" else None

    def prepare(
        self, frame: np.ndarray | None, audio: np.ndarray | None, sample_rate: int | None, text: str | None
    ) -> Prepared:
        """Preprocess what the window holds; absent or unusable modalities become zeros."""
        present, notes = [], []
        face = torch.zeros((1, *self.face.output_shape))
        voice = torch.zeros((1, *self.voice.output_shape))
        ids = torch.zeros((1, self.max_length), dtype=torch.long)
        mask = torch.zeros((1, self.max_length), dtype=torch.long)
        if frame is not None:
            try:
                crop, found = self.face(frame)
                if found:
                    face[0], present = crop, [*present, "face"]
                else:
                    notes.append("face:not_detected")
            except UnusableInput as err:
                notes.append(f"face:{err.reason}")
        if audio is not None and sample_rate is not None:
            samples = audio if audio.ndim == 1 else audio.mean(axis=1)
            rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
            if not math.isfinite(rms):
                notes.append("voice:non_finite")
            elif 20.0 * math.log10(max(rms, 1e-12)) < self.silence_db:
                notes.append("voice:silent")
            else:
                try:
                    voice[0], present = self.voice(audio, sample_rate), [*present, "voice"]
                except UnusableInput as err:
                    notes.append(f"voice:{err.reason}")
        if text is not None and text.strip():
            ids, mask = self.text([text])
            present.append("text")
        return Prepared(face, voice, ids, mask, present, notes)

    @torch.inference_mode()
    def __call__(self, prepared: Prepared) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused probabilities (7,) and each present modality's own probabilities."""
        modality_mask = torch.tensor([[m in prepared.present for m in MODALITIES]])  # (1, 3)
        inputs = (prepared.face, prepared.voice, prepared.text_ids, prepared.text_mask)
        if self.features is not None:
            window = TensorDataset(*inputs, modality_mask.float(), torch.zeros(1, dtype=torch.long))
            inputs = self.features(window).tensors[:4]  # projected face, voice, text; (1, 0)
        fused, per_modality = self.model(*inputs, modality_mask)  # (1, 7), (1, 3, 7)
        probabilities = torch.softmax(fused[0].double(), dim=0).numpy()
        alone = {
            m: torch.softmax(per_modality[0, i].double(), dim=0).numpy()
            for i, m in enumerate(MODALITIES)
            if m in prepared.present
        }
        return probabilities, alone

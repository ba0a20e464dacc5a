"""Emotion networks for face, voice and text, their fusion, preprocessing and label set."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that light users (the label set, the command-line parser) do
# not pay for torch and transformers.
_LAZY = {
    "CORPUS_LABEL_MAPS": "models.labels",
    "EMOTIONS": "models.labels",
    "FACE_ENCODERS": "models.fusion",
    "FUSIONS": "models.fusion",
    "FaceCNN": "models.face",
    "FacePreprocessor": "models.face",
    "GatedFusion": "models.fusion",
    "MODALITIES": "models.fusion",
    "MeanFusion": "models.fusion",
    "MultimodalEmotionNet": "models.fusion",
    "MultimodalPreprocessor": "models.preprocess",
    "NUM_CLASSES": "models.labels",
    "PreprocessReport": "models.preprocess",
    "RawSample": "models.preprocess",
    "TEXT_ENCODERS": "models.fusion",
    "TEXT_MODES": "models.text",
    "TextEncoder": "models.text",
    "TextPreprocessor": "models.text",
    "UnusableInput": "models.errors",
    "VOICE_ENCODERS": "models.fusion",
    "VoiceCNN": "models.voice",
    "VoicePreprocessor": "models.voice",
    "build_model": "models.fusion",
    "check_text": "models.text",
    "default_device": "models.fusion",
    "default_encoder_path": "models.text",
    "emotion_loss": "models.fusion",
    "encoder_path": "models.text",
    "get_state": "models.state",
    "haar_cascade_path": "models.face",
    "label_id": "models.labels",
    "load_audio": "models.voice",
    "map_label": "models.labels",
    "set_state": "models.state",
    "shared_state_keys": "models.state",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)

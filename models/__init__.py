"""Emotion networks for face, voice and text, their fusion, preprocessing and label set."""

from models.errors import UnusableInput
from models.face import FaceCNN, FacePreprocessor, haar_cascade_path
from models.fusion import (
    FACE_ENCODERS,
    FUSIONS,
    MODALITIES,
    TEXT_ENCODERS,
    VOICE_ENCODERS,
    GatedFusion,
    MeanFusion,
    MultimodalEmotionNet,
    build_model,
    default_device,
    emotion_loss,
)
from models.labels import CORPUS_LABEL_MAPS, EMOTIONS, NUM_CLASSES, label_id, map_label
from models.preprocess import MultimodalPreprocessor, PreprocessReport, RawSample
from models.state import get_state, set_state, shared_state_keys
from models.text import (
    TEXT_MODES,
    TextEncoder,
    TextPreprocessor,
    check_text,
    default_encoder_path,
    encoder_path,
)
from models.voice import VoiceCNN, VoicePreprocessor, load_audio

__all__ = [
    "CORPUS_LABEL_MAPS",
    "EMOTIONS",
    "FACE_ENCODERS",
    "FUSIONS",
    "MODALITIES",
    "NUM_CLASSES",
    "TEXT_ENCODERS",
    "TEXT_MODES",
    "VOICE_ENCODERS",
    "FaceCNN",
    "FacePreprocessor",
    "GatedFusion",
    "MeanFusion",
    "MultimodalEmotionNet",
    "MultimodalPreprocessor",
    "PreprocessReport",
    "RawSample",
    "TextEncoder",
    "TextPreprocessor",
    "UnusableInput",
    "VoiceCNN",
    "VoicePreprocessor",
    "build_model",
    "check_text",
    "default_device",
    "default_encoder_path",
    "emotion_loss",
    "encoder_path",
    "get_state",
    "haar_cascade_path",
    "label_id",
    "load_audio",
    "map_label",
    "set_state",
    "shared_state_keys",
]

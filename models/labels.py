"""The shared emotion label set and each public corpus's mapping onto it."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "CORPUS_LABEL_MAPS",
    "EMOTIONS",
    "NUM_CLASSES",
    "label_id",
    "map_label",
]

# Index is the class id everywhere (labels, logits, metrics); never reorder.
EMOTIONS: tuple[str, ...] = (
    "neutral",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgusted",
    "surprised",
)
NUM_CLASSES: int = len(EMOTIONS)

# Keys are compared after ``strip().lower()``; a value of None means "drop the sample":
# the emotion has no counterpart in the shared set (boredom, contempt, shame, ...).
_RAVDESS: dict[str, str | None] = {
    # Filename field 3 (emotion code), https://zenodo.org/record/1188976
    "01": "neutral",
    "02": "neutral",  # calm: low-arousal neutral, as most RAVDESS papers merge it
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgusted",
    "08": "surprised",
    "neutral": "neutral",
    "calm": "neutral",
    "happy": "happy",
    "sad": "sad",
    "angry": "angry",
    "fearful": "fearful",
    "disgust": "disgusted",
    "surprised": "surprised",
}
_CREMA_D: dict[str, str | None] = {
    # Filename field 3, e.g. 1001_DFA_ANG_XX.wav
    "ang": "angry",
    "dis": "disgusted",
    "fea": "fearful",
    "hap": "happy",
    "neu": "neutral",
    "sad": "sad",
}
_TESS: dict[str, str | None] = {
    # Folder suffix after OAF_/YAF_, spelled differently across releases
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "ps": "surprised",
    "pleasant_surprise": "surprised",
    "pleasant_surprised": "surprised",
    "sad": "sad",
}
_EMODB: dict[str, str | None] = {
    # Filename letter 6 (German initial), e.g. 03a01Wa.wav
    "w": "angry",  # Wut
    "l": None,  # Langeweile (boredom)
    "e": "disgusted",  # Ekel
    "a": "fearful",  # Angst
    "f": "happy",  # Freude
    "t": "sad",  # Trauer
    "n": "neutral",
    "anger": "angry",
    "boredom": None,
    "disgust": "disgusted",
    "fear": "fearful",
    "anxiety": "fearful",
    "happiness": "happy",
    "sadness": "sad",
    "neutral": "neutral",
}
_FER2013: dict[str, str | None] = {
    # Column "emotion" of fer2013.csv
    "0": "angry",
    "1": "disgusted",
    "2": "fearful",
    "3": "happy",
    "4": "sad",
    "5": "surprised",
    "6": "neutral",
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "sad": "sad",
    "surprise": "surprised",
    "neutral": "neutral",
}
_CK_PLUS: dict[str, str | None] = {
    # Emotion_labels/*.txt codes (Lucey et al., 2010) and the folder names of common exports
    "0": "neutral",
    "1": "angry",
    "2": None,  # contempt
    "3": "disgusted",
    "4": "fearful",
    "5": "happy",
    "6": "sad",
    "7": "surprised",
    "neutral": "neutral",
    "anger": "angry",
    "contempt": None,
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "sadness": "sad",
    "surprise": "surprised",
}
_DAIR_EMOTION: dict[str, str | None] = {
    # dair-ai/emotion ClassLabel order 0..5 and names
    "0": "sad",
    "1": "happy",
    "2": "happy",
    "3": "angry",
    "4": "fearful",
    "5": "surprised",
    "sadness": "sad",
    "joy": "happy",
    "love": "happy",
    "anger": "angry",
    "fear": "fearful",
    "surprise": "surprised",
}
# GoEmotions' own Ekman grouping (Demszky et al., 2020, data/ekman_mapping.json),
# with Ekman "joy" read as happy.
_GOEMOTIONS_EKMAN: dict[str, tuple[str, ...]] = {
    "angry": ("anger", "annoyance", "disapproval"),
    "disgusted": ("disgust",),
    "fearful": ("fear", "nervousness"),
    "happy": (
        "joy",
        "amusement",
        "approval",
        "excitement",
        "gratitude",
        "love",
        "optimism",
        "relief",
        "pride",
        "admiration",
        "desire",
        "caring",
    ),
    "sad": ("sadness", "disappointment", "embarrassment", "grief", "remorse"),
    "surprised": ("surprise", "realization", "confusion", "curiosity"),
    "neutral": ("neutral",),
}
_GOEMOTIONS: dict[str, str | None] = {
    raw: emotion for emotion, raws in _GOEMOTIONS_EKMAN.items() for raw in raws
}
_ISEAR: dict[str, str | None] = {
    "joy": "happy",
    "fear": "fearful",
    "anger": "angry",
    "sadness": "sad",
    "disgust": "disgusted",
    "shame": None,
    "guilt": None,
}
_MELD: dict[str, str | None] = {
    "neutral": "neutral",
    "joy": "happy",
    "sadness": "sad",
    "anger": "angry",
    "fear": "fearful",
    "disgust": "disgusted",
    "surprise": "surprised",
}
# Our own names, for data that is already labelled in the shared set (synthetic federation).
_EMOFED: dict[str, str | None] = {name: name for name in EMOTIONS}

CORPUS_LABEL_MAPS: Mapping[str, Mapping[str, str | None]] = MappingProxyType(
    {
        name: MappingProxyType(mapping)
        for name, mapping in {
            "emofed": _EMOFED,
            "ravdess": _RAVDESS,
            "crema_d": _CREMA_D,
            "tess": _TESS,
            "emodb": _EMODB,
            "fer2013": _FER2013,
            "ck_plus": _CK_PLUS,
            "dair_emotion": _DAIR_EMOTION,
            "goemotions": _GOEMOTIONS,
            "isear": _ISEAR,
            "meld": _MELD,
        }.items()
    }
)

_IDS: dict[str, int] = {name: index for index, name in enumerate(EMOTIONS)}


def label_id(name: str) -> int:
    """Return the class id of a shared emotion name.

    Parameters
    ----------
    name : str
        One of :data:`EMOTIONS` (case and surrounding spaces ignored).

    Returns
    -------
    int
        Index of ``name`` in :data:`EMOTIONS`.

    Raises
    ------
    ValueError
        If ``name`` is not a shared emotion.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _IDS:
        raise ValueError(f"Unknown emotion {name!r}; known: {', '.join(EMOTIONS)}.")
    return _IDS[key]


def map_label(corpus: str, raw: str | int) -> int | None:
    """Map a corpus's raw label onto a shared class id.

    Parameters
    ----------
    corpus : str
        A key of :data:`CORPUS_LABEL_MAPS`.
    raw : str or int
        The label as the corpus writes it (compared after ``strip().lower()``); an int is
        read as its decimal string, so ``fer2013`` accepts ``3`` and ``"3"`` alike.

    Returns
    -------
    int or None
        The class id, or None when the corpus's label has no shared counterpart and the
        sample should be dropped (e.g. EmoDB boredom, CK+ contempt).

    Raises
    ------
    ValueError
        If ``corpus`` is unknown (the message lists the known corpora) or ``raw`` is not
        one of that corpus's labels.
    """
    if corpus not in CORPUS_LABEL_MAPS:
        raise ValueError(
            f"Unknown corpus {corpus!r}; known: {', '.join(sorted(CORPUS_LABEL_MAPS))}."
        )
    mapping = CORPUS_LABEL_MAPS[corpus]
    key = str(raw).strip().lower()
    if key not in mapping:
        raise ValueError(f"Unknown {corpus} label {raw!r}; known: {', '.join(sorted(mapping))}.")
    emotion = mapping[key]
    return None if emotion is None else _IDS[emotion]

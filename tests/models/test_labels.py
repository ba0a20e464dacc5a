"""Tests of the shared label set and the corpus label maps."""

from __future__ import annotations

import pytest

from models.labels import CORPUS_LABEL_MAPS, EMOTIONS, NUM_CLASSES, label_id, map_label


def test_emotion_order_is_pinned() -> None:
    """Class ids are the index in EMOTIONS, in this exact order."""
    assert EMOTIONS == ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
    assert NUM_CLASSES == 7


@pytest.mark.parametrize(
    ("corpus", "raw", "emotion"),
    [
        ("ravdess", "01", "neutral"),
        ("ravdess", "02", "neutral"),
        ("ravdess", "calm", "neutral"),
        ("ravdess", "07", "disgusted"),
        ("ravdess", "08", "surprised"),
        ("crema_d", "ANG", "angry"),
        ("crema_d", "FEA", "fearful"),
        ("tess", "ps", "surprised"),
        ("tess", "Pleasant_Surprise", "surprised"),
        ("tess", "disgust", "disgusted"),
        ("emodb", "W", "angry"),
        ("emodb", "A", "fearful"),
        ("emodb", "F", "happy"),
        ("emodb", "T", "sad"),
        ("fer2013", "0", "angry"),
        ("fer2013", 3, "happy"),
        ("fer2013", "6", "neutral"),
        ("ck_plus", "sadness", "sad"),
        ("ck_plus", "7", "surprised"),
        ("dair_emotion", "love", "happy"),
        ("dair_emotion", "joy", "happy"),
        ("dair_emotion", "sadness", "sad"),
        ("goemotions", "nervousness", "fearful"),
        ("goemotions", "curiosity", "surprised"),
        ("goemotions", "disapproval", "angry"),
        ("isear", "joy", "happy"),
        ("meld", "surprise", "surprised"),
        ("emofed", "disgusted", "disgusted"),
    ],
)
def test_map_label_known_values(corpus: str, raw: str | int, emotion: str) -> None:
    """Pinned raw labels map to the documented shared emotion."""
    assert map_label(corpus, raw) == EMOTIONS.index(emotion)


@pytest.mark.parametrize(
    ("corpus", "raw"),
    [
        ("emodb", "L"),
        ("ck_plus", "contempt"),
        ("ck_plus", "2"),
        ("isear", "shame"),
        ("isear", "guilt"),
    ],
)
def test_map_label_drops_unmapped_emotions(corpus: str, raw: str) -> None:
    """Emotions without a shared counterpart map to None (drop the sample)."""
    assert map_label(corpus, raw) is None


def test_map_label_unknown_corpus_lists_known() -> None:
    """An unknown corpus raises ValueError naming the known corpora."""
    with pytest.raises(ValueError, match="ravdess"):
        map_label("iemocap", "ang")


def test_map_label_unknown_raw_label_raises() -> None:
    """A raw label outside the corpus's map raises ValueError."""
    with pytest.raises(ValueError, match="crema_d"):
        map_label("crema_d", "BOR")


def test_every_map_targets_the_shared_set() -> None:
    """Every value of every corpus map is a shared emotion or None."""
    for corpus, mapping in CORPUS_LABEL_MAPS.items():
        for raw, emotion in mapping.items():
            assert emotion is None or emotion in EMOTIONS, (corpus, raw)


def test_goemotions_covers_all_28_labels() -> None:
    """The Ekman grouping covers GoEmotions' 27 emotions plus neutral, nothing dropped."""
    mapping = CORPUS_LABEL_MAPS["goemotions"]
    assert len(mapping) == 28
    assert None not in mapping.values()


def test_label_id() -> None:
    """label_id returns the index and rejects unknown names."""
    assert label_id("happy") == 1
    assert label_id(" Surprised ") == 6
    with pytest.raises(ValueError, match="neutral"):
        label_id("bored")

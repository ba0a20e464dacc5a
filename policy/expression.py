"""How a decision is expressed: a supportive message retrieved from a bank, and an avatar face.

Messages. Every message in ``configs/policy/messages.yaml`` belongs to one action and may be
tagged with the emotions it was written for. For a decision on action ``a`` while the
dominant emotion is ``e``, the candidates are the messages of ``a`` that are untagged or
tagged with ``e`` (a message written for someone else's feeling is never shown: "share the
good mood" to a sad person). The query ``query_template.format(feeling=<phrase for e>,
action=<description of a>)`` and the candidates are embedded by a sentence encoder and
ranked by::

    cos(query, message) + tag_weight * [e in tags]
        - dismissed_penalty * (times this person dismissed the message)
        - recent_penalty * [message among the last recent_window shown]

The encoder is any callable ``texts -> (N, E) array``; the default is the packaged
all-MiniLM-L6-v2 (mean pooling over tokens, as its sentence-transformers configuration
does). :class:`HashingEncoder` is a cheap deterministic stand-in for tests and quick runs.
The bank embeds every message and every (emotion, action) query once, when built.

Avatar. ``configs/policy/expressions.yaml`` gives ARKit-style blendshape weights for the
avatar's *response* to each emotion (empathic: concern for anger, never mirrored anger) and
for each action; a decision's face is ``clip(emotion_weight * Σₑ pₑ Eₑ + action_weight * Aₐ,
0, 1)``.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emofed.config import ConfigError, check_subset
from models.labels import EMOTIONS

__all__ = [
    "ENCODERS",
    "AvatarExpressions",
    "ExpressionConfig",
    "HashingEncoder",
    "MessageBank",
    "MessageConfig",
    "MessageSpec",
    "MiniLMEncoder",
    "TextEmbedder",
    "build_encoder",
    "check_expression_config",
    "check_message_config",
]

logger = logging.getLogger(__name__)

TextEmbedder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class MessageSpec:
    """One supportive message of the bank."""

    id: str = ""
    action: str = ""
    text: str = ""
    emotions: tuple[str, ...] = ()  # written for these emotions; empty: any

    def __post_init__(self) -> None:
        """Store lists read from YAML as tuples."""
        object.__setattr__(self, "emotions", tuple(self.emotions))


@dataclass(frozen=True)
class MessageConfig:
    """The message bank and how it is ranked."""

    query_template: str = "{feeling} {action}"
    emotion_phrases: dict[str, str] = field(default_factory=dict)  # emotion -> how it feels
    tag_weight: float = 0.25  # bonus of a message written for the current emotion
    dismissed_penalty: float = 0.5  # per earlier dismissal of the message
    recent_penalty: float = 0.4
    recent_window: int = 3  # how many recently shown messages are penalised
    bank: tuple[MessageSpec, ...] = ()

    def __post_init__(self) -> None:
        """Store lists read from YAML as tuples."""
        object.__setattr__(self, "bank", tuple(self.bank))


@dataclass(frozen=True)
class ExpressionConfig:
    """Avatar blendshape weights per emotion and per action."""

    blendshapes: tuple[str, ...] = ()
    emotion_weight: float = 0.6
    action_weight: float = 0.4
    emotions: dict[str, dict[str, float]] = field(default_factory=dict)
    actions: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Store lists read from YAML as tuples."""
        object.__setattr__(self, "blendshapes", tuple(self.blendshapes))


def check_message_config(cfg: MessageConfig, actions: Sequence[str], *, quiet_action: str) -> None:
    """Check the message bank against the action catalogue.

    Its numeric ranges are checked with the rest of the catalogue's (``policy.rules``).

    Raises
    ------
    ConfigError
        (a ``ValueError``) naming the first offending key: an unknown emotion or action,
        a duplicate id, an empty text, or an action without an untagged message.
    """
    check_subset("messages.emotion_phrases", list(cfg.emotion_phrases), EMOTIONS)
    try:
        cfg.query_template.format(feeling="", action="")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            f"'messages.query_template' may use only {{feeling}} and {{action}}. Found {cfg.query_template!r}."
        ) from None
    ids = [m.id for m in cfg.bank]
    if not all(ids) or len(set(ids)) != len(ids):
        raise ConfigError("'messages.bank' ids must be non-empty and unique.")
    for message in cfg.bank:
        check_subset(
            f"messages.bank.{message.id}.action",
            [message.action],
            [n for n in actions if n != quiet_action],
        )
        check_subset(f"messages.bank.{message.id}.emotions", message.emotions, EMOTIONS)
        if not message.text.strip():
            raise ConfigError(f"'messages.bank.{message.id}.text' must not be empty.")
    # An untagged message per action guarantees a candidate whatever the emotion.
    missing = [
        n
        for n in actions
        if n != quiet_action and n not in {m.action for m in cfg.bank if not m.emotions}
    ]
    if missing:
        raise ConfigError(
            f"'messages.bank' must hold an untagged message (for any emotion) per action. Found none for {missing[0]!r}."
        )


def check_expression_config(cfg: ExpressionConfig, actions: Sequence[str]) -> None:
    """Check the avatar expression tables against the emotions, actions and blendshapes.

    Raises
    ------
    ConfigError
        (a ``ValueError``) naming the first offending key.
    """
    if not cfg.blendshapes or len(set(cfg.blendshapes)) != len(cfg.blendshapes):
        raise ConfigError(
            f"'expression.blendshapes' must be non-empty and unique. Found {list(cfg.blendshapes)}."
        )
    check_subset("expression.emotions", list(cfg.emotions), EMOTIONS)
    check_subset("expression.actions", list(cfg.actions), actions)
    for section, table in (("emotions", cfg.emotions), ("actions", cfg.actions)):
        for row, weights in table.items():
            check_subset(f"expression.{section}.{row}", list(weights), cfg.blendshapes)
            for name, weight in weights.items():
                if not 0.0 <= weight <= 1.0:
                    raise ConfigError(
                        f"'expression.{section}.{row}.{name}' must be in [0, 1]. Found {weight}."
                    )


_TOKEN = re.compile(r"[a-z]+")
_STOPWORDS = frozenset(
    "a an and are as at be but by can for from i if in is it its just me my of on or so "
    "some that the this to up what when with you your".split()
)


class HashingEncoder:
    """Deterministic bag-of-words embeddings by feature hashing (Weinberger et al. 2009).

    Lower-cased words, minus a few stopwords, each add ±1 to one of ``dim`` buckets chosen
    by CRC-32; rows are L2-normalised. No model, no randomness: for tests and fast runs.
    """

    def __init__(self, dim: int = 512) -> None:
        if dim < 2:
            raise ValueError(f"HashingEncoder dim must be >= 2. Found {dim}.")
        self.dim = dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into an (N, dim) array of unit rows (zero rows for no words)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not a single str.")
        out = np.zeros((len(texts), self.dim))
        for row, text in enumerate(texts):
            for word in _TOKEN.findall(text.lower()):
                if word in _STOPWORDS:
                    continue
                code = zlib.crc32(word.encode())
                out[row, code % self.dim] += 1.0 if code & 0x80000000 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


@functools.lru_cache(maxsize=2)
def _load_minilm(path: str) -> tuple[object, object]:
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    logger.debug("Loaded message encoder from %s", path)
    return tokenizer, model


class MiniLMEncoder:
    """Sentence embeddings from a local transformers encoder (default: packaged all-MiniLM-L6-v2).

    Mean pooling of the last hidden states over real tokens, then L2 normalisation, as the
    model's sentence-transformers configuration prescribes (modules.json: Pooling, Normalize).

    Parameters
    ----------
    path : str or Path, optional
        A local model directory; None uses ``models.text.default_encoder_path()``.
    max_length : int
        Longer texts are truncated to this many tokens.
    batch_size : int
        Texts per forward pass.

    Raises
    ------
    FileNotFoundError
        If the directory does not exist (weights are never downloaded).
    """

    def __init__(
        self, path: str | Path | None = None, *, max_length: int = 128, batch_size: int = 64
    ) -> None:
        if path is None:
            from models.text import default_encoder_path

            path = default_encoder_path()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Message encoder directory {path} does not exist.")
        self.path = path
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into an (N, 384) array of unit rows."""
        import torch

        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not a single str.")
        tokenizer, model = _load_minilm(str(self.path))
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state  # (B, L, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
                chunks.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        if not chunks:
            return np.zeros((0, 0))
        return np.concatenate(chunks).astype(np.float64)


ENCODERS: dict[str, Callable[[], TextEmbedder]] = {"minilm": MiniLMEncoder, "hashing": HashingEncoder}


def build_encoder(name: str) -> TextEmbedder:
    """Build a registered message encoder by name.

    Raises
    ------
    ValueError
        If the name is unknown (the message lists the known ones).
    """
    if name not in ENCODERS:
        raise ValueError(f"Unknown message encoder {name!r}; known: {', '.join(ENCODERS)}.")
    return ENCODERS[name]()


def _unit_rows(matrix: np.ndarray, expected: int) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != expected:
        raise ValueError(
            f"The encoder must return an (N, E) array for N={expected} texts. Found {matrix.shape}."
        )
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


class MessageBank:
    """The message bank, embedded once, and the ranking of its messages for a decision.

    Parameters
    ----------
    config : MessageConfig
        Messages, query phrases and ranking weights.
    descriptions : Mapping[str, str]
        Action name -> description, for the queries; every message's action must be a key.
    encoder : callable
        ``texts -> (N, E)`` embeddings (rows are L2-normalised here).

    Raises
    ------
    ValueError
        If a message names an unknown action or the encoder returns a wrong shape.
    """

    def __init__(
        self, config: MessageConfig, descriptions: Mapping[str, str], encoder: TextEmbedder
    ) -> None:
        self.config = config
        self.messages = config.bank
        self._by_id = {m.id: i for i, m in enumerate(self.messages)}
        self._candidates: dict[str, np.ndarray] = {name: np.zeros(0, dtype=int) for name in descriptions}
        for index, message in enumerate(self.messages):
            if message.action not in self._candidates:
                raise ValueError(f"Message {message.id!r} names unknown action {message.action!r}.")
            self._candidates[message.action] = np.append(self._candidates[message.action], index)
        # Candidates per (emotion, action): the action's untagged messages and those for the emotion.
        self._eligible = {
            (emotion, action): np.array(
                [
                    i
                    for i in indices
                    if not self.messages[i].emotions or emotion in self.messages[i].emotions
                ],
                dtype=int,
            )
            for emotion in EMOTIONS
            for action, indices in self._candidates.items()
        }
        queries = [key for key, indices in self._eligible.items() if indices.size]
        texts = [m.text for m in self.messages] + [self.query(e, a, descriptions) for e, a in queries]
        embedded = _unit_rows(encoder(texts), len(texts)) if texts else np.zeros((0, 1))
        self._embeddings = embedded[: len(self.messages)]  # (N, E)
        # Cosine of every candidate to its (emotion, action) query, computed once.
        self._similarity: dict[tuple[str, str], np.ndarray] = {}
        for key, q in zip(queries, embedded[len(self.messages) :], strict=True):
            self._similarity[key] = self._embeddings[self._eligible[key]] @ q

    def query(self, emotion: str, action: str, descriptions: Mapping[str, str]) -> str:
        """The query text for ``emotion`` and ``action``."""
        feeling = self.config.emotion_phrases.get(emotion, f"I feel {emotion}.")
        return self.config.query_template.format(feeling=feeling, action=descriptions[action])

    def ranking(
        self,
        emotion: str,
        action: str,
        *,
        dismissed: Mapping[str, int] | None = None,
        recent: Sequence[str] = (),
    ) -> list[tuple[str, float]]:
        """The candidate messages of ``action`` for ``emotion`` with their scores, best first.

        Ties keep bank order. Empty if the action has no message for the emotion.
        """
        candidates = self._eligible.get((emotion, action))
        if candidates is None or candidates.size == 0:
            return []
        dismissed = dismissed or {}
        window = set(recent[-self.config.recent_window :]) if self.config.recent_window > 0 else set()
        ranked = []
        for position, index in enumerate(candidates):
            message = self.messages[index]
            score = float(self._similarity[(emotion, action)][position])
            score += self.config.tag_weight * (emotion in message.emotions)
            score -= self.config.dismissed_penalty * dismissed.get(message.id, 0)
            score -= self.config.recent_penalty * (message.id in window)
            ranked.append((message.id, score))
        order = sorted(range(len(ranked)), key=lambda i: (-ranked[i][1], i))
        return [ranked[i] for i in order]

    def select(
        self,
        emotion: str,
        action: str,
        *,
        dismissed: Mapping[str, int] | None = None,
        recent: Sequence[str] = (),
    ) -> MessageSpec | None:
        """The best message of ``action`` for ``emotion``; None if the action has no messages."""
        ranked = self.ranking(emotion, action, dismissed=dismissed, recent=recent)
        return self.messages[self._by_id[ranked[0][0]]] if ranked else None

    def __getitem__(self, message_id: str) -> MessageSpec:
        """The message with this id."""
        return self.messages[self._by_id[message_id]]


class AvatarExpressions:
    """Blendshape weights in [0, 1] for a decision's emotion probabilities and action."""

    def __init__(self, config: ExpressionConfig, actions: Sequence[str]) -> None:
        self.config = config
        self.names = config.blendshapes
        column = {name: j for j, name in enumerate(self.names)}
        self._emotions = np.zeros((len(EMOTIONS), len(self.names)))  # (7, B)
        for i, emotion in enumerate(EMOTIONS):
            for name, weight in config.emotions.get(emotion, {}).items():
                self._emotions[i, column[name]] = weight
        self._actions = {
            action: np.array([config.actions.get(action, {}).get(name, 0.0) for name in self.names])
            for action in actions
        }  # action -> (B,)

    def __call__(self, probabilities: np.ndarray, action: str) -> dict[str, float]:
        """The avatar's face for smoothed ``probabilities`` (7,) and the chosen ``action``."""
        face = self.config.emotion_weight * (probabilities @ self._emotions)
        face = np.clip(face + self.config.action_weight * self._actions[action], 0.0, 1.0)  # (B,)
        return dict(zip(self.names, face.tolist(), strict=True))

"""Fixed features that cost no privacy, the public feature space, and the small private heads.

Under DP-SGD every trained weight pays for its noise, and a device holds tens of samples:
training convolutional encoders from scratch under DP leaves the model at its random start.
What learns instead (Tramèr & Boneh, ICLR 2021, "Differentially Private Learning Needs
Better Features"; De et al. 2022) is a *fixed* representation computed on the device and
never sent, then a small model trained privately on top:

* face: histograms of oriented gradients (Dalal & Triggs 2005) of the OpenCV face crop,
  computed by ``cv2.HOGDescriptor``;
* voice: spectral functionals of the log-mel spectrogram (per-band mean and standard
  deviation over time and of the frame-to-frame change), the eGeMAPS idea (Eyben et al.
  2016) on the torchaudio front-end the CNN path uses;
* text: the frozen sentence encoder's mean-pooled embedding (all-MiniLM-L6-v2 by default).

A :class:`PublicFeatureSpace`, fitted by ``emofed pretrain`` on *public* data only (in the
synthetic world: synthetic people disjoint from every device), standardises each modality
and projects it with linear discriminant analysis; devices apply it as a fixed function.
:class:`FeatureHeadsNet` then holds the only weights DP-SGD trains: one zero-initialised
linear head per modality and a fusion of their logits (``head``: a weight per modality and
a class bias, the personal layer by default).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.utils.data import TensorDataset

from emofed.config import ConfigError, EmofedConfig, FeaturesConfig, ModelConfig, TextModelConfig
from models.labels import EMOTIONS, NUM_CLASSES

__all__ = [
    "FACE_FEATURES",
    "PUBLIC_DIR",
    "TEXT_FEATURES",
    "VOICE_FEATURES",
    "FeatureExtractor",
    "FeatureHeadsNet",
    "ModalityProjection",
    "PublicFeatureSpace",
    "check_public_space",
    "default_public_space",
    "fit_public_space",
]

logger = logging.getLogger(__name__)

MODALITY_NAMES = ("face", "voice", "text")
PUBLIC_DIR = Path(__file__).resolve().parent / "public"
FORMAT = "emofed-public-features/1"
_OFF = -1e4  # logit of an emotion outside the label set: softmax gives it ~0, the loss stays finite
# Ridge added to the within-class scatter, as a share of its largest eigenvalue (shrinkage).
_LDA_RIDGE = 1e-2


# -- fixed extractors (per modality, on the preprocessed tensors) ---------------------------


class HOGFeatures:
    """HOG of a preprocessed face (1, S, S) → (D,): 8-pixel cells, 2×2-cell blocks, 9 bins.

    The face is standardised per image by the preprocessor; HOG normalises each block
    (L2-Hys), so mapping it to uint8 with a fixed affine map loses nothing.
    """

    def __init__(self, image_size: int) -> None:
        if image_size % 8 or image_size < 16:
            raise ValueError(f"HOG needs model.face.image_size a multiple of 8, >= 16; found {image_size}.")
        self.hog = cv2.HOGDescriptor((image_size, image_size), (16, 16), (8, 8), (8, 8), 9)
        self.dim = int(self.hog.getDescriptorSize())

    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) standardised faces → (N, D) descriptors."""
        out = np.empty((len(faces), self.dim), dtype=np.float32)
        for index, face in enumerate(faces.numpy()):
            grey = np.clip(face[0] * 48.0 + 128.0, 0, 255).astype(np.uint8)  # (S, S)
            out[index] = self.hog.compute(grey).reshape(-1)
        return torch.from_numpy(out)


class MelStatsFeatures:
    """Functionals of a log-mel spectrogram (1, n_mels, T) → (3·n_mels,).

    Per band: the mean and standard deviation over frames (spectral envelope and its
    variability: pitch register, energy, voice quality) and the standard deviation of the
    frame-to-frame difference (how fast the spectrum moves: speech rate, arousal).
    """

    def __init__(self, n_mels: int) -> None:
        self.dim = 3 * n_mels

    def __call__(self, voices: torch.Tensor) -> torch.Tensor:
        """(N, 1, n_mels, T) scaled log-mels → (N, 3·n_mels)."""
        mel = voices[:, 0]  # (N, M, T)
        delta = mel[:, :, 1:] - mel[:, :, :-1]  # (N, M, T-1)
        return torch.cat([mel.mean(-1), mel.std(-1), delta.std(-1)], dim=1).float()  # (N, 3M)


class SentenceFeatures:
    """The frozen sentence encoder's mean-pooled embedding of the token ids (N, L) → (N, H)."""

    def __init__(self, config: TextModelConfig) -> None:
        self.encoder = _frozen_text_encoder(config)
        self.dim = int(self.encoder.proj.in_features)

    def __call__(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Token ids and masks (N, L) → (N, H); rows without tokens are zeros."""
        out = torch.zeros((len(ids), self.dim))
        has = attention.long().any(dim=1)  # (N,)
        if bool(has.any()):
            out[has] = self.encoder.pooled(ids[has], attention[has].long()).float()
        return out


@functools.lru_cache(maxsize=2)
def _frozen_text_encoder(config: TextModelConfig) -> nn.Module:
    from models.text import TextEncoder  # transformers loads only where text features are used

    frozen = TextModelConfig(**{**config.__dict__, "mode": "frozen"})
    return TextEncoder(frozen, embed_dim=1, dropout=0.0).eval()


FACE_FEATURES: dict[str, Callable[[ModelConfig], HOGFeatures]] = {
    "hog": lambda config: HOGFeatures(config.face.image_size),
}
VOICE_FEATURES: dict[str, Callable[[ModelConfig], MelStatsFeatures]] = {
    "mel-stats": lambda config: MelStatsFeatures(config.voice.n_mels),
}
TEXT_FEATURES: dict[str, Callable[[ModelConfig], SentenceFeatures]] = {
    "minilm": lambda config: SentenceFeatures(config.text),
}


def _pick(registry: Mapping[str, Callable], name: str, key: str) -> Callable:
    if name not in registry:
        raise ValueError(f"Unknown {key} {name!r}; known: {', '.join(sorted(registry))}.")
    return registry[name]


# -- the public feature space ----------------------------------------------------------------


@dataclass(frozen=True)
class ModalityProjection:
    """Standardise with public statistics, then project: ``((x − mean) / std) @ projection``."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    projection: np.ndarray  # (D, K)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features → (N, K)."""
        z = (x.numpy() - self.mean) / self.std
        return torch.from_numpy((z @ self.projection).astype(np.float32))


@dataclass(frozen=True)
class PublicFeatureSpace:
    """A fitted projection per modality plus where it came from (recorded in every run)."""

    extractors: Mapping[str, str]  # modality -> extractor name
    modalities: Mapping[str, ModalityProjection]
    provenance: Mapping[str, object]

    def dim(self, modality: str) -> int:
        """Output size of a modality's projection."""
        return int(self.modalities[modality].projection.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write the space as JSON (readable, diffable, shipped inside the Flower App); returns ``path``."""
        doc = {
            "format": FORMAT,
            "extractors": dict(self.extractors),
            "provenance": dict(self.provenance),
            "modalities": {
                name: {
                    "mean": [round(float(v), 6) for v in proj.mean],
                    "std": [round(float(v), 6) for v in proj.std],
                    "projection": [[round(float(v), 6) for v in row] for row in proj.projection],
                }
                for name, proj in self.modalities.items()
            },
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PublicFeatureSpace:
        """Read a space written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a public feature space.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"public feature space not found: {path} (make one with `emofed pretrain`)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            modalities = {}
            for name in MODALITY_NAMES:
                entry = doc["modalities"][name]
                mean = np.asarray(entry["mean"], dtype=np.float32)
                std = np.asarray(entry["std"], dtype=np.float32)
                projection = np.asarray(entry["projection"], dtype=np.float32)
                if mean.ndim != 1 or std.shape != mean.shape or projection.ndim != 2 or projection.shape[0] != mean.size:
                    raise ValueError(f"{name}: inconsistent shapes")
                if not (np.isfinite(projection).all() and (std > 0).all()):
                    raise ValueError(f"{name}: non-finite projection or non-positive std")
                modalities[name] = ModalityProjection(mean, std, projection)
            extractors, provenance = doc["extractors"], doc.get("provenance", {})
            if not isinstance(extractors, dict) or not isinstance(provenance, dict):
                raise ValueError("'extractors' and 'provenance' must be objects")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a public feature space ({err})") from None
        return cls(extractors, modalities, provenance)


def default_public_space() -> Path:
    """The packaged space ``emofed pretrain`` fitted on public synthetic people."""
    return PUBLIC_DIR / "synthetic.json"


@functools.lru_cache(maxsize=4)
def load_public_space(path: str) -> PublicFeatureSpace:
    """A space by path, read once per process."""
    return PublicFeatureSpace.load(path)


def public_space_path(config: FeaturesConfig) -> Path:
    """``model.features.public``, or the packaged default."""
    return Path(config.public) if config.public else default_public_space()


def check_public_space(cfg: EmofedConfig) -> None:
    """Refuse a run whose devices could be the public people its feature space was fitted on.

    Raises
    ------
    ConfigError
        If ``model.kind=features``, the data are synthetic and the space's public synthetic
        people share the run's seed (the devices would be those very people).
    FileNotFoundError, ValueError
        If the space file is missing or malformed.
    """
    if cfg.model.kind != "features":
        return
    space = load_public_space(str(public_space_path(cfg.model.features)))
    provenance = space.provenance
    if cfg.data.source == "synthetic" and provenance.get("source") == "synthetic" and provenance.get("seed") == cfg.seed:
        raise ConfigError(
            f"'seed': {cfg.seed} is the seed of the public synthetic people the feature space "
            f"'model.features.public' was fitted on; the devices would be those people. Choose another seed."
        )
    if cfg.data.source == "folder" and cfg.data.path:
        folder = Path(cfg.data.path).resolve()
        index = folder / "federation.json"
        digest = hashlib.sha256(index.read_bytes()).hexdigest()[:16] if index.is_file() else None
        if provenance.get("source") == "folder" and (
            provenance.get("path") == str(folder) or (digest and provenance.get("index_sha256") == digest)
        ):
            raise ConfigError(
                f"'model.features.public' was fitted on {folder}, the run's own device data; "
                "fit the public space on public data only"
            )
        if index.is_file() and provenance.get("source") == "synthetic":
            meta = json.loads(index.read_text(encoding="utf-8"))
            if meta.get("source") == "synthetic" and meta.get("seed") == provenance.get("seed"):
                raise ConfigError(
                    f"'data.path': {folder} holds the public synthetic people (seed {meta.get('seed')}) "
                    "the feature space was fitted on"
                )


def fit_public_space(
    features: Mapping[str, np.ndarray],
    present: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    extractors: Mapping[str, str],
    components: int,
    provenance: Mapping[str, object],
) -> PublicFeatureSpace:
    """Fit standardisation and an LDA projection per modality on *public* samples.

    LDA (Fisher 1936; the regularised form of Friedman 1989) keeps the ``components``
    directions that best separate the classes relative to their spread within a class:
    solve ``S_b v = λ (S_w + ridge·I) v`` in the standardised space by whitening with
    ``S_w``'s eigendecomposition. Projections are scaled to unit variance on the public data.

    Parameters
    ----------
    features : Mapping[str, np.ndarray]
        Raw features per modality, (N, D_m).
    present : Mapping[str, np.ndarray]
        Per modality, (N,) bool: which samples have that modality.
    labels : np.ndarray
        (N,) class ids.
    extractors : Mapping[str, str]
        Extractor names per modality, recorded in the space.
    components : int
        Output size per modality (at most ``classes − 1`` carry between-class variance).
    provenance : Mapping[str, object]
        What the space was fitted on, recorded in the space.

    Raises
    ------
    ValueError
        If a modality has fewer samples than two per class.
    """
    modalities: dict[str, ModalityProjection] = {}
    for name in MODALITY_NAMES:
        rows = np.asarray(present[name], dtype=bool)
        x = np.asarray(features[name], dtype=np.float64)[rows]
        y = np.asarray(labels)[rows]
        classes = np.unique(y)
        if len(classes) < 2 or len(x) < 2 * len(classes):
            raise ValueError(f"public data: {name} needs at least two samples of two classes; found {len(x)} samples")
        mean = x.mean(0)
        std = np.maximum(x.std(0), 1e-6)
        z = (x - mean) / std  # (N, D)
        within = np.zeros((z.shape[1], z.shape[1]))
        between = np.zeros_like(within)
        for c in classes:
            zc = z[y == c]
            centred = zc - zc.mean(0)
            within += centred.T @ centred
            between += len(zc) * np.outer(zc.mean(0), zc.mean(0))
        within /= len(z)
        between /= len(z)
        evals, evecs = np.linalg.eigh(within)
        evals = np.maximum(evals, 0.0) + _LDA_RIDGE * max(float(evals.max()), 1e-12)
        whiten = evecs / np.sqrt(evals)  # (D, D): S_w^{-1/2} up to rotation
        bvals, bvecs = np.linalg.eigh(whiten.T @ between @ whiten)
        # At most classes − 1 directions carry between-class variance; more would be noise.
        k = min(components, z.shape[1], len(classes) - 1)
        projection = whiten @ bvecs[:, ::-1][:, :k]  # (D, K), strongest directions first
        projection /= np.maximum((z @ projection).std(0), 1e-6)
        modalities[name] = ModalityProjection(mean.astype(np.float32), std.astype(np.float32), projection.astype(np.float32))
    return PublicFeatureSpace(dict(extractors), modalities, dict(provenance))


# -- extraction on the device ------------------------------------------------------------


class FeatureExtractor:
    """Preprocessed tensors → projected features, once per sample (the device's cache).

    Input: the preprocessor's dataset ``(face, voice, text_ids, text_mask, mask, label)``;
    output: ``(face (N, K_f), voice (N, K_v), text (N, K_t), empty (N, 0), mask, label)``,
    the order :class:`FeatureHeadsNet` and the training loop take. Absent modalities are
    zero rows and stay masked.

    Raises
    ------
    ValueError
        If an extractor name is unknown, or the public space was fitted with other extractors.
    FileNotFoundError
        If the public space file is missing.
    """

    def __init__(self, config: ModelConfig, *, fitted: bool = True) -> None:
        names = {"face": config.features.face, "voice": config.features.voice, "text": config.features.text}
        self.names = names
        self.face = _pick(FACE_FEATURES, names["face"], "model.features.face")(config)
        self.voice = _pick(VOICE_FEATURES, names["voice"], "model.features.voice")(config)
        self.text = _pick(TEXT_FEATURES, names["text"], "model.features.text")(config)
        self.space: PublicFeatureSpace | None = None
        if not fitted:  # `emofed pretrain`: raw features only
            return
        self.space = load_public_space(str(public_space_path(config.features)))
        if dict(self.space.extractors) != names:
            raise ValueError(
                f"'model.features.public': fitted with extractors {dict(self.space.extractors)}, "
                f"the run uses {names}; fit one with `emofed pretrain`"
            )
        dims = {"face": self.face.dim, "voice": self.voice.dim, "text": self.text.dim}
        fitted = {m: int(self.space.modalities[m].mean.size) for m in MODALITY_NAMES}
        if dims != fitted:
            raise ValueError(
                f"'model.features.public': fitted on feature sizes {fitted}, the run's settings "
                f"(model.face.image_size, model.voice.n_mels, model.text.encoder_path) give {dims}; "
                "fit one with `emofed pretrain` under the same settings"
            )

    def raw(self, dataset: TensorDataset) -> dict[str, torch.Tensor]:
        """Unprojected features per modality (what ``emofed pretrain`` fits on)."""
        face, voice, ids, attention = dataset.tensors[:4]
        return {"face": self.face(face), "voice": self.voice(voice), "text": self.text(ids, attention)}

    def __call__(self, dataset: TensorDataset) -> TensorDataset:
        """The projected features of ``dataset`` (see the class docstring)."""
        if self.space is None:
            raise RuntimeError("this extractor was built without a public space (fitted=False)")
        mask, label = dataset.tensors[4], dataset.tensors[5]
        raw = self.raw(dataset)
        projected = []
        for index, name in enumerate(MODALITY_NAMES):
            z = self.space.modalities[name](raw[name])  # (N, K)
            projected.append(torch.where(mask[:, index : index + 1] > 0, z, 0.0))
        empty = torch.zeros((len(label), 0))
        return TensorDataset(*projected, empty, mask, label)


# -- the private model --------------------------------------------------------------------


class LogitFusion(nn.Module):
    """Fused logits: a learned weight per modality on its logits, averaged over present ones, plus a class bias."""

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_modalities))
        self.bias = nn.Parameter(torch.zeros(NUM_CLASSES))

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, C) per-modality logits under a (B, 3) bool mask → (B, C)."""
        return torch.einsum("m,bmc->bc", self.weight, _mean_present(logits, mask)) + self.bias  # (B, C)


def _mean_present(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, 3, C) zeroed where absent and divided by the number present: (B, 3, C)."""
    present = mask.float()  # (B, 3)
    count = present.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return logits * (present / count).unsqueeze(-1)


@register_grad_sampler(LogitFusion)
def _fusion_grad_sample(
    layer: LogitFusion, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the fusion for Opacus (its functorch fallback passes one input only)."""
    scaled = _mean_present(activations[0], activations[1]).to(backprops.dtype)  # (B, 3, C)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = torch.einsum("bc,bmc->bm", backprops, scaled)  # (B, 3)
    if layer.bias.requires_grad:
        grads[layer.bias] = backprops  # (B, C)
    return grads


class FeatureHeadsNet(nn.Module):
    """Zero-initialised linear heads on fixed features, fused by :class:`LogitFusion`.

    Submodules ``face``, ``voice``, ``text`` (a linear classifier each) and ``head`` (the
    fusion: the personal layer by default). The interface is the CNN network's: ``forward``,
    ``embed`` (here the per-modality logits) and ``classify``, so training, evaluation and
    personal layers work on either.

    Parameters
    ----------
    dims : Sequence[int]
        Feature sizes of face, voice and text.
    """

    def __init__(self, dims: Sequence[int], labels: Sequence[str] | None = None) -> None:
        super().__init__()
        self.face, self.voice, self.text = (nn.Linear(d, NUM_CLASSES) for d in dims)
        # Logits of emotions outside the corpus's label set are fixed far below the others:
        # a 5-class corpus is scored over 5 classes (a buffer: never trained, never sent).
        allowed = torch.ones(NUM_CLASSES, dtype=torch.bool)
        if labels is not None:
            allowed = torch.tensor([e in set(labels) for e in EMOTIONS])
        self.register_buffer("allowed", allowed, persistent=False)
        for linear in (self.face, self.voice, self.text):
            nn.init.zeros_(linear.weight)  # DP-SGD starts from the uniform prediction, not noise
            nn.init.zeros_(linear.bias)
        self.head = LogitFusion(len(MODALITY_NAMES))

    def forward(
        self, face: torch.Tensor, voice: torch.Tensor, text: torch.Tensor, unused: torch.Tensor, modality_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused logits (B, C) and per-modality logits (B, 3, C), zeros where absent."""
        return self.classify(self.embed(face, voice, text, unused), modality_mask)

    def embed(self, face: torch.Tensor, voice: torch.Tensor, text: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        """Per-modality logits (B, 3, C) before masking."""
        return torch.stack([self.face(face), self.voice(voice), self.text(text)], dim=1)  # (B, 3, C)

    def classify(self, embeddings: torch.Tensor, modality_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused and per-modality logits from per-modality logits (B, 3, C) under a mask (B, 3)."""
        mask = modality_mask > 0  # (B, 3)
        per_modality = torch.where(mask.unsqueeze(-1), embeddings, 0.0)  # (B, 3, C)
        fused = self.head(per_modality, mask).masked_fill(~self.allowed, _OFF)  # (B, C)
        return fused, per_modality.masked_fill(~self.allowed, _OFF)


def build_feature_model(config: ModelConfig) -> FeatureHeadsNet:
    """The heads for the run's public feature space.

    Raises
    ------
    FileNotFoundError
        If the public space file is missing.
    """
    space = load_public_space(str(public_space_path(config.features)))
    return FeatureHeadsNet([space.dim(name) for name in MODALITY_NAMES], config.labels)

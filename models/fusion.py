"""The multimodal emotion network: face, voice and text encoders, fusion, classifier head."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from emofed.config import ModelConfig
from models.face import FaceCNN
from models.labels import NUM_CLASSES
from models.text import TextEncoder
from models.voice import VoiceCNN

__all__ = [
    "FACE_ENCODERS",
    "FUSIONS",
    "MODALITIES",
    "TEXT_ENCODERS",
    "VOICE_ENCODERS",
    "GatedFusion",
    "MeanFusion",
    "MultimodalEmotionNet",
    "build_model",
    "default_device",
    "emotion_loss",
]

logger = logging.getLogger(__name__)

# Column order of modality masks and of the per-modality logits.
MODALITIES: tuple[str, ...] = ("face", "voice", "text")

FACE_ENCODERS: dict[str, Callable[..., nn.Module]] = {"cnn": FaceCNN}
VOICE_ENCODERS: dict[str, Callable[..., nn.Module]] = {"cnn": VoiceCNN}
TEXT_ENCODERS: dict[str, Callable[..., nn.Module]] = {"transformer": TextEncoder}


class GatedFusion(nn.Module):
    """Weighted sum of the present modalities' embeddings, weights from learned gates.

    Each modality m has a gate ``s_m = w_m · e_m + b_m`` scoring its own embedding (how
    informative this face, this voice, this text looks); a softmax over the present
    modalities only turns the scores into weights. Absent modalities get weight exactly 0.

    Parameters
    ----------
    embed_dim : int
        Embedding size of every modality.
    num_modalities : int
        Number of modalities.
    """

    def __init__(self, embed_dim: int, num_modalities: int) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(embed_dim, 1) for _ in range(num_modalities))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fuse embeddings (B, M, E) under a bool mask (B, M) into (B, E); all-absent → 0."""
        scores = torch.cat(
            [gate(embeddings[:, index]) for index, gate in enumerate(self.gates)], dim=1
        )  # (B, M)
        # A finite floor rather than -inf: a row with every modality absent would be
        # all -inf and softmax would give NaN. exp(floor - s) underflows to exactly 0.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1) * mask  # (B, M)
        return (weights.unsqueeze(-1) * embeddings).sum(dim=1)  # (B, E)


class MeanFusion(nn.Module):
    """Plain average of the present modalities' embeddings (no parameters).

    Parameters
    ----------
    embed_dim : int
        Embedding size of every modality (unused; same signature as the other fusions).
    num_modalities : int
        Number of modalities (unused).
    """

    def __init__(self, embed_dim: int, num_modalities: int) -> None:
        super().__init__()

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fuse embeddings (B, M, E) under a bool mask (B, M) into (B, E); all-absent → 0."""
        weights = mask.to(embeddings.dtype)  # (B, M)
        total = (weights.unsqueeze(-1) * embeddings).sum(dim=1)  # (B, E)
        return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, E)


FUSIONS: dict[str, type[nn.Module]] = {"gated": GatedFusion, "mean": MeanFusion}


def _pick(
    registry: Mapping[str, Callable[..., nn.Module]], name: str, key: str
) -> Callable[..., nn.Module]:
    if name not in registry:
        raise ValueError(f"Unknown {key} {name!r}; known: {', '.join(registry)}.")
    return registry[name]


def _as_bool_mask(modality_mask: torch.Tensor, batch: int) -> torch.Tensor:
    if modality_mask.shape != (batch, len(MODALITIES)):
        raise ValueError(
            f"modality_mask must have shape ({batch}, {len(MODALITIES)}) "
            f"(columns {', '.join(MODALITIES)}), found {tuple(modality_mask.shape)}."
        )
    if modality_mask.dtype == torch.bool:
        return modality_mask
    return modality_mask > 0.5


def default_device() -> torch.device:
    """Return CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MultimodalEmotionNet(nn.Module):
    """Face, voice and text encoders, a fusion of their embeddings, and a classifier head.

    Submodules: ``face``, ``voice``, ``text`` (encoders to ``embed_dim``),
    ``aux_heads`` (one linear classifier per modality, for the auxiliary loss and for
    single-modality predictions), ``fusion`` (from :data:`FUSIONS`) and ``head`` (the
    fused classifier, a distinct module so that it can stay on the device as a personal
    layer).

    Missing or unusable modalities are given as zeros and switched off by the modality
    mask: they contribute nothing to the fused output. A row whose mask is all zero
    returns ``head``'s bias as fused logits (the class prior the head has learned), and
    zeros as its per-modality logits; it never produces NaN.

    During training, ``config.fusion.modality_dropout`` hides each present modality from
    the fusion with that probability, never all present modalities of a row, so the
    network learns to predict from any subset (a device without camera or microphone).

    Parameters
    ----------
    config : ModelConfig
        Embedding size, dropout, each branch's configuration and the fusion.

    Raises
    ------
    ValueError
        If the fusion kind, an encoder kind or a text mode is unknown (the message lists
        the known ones), or a size or probability is out of range.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, found {config.embed_dim}.")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), found {config.dropout}.")
        if not 0.0 <= config.fusion.modality_dropout < 1.0:
            raise ValueError(
                "fusion.modality_dropout must lie in [0, 1), "
                f"found {config.fusion.modality_dropout}."
            )
        self.config = config
        embed, dropout = config.embed_dim, config.dropout
        # Encoder kinds are read with getattr so configs without a ``kind`` field build
        # the default encoder.
        face_kind = getattr(config.face, "kind", "cnn")
        voice_kind = getattr(config.voice, "kind", "cnn")
        text_kind = getattr(config.text, "kind", "transformer")
        self.face = _pick(FACE_ENCODERS, face_kind, "face.kind")(config.face, embed, dropout)
        self.voice = _pick(VOICE_ENCODERS, voice_kind, "voice.kind")(config.voice, embed, dropout)
        self.text = _pick(TEXT_ENCODERS, text_kind, "text.kind")(config.text, embed, dropout)
        self.aux_heads = nn.ModuleList(nn.Linear(embed, NUM_CLASSES) for _ in MODALITIES)
        self.fusion = _pick(FUSIONS, config.fusion.kind, "fusion.kind")(embed, len(MODALITIES))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed, NUM_CLASSES)
        self.modality_dropout = config.fusion.modality_dropout

    def forward(
        self,
        face: torch.Tensor,
        voice: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        modality_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify a batch.

        Parameters
        ----------
        face : torch.Tensor
            (B, 1, S, S) preprocessed faces (zeros where absent).
        voice : torch.Tensor
            (B, 1, n_mels, frames) scaled log-mels (zeros where absent).
        text_ids : torch.Tensor
            (B, L) token ids (zeros where absent).
        text_mask : torch.Tensor
            (B, L) attention mask (zeros where absent).
        modality_mask : torch.Tensor
            (B, 3) bool or float, columns face, voice, text; true/1 where present.

        Returns
        -------
        fused_logits : torch.Tensor
            (B, 7) class scores from the fused embedding.
        modality_logits : torch.Tensor
            (B, 3, 7) class scores of each modality alone; zeros where absent.

        Raises
        ------
        ValueError
            If the batch sizes disagree or ``modality_mask`` is not (B, 3).
        """
        embeddings = self.embed(face, voice, text_ids, text_mask)  # (B, 3, E)
        return self.classify(embeddings, modality_mask)

    def embed(
        self,
        face: torch.Tensor,
        voice: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Per-modality embeddings (B, 3, E) of a batch, before any masking.

        Raises
        ------
        ValueError
            If the batch sizes disagree.
        """
        batch = face.shape[0]
        sizes = {t.shape[0] for t in (face, voice, text_ids, text_mask)}
        if sizes != {batch}:
            raise ValueError(f"All inputs must share one batch size, found sizes {sorted(sizes)}.")
        return torch.stack(
            [self.face(face), self.voice(voice), self.text(text_ids, text_mask)], dim=1
        )  # (B, 3, E)

    def classify(
        self, embeddings: torch.Tensor, modality_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused and per-modality logits from embeddings (B, 3, E) under a mask (B, 3).

        Evaluating one batch under several masks (each modality alone, all together)
        needs :meth:`embed` once and this once per mask.

        Raises
        ------
        ValueError
            If ``modality_mask`` is not (B, 3).
        """
        mask = _as_bool_mask(modality_mask, embeddings.shape[0])  # (B, 3)
        # torch.where, not a product: whatever an absent input yields, nothing of it
        # (not even a NaN) reaches the outputs or the gradients of the shared layers.
        present = mask.unsqueeze(-1)  # (B, 3, 1)
        embeddings = torch.where(present, embeddings, 0.0)
        modality_logits = torch.stack(
            [head(embeddings[:, index]) for index, head in enumerate(self.aux_heads)], dim=1
        )  # (B, 3, C)
        modality_logits = torch.where(present, modality_logits, 0.0)
        fusion_mask = mask
        if self.training and self.modality_dropout > 0.0:
            fusion_mask = self._drop_modalities(mask)
        fused = self.fusion(embeddings, fusion_mask)  # (B, E)
        return self.head(self.dropout(fused)), modality_logits  # (B, C), (B, 3, C)

    def _drop_modalities(self, mask: torch.Tensor) -> torch.Tensor:
        """Hide each present modality with probability p, keeping one per non-empty row."""
        noise = torch.rand(mask.shape, device=mask.device)  # (B, 3)
        kept = mask & (noise >= self.modality_dropout)
        emptied = mask.any(dim=1) & ~kept.any(dim=1)  # (B,)
        # Rows that lost every modality get back one present modality, chosen uniformly
        # (the largest noise among present ones).
        choice = noise.masked_fill(~mask, -1.0).argmax(dim=1)  # (B,)
        rescued = F.one_hot(choice, mask.shape[1]).bool() & emptied.unsqueeze(1)
        return kept | rescued  # (B, 3)


def emotion_loss(
    fused_logits: torch.Tensor,
    modality_logits: torch.Tensor,
    modality_mask: torch.Tensor,
    labels: torch.Tensor,
    aux_weight: float,
) -> torch.Tensor:
    """Cross-entropy of the fused logits plus weighted per-modality cross-entropies.

    Per sample i: ``CE(fused_i) + aux_weight * mean over present m of CE(modality_im)``;
    the loss is the batch mean of that. Each sample's term depends on that sample only,
    which is what DP-SGD needs: with Opacus's default ``loss_reduction="mean"`` the
    per-sample gradients it recovers are exactly those of the per-sample terms.

    Parameters
    ----------
    fused_logits : torch.Tensor
        (B, C) fused class scores.
    modality_logits : torch.Tensor
        (B, M, C) per-modality class scores.
    modality_mask : torch.Tensor
        (B, M) bool or float; absent modalities add no auxiliary loss.
    labels : torch.Tensor
        (B,) class ids.
    aux_weight : float
        Weight of the auxiliary term (``config.fusion.aux_weight``).

    Returns
    -------
    torch.Tensor
        Scalar loss; 0 (still attached to the graph) for an empty batch.

    Raises
    ------
    ValueError
        If the shapes disagree or ``aux_weight`` is negative.
    """
    if aux_weight < 0:
        raise ValueError(f"aux_weight must be >= 0, found {aux_weight}.")
    batch, num_classes = fused_logits.shape
    if (
        modality_logits.ndim != 3
        or modality_logits.shape[::2] != (batch, num_classes)
        or labels.shape != (batch,)
    ):
        raise ValueError(
            f"Expected modality_logits (B, M, {num_classes}) and labels ({batch},), found "
            f"{tuple(modality_logits.shape)} and {tuple(labels.shape)}."
        )
    num_modalities = modality_logits.shape[1]
    if modality_mask.shape != (batch, num_modalities):
        raise ValueError(
            f"modality_mask must have shape ({batch}, {num_modalities}), "
            f"found {tuple(modality_mask.shape)}."
        )
    if batch == 0:
        # Poisson sampling can draw an empty batch; a zero loss keeps the step valid.
        return fused_logits.sum() + modality_logits.sum()
    labels = labels.long()
    present = (modality_mask if modality_mask.dtype == torch.bool else modality_mask > 0.5).to(
        fused_logits.dtype
    )  # (B, M)
    fused = F.cross_entropy(fused_logits, labels, reduction="none")  # (B,)
    per_modality = F.cross_entropy(
        modality_logits.reshape(batch * num_modalities, num_classes),
        labels.repeat_interleave(num_modalities),
        reduction="none",
    ).view(batch, num_modalities)  # (B, M)
    aux = (per_modality * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)  # (B,)
    return (fused + aux_weight * aux).mean()


def build_model(
    config: ModelConfig, *, device: torch.device | str | None = None
) -> nn.Module:
    """Build the network of ``config`` on ``device``: feature heads or the end-to-end CNNs.

    Parameters
    ----------
    config : ModelConfig
        The network's configuration.
    device : torch.device or str, optional
        Where to put it; default :func:`default_device` (CUDA when available).

    Returns
    -------
    nn.Module
        :class:`models.features.FeatureHeadsNet` (``model.kind=features``) or
        :class:`MultimodalEmotionNet` (``cnn``), in training mode.

    Raises
    ------
    ValueError
        If a kind or mode in ``config`` is unknown, or a value is out of range.
    """
    model: nn.Module
    if getattr(config, "kind", "cnn") == "features":
        from models.features import build_feature_model

        model = build_feature_model(config)
    else:
        model = MultimodalEmotionNet(config)
    return model.to(default_device() if device is None else torch.device(device))

"""Local training and evaluation loops of a device."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import DPSGDSettings, private_training
from emofed.config import RuntimeConfig, TrainConfig
from models import MODALITIES, NUM_CLASSES, emotion_loss

logger = logging.getLogger(__name__)


def select_device(runtime: RuntimeConfig) -> torch.device:
    """The torch device to use: CUDA when present and allowed, else CPU.

    Raises
    ------
    ValueError
        If CUDA is demanded but not available.
    """
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device=cuda but CUDA is not available on this machine")
    if runtime.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The local optimizer named in the training config."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class TrainResult:
    """Mean training loss over the local steps, examples seen and steps taken."""

    loss: float
    num_examples: int
    steps: int


def train_local(
    model: nn.Module,
    data: TensorDataset,
    *,
    cfg: TrainConfig,
    aux_weight: float,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    dp: DPSGDSettings | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs on one device's data.

    With ``proximal_mu`` > 0 the FedProx term (mu/2)·||w − w_global||² is added
    (Li et al., 2020, "Federated Optimization in Heterogeneous Networks", eq. 2).

    With ``dp``, every step is a DP-SGD step (:func:`client.dp.private_training`):
    Poisson-sampled batches, per-sample clipping to ``dp.max_grad_norm`` and Gaussian
    noise; ``cfg.max_grad_norm`` does not apply. Opacus replaces each gradient with the
    privatised sum of per-sample gradients, which would drop the proximal term, so its
    gradient mu·(w − w_global) is added after privatisation: it does not depend on the
    data, so it costs no privacy.

    Raises
    ------
    FloatingPointError
        If the training loss is not finite.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = make_optimizer(params, cfg)
    # Dropout and modality dropout draw from the global RNG, whose state would otherwise
    # depend on which devices this (simulation) process happened to serve before.
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=generator)

    if dp is None:

        def step(loss: torch.Tensor) -> None:
            objective = loss
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                objective = loss + 0.5 * proximal_mu * prox
            objective.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()

        return _train_epochs(model, loader, optimizer, step, cfg.local_epochs, aux_weight, device)

    with private_training(model, optimizer, loader, settings=dp, seed=seed) as (
        private_model,
        private_optimizer,
        private_loader,
    ):

        def private_step(loss: torch.Tensor) -> None:
            loss.backward()
            if not private_optimizer.pre_step():  # clip, noise, scale into p.grad
                return
            if anchor:
                with torch.no_grad():
                    for p, a in zip(params, anchor, strict=True):
                        p.grad.add_(p - a, alpha=proximal_mu)
            private_optimizer.original_optimizer.step()

        return _train_epochs(
            private_model,
            private_loader,
            private_optimizer,
            private_step,
            cfg.local_epochs,
            aux_weight,
            device,
        )


def _train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    step: Callable[[torch.Tensor], None],
    epochs: int,
    aux_weight: float,
    device: torch.device,
) -> TrainResult:
    total_loss, total_n, steps = 0.0, 0, 0
    for _ in range(epochs):
        for face, voice, ids, attn, mask, label in loader:
            face, voice, ids, attn, mask, label = (
                t.to(device) for t in (face, voice, ids, attn, mask, label)
            )
            optimizer.zero_grad(set_to_none=True)
            fused, per_modality = model(face, voice, ids, attn, mask)  # (B, 7), (B, 3, 7)
            loss = emotion_loss(fused, per_modality, mask, label, aux_weight)
            step(loss)
            total_loss += float(loss.detach()) * len(label)
            total_n += len(label)
            steps += 1  # under DP an empty Poisson batch is a step too (it was accounted)
    if not np.isfinite(total_loss):
        raise FloatingPointError("local training diverged (non-finite loss)")
    return TrainResult(total_loss / max(total_n, 1), total_n, steps)


@dataclass(frozen=True)
class EvalResult:
    """Loss, confusion counts (rows: truth) and single-modality correct/total counts."""

    loss: float
    num_examples: int
    confusion: np.ndarray
    modality_correct: Mapping[str, int]
    modality_total: Mapping[str, int]

    @property
    def accuracy(self) -> float:
        """Share of correct fused predictions (NaN without samples)."""
        total = int(self.confusion.sum())
        return float(np.trace(self.confusion) / total) if total else float("nan")


@torch.no_grad()
def evaluate_local(
    model: nn.Module, data: TensorDataset, *, batch_size: int, device: torch.device
) -> EvalResult:
    """Evaluate fused predictions, and each modality alone where the sample has it."""
    model.to(device).eval()
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    correct = dict.fromkeys(MODALITIES, 0)
    total = dict.fromkeys(MODALITIES, 0)
    loss_sum, n = 0.0, 0
    for face, voice, ids, attn, mask, label in DataLoader(data, batch_size=batch_size):
        face, voice, ids, attn, mask, label = (t.to(device) for t in (face, voice, ids, attn, mask, label))
        embeddings = model.embed(face, voice, ids, attn)  # (B, 3, E), once for all masks
        fused, _ = model.classify(embeddings, mask)  # (B, 7)
        loss_sum += float(nn.functional.cross_entropy(fused, label, reduction="sum"))
        n += len(label)
        pred = fused.argmax(dim=1)
        np.add.at(confusion, (label.cpu().numpy(), pred.cpu().numpy()), 1)
        for index, modality in enumerate(MODALITIES):
            has = mask[:, index] > 0  # (B,)
            if not bool(has.any()):
                continue
            only = torch.zeros_like(mask[has])
            only[:, index] = 1
            # The fused path with one modality: what a device with only this sensor gets.
            single, _ = model.classify(embeddings[has], only)
            correct[modality] += int((single.argmax(dim=1) == label[has]).sum())
            total[modality] += int(has.sum())
    return EvalResult(loss_sum / max(n, 1), n, confusion, correct, total)

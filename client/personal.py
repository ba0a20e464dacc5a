"""Personal layers: a device's own version of some modules, fine-tuned locally, never sent.

The global model (every trainable weight) is what the federation trains and what the
server sends. A device also keeps its own version of the modules named in
``personal.layers`` (by default the fused classifier ``head``): initialised from the
global version the first time, then fine-tuned at every evaluation on the device's
training split with the shared layers frozen, and kept in the device's encrypted store
(:mod:`device.store`) between rounds. The device's personalised model is the global
model with those modules replaced by its own.

The fine-tuning objective is Ditto's (Li, Hu, Beirami & Smith, 2021, "Ditto: Fair and
Robust Federated Learning Through Personalization", eq. 2) restricted to the personal
modules: the device's emotion loss plus ``(prox/2)·||v − w||²`` pulling the personal
weights ``v`` towards the current global ones ``w``. It warm-starts from the stored
version, so the personal layers follow the global model round after round.

Nothing here enters a training reply: the train handler never loads personal layers,
fine-tuning restores the global weights it swapped out (even on error), and the
device's outgoing guard refuses any reply array equal to a stored personal array
(:func:`personal_arrays_in`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from client.dp import DeviceStore
from client.train import evaluate_local
from device.layout import has_store
from device.personal import load_personal, personal_keys, save_personal
from device.store import EncryptedStore
from emofed.config import PersonalConfig
from models import emotion_loss, get_state, set_state

logger = logging.getLogger(__name__)

__all__ = [
    "FineTuneResult",
    "existing_device_store",
    "fine_tune",
    "load_personal",
    "personal_arrays_in",
    "personal_keys",
    "personalise",
    "save_personal",
    "swapped",
]


# -- the device's store -------------------------------------------------------------------


def existing_device_store(context: Context) -> EncryptedStore | None:
    """The device's encrypted store if it has one (never creates it), else None.

    The store is ``<device folder>/store`` (:mod:`device.layout`): the node config's
    ``device-dir`` when deployed, so personal layers survive from one run to the next,
    and ``<device-root>/<id>`` when simulated (:meth:`client.dp.DeviceStore.from_context`).
    ``DeviceStore.from_context(context).open_store()`` opens it, creating it the first time.

    Raises
    ------
    device.store.StoreError, OSError
        If the store exists but cannot be opened.
    """
    device = DeviceStore.from_context(context)
    if not has_store(device.folder):
        return None
    return device.open_store(create=False)


def personal_arrays_in(
    content: RecordDict, personal: Mapping[str, np.ndarray], received: RecordDict | None = None
) -> list[str]:
    """Names of the reply arrays whose values equal one of the personal arrays.

    The global version of a personal module has the same name and shape as the personal
    one, so only the values tell them apart: a reply carrying the personal version (for
    instance a model left with its personal weights swapped in) matches exactly. A reply
    array equal to the array of the same name in ``received`` (what the server sent)
    carries nothing the server does not have, and is not counted: weights that get no
    gradient (an auxiliary head of a modality the device lacks) come back unchanged and
    equal to a personal copy that fine-tuning could not move either.
    """
    sent: dict[str, np.ndarray] = {}
    for record in (received.array_records.values() if received is not None else ()):
        for key, array in record.items():
            try:
                sent[key] = array.numpy()
            except Exception:  # noqa: BLE001 - undecodable arrays are the base guard's concern
                continue
    found = []
    for record in content.array_records.values():
        for key, array in record.items():
            try:
                value = array.numpy()
            except Exception:  # noqa: BLE001 - undecodable arrays are the base guard's concern
                continue
            if key in sent and sent[key].shape == value.shape and np.array_equal(sent[key], value):
                continue
            if any(
                value.shape == p.shape and value.dtype == p.dtype and np.array_equal(value, p)
                for p in personal.values()
            ):
                found.append(key)
    return found


# -- fine-tuning -------------------------------------------------------------------------


@contextmanager
def swapped(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> Iterator[nn.Module]:
    """Load ``arrays`` into ``model`` for the ``with`` block, then put the old values back.

    The old values come back even if the block raises, so a model shared by the devices
    of a process never keeps one device's personal weights.
    """
    keys = list(arrays)
    saved = get_state(model, keys)
    set_state(model, arrays, keys=keys)
    try:
        yield model
    finally:
        set_state(model, saved, keys=keys)


@dataclass(frozen=True)
class FineTuneResult:
    """The fine-tuned personal arrays, the mean loss of the last epoch and the steps taken."""

    arrays: dict[str, np.ndarray]
    loss: float
    steps: int


@torch.no_grad()
def _embeddings(
    model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.eval()
    chunks, masks, labels = [], [], []
    face, voice, ids, attn, mask, label = data.tensors
    for start in range(0, len(label), batch_size):
        part = slice(start, start + batch_size)
        chunks.append(
            model.embed(face[part].to(device), voice[part].to(device), ids[part].to(device), attn[part].to(device))
        )  # (B, 3, E)
        masks.append(mask[part].to(device))
        labels.append(label[part].to(device))
    return torch.cat(chunks), torch.cat(masks), torch.cat(labels)  # (N, 3, E), (N, 3), (N,)


def fine_tune(
    model: nn.Module,
    data: TensorDataset,
    start: Mapping[str, np.ndarray],
    *,
    cfg: PersonalConfig,
    batch_size: int,
    aux_weight: float,
    device: torch.device,
    seed: int,
) -> FineTuneResult:
    """Fine-tune personal layers on one device's data, the rest of ``model`` frozen.

    ``model`` holds the global weights and holds them again on return; ``start`` (the
    stored personal layers, or the global ones the first time) is where the personal
    weights begin. The shared layers only produce embeddings (computed once, in eval
    mode): no gradient reaches them.

    Parameters
    ----------
    model : nn.Module
        The global network (:class:`models.MultimodalEmotionNet`).
    data : TensorDataset
        The device's training split.
    start : Mapping[str, np.ndarray]
        Personal weights to start from, keyed by parameter name.
    cfg : PersonalConfig
        Epochs, learning rate and proximal weight.
    batch_size : int
        Mini-batch size.
    aux_weight : float
        Weight of the per-modality auxiliary loss (``model.fusion.aux_weight``).
    device : torch.device
        Where to compute.
    seed : int
        Seeds shuffling, dropout and modality dropout.

    Returns
    -------
    FineTuneResult
        The new personal arrays (``start`` unchanged when there is no training data).

    Raises
    ------
    ValueError
        If ``start`` names weights the model does not have.
    FloatingPointError
        If the loss is not finite.
    """
    keys = list(start)
    if len(data) == 0:
        return FineTuneResult({k: np.array(v, copy=True) for k, v in start.items()}, float("nan"), 0)
    model.to(device)
    anchor = {k: torch.from_numpy(v).to(device) for k, v in get_state(model, keys).items()}
    embeddings, mask, label = _embeddings(model, data, max(batch_size, 64), device)
    torch.manual_seed(seed)  # dropout and modality dropout draw from the global RNG
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    steps = 0
    with swapped(model, start):
        named = dict(model.named_parameters())
        params = [named[k] for k in keys]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        model.train()
        for _ in range(cfg.epochs):
            losses = []
            order = torch.randperm(len(label), generator=generator).to(device)
            for batch in order.split(batch_size):
                fused, per_modality = model.classify(embeddings[batch], mask[batch])  # (B, 7), (B, 3, 7)
                loss = emotion_loss(fused, per_modality, mask[batch], label[batch], aux_weight)
                if cfg.prox > 0:
                    prox = sum(((named[k] - anchor[k]) ** 2).sum() for k in keys)
                    loss = loss + 0.5 * cfg.prox * prox
                # Gradients of the personal weights only: nothing lands in a shared .grad.
                grads = torch.autograd.grad(loss, params)
                for param, grad in zip(params, grads, strict=True):
                    param.grad = grad
                optimizer.step()
                losses.append(float(loss.detach()))
                steps += 1
        for param in params:
            param.grad = None
        tuned = get_state(model, keys)
    mean = float(np.mean(losses))
    if not np.isfinite(mean):
        raise FloatingPointError("fine-tuning the personal layers diverged (non-finite loss)")
    return FineTuneResult(tuned, mean, steps)


def personalise(
    model: nn.Module,
    train: TensorDataset,
    test: TensorDataset,
    store: EncryptedStore,
    *,
    cfg: PersonalConfig,
    batch_size: int,
    aux_weight: float,
    device: torch.device,
    seed: int,
) -> float:
    """Fine-tune, save, and evaluate this device's personal layers on top of ``model``.

    Returns
    -------
    float
        The personalised model's accuracy on ``test`` (NaN for an empty split).

    Personal layers stored under another ``personal.layers`` (an earlier run) are
    replaced, with a warning, by a fresh start from the global model.

    Raises
    ------
    device.store.StoreTampered
        If the stored layers fail authentication.
    """
    keys = personal_keys(model, cfg.layers)
    try:
        stored = load_personal(store, keys)
    except ValueError as err:
        # personal.layers changed since the last run: they are re-derived from local data.
        logger.warning("Starting personal layers again from the global model: %s", err)
        stored = None
    start = stored if stored is not None else get_state(model, keys)
    result = fine_tune(
        model, train, start, cfg=cfg, batch_size=batch_size, aux_weight=aux_weight, device=device, seed=seed
    )
    save_personal(store, result.arrays)
    with swapped(model, result.arrays):
        evaluation = evaluate_local(model, test, batch_size=max(batch_size, 64), device=device)
    logger.debug(
        "Personal layers %s: %d steps, loss %.4f, accuracy %.3f",
        ",".join(cfg.layers), result.steps, result.loss, evaluation.accuracy,
    )
    return evaluation.accuracy

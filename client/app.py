"""The Flower ClientApp: what a device does when the coordinator asks it to train or evaluate.

Everything the device sends is built here: the shared-weight arrays the server sent
(updated) and numeric metrics. Raw samples and features never leave this module.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import FederationFolderError, UnusableDeviceData, load_device_data
from client.train import evaluate_local, select_device, train_local
from emofed.config import MESSAGE_CONFIG_KEY, ConfigError, EmofedConfig, fingerprint, from_json
from models import MultimodalEmotionNet, build_model, get_state, set_state

logger = logging.getLogger(__name__)

# Flower's error codes below 1000 are its own; ours say why a device declined.
ERROR_UNUSABLE_DATA = 1001
ERROR_BAD_REQUEST = 1002
ERROR_TRAINING_FAILED = 1003

app = ClientApp()

_MODELS: dict[str, MultimodalEmotionNet] = {}


def _config(msg: Message) -> EmofedConfig:
    try:
        record = msg.content["config"]
        text = record[MESSAGE_CONFIG_KEY]
    except KeyError:
        raise ConfigError(f"message carries no '{MESSAGE_CONFIG_KEY}' in its config record") from None
    if not isinstance(text, str):
        raise ConfigError(f"'{MESSAGE_CONFIG_KEY}' must be a JSON string")
    return from_json(text)


def _model(cfg: EmofedConfig, arrays: ArrayRecord) -> MultimodalEmotionNet:
    # One network per process and model config: building the text encoder is the slow part.
    key = fingerprint(cfg.model)
    if key not in _MODELS:
        torch.manual_seed(cfg.seed)
        _MODELS[key] = build_model(cfg.model)
    model = _MODELS[key]
    set_state(model, {k: a.numpy() for k, a in arrays.items()})
    return model


def _seed(cfg: EmofedConfig, msg: Message, context: Context) -> int:
    server_round = int(msg.content["config"].get("server-round", 0))
    node = str(context.node_config.get("partition-id", context.node_id))
    return zlib.crc32(f"{cfg.seed}:{server_round}:{node}".encode())


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    logger.warning("Declining %s request: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _handle(msg: Message, context: Context, *, train: bool) -> Message:
    try:
        cfg = _config(msg)
        torch.set_num_threads(cfg.runtime.threads)
        data = load_device_data(cfg, context.node_config)
        if "arrays" not in msg.content.array_records:
            raise ConfigError("message carries no 'arrays' record")
        arrays = msg.content["arrays"]
        model = _model(cfg, arrays)
        device = select_device(cfg.runtime)
        if train:
            metrics = _train(cfg, msg, context, model, data.train, device)
            updated = get_state(model, list(arrays.keys()))
            record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in updated.items()})
            return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)
        metrics = _evaluate(cfg, model, data.test, device)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    except (UnusableDeviceData, FederationFolderError) as err:
        return _error_reply(msg, ERROR_UNUSABLE_DATA, f"unusable device data: {err}")
    except (ConfigError, ValueError, KeyError, TypeError) as err:
        return _error_reply(msg, ERROR_BAD_REQUEST, f"{type(err).__name__}: {err}")
    except FloatingPointError as err:
        return _error_reply(msg, ERROR_TRAINING_FAILED, str(err))


def _train(
    cfg: EmofedConfig, msg: Message, context: Context, model: MultimodalEmotionNet, data: Any, device: torch.device
) -> dict[str, Any]:
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_local(
        model,
        data,
        cfg=cfg.train,
        aux_weight=cfg.model.fusion.aux_weight,
        device=device,
        seed=_seed(cfg, msg, context),
        proximal_mu=proximal_mu,
    )
    return {"num-examples": len(data), "train-loss": result.loss, "steps": result.steps}


def _evaluate(cfg: EmofedConfig, model: MultimodalEmotionNet, data: Any, device: torch.device) -> dict[str, Any]:
    result = evaluate_local(model, data, batch_size=max(cfg.train.batch_size, 64), device=device)
    metrics: dict[str, Any] = {
        "num-examples": result.num_examples,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "confusion": [int(c) for c in result.confusion.reshape(-1)],
    }
    # Every key always (zeros for a missing sensor): the server accepts one key set.
    for modality, total in result.modality_total.items():
        metrics[f"{modality}-correct"] = int(result.modality_correct[modality])
        metrics[f"{modality}-total"] = int(total)
    return metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the shared layers on this device's training split."""
    return _handle(msg, context, train=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this device's test split."""
    return _handle(msg, context, train=False)

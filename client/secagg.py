"""The device's side of secure aggregation: Flower's ``secaggplus_mod``, fed our update.

Flower's mod runs the SecAgg+ stages (key pairs, Shamir shares of the mask seeds,
masking, unmasking shares) and masks whatever legacy ``FitRes`` the app below it returns.
This mod adapts the ClientApp's reply to that: in the masking stage it runs the app (and
the outgoing guard inside it), turns the guarded reply into the vector to mask, and lets
Flower's mod mask it and drop every array, so no update leaves the device unmasked.

The vector is the update ``Δ = w_local − w_global`` in the order of the global model's
arrays; under user-level DP (the message carries a ``clipping-norm`` C) the device's
``update-clipped`` bit travels as one more coordinate, ``C·b``, instead of in the clear,
and the weight is 1; otherwise the weight is ``num-examples`` (at most ``max_weight``).

A device that declines or fails answers with its error reply; the coordinator counts it
as dropped and reconstructs its masks from its neighbours' shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from emofed.protocol import ARRAYS_KEY, CLIPPING_NORM_KEY, CONFIG_KEY, METRICS_KEY, UPDATE_CLIPPED_KEY

logger = logging.getLogger(__name__)



class _Declined(Exception):
    """The app answered the masking stage with an error reply."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def update_vector(request: RecordDict, reply: RecordDict) -> tuple[list[np.ndarray], float, MetricRecord]:
    """The vector a device masks, its weight, and the metrics it still sends in the clear.

    Raises
    ------
    ValueError
        If the reply's arrays do not match the request's.
    """
    sent = request[ARRAYS_KEY]
    got = reply[ARRAYS_KEY]
    if list(sent) != list(got):
        raise ValueError("the reply's array keys differ from the global model's")
    vector = [
        got[k].numpy().astype(np.float64) - sent[k].numpy().astype(np.float64) for k in sent
    ]
    metrics = MetricRecord(dict(reply[METRICS_KEY]))
    config = request[CONFIG_KEY]
    if CLIPPING_NORM_KEY in config:
        norm = float(config[CLIPPING_NORM_KEY])  # type: ignore[arg-type]
        clipped = float(metrics.pop(UPDATE_CLIPPED_KEY))  # type: ignore[arg-type]
        vector.append(np.array([norm * clipped]))
        return vector, 1.0, metrics
    return vector, float(metrics["num-examples"]), metrics  # type: ignore[arg-type]


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Answer SecAgg+ stages with Flower's mod; pass every other message through."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
        return secaggplus_mod(msg, ctxt, call_next)

    # Flower's mod scales by weight / max_weight; the device caps its weight there.
    saved = ctxt.state.config_records.get(RECORD_KEY_STATE)
    max_weight = float(saved.get("max_weight", 1.0)) if saved is not None else 1.0  # type: ignore[arg-type]

    def masked_app(inner: Message, inner_ctxt: Context) -> Message:
        reply = call_next(inner, inner_ctxt)
        if reply.has_error():
            raise _Declined(reply)
        vector, weight, metrics = update_vector(inner.content, reply.content)
        content = compat.fitres_to_recorddict(
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(vector),
                num_examples=int(min(weight, max_weight)),
                metrics={},
            ),
            keep_input=False,
        )
        content[METRICS_KEY] = metrics
        for name, record in reply.content.config_records.items():
            content[name] = record
        return Message(content, reply_to=inner)

    try:
        return secaggplus_mod(msg, ctxt, masked_app)
    except _Declined as declined:
        # Flower's mod saves its state only after a stage succeeds; the next round's
        # setup stage restarts the protocol from whatever stage was saved.
        return declined.reply

"""Secure aggregation of training replies with Flower's SecAgg+ (Bell et al., CCS 2020).

The cryptography is Flower's: this module drives the four stages of
``flwr.server.workflow.SecAggPlusWorkflow`` (setup, share keys, collect masked vectors,
unmask) for the training messages a new-style strategy built, and hands the strategy
the unmasked *sum* instead of per-device arrays. Devices answer with
``client.secagg.secure_aggregation_mod``, which wraps Flower's ``secaggplus_mod``.

:class:`SecureAggregationGrid` wraps the run's ``Grid``: evaluation and every other
message pass through untouched; a batch of training messages becomes one SecAgg+
protocol run. What each device sends in the clear with its masked vector (metrics and,
under device-level DP, its signed ledger) is screened before unmasking; a reply that
fails the screen is treated exactly like a device that dropped out after sharing its
keys, so its masked vector never enters the sum.

The vector each device masks is its update ``Δ = w_local − w_global`` (not its weights:
updates are small, so quantisation in ``[-r, r]`` loses little), multiplied by its
weight ``w`` (``num-examples`` for FedAvg, 1 under user-level DP, where the sum is then
divided by the number *sampled*, a fixed denominator). Under user-level DP the device
appends ``C·b`` (``b`` = 1 when its update was clipped) so that the clipped count needed
by adaptive clipping is also only seen as a sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.serverapp import Grid

from emofed.config import SecAggConfig
from emofed.protocol import SERVER_ROUND_KEY
from server.grids import DelegatingGrid

logger = logging.getLogger(__name__)

# Flower's SecAggPlusWorkflow stages, in order.
STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


@dataclass
class SecureSum:
    """The outcome of one SecAgg+ run: the weighted mean of the masked vectors, or why not.

    ``mean`` is ``Σ w_i x_i / Σ w_i`` over the ``contributors`` whose masked vectors were
    summed (the weighted sum is ``mean · Σ w_i``); ``None`` when the protocol halted.
    """

    server_round: int
    sampled: int
    contributors: list[int] = field(default_factory=list)
    mean: list[np.ndarray] | None = None
    halted_at: str | None = None
    dropped: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the protocol completed and the mean is known."""
        return self.mean is not None


class _Proxy:
    """What the workflow needs of a legacy ``ClientProxy``: the node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _StrategyShim:
    """The two legacy-strategy calls SecAggPlusWorkflow makes, answered for one round.

    ``configure_fit`` names the nodes the new-style strategy already sampled (their real
    training content replaces the empty ``FitIns`` after setup); ``aggregate_fit``
    receives the unmasked aggregate and keeps it.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.aggregate: list[np.ndarray] | None = None
        self.contributors = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[_Proxy, FitIns]]:
        return [(_Proxy(nid), FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})) for nid in self.node_ids]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
    ) -> tuple[None, dict[str, Any]]:
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        self.contributors = len(results)
        # Nothing for the workflow to store: the strategy takes the aggregate from here.
        return None, {}


class SecureAggregationGrid(DelegatingGrid):
    """A ``Grid`` that runs each batch of training messages through SecAgg+.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    settings : SecAggConfig
        Shares, threshold and quantisation.
    screen : Callable[[Message], str | None]
        Checks what a reply carries in the clear besides its masked vector (metrics,
        ledger); returns why it is refused, or None. Refused replies count as dropped.
    on_refused : Callable[[Message, str], None]
        Told of every reply the screen refused (error replies are returned as they are).
    clipping_range : Callable[[int], float]
        The coordinate range of the masked vectors in a round (the user-level clipping
        norm, which changes with adaptive clipping, or ``settings.clipping_range``).
    max_weight : float
        Largest weight a device may use (1 under user-level DP).
    """

    def __init__(
        self,
        grid: Grid,
        settings: SecAggConfig,
        *,
        screen: Callable[[Message], str | None],
        on_refused: Callable[[Message, str], None],
        clipping_range: Callable[[int], float],
        max_weight: float,
    ) -> None:
        super().__init__(grid)
        self.settings = settings
        self._screen = screen
        self._on_refused = on_refused
        self._clipping_range = clipping_range
        self._max_weight = max_weight
        self.sums: dict[int, SecureSum] = {}
        self._stage = ""
        self._stage_replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send messages; a batch of training messages goes through SecAgg+."""
        batch = list(messages)
        if not batch or batch[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(batch, timeout=timeout)
        return self._secure_round(batch, timeout)

    # -- one SecAgg+ run ------------------------------------------------------------
    def _workflow(self, server_round: int, timeout: float | None) -> SecAggPlusWorkflow:
        s = self.settings
        num_shares: int | float = int(s.num_shares) if s.num_shares > 1 else float(s.num_shares)
        threshold: int | float = (
            int(s.reconstruction_threshold) if s.reconstruction_threshold > 1 else float(s.reconstruction_threshold)
        )
        return SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            max_weight=self._max_weight,
            clipping_range=float(self._clipping_range(server_round)),
            quantization_range=int(s.quantization_range),
            timeout=timeout,
        )

    def _secure_round(self, batch: list[Message], timeout: float | None) -> list[Message]:
        server_round = _round_of(batch[0])
        by_node = {msg.metadata.dst_node_id: msg for msg in batch}
        outcome = SecureSum(server_round=server_round, sampled=len(by_node))
        self.sums[server_round] = outcome
        shim = _StrategyShim(list(by_node))
        state_records = RecordDict(
            {MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})}
        )
        base = Context(run_id=0, node_id=0, node_config={}, state=state_records, run_config={})
        context = LegacyContext(base, strategy=shim)  # type: ignore[arg-type]
        # Setup only turns this into the (ignored) argument of the shim's configure_fit.
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow = self._workflow(server_round, timeout)
        state = WorkflowState()
        collected: list[Message] = []
        recorder = _RecordingGrid(self, collected)
        for index, step in enumerate(
            (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage)
        ):
            self._stage = STAGES[index]
            if index == 2:
                # The real training content (global arrays + round config) replaces the
                # empty FitIns the shim gave the workflow during setup.
                state.nid_to_fitins = {nid: _copy_content(by_node[nid].content) for nid in state.active_node_ids}
            if not step(recorder, context, state):
                outcome.halted_at = STAGES[index]
                break
        self._stage = ""
        outcome.contributors = sorted(
            msg.metadata.src_node_id for msg in collected if not msg.has_error()
        )
        outcome.dropped = sorted(set(by_node) - set(outcome.contributors))
        if outcome.halted_at is None and shim.aggregate is not None:
            outcome.mean = shim.aggregate
            logger.info(
                "Round %d secure aggregation: sum of %d of %d sampled devices unmasked",
                server_round, len(outcome.contributors), outcome.sampled,
            )
        else:
            where = outcome.halted_at or "unmask"
            logger.warning(
                "Round %d secure aggregation failed at the %s stage: fewer devices than the "
                "reconstruction threshold remained (%d of %d sampled); no update is released",
                server_round, where, len(outcome.contributors), outcome.sampled,
            )
        return collected

    def _receive(self, messages: list[Message], timeout: float | None, collected: list[Message]) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if self._stage != STAGES[2]:
            return replies
        kept: list[Message] = []
        for reply in replies:
            if not reply.has_error():
                reason = self._screen(reply)
                if reason is not None:
                    # Refused before unmasking: its masked vector never enters the sum,
                    # as if the device had dropped out after sharing its keys.
                    self._on_refused(reply, reason)
                    continue
            # Error replies (a declined round, a failure) go to the strategy, which
            # tells declines from failures; the workflow counts them as dropped.
            collected.append(reply)
            kept.append(reply)
        return kept


def _round_of(msg: Message) -> int:
    # Flower's strategies put the round in the message config (not in group_id).
    for record in msg.content.config_records.values():
        value = record.get(SERVER_ROUND_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return int(msg.metadata.group_id or 0)


class _RecordingGrid:
    """The grid the workflow talks to: our screen sits between it and the real grid."""

    def __init__(self, owner: SecureAggregationGrid, collected: list[Message]) -> None:
        self._owner = owner
        self._collected = collected

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self._owner._receive(list(messages), timeout, self._collected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner._grid, name)


def _copy_content(content: RecordDict) -> RecordDict:
    # The workflow adds its own config record to the content; keep the strategy's intact.
    return RecordDict(dict(content.items()))

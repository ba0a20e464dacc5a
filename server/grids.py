"""Wrappers around the run's ``Grid``: the ServerApp's one view of which devices exist.

* :class:`DelegatingGrid` passes everything to the grid it wraps; subclasses change one part.
* :class:`EnrolledGrid` (deployment) shows the strategy only the devices the operator
  enrolled and refuses to address any other node. Flower's SuperNode authentication
  already keeps unregistered keys out, but in Flower 1.42 anyone who reaches the
  coordinator's port can call the Control API's RegisterNode; the allow-list, fixed by
  ``emofed server start`` from the keys in its ``enrolled/`` folder, closes that gap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

# Run-config key set by `emofed server start`: comma-separated node ids of enrolled devices.
ENROLLED_NODES_KEY = "enrolled-nodes"


class DelegatingGrid(Grid):
    """A ``Grid`` that forwards every call to ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Any) -> None:
        """Forward to the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped grid's run."""
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Forward to the wrapped grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forward to the wrapped grid."""
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward to the wrapped grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Forward to the wrapped grid."""
        return self._grid.send_and_receive(messages, timeout=timeout)


def parse_enrolled(value: object) -> frozenset[int]:
    """The node ids in the ``enrolled-nodes`` run-config value.

    Raises
    ------
    ValueError
        If the value is not a comma-separated list of node ids.
    """
    text = str(value).strip()
    try:
        ids = frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"run config '{ENROLLED_NODES_KEY}' must list node ids separated by commas. Found {text!r}.") from None
    if not ids:
        raise ValueError(f"run config '{ENROLLED_NODES_KEY}' names no node")
    return ids


class EnrolledGrid(DelegatingGrid):
    """Only enrolled devices exist for the strategy; nothing is sent to any other node."""

    def __init__(self, grid: Grid, enrolled: frozenset[int]) -> None:
        super().__init__(grid)
        self.enrolled = enrolled
        self._warned: set[int] = set()

    def get_node_ids(self) -> Iterable[int]:
        """The enrolled connected nodes; any other is logged once and left out."""
        ids = list(self._grid.get_node_ids())
        strangers = set(ids) - self.enrolled - self._warned
        if strangers:
            self._warned |= strangers
            logger.warning(
                "Ignoring %d connected node(s) that were not enrolled: %s",
                len(strangers), ", ".join(map(str, sorted(strangers))),
            )
        return [node for node in ids if node in self.enrolled]

    def _check(self, messages: Iterable[Message]) -> list[Message]:
        batch = list(messages)
        for msg in batch:
            if msg.metadata.dst_node_id not in self.enrolled:
                raise ValueError(f"refusing to send to node {msg.metadata.dst_node_id}: not enrolled")
        return batch

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages addressed to enrolled nodes only.

        Raises
        ------
        ValueError
            If a message is addressed to a node that was not enrolled.
        """
        return self._grid.push_messages(self._check(messages))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send messages addressed to enrolled nodes only, and wait for the replies.

        Raises
        ------
        ValueError
            If a message is addressed to a node that was not enrolled.
        """
        return self._grid.send_and_receive(self._check(messages), timeout=timeout)

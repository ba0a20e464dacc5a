"""The policy prior phase: devices' statistics in, screened and ledgered, prior and table out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from emofed.config import load_config
from emofed.protocol import DEVICE_ROOT_KEY, POLICY_STATISTICS_KEY, POLICY_VARIANTS
from policy.federated import policy_epsilon
from privacy.audit import audit
from privacy.ledger_store import LedgerStore
from server.policy import PRIOR_FILE, format_policy_table, policy_phase_blocker, run_policy_phase
from server.rundir import RunDirectory

SMALL = ["devices=3", "data.samples_per_device=12", "policy.history=80", "policy.decisions=30"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class _AppGrid:
    """Nodes 11, 12, 13 answered by the real ClientApp (partitions 0, 1, 2); ``tamper`` spoils one reply."""

    def __init__(self, root: Path, *, tamper: int | None = None) -> None:
        self.root = root
        self.nodes = [11, 12, 13]
        self.tamper = tamper
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            context = Context(
                run_id=1, node_id=node, node_config={"partition-id": node - 11}, state=RecordDict(),
                run_config={DEVICE_ROOT_KEY: str(self.root)},
            )
            reply = app(msg, context)
            if node == self.tamper and msg.metadata.message_type == "train.policy" and not reply.has_error():
                vector = reply.content["arrays"][POLICY_STATISTICS_KEY].numpy().copy()
                vector[0] = np.inf
                reply.content["arrays"] = ArrayRecord({POLICY_STATISTICS_KEY: Array(vector)})
            replies.append(reply)
        return replies


def test_phase_builds_a_prior_from_every_device_and_scores_the_policies(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, f"output.dir={tmp_path}"])
    run_dir = RunDirectory(tmp_path / "run")
    ledger = LedgerStore(run_dir.path / "ledger")
    grid = _AppGrid(tmp_path / "devices")
    section = run_policy_phase(grid, cfg, run_dir, ledger)  # type: ignore[arg-type]
    assert section["status"] == "complete", section
    assert section["devices_shared"] == 3 and section["devices_scored"] == 3 and not section["refused"]
    assert set(section["table"]) == set(POLICY_VARIANTS)
    assert section["privacy"]["device_epsilon_max"] == pytest.approx(policy_epsilon(cfg), abs=0.02)
    prior = json.loads((run_dir.path / PRIOR_FILE).read_text())
    assert prior["devices"] == 3 and len(prior["actions"]) == len(prior["rx"])
    # Every device got a prior built without its own statistics: three different priors.
    sent = [m for m in grid.sent if m.metadata.message_type == "evaluate.policy"]
    vectors = [m.content["arrays"]["policy-prior"].numpy() for m in sent]
    assert len(vectors) == 3 and not np.allclose(vectors[0], vectors[1])
    report = audit(run_dir.path / "ledger")
    assert report.ok and len(report.scopes) == 3
    lines = format_policy_table(section)
    assert lines[0].startswith("| policy |") and len(lines) == 2 + len(POLICY_VARIANTS) + 2
    assert section["prior_gain"]["mean"] == pytest.approx(
        section["table"]["local"]["regret"] - section["table"]["federated"]["regret"]
    )


def test_a_malformed_reply_is_refused_and_the_rest_are_used(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "privacy.preset=off"])
    run_dir = RunDirectory(tmp_path / "run")
    section = run_policy_phase(_AppGrid(tmp_path / "devices", tamper=12), cfg, run_dir, None)  # type: ignore[arg-type]
    assert section["devices_shared"] == 2
    assert any("device 12" in r and "not finite" in r for r in section["refused"])
    assert section["devices_scored"] == 3


def test_runs_without_device_level_dp_but_with_other_protection_skip_the_phase() -> None:
    user_only = load_config(None, ["privacy.preset=off", "privacy.user.enabled=true"])
    assert "user-level DP" in policy_phase_blocker(user_only)
    assert policy_phase_blocker(load_config(None, [])) is None
    assert policy_phase_blocker(load_config(None, ["privacy.preset=off"])) is None

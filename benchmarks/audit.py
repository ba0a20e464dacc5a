"""Benchmark (not a test): time an audit of a simulated run; prints figures.

Run: ``.venv/bin/python benchmarks/audit.py [devices] [rounds]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accounting import PrivacyEvent, calibrate_noise
from privacy.audit import audit
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.guard import ledger_record, read_ledger_record
from privacy.ledger import Ledger
from privacy.ledger_store import LedgerStore

DELTA = 1e-5


def main(devices: int = 20, rounds: int = 10) -> None:
    """Build a run with `devices` DP-SGD devices and a DP aggregate, then audit it."""
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp())
    store = LedgerStore(root / "run" / "ledger")
    server_key = Ed25519PrivateKey.generate()
    store.enroll("server", server_key)
    server = BudgetedAccountant(PrivacyBudget(epsilon=10.0, delta=DELTA))
    start = time.perf_counter()
    plans = {}
    for d in range(devices):
        n = int(rng.integers(40, 120))
        q, steps = 8 / n, n // 8
        sigma = calibrate_noise(
            target_epsilon=6.0, delta=DELTA, sample_rate=q, steps=rounds * steps
        )
        plans[d] = (Ed25519PrivateKey.generate(), q, steps, sigma)
    print(f"calibrate {devices} devices: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    for server_round in range(1, rounds + 1):
        for d, (key, q, steps, sigma) in plans.items():
            ledger = Ledger(root / f"dev{d}" / f"{d}.jsonl", scope=f"device:{d}")
            accountant = BudgetedAccountant(  # restored from the device's own ledger
                PrivacyBudget(epsilon=6.0, delta=DELTA), events=ledger.events()
            )
            event = PrivacyEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
            ledger.append(
                server_round=server_round, event=event, clipping_norm=1.0, delta=DELTA,
                epsilon=accountant.spend(event), accountant=accountant.accountant,
                budget_epsilon=6.0, private_key=key,
            )
            lines, seal, public_key = read_ledger_record(ledger_record(ledger, public_key=key))
            store.receive(f"device:{d}", lines, seal, public_key=public_key)
        event = PrivacyEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1,
                             sampling="no-amplification")
        store.ledger("server").append(
            server_round=server_round, event=event, clipping_norm=0.5, delta=DELTA,
            epsilon=server.spend(event), accountant=server.accountant, budget_epsilon=10.0,
            private_key=server_key,
        )
    print(f"{rounds} rounds x {devices} devices (spend, sign, ship, store): "
          f"{time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    report = audit(root / "run")
    print(f"audit of {len(report.scopes)} scopes x {rounds} rounds: "
          f"{time.perf_counter() - start:.2f} s, ok={report.ok}")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))

"""A device's differential privacy: its store, its cumulative accountant, DP-SGD, update clipping.

Sample-level DP-SGD composes Opacus's public pieces (``GradSampleModule``,
``DPOptimizer``, ``DPDataLoader``) rather than ``PrivacyEngine``: the engine keeps an
accountant of its own that lives only as long as the engine (one round, here), and in
secure mode it needs ``torchcsprng``, which has no build for torch 2.11. The device's
accountant is instead rebuilt every round from the device's own signed ledger in
its encrypted store, which is the source of truth: it survives process restarts on a
deployed device and Ray worker reuse in simulation, and the server receives the same
chain.

The budget is split once, by :func:`plan_device_budget` (DP-SGD every round, then one
policy release). Every release, a model update or the policy statistics, goes through
:func:`release_privately`, in this order (no release can exceed the budget)::

    privacy = DevicePrivacy.open(store, cfg.privacy)      # verify ledger, rebuild accountant
    privacy.check(event, server_round=r)                   # raises before any noise is drawn
    ... the mechanism, with exactly `event` ...
    epsilon = privacy.record(event, ...)                   # spend, then sign into the ledger
    privacy.ledger_record()                                # the chain that ships with it

Everything a device keeps for its privacy lives in its encrypted store
(:mod:`device.store`, ``<device folder>/store``, keyed by ``keys/store.key``; see
:class:`DeviceStore`)::

    ledger-key                  the Ed25519 ledger-signing key (32 raw bytes), created on
                                first use and never written in plaintext
    ledger.<run_id>.<device_id> the device's chain of one run, in the ledger format
                                (``privacy.ledger_format``), byte for byte what it ships

Each append verifies the chain with the device's key and replaces the object
atomically under the store's writer lock, which :meth:`DevicePrivacy.record` holds
from its budget check to the append, so concurrent processes of one device never
overspend or fork the chain. A plaintext ``keys/ledger.key`` and this run's plaintext
``ledger/`` chain left by an older version are imported once and then removed. The
server keeps its verbatim copies of device chains in plaintext, in the run's
``ledger/``: that is what ``emofed audit`` reads.
"""

from __future__ import annotations

import logging
import math
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Context
from flwr.supercore.differential_privacy import compute_adaptive_clip_model_update
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from device.layout import (
    LEDGER_KEY_OBJECT,
    LEGACY_LEDGER_DIR,
    ledger_chain_object,
    legacy_key_path,
    legacy_run_root,
    open_device_store,
    store_key_path,
    store_path,
)
from device.store import EncryptedStore, StoreError, StoreNotFound, StoreTampered
from emofed.config import EmofedConfig, PrivacyConfig
from emofed.protocol import (
    CLIPPING_NORM_KEY,
    DEVICE_DIR_KEY,
    DEVICE_ID_KEY,
    DEVICE_ROOT_KEY,
    simulated_device_root,
)
from policy.federated import policy_event
from privacy.accounting import PrivacyEvent, calibrate_noise_beside
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.errors import LedgerTampered, PrivacyBudgetExceeded
from privacy.guard import ledger_record
from privacy.keys import (
    fingerprint,
    generate_private_key,
    load_private_key,
    private_key_from_bytes,
    private_key_to_bytes,
    public_key_to_string,
    secret_seed,
)
from privacy.ledger import Ledger
from privacy.ledger_format import check_scope, event_of
from privacy.ledger_store import DEVICES_DIR, KEYS_FILE, LedgerStore, scope_path

logger = logging.getLogger(__name__)

RUN_DIR_KEY = "run-dir"  # run config (pyproject.toml): the ServerApp's run directory
# δ must be well below 1/records: δ = 1/n allows publishing one record outright.
DELTA_RECORDS_FACTOR = 10


# -- the device's store --------------------------------------------------------------


@dataclass(frozen=True)
class DeviceStore:
    """Where one device keeps its privacy state, and which of its chains is this run's.

    Everything lives in the device's encrypted store (:mod:`device.store`): the
    Ed25519 ledger-signing key (object ``ledger-key``, created on first use) and one
    signed chain per run (object :attr:`chain_object`).

    Attributes
    ----------
    device_id : str
        The device's name in the ledger (scope ``device:<id>``).
    folder : Path
        The device's folder: ``store/`` (the encrypted store) and ``keys/store.key``
        (its 32-byte key file, owner-only).
    run_id : int
        The run; the device signs one chain per run.
    legacy_root : Path
        Where versions before the encrypted ledger kept this run's plaintext
        ``ledger/`` (next to ``keys/ledger.key`` in :attr:`folder`); what is found
        there is imported into the store once, then removed.
    """

    device_id: str
    folder: Path
    run_id: int
    legacy_root: Path

    @property
    def scope(self) -> str:
        """The device's ledger scope."""
        return f"device:{self.device_id}"

    @property
    def store_path(self) -> Path:
        """The device's encrypted store, ``<folder>/store`` (:mod:`device.layout`)."""
        return store_path(self.folder)

    @property
    def store_key_path(self) -> Path:
        """The store's key file, ``<folder>/keys/store.key``."""
        return store_key_path(self.folder)

    @property
    def chain_object(self) -> str:
        """The store object holding this run's chain: ``ledger.<run_id>.<device_id>``."""
        return ledger_chain_object(self.run_id, self.device_id)

    @property
    def legacy_key_path(self) -> Path:
        """Where older versions kept the ledger key in plaintext (PEM), migrated once."""
        return legacy_key_path(self.folder)

    @property
    def legacy_chain_path(self) -> Path:
        """Where older versions kept this run's chain in plaintext, imported once."""
        return scope_path(self.legacy_root / LEGACY_LEDGER_DIR, self.scope)

    @classmethod
    def from_context(cls, context: Context) -> DeviceStore:
        """Resolve the device's id and folder from Flower's node and run config.

        The id is node config ``device-id``, else ``partition-id`` (simulation), else
        Flower's node id. The folder is, in order:

        * deployment, node config ``device-dir``: that folder, kept across runs (one
          identity per device); the chain is per run: a ledger's rounds may not go back
          and ``privacy.device.epsilon`` is a budget over one run, so a new run starts a
          new chain;
        * simulation, run config ``device-root`` (set by the runner): ``<root>/<id>``;
        * run config ``run-dir``: ``<run-dir>.incomplete/simulated-devices/<id>``;
        * otherwise ``<tempdir>/emofed-devices/run-<run_id>/<id>``.

        Raises
        ------
        ValueError
            If the device id is not a valid ledger name ``[A-Za-z0-9_][A-Za-z0-9_.-]*``.
        """
        node, run = context.node_config, context.run_config
        if node.get(DEVICE_ID_KEY) not in (None, ""):
            device_id, source = str(node[DEVICE_ID_KEY]), f"node config '{DEVICE_ID_KEY}'"
        elif node.get("partition-id") is not None:
            device_id, source = str(node["partition-id"]), "node config 'partition-id'"
        else:
            device_id, source = str(context.node_id), "the node id"
        try:
            check_scope(f"device:{device_id}")
        except ValueError:
            raise ValueError(
                f"Device id from {source} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}. "
                f"Found {device_id!r}."
            ) from None
        run_id = int(context.run_id)
        if node.get(DEVICE_DIR_KEY):
            folder = Path(str(node[DEVICE_DIR_KEY]))
            return cls(device_id, folder, run_id, legacy_run_root(folder, run_id))
        if run.get(DEVICE_ROOT_KEY):
            folder = Path(str(run[DEVICE_ROOT_KEY])) / device_id
        elif run.get(RUN_DIR_KEY):
            folder = simulated_device_root(Path(str(run[RUN_DIR_KEY]))) / device_id
        else:
            folder = Path(tempfile.gettempdir()) / "emofed-devices" / f"run-{run_id}" / device_id
        return cls(device_id, folder, run_id, folder)

    def open_store(self, *, create: bool = True) -> EncryptedStore:
        """Open the device's encrypted store, by default creating it and its key file.

        A new store gets a fresh key file (0600). An existing store is only ever opened
        with the key file it has: a missing key file is an error, never replaced.

        Parameters
        ----------
        create : bool
            Create the store (and its key file) if there is none.

        Raises
        ------
        device.store.StoreNotFound
            If there is no store and ``create`` is False.
        device.store.WrongStoreKey, device.store.StoreTampered
            If the key file does not open the store, or its header was modified.
        FileNotFoundError
            If the store exists but its key file does not.
        PermissionError
            If the key file is accessible by group or others.
        """
        return open_device_store(self.folder, create=create)

    def public_key(self) -> Ed25519PublicKey:
        """The device's existing ledger key (never creates one), read from its store.

        Raises
        ------
        FileNotFoundError
            If the device has no store, store key file or ledger key yet.
        PermissionError
            If the store's key file is accessible by others.
        ValueError
            If the store does not open (wrong key, modified) or its key object is unusable.
        """
        try:
            with self.open_store(create=False) as store:
                if LEDGER_KEY_OBJECT not in store:
                    raise FileNotFoundError(
                        f"Device {self.device_id} has no ledger key in its store "
                        f"{self.store_path} yet."
                    )
                return _read_ledger_key(store).public_key()
        except StoreNotFound:
            raise
        except StoreError as err:  # callers (the outgoing guard) fail closed on ValueError
            raise ValueError(str(err)) from None


def _read_ledger_key(store: EncryptedStore) -> Ed25519PrivateKey:
    """The ledger key held in ``store``.

    Raises
    ------
    device.store.StoreTampered
        If the object fails authentication or does not hold an Ed25519 key.
    """
    try:
        return private_key_from_bytes(store.get_bytes(LEDGER_KEY_OBJECT))
    except (TypeError, ValueError):
        raise StoreTampered(
            f"Object {LEDGER_KEY_OBJECT!r} in device store {store.path} is not an Ed25519 private key."
        ) from None


def _load_ledger_key(device: DeviceStore, store: EncryptedStore) -> Ed25519PrivateKey:
    """Load the device's ledger key from its store; create it, or import a plaintext one, once.

    Under the store's writer lock, so two processes of one device never create two
    identities. A plaintext ``keys/ledger.key`` from an older version is imported and
    removed only after the store write committed; if a crash left it behind, it is
    removed on the next open once it is found to be the same key.

    Raises
    ------
    device.store.StoreError
        If the store holds a different key than a plaintext ``keys/ledger.key`` left
        beside it (neither is discarded).
    PermissionError
        If a plaintext key to import is accessible by group or others.
    """
    legacy = device.legacy_key_path
    if LEDGER_KEY_OBJECT in store and not legacy.exists():  # every round but the first: no lock
        return _read_ledger_key(store)
    with store.locked():
        if LEDGER_KEY_OBJECT in store:
            key = _read_ledger_key(store)
            if legacy.exists():
                if fingerprint(load_private_key(legacy)) != fingerprint(key):
                    raise StoreError(
                        f"Device {device.device_id}: {legacy} holds another ledger key than its "
                        f"store {device.store_path}; move the plaintext key away (the stored one "
                        "signs the device's ledger)."
                    )
                legacy.unlink()  # a migration interrupted after its commit
            return key
        if legacy.exists():
            key = load_private_key(legacy)
            store.put_bytes(LEDGER_KEY_OBJECT, private_key_to_bytes(key))  # the commit point
            legacy.unlink()
            logger.info(
                "Device %s: moved its ledger key %s into its encrypted store (fingerprint %s)",
                device.device_id, legacy, fingerprint(key)[:16],
            )
            return key
        key = generate_private_key()
        store.put_bytes(LEDGER_KEY_OBJECT, private_key_to_bytes(key))
        logger.debug(
            "Device %s: created its ledger key (fingerprint %s)",
            device.device_id, fingerprint(key)[:16],
        )
        return key


class _StoreChain:
    """One chain as one object of a device's encrypted store (a ``privacy.ledger.LedgerIO``).

    Writes are the store's atomic replace; the lock is the store's writer lock,
    re-entrant for the instance holding it, so an append may run inside
    :meth:`DevicePrivacy.record`'s lock. An object that fails authentication is a
    tampered ledger.
    """

    def __init__(self, store: EncryptedStore, name: str) -> None:
        self.store = store
        self.name = name

    def read(self) -> bytes | None:
        try:
            return self.store.get_bytes(self.name)
        except KeyError:
            return None
        except (StoreTampered, TypeError) as err:
            raise LedgerTampered(f"{self.name}: {err}") from None

    def write(self, data: bytes) -> None:
        self.store.put_bytes(self.name, data)

    def lock(self) -> AbstractContextManager[object]:
        return self.store.locked()


def _import_legacy_chain(device: DeviceStore, ledger: Ledger, key: Ed25519PrivateKey) -> None:
    """Import this run's plaintext chain of an older version into the store, once.

    The file must verify with the device's key; it is written into the store as is
    (the same bytes, so the server's copy still matches) and removed only after that
    write committed. Called under the store's writer lock.

    Raises
    ------
    LedgerTampered
        If the plaintext chain does not verify (nothing is imported or removed).
    """
    path = device.legacy_chain_path
    if not path.is_file():
        return
    data = path.read_bytes()
    held = ledger.io.read()
    if held is None:
        plain = Ledger(path, scope=device.scope)
        plain.verify(key.public_key())
        ledger.io.write(data)  # the commit point
        logger.info(
            "Device %s: moved its ledger %s into its encrypted store", device.device_id, path
        )
    elif held != data:
        logger.warning(
            "Device %s: %s differs from the chain in its store; leaving it where it is.",
            device.device_id, path,
        )
        return
    path.unlink()
    path.with_name(f".{path.name}.lock").unlink(missing_ok=True)
    _remove_legacy_ledger_dir(device, key)


def _remove_legacy_ledger_dir(device: DeviceStore, key: Ed25519PrivateKey) -> None:
    """Remove the emptied plaintext ledger folder (its key list only if it names this device)."""
    root = device.legacy_root / LEGACY_LEDGER_DIR
    ledgers = LedgerStore(root)
    try:
        keys = ledgers.public_keys()
    except LedgerTampered:
        return
    if keys == {device.scope: public_key_to_string(key)} and not ledgers.scopes():
        ledgers.keys_path.unlink(missing_ok=True)
        ledgers.keys_path.with_name(f".{KEYS_FILE}.lock").unlink(missing_ok=True)
    for empty in (root / DEVICES_DIR, root, device.legacy_root):
        if empty == device.folder:
            break
        try:
            empty.rmdir()
        except OSError:  # not empty (or gone): leave it
            break


# -- sampling and noise of one round -----------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DPSGDPlan:
    """How one round of DP-SGD samples a device's data, exactly as Opacus does.

    ``DPDataLoader.from_data_loader`` turns a loader of ``L = ceil(n / batch_size)``
    batches into Poisson sampling at rate ``q = 1 / L``; its sampler then yields
    ``int(1 / q)`` batches per epoch, which floating point makes ``L - 1`` for some
    ``L`` (e.g. 93): ``steps_per_epoch`` is what it yields, so the ledger records the
    steps actually taken. ``expected_batch_size`` is ``PrivacyEngine.make_private``'s
    ``int(n * q)`` (the mean-reduction denominator), kept at least 1.
    """

    num_examples: int
    batch_size: int
    local_epochs: int
    sample_rate: float
    steps_per_epoch: int
    expected_batch_size: int

    @property
    def steps(self) -> int:
        """DP-SGD steps of one round."""
        return self.local_epochs * self.steps_per_epoch


def plan_dp_sgd(num_examples: int, *, batch_size: int, local_epochs: int) -> DPSGDPlan:
    """The Poisson sampling of one round over ``num_examples`` training samples.

    Raises
    ------
    ValueError
        If a count is not positive.
    """
    counts = {"num_examples": num_examples, "batch_size": batch_size, "local_epochs": local_epochs}
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer. Found {value}.")
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1 / batches
    sampler = UniformWithReplacementSampler(num_samples=num_examples, sample_rate=sample_rate)
    return DPSGDPlan(
        num_examples=num_examples,
        batch_size=batch_size,
        local_epochs=local_epochs,
        sample_rate=sample_rate,
        steps_per_epoch=len(sampler),
        expected_batch_size=max(1, int(num_examples * sample_rate)),
    )


def check_device_delta(delta: float, *, num_examples: int) -> None:
    """Refuse a δ that is not well below 1 / records on this device.

    Raises
    ------
    ValueError
        If ``delta > 1 / (10 * num_examples)``.
    """
    limit = 1 / (DELTA_RECORDS_FACTOR * num_examples)
    if delta > limit:
        raise ValueError(
            f"'privacy.delta' must be well below 1/records: at most {limit:.3g} on this device "
            f"with {num_examples} training samples. Found {delta:g}."
        )


@dataclass(frozen=True, kw_only=True)
class DPSGDSettings:
    """Everything one round of DP-SGD needs; ``event`` is what it releases."""

    plan: DPSGDPlan
    noise_multiplier: float
    max_grad_norm: float
    secure_mode: bool = False

    @property
    def event(self) -> PrivacyEvent:
        """The round's release: ``plan.steps`` Poisson-sampled Gaussian steps."""
        return PrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.plan.sample_rate,
            steps=self.plan.steps,
        )


@dataclass(frozen=True, kw_only=True)
class DeviceBudgetPlan:
    """How one device spends its budget over the run: DP-SGD every round, one policy release.

    Attributes
    ----------
    dp_sgd : DPSGDSettings or None
        One round of DP-SGD; None without device-level DP or when no data plan was given
        (the policy handler, which needs only the release).
    policy_release : PrivacyEvent or None
        The release of the policy statistics (``policy.federated.policy_event``); None
        without device-level DP or without the policy prior.
    """

    dp_sgd: DPSGDSettings | None
    policy_release: PrivacyEvent | None


def plan_device_budget(cfg: EmofedConfig, plan: DPSGDPlan | None = None) -> DeviceBudgetPlan:
    """Split the device's budget between DP-SGD and the policy release; the one place that does.

    The policy release is one Gaussian mechanism of its own ε (``policy.federated.policy_event``).
    DP-SGD's σ is ``privacy.device.noise_multiplier``, or calibrated before training over
    ``cfg.rounds × plan.steps`` steps with the policy release composed in, so a device trained
    every round and then releasing its policy statistics spends at most its budget (Abadi
    et al. 2016, "Deep Learning with Differential Privacy", §3.1; the accountant composes
    the sampled Gaussian mechanism, Mironov et al. 2019).

    Parameters
    ----------
    cfg : EmofedConfig
        The run's configuration.
    plan : DPSGDPlan, optional
        This device's sampling of one round; None plans the policy release alone.

    Returns
    -------
    DeviceBudgetPlan
        DP-SGD's settings (None without ``plan``) and the policy release.

    Raises
    ------
    ValueError
        If the target cannot be met.
    """
    device = cfg.privacy.device
    if not device.enabled:
        return DeviceBudgetPlan(dp_sgd=None, policy_release=None)
    release = policy_event(cfg)
    if plan is None:
        return DeviceBudgetPlan(dp_sgd=None, policy_release=release)
    sigma = device.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_beside(
            target_epsilon=device.epsilon,
            delta=cfg.privacy.delta,
            sample_rate=plan.sample_rate,
            steps=cfg.rounds * plan.steps,
            planned=[release] if release is not None else [],
            accountant=cfg.privacy.accountant,
        )
    settings = DPSGDSettings(
        plan=plan,
        noise_multiplier=float(sigma),
        max_grad_norm=device.max_grad_norm,
        secure_mode=cfg.privacy.secure_mode,
    )
    return DeviceBudgetPlan(dp_sgd=settings, policy_release=release)


# -- the cumulative accountant -------------------------------------------------------


class DevicePrivacy:
    """A device's cumulative DP-SGD accountant, rebuilt from its own ledger each round.

    Build it with :meth:`open`. The chain in the device's store is the only state:
    nothing is kept in memory between rounds, so a restarted process continues where
    the chain ends.
    """

    def __init__(
        self, store: DeviceStore, privacy: PrivacyConfig, ledger: Ledger, key: Ed25519PrivateKey
    ) -> None:
        if not isinstance(ledger.io, _StoreChain):  # record() relies on its re-entrant lock
            raise TypeError(
                "A device's ledger lives in its encrypted store; build DevicePrivacy with open()."
            )
        self.store = store
        self.privacy = privacy
        self.ledger = ledger
        self._key = key
        self._budget = PrivacyBudget(epsilon=privacy.device.epsilon, delta=privacy.delta)
        self._load()

    def _load(self) -> None:
        """Rebuild the accountant from every entry of the chain as it is on disk now."""
        self._entries = self.ledger.entries()
        if self._entries:
            self._check_same_terms(self._entries[-1])
        try:
            self.accountant = BudgetedAccountant(
                self._budget,
                accountant=self.privacy.accountant,
                events=[event_of(entry) for entry in self._entries],
            )
        except PrivacyBudgetExceeded:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: device {self.store.device_id} has already spent more "
                f"than epsilon {self._budget.epsilon:g}"
            ) from None

    @classmethod
    def open(cls, store: DeviceStore, privacy: PrivacyConfig) -> DevicePrivacy:
        """Load (or create) the device's key, enroll it, verify the chain, rebuild ε.

        The device's encrypted store (and its key file) is created on first use; a
        plaintext key or chain of an older version is imported first (see the module
        docstring).

        Raises
        ------
        LedgerTampered
            If the device's own chain fails verification (or its object fails
            authentication): it cannot know what it spent.
        ValueError
            If the request's privacy terms differ from those the chain was written under.
        PrivacyBudgetExceeded
            If the chain already spends more than the budget.
        device.store.StoreError
            If the store key does not open the store, or the store was modified.
        OSError
            If the store's key file is missing (for an existing store) or readable by others.
        """
        encrypted = store.open_store()
        key = _load_ledger_key(store, encrypted)
        ledger = Ledger(_StoreChain(encrypted, store.chain_object), scope=store.scope)
        if store.legacy_chain_path.is_file():
            with encrypted.locked():
                _import_legacy_chain(store, ledger, key)
        ledger.verify(key.public_key())
        return cls(store, privacy, ledger, key)

    def noise_seed(self, *parts: object) -> int:
        """Seed of this round's DP-SGD noise and Poisson sampling (without secure mode).

        Derived from the device's private key: the coordinator knows the run's ``seed``
        and the round, so a seed made from those alone would let it regenerate the noise.
        """
        return secret_seed(self._key, *parts)

    def _check_same_terms(self, last: Mapping[str, Any]) -> None:
        # A budget raised mid-run would let the device overspend what it first promised.
        recorded = (last["budget_epsilon"], last["delta"], last["accountant"])
        requested = (self._budget.epsilon, self._budget.delta, self.privacy.accountant)
        if recorded != requested:
            raise ValueError(
                f"Device {self.store.device_id}'s ledger was written at epsilon {recorded[0]:g}, "
                f"delta {recorded[1]:g} ({recorded[2]}); this run asks for epsilon "
                f"{requested[0]:g}, delta {requested[1]:g} ({requested[2]})."
            )

    @property
    def epsilon(self) -> float:
        """Cumulative ε spent so far."""
        return self.accountant.epsilon

    def check(self, event: PrivacyEvent, *, server_round: int) -> float:
        """Return the ε this round would bring the device to; raise if it must not train.

        Raises
        ------
        PrivacyBudgetExceeded
            With a one-line reason if ``event`` would exceed the budget.
        ValueError
            If ``server_round`` is before a round already in the ledger.
        """
        if self._entries and server_round < self._entries[-1]["round"]:
            raise ValueError(
                f"Server round {server_round} is before round {self._entries[-1]['round']} "
                f"already in device {self.store.device_id}'s ledger."
            )
        after = self._refuse_over_budget(event)
        logger.debug(
            "Device %s round %d: DP-SGD sigma %.4f, q %.4g, %d steps; epsilon %.4f -> %.4f of %g",
            self.store.device_id, server_round, event.noise_multiplier, event.sample_rate,
            event.steps, self.epsilon, after, self._budget.epsilon,
        )
        return after

    def _refuse_over_budget(self, event: PrivacyEvent) -> float:
        after = self.accountant.epsilon_if(event)
        if not after <= self._budget.epsilon:  # also refuses nan
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: device {self.store.device_id} has spent epsilon "
                f"{self.epsilon:.3g} of {self._budget.epsilon:g}; "
                f"this round would bring it to {after:.3g}"
            )
        return after

    def record(
        self,
        event: PrivacyEvent,
        *,
        server_round: int,
        clipping_norm: float,
        extra: Mapping[str, int | float],
    ) -> float:
        """Spend ``event`` and sign it into the device's ledger; return the cumulative ε.

        Raises
        ------
        PrivacyBudgetExceeded
            If the release would overspend (nothing is recorded, nothing may be sent).
        """
        # Another process on this device may have released since check(): compose what
        # the chain holds now, and hold the store's writer lock until the append (which
        # verifies the chain again), so no release lands between the check and the write.
        with self.ledger.io.lock():
            self._load()
            self._refuse_over_budget(event)
            epsilon = self.accountant.spend(event)
            self.ledger.append(
                server_round=server_round,
                event=event,
                clipping_norm=clipping_norm,
                delta=self.privacy.delta,
                epsilon=epsilon,
                accountant=self.privacy.accountant,
                budget_epsilon=self.privacy.device.epsilon,
                private_key=self._key,
                extra=dict(extra),
            )
        return epsilon

    def ledger_record(self) -> ConfigRecord:
        """The whole signed chain and its seal, for the reply (the server merges idempotently).

        Raises
        ------
        RuntimeError
            If the ledger is empty (nothing has been recorded).
        """
        with self.ledger.io.lock():  # entries and seal of one version, not of two appends
            record = ledger_record(self.ledger, public_key=self._key.public_key(), since_seq=0)
        if record is None:
            raise RuntimeError(f"Device {self.store.device_id}'s ledger is empty: nothing to ship.")
        return record


R = TypeVar("R")


@dataclass(frozen=True)
class Release(Generic[R]):
    """What a private release produced, the cumulative ε it brought and the chain to ship."""

    value: R
    epsilon: float
    ledger: ConfigRecord


def release_privately(
    privacy: DevicePrivacy,
    event: PrivacyEvent,
    *,
    server_round: int,
    mechanism: Callable[[], tuple[R, float, Mapping[str, int | float]]],
) -> Release[R]:
    """The one release sequence of a device: check, release, record, ledger entry.

    ``mechanism`` is run only once ``event`` fits the budget, and must draw exactly the
    noise of ``event``; it returns its result, the clipping norm (sensitivity) it used and
    the extra fields of the ledger entry. The release is spent and signed before anything
    leaves: if recording raises, nothing of the result may be sent.

    Raises
    ------
    PrivacyBudgetExceeded
        If ``event`` would exceed the budget, before the mechanism or at recording.
    ValueError
        If ``server_round`` is before a round already in the ledger.
    """
    privacy.check(event, server_round=server_round)
    value, clipping_norm, extra = mechanism()
    epsilon = privacy.record(
        event, server_round=server_round, clipping_norm=clipping_norm, extra=extra
    )
    return Release(value=value, epsilon=epsilon, ledger=privacy.ledger_record())


# -- DP-SGD ------------------------------------------------------------------------


def _generators(
    device: torch.device, *, secure_mode: bool, seed: int
) -> tuple[torch.Generator, torch.Generator]:
    """(sampler generator on CPU, noise generator on ``device``).

    Secure mode seeds both from the OS entropy pool, never from the config seed;
    otherwise from ``seed``, so that simulations are reproducible.
    """
    if secure_mode:
        seeds = (secrets.randbits(63), secrets.randbits(63))
    else:
        seeds = (seed % 2**63, (seed + 1) % 2**63)
    sampler = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator(device=device).manual_seed(seeds[1])
    return sampler, noise


def _release(model: nn.Module, wrapped: GradSampleModule | None) -> None:
    """Leave ``model`` as it was before DP-SGD: no hooks, no per-sample state."""
    if wrapped is not None:
        wrapped.cleanup()  # hooks, grad_sample, _forward_counter, ...
    for module in model.modules():
        # Activations captured by a forward pass whose backward never ran (an error).
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)
    for parameter in model.parameters():
        if hasattr(parameter, "summed_grad"):  # set by DPOptimizer
            del parameter.summed_grad
        parameter.grad = None


@contextmanager
def private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    settings: DPSGDSettings,
    seed: int,
) -> Iterator[tuple[GradSampleModule, DPOptimizer, DPDataLoader]]:
    """Wrap a model, optimizer and loader for DP-SGD; undo the wrapping on exit.

    Per-sample gradients (``GradSampleModule``, mean loss reduction) are clipped to
    ``settings.max_grad_norm`` and Gaussian noise of standard deviation
    ``noise_multiplier × max_grad_norm`` is added to their sum (``DPOptimizer``), on
    Poisson-sampled batches (``DPDataLoader.from_data_loader``), which may be empty.

    ``secure_mode`` uses ``DPOptimizer(secure_mode=True)``: each noise value is the
    scaled sum of four Gaussian draws, which defeats the floating-point attack on
    noise (Holohan & Braghin 2021, §5.1; Opacus ``_generate_noise``), and the noise and
    sampling generators are seeded from ``secrets``. ``torchcsprng`` (Opacus's CSPRNG)
    has no build for torch 2.11, so the draws come from torch's Mersenne Twister: seeded
    unpredictably, but not a cryptographic generator.

    The model is cached and reused by later rounds and other devices, so on exit,
    normal or not, Opacus's hooks and per-parameter attributes are removed.

    Raises
    ------
    ValueError
        If the loader's sampling differs from ``settings.plan`` (the accounted event).
    """
    sampler_generator, noise_generator = _generators(
        next(model.parameters()).device, secure_mode=settings.secure_mode, seed=seed
    )
    private_loader = DPDataLoader.from_data_loader(loader, generator=sampler_generator)
    plan = settings.plan
    if private_loader.sample_rate != plan.sample_rate or len(private_loader) != plan.steps_per_epoch:
        raise ValueError(
            f"DP-SGD loader samples at q={private_loader.sample_rate} for {len(private_loader)} "
            f"steps; the accounted plan is q={plan.sample_rate} for {plan.steps_per_epoch}."
        )
    wrapped: GradSampleModule | None = None
    try:
        with warnings.catch_warnings():
            # Frozen inputs (images, token ids) make every full backward hook say so.
            warnings.filterwarnings(
                "ignore", message="Full backward hook is firing", category=UserWarning
            )
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            private_optimizer = DPOptimizer(
                optimizer,
                noise_multiplier=settings.noise_multiplier,
                max_grad_norm=settings.max_grad_norm,
                expected_batch_size=plan.expected_batch_size,
                loss_reduction="mean",
                generator=noise_generator,
                secure_mode=settings.secure_mode,
            )
            yield wrapped, private_optimizer, private_loader
    finally:
        _release(model, wrapped)


# -- user-level DP: clipping the update ------------------------------------------------


def user_clipping_norm(config: ConfigRecord) -> float:
    """The norm the server asks this round's update to be clipped to.

    Raises
    ------
    ValueError
        If the training message carries no positive, finite ``clipping-norm``.
    """
    if CLIPPING_NORM_KEY not in config:
        raise ValueError(f"Training message carries no '{CLIPPING_NORM_KEY}' (user-level DP is on).")
    value = config[CLIPPING_NORM_KEY]
    usable = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (usable and math.isfinite(value) and value > 0):
        raise ValueError(f"'{CLIPPING_NORM_KEY}' must be a positive finite number. Found {value!r}.")
    return float(value)


def clip_update(
    updated: dict[str, np.ndarray], received: Mapping[str, np.ndarray], *, clipping_norm: float
) -> bool:
    """Clip ``updated − received`` to ``clipping_norm`` in place; return whether it was clipped.

    Flower's ``compute_adaptive_clip_model_update`` (flat clipping, McMahan et al. 2018,
    "Learning Differentially Private Recurrent Language Models", Alg. 1); its boolean
    is the norm bit that adaptive clipping counts (Andrew et al. 2021).
    """
    keys = list(received)
    new = [updated[key] for key in keys]
    try:
        clipped = compute_adaptive_clip_model_update(new, [received[key] for key in keys], clipping_norm)
    except ZeroDivisionError:  # a zero update: nothing to clip (Flower divides by its norm)
        return False
    for key, array in zip(keys, new, strict=True):
        updated[key] = array
    return bool(clipped)

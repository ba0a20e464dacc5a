"""A device's part in the emotion-management policy's federated prior (``server.policy``).

After the model's rounds the coordinator asks every device twice:

* ``train.policy``: the emotion-probability block of the device's bandit statistics
  (``client.policy_release.shared_block``: sums over its feedback events). A simulated device plays ``policy.history`` decisions of a
  simulated person (``simulations.users``) with a local LinUCB; a deployed device reads the
  policy state ``emofed device run`` keeps in its encrypted store. Under device-level DP the
  statistics are privatised on the device with record-level Gaussian noise
  (``privatise_events``: one feedback event is one record, as one sample is for DP-SGD),
  the release is checked against and recorded in the device's own signed ledger, and
  DP-SGD was calibrated to leave room for it (:func:`policy_event`). Only the noised vector
  (and the ledger) leaves, through the same outgoing guard as a model update.
* ``evaluate.policy``: the prior built from the *other* devices' statistics
  (leave-one-out: the device's own evidence is already in its local statistics). The
  device keeps it in its store (``policy_prior``); a simulated device also plays four
  policies against its simulated person on fresh days (:func:`evaluate_policies`) and
  reports their reward and regret.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from client.expression import MessageBank, build_encoder
from client.policy import Policy, PolicyConfig, load_policy_config
from client.policy_state import NUM_FEATURES, SHARED_FEATURES, PolicyStatistics
from emofed.config import ConfigError, EmofedConfig
from privacy.accounting import PrivacyEvent, calibrate_noise
from simulations.users import UserProfile, make_population, run_policy

__all__ = [
    "PRIOR_OBJECT",
    "check_catalogue",
    "evaluate_policies",
    "history_statistics",
    "policy_config",
    "policy_epsilon",
    "policy_event",
    "prior_size",
    "simulated_person",
    "statistics_from_state",
    "variants",
]

PRIOR_OBJECT = "policy_prior"  # the federated prior a device adopted, JSON, in its store
FIRST_LAST_WINDOW = 100  # decisions in the "first" and "last" regret columns


@functools.lru_cache(maxsize=8)
def _policy_config(directory: str | None) -> PolicyConfig:
    return load_policy_config(directory)


def policy_config(cfg: EmofedConfig) -> PolicyConfig:
    """The policy catalogue of the run (``policy.config_dir``, else ``configs/policy``)."""
    return _policy_config(cfg.policy.config_dir)


@functools.lru_cache(maxsize=8)
def _bank(directory: str | None) -> MessageBank:
    # Messages do not change a decision; the hashing encoder spares loading MiniLM per device.
    config = _policy_config(directory)
    return MessageBank(config.messages, {a.name: a.description for a in config.actions}, build_encoder("hashing"))


def check_catalogue(cfg: EmofedConfig) -> None:
    """Load the run's policy catalogue once, so a broken one stops a run before any work.

    Raises
    ------
    emofed.config.ConfigError
        One line naming ``policy.config_dir`` and what is wrong with its files.
    """
    try:
        policy_config(cfg)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"'policy.config_dir': {err}") from None


def policy_epsilon(cfg: EmofedConfig) -> float:
    """ε of the policy release alone: ``policy.epsilon``, or a third of the device's budget."""
    if cfg.policy.epsilon is not None:
        return float(cfg.policy.epsilon)
    return cfg.privacy.device.epsilon / 3.0


def policy_event(cfg: EmofedConfig) -> PrivacyEvent | None:
    """The device-level DP release of the policy statistics; None without device-level DP or policy.

    One Gaussian mechanism (no subsampling) of noise multiplier ``policy.noise_multiplier``,
    or the one that spends :func:`policy_epsilon` alone.
    """
    if not (cfg.policy.enabled and cfg.privacy.device.enabled):
        return None
    sigma = cfg.policy.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(
            target_epsilon=policy_epsilon(cfg),
            delta=cfg.privacy.delta,
            sample_rate=1.0,
            steps=1,
            sampling="no-amplification",
            accountant=cfg.privacy.accountant,
        )
    return PrivacyEvent(noise_multiplier=float(sigma), sample_rate=1.0, steps=1, sampling="no-amplification")


def person_index(device_id: str) -> int:
    """The simulated person of a device: its partition number, or a hash of its name."""
    return int(device_id) if device_id.isdigit() else zlib.crc32(device_id.encode())


def simulated_person(cfg: EmofedConfig, device_id: str) -> UserProfile:
    """The hidden preferences of the person a simulated device belongs to (seeded by the run)."""
    config = policy_config(cfg)
    return make_population(
        1, config.action_names, seed=cfg.seed, quiet_action=config.safety.quiet_action,
        first_id=person_index(device_id),
    )[0]


def history_statistics(cfg: EmofedConfig, person: UserProfile) -> PolicyStatistics:
    """The statistics a simulated device has gathered: ``policy.history`` decisions of local LinUCB."""
    config = policy_config(cfg)
    local = replace(config, bandit=replace(config.bandit, kind="linucb", learn=True))
    policy = Policy(local, bank=_bank(cfg.policy.config_dir))
    run_policy(policy, person, decisions=cfg.policy.history, seed=cfg.seed)
    return policy.local_statistics()


def statistics_from_state(cfg: EmofedConfig, state: Mapping) -> PolicyStatistics:
    """A deployed device's statistics: the local part of the policy state in its store.

    Raises
    ------
    ValueError
        If the state does not fit the run's action catalogue.
    """
    policy = Policy(policy_config(cfg), bank=_bank(cfg.policy.config_dir), state=state)
    return policy.local_statistics()


def variants(
    config: PolicyConfig, prior: PolicyStatistics
) -> dict[str, tuple[PolicyConfig, PolicyStatistics | None]]:
    """The four compared policies (:data:`emofed.protocol.POLICY_VARIANTS`): config and prior."""
    bandit = config.bandit
    learn = replace(config, bandit=replace(bandit, kind="linucb", learn=True))
    return {
        "random": (replace(config, bandit=replace(bandit, kind="random")), None),
        "prior": (replace(config, bandit=replace(bandit, kind="linucb", learn=False, alpha=0.0)), prior),
        "local": (learn, None),
        "federated": (learn, prior),
    }


def evaluate_policies(cfg: EmofedConfig, prior: PolicyStatistics, person: UserProfile) -> dict[str, float]:
    """Play the four policies against ``person`` on the same fresh days; their metrics.

    Keys ``policy-<variant>-<reward|regret|regret-first|regret-last|interventions>``:
    cumulative expected reward and regret over ``policy.decisions`` decisions, the regret
    of the first and last :data:`FIRST_LAST_WINDOW` of them, and the interventions made.
    Regret is against an oracle that knows the true emotion and the person's hidden
    preferences and picks among the actions the safety rules allow at that moment.
    """
    quiet = policy_config(cfg).safety.quiet_action
    bank = _bank(cfg.policy.config_dir)
    window = min(FIRST_LAST_WINDOW, cfg.policy.decisions)
    metrics: dict[str, float] = {}
    for name, (config, variant_prior) in variants(policy_config(cfg), prior).items():
        outcome = run_policy(
            Policy(config, prior=variant_prior, bank=bank), person, decisions=cfg.policy.decisions,
            seed=cfg.seed + 1,  # days the history never saw
        )
        metrics[f"policy-{name}-reward"] = float(outcome.rewards.sum())
        metrics[f"policy-{name}-regret"] = float(outcome.regret.sum())
        metrics[f"policy-{name}-regret-first"] = float(outcome.regret[:window].sum())
        metrics[f"policy-{name}-regret-last"] = float(outcome.regret[-window:].sum())
        metrics[f"policy-{name}-interventions"] = float(sum(a != quiet for a in outcome.actions))
    return metrics


def statistics_size(cfg: EmofedConfig) -> int:
    """Length of the released vector (the shared block's :meth:`PolicyStatistics.to_vector`)."""
    return PolicyStatistics.zeros(policy_config(cfg).action_names, SHARED_FEATURES).to_vector().size


def prior_size(cfg: EmofedConfig) -> int:
    """Length of a prior's vector (all features) for the run's catalogue."""
    return PolicyStatistics.zeros(policy_config(cfg).action_names, NUM_FEATURES).to_vector().size


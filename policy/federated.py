"""A device's part in the emotion-management policy's federated prior (``server.policy``).

After the model's rounds the coordinator asks every device twice:

* ``train.policy``: the emotion-probability block of the device's bandit statistics
  (``policy.release.shared_block``: sums over its feedback events). A simulated device plays ``policy.history`` decisions of a
  simulated person (``simulations.users.history_statistics``) with a local LinUCB; a deployed device reads the
  policy state ``emofed device run`` keeps in its encrypted store. Under device-level DP the
  statistics are privatised on the device with record-level Gaussian noise
  (``privatise_events``: one feedback event is one record, as one sample is for DP-SGD),
  the release is checked against and recorded in the device's own signed ledger, and
  DP-SGD was calibrated to leave room for it (:func:`policy_event`). Only the noised vector
  (and the ledger) leaves, through the same outgoing guard as a model update.
* ``evaluate.policy``: the prior built from the *other* devices' statistics
  (leave-one-out: the device's own evidence is already in its local statistics). The
  device keeps it in its store (``policy_prior``); a simulated device also plays four
  policies against its simulated person on fresh days (``simulations.users.evaluate_policies``) and
  reports their reward and regret.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import replace

from emofed.config import ConfigError, EmofedConfig
from policy.expression import MessageBank, build_encoder
from policy.rules import Policy, PolicyConfig, load_policy_config
from policy.state import NUM_FEATURES, SHARED_FEATURES, PolicyStatistics
from privacy.accounting import PrivacyEvent, calibrate_noise

__all__ = [
    "check_catalogue",
    "message_bank",
    "policy_config",
    "policy_epsilon",
    "policy_event",
    "prior_size",
    "statistics_from_state",
    "variants",
]

FIRST_LAST_WINDOW = 100  # decisions in the "first" and "last" regret columns


@functools.lru_cache(maxsize=8)
def _policy_config(directory: str | None) -> PolicyConfig:
    return load_policy_config(directory)


def policy_config(cfg: EmofedConfig) -> PolicyConfig:
    """The policy catalogue of the run (``policy.config_dir``, else ``configs/policy``)."""
    return _policy_config(cfg.policy.config_dir)


@functools.lru_cache(maxsize=8)
def message_bank(directory: str | None) -> MessageBank:
    """The catalogue's supportive messages, ranked by the hashing encoder."""
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
    except ConfigError as err:
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


def statistics_from_state(cfg: EmofedConfig, state: Mapping) -> PolicyStatistics:
    """A deployed device's statistics: the local part of the policy state in its store.

    Raises
    ------
    ValueError
        If the state does not fit the run's action catalogue.
    """
    policy = Policy(policy_config(cfg), bank=message_bank(cfg.policy.config_dir), state=state)
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


def statistics_size(cfg: EmofedConfig) -> int:
    """Length of the released vector (the shared block's :meth:`PolicyStatistics.to_vector`)."""
    return PolicyStatistics.zeros(policy_config(cfg).action_names, SHARED_FEATURES).to_vector().size


def prior_size(cfg: EmofedConfig) -> int:
    """Length of a prior's vector (all features) for the run's catalogue."""
    return PolicyStatistics.zeros(policy_config(cfg).action_names, NUM_FEATURES).to_vector().size


"""User-level differential privacy on the aggregate: DP-FedAvg with a hard budget stop.

Mechanism, per round (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv:1710.06963, Alg. 1 with the fixed-denominator estimator)::

    m      devices sampled (messages configured) this round
    Δ_i    = w_i − w                      update of each device that replied, against the
                                          global model w it was sent
    Δ̃_i    = Δ_i · min(1, C / ‖Δ_i‖₂)     flat clipping, redone on the server
    Δ̄      = Σ_i Δ̃_i / m + N(0, (σ_Δ·C/m)² I)
    w'     = w + Δ̄                        FedAvg / FedProx; FedAdam feeds w + Δ̄ through
                                          its server optimiser (post-processing)

Adding or removing one device changes ``Σ Δ̃_i`` by at most C, so the mean over the fixed
``m`` has sensitivity C/m *whoever drops out*: a device that declines, fails or is
screened out counts as a zero update, and the noise scale never depends on the replies.
Devices clip too (``emofed.protocol.CLIPPING_NORM_KEY``); the server's re-clip is
idempotent for them and keeps the bound for a device that did not clip. Every device
weighs the same: an example-weighted mean would let one large device move it by C.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping", arXiv:1905.03871, Alg. 1): each device reports whether its update was longer
than C; the server releases the noisy count of *unclipped* updates,
``b̄ = (Σ_i (1[‖Δ_i‖ ≤ C] − ½) + N(0, σ_b²)) / m + ½`` (centred, so the count's
sensitivity is ½ whether a device is added or removed), and sets ``C ← C·exp(−η_C (b̄ − γ))`` with γ
the target share of unclipped updates. The update is noised with
``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2)`` so that the pair (update, count) is one Gaussian
mechanism with noise multiplier σ (Thm. 1); σ is what is accounted and recorded.
``σ_b`` is ``clipped_count_stddev`` or, if unset, ``max(m/20, σ)``: Andrew et al.'s m/20
alone needs σ < m/10, which a small federation with strong privacy cannot meet.

Accounting: every release is ``PrivacyEvent(σ, sample_rate=1, steps=1,
sampling="no-amplification")``. Flower samples a fixed number of devices, which is not
Poisson sampling, so no amplification by subsampling is claimed. Before a round's
messages are built, the federation's :class:`~privacy.budget.BudgetedAccountant` composes
every earlier release with the next one; if that exceeds the budget,
:class:`PrivacyBudgetStop` is raised and nothing is sent. A round whose messages went out
always releases, even if no usable reply came back (noise only): whether anything is
released must not depend on the devices' data, and the budget for it was committed when
the messages were sent. Each release is signed into the server's ledger
(``<run>/ledger/server.jsonl``) before it is handed back to the strategy.

Noise: reproducible by default for the server only (a generator seeded from the server's
private signing key, ``seed`` and the round: devices know ``seed`` and must not be able to
regenerate the noise). With
``privacy.secure_mode`` each release draws from a fresh generator seeded with 64 bits of
OS entropy and uses Opacus's floating-point-attack-resistant sampling
(:func:`opacus.optimizers.optimizer._generate_noise` with ``secure_mode=True``: the mean
of 2n = 4 Gaussian draws, Holohan & Braghin 2021, §5.1). Opacus's own secure mode adds
``torchcsprng``, which is not installed: the generator itself is PyTorch's, so this mode
is non-reproducible, not cryptographically secure.

Why not Flower's central-DP wrappers (``flwr/serverapp/strategy/dp_fixed_clipping.py``,
``dp_adaptive_clipping.py``, flwr 1.42); each gap is filled here:

(a) their noise σ·C/m assumes an unweighted mean of m clipped updates, but they hand the
    clipped replies to the wrapped strategy, whose FedAvg mean is example-weighted, so
    one device holding most examples moves it by up to C (the accounted fixed-clipping
    mode instead refuses any unequal weights). Here: unweighted sum over m.
(b) any error reply makes them skip the whole round's aggregation (so one device that
    declines for lack of budget voids the round), and a short round is averaged over the
    k < m replies with noise still scaled for m, a sensitivity of C/k (the accounted mode
    skips it instead). Here: errors are screened out, and the denominator is always m.
(c) the fixed-clipping accountant lives in the wrapper object, is RDP only and writes no
    ledger; the adaptive wrappers account nothing. Here: the project's accountants,
    a budget that stops the run, and a signed ledger entry per release.
(d) the adaptive wrappers update the norm with the *clipped* fraction where Andrew et al.
    use the *unclipped* one (``C *= exp(-lr * (clipped_fraction - target))``), so when
    every update is clipped the norm shrinks further instead of growing.
(e) noise comes from the global ``np.random`` state: neither reproducible per run nor
    secure.

Flower's helpers that are right are reused: ``get_norm``, ``compute_stdv`` and
``compute_adaptive_noise_params`` (the σ_Δ split of Thm. 1). Wrapping the screened
strategy in those wrappers would not help either: they check the raw replies before the
screen sees them.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.supercore.differential_privacy import (
    compute_adaptive_noise_params,
    compute_stdv,
    get_norm,
)
from opacus.optimizers.optimizer import _generate_noise

from emofed.config import EmofedConfig, PrivacyConfig
from privacy.accounting import PrivacyEvent, calibrate_noise
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.errors import PrivacyBudgetExceeded
from privacy.keys import fingerprint, load_or_create_private_key, secret_seed
from privacy.ledger_store import LedgerStore

logger = logging.getLogger(__name__)

SERVER_SCOPE = "server"
SERVER_KEY_FILE = Path(".keys") / "server-ledger.key"
# A device's clipped update comes back as global + Δ̃ in float32; recovering Δ̃ loses a
# little precision, so "longer than C" allows this much relative slack.
NORM_TOLERANCE = 1e-3
_NOISE_STREAM = 0x6E6F697365  # separates the noise seeds from other uses of `seed`


class PrivacyBudgetStop(PrivacyBudgetExceeded):
    """The next user-level release would exceed the federation's budget: the run stops.

    Raised before the round's messages are sent; nothing of that round was released.
    """


@dataclass(frozen=True)
class UserRelease:
    """One private release of the aggregate, as recorded in the server ledger."""

    server_round: int
    sampled: int  # m: devices sent a training message
    aggregated: int  # k ≤ m: usable replies in the sum
    clipping_norm: float  # C used in this release
    noise_multiplier: float  # σ, effective for (update, count): what is accounted
    update_noise_multiplier: float  # σ_Δ on the update
    count_noise_stddev: float | None  # σ_b on the unclipped count (adaptive clipping)
    noise_std: float  # σ_Δ·C/m per coordinate of the mean update
    epsilon: float  # cumulative ε after this release
    next_clipping_norm: float
    arrays: dict[str, np.ndarray]  # w + Δ̄ (float64), before any server optimiser


@dataclass(frozen=True)
class _Pending:
    sampled: int
    clipping_norm: float
    update_noise_multiplier: float
    count_noise_stddev: float | None
    epsilon: float  # cumulative ε once released


def server_key_path(cfg: EmofedConfig) -> Path:
    """Where the server's ledger signing key lives (outside every run directory)."""
    path = Path(cfg.privacy.server_key) if cfg.privacy.server_key else Path(cfg.output.dir) / SERVER_KEY_FILE
    return path.expanduser().resolve()


def gaussian_noise(
    std: float, shape: tuple[int, ...], generator: torch.Generator, *, secure_mode: bool
) -> np.ndarray:
    """Draw N(0, std²) noise of ``shape`` (float64) with Opacus's sampler."""
    reference = torch.zeros(shape, dtype=torch.float64)
    return _generate_noise(std, reference, generator, secure_mode=secure_mode).numpy()


class UserLevelDP:
    """The federation's user-level DP: clipping norm, noise, budget, and server ledger.

    Parameters
    ----------
    privacy : PrivacyConfig
        The run's privacy section; ``privacy.user.enabled`` must be true.
    rounds : int
        Planned rounds (σ is calibrated so that they spend the budget).
    seed : int
        Seed of the reproducible noise (unused with ``privacy.secure_mode``).
    ledger : LedgerStore
        The run's ledger directory; the server's public key is enrolled in it.
    private_key : Ed25519PrivateKey
        The server's ledger signing key.

    Raises
    ------
    ValueError
        If user-level DP is off, or ``clipped_count_stddev`` is too small for σ.
    privacy.errors.LedgerTampered
        If the ledger already holds a different key for the server.
    """

    def __init__(
        self,
        privacy: PrivacyConfig,
        *,
        rounds: int,
        seed: int,
        ledger: LedgerStore,
        private_key: Ed25519PrivateKey,
    ) -> None:
        user = privacy.user
        if not user.enabled:
            raise ValueError("UserLevelDP needs privacy.user.enabled=true.")
        if user.noise_multiplier is None:
            sigma = calibrate_noise(
                target_epsilon=user.epsilon,
                delta=privacy.delta,
                sample_rate=1.0,
                steps=rounds,
                sampling="no-amplification",
                accountant=privacy.accountant,
            )
        else:
            sigma = float(user.noise_multiplier)
        self.adaptive = user.clipping == "adaptive"
        if self.adaptive and user.clipped_count_stddev is not None and sigma >= 2 * user.clipped_count_stddev:
            raise ValueError(
                f"'privacy.user.clipped_count_stddev' must be above noise_multiplier / 2 = {sigma / 2:.4g} "
                f"for adaptive clipping (Andrew et al. 2021, Thm. 1). Found {user.clipped_count_stddev}."
            )
        self.noise_multiplier = sigma
        self.clipping_norm = float(user.clipping_norm)
        self.target_quantile = user.target_quantile
        self.clip_lr = user.clip_lr
        self.clipped_count_stddev = user.clipped_count_stddev
        self.delta = privacy.delta
        self.secure_mode = privacy.secure_mode
        self.seed = seed
        self.accountant = BudgetedAccountant(
            PrivacyBudget(epsilon=user.epsilon, delta=privacy.delta), accountant=privacy.accountant
        )
        self.event = PrivacyEvent(
            noise_multiplier=sigma, sample_rate=1.0, steps=1, sampling="no-amplification"
        )
        self.release_count = 0
        # Only the latest: a release holds a whole model, and runs can be long.
        self.last_release: UserRelease | None = None
        self._ledger = ledger.ledger(SERVER_SCOPE)
        self._key = private_key
        ledger.enroll(SERVER_SCOPE, private_key.public_key())
        self.key_fingerprint = fingerprint(private_key)
        self._pending: dict[int, _Pending] = {}
        logger.info(
            "User-level DP: sigma %.4f, %s clipping from C=%.4g, budget epsilon %g at delta %g (%s)",
            sigma, user.clipping, self.clipping_norm, user.epsilon, privacy.delta, privacy.accountant,
        )
        logger.info(
            "Server ledger key %s (pin it with `emofed audit RUN --pin server=%s`)",
            self.key_fingerprint, self.key_fingerprint,
        )

    @classmethod
    def from_config(cls, cfg: EmofedConfig, ledger: LedgerStore) -> UserLevelDP:
        """Build from a run's configuration, loading (or creating) the server's key."""
        key = load_or_create_private_key(server_key_path(cfg))
        return cls(cfg.privacy, rounds=cfg.rounds, seed=cfg.seed, ledger=ledger, private_key=key)

    @property
    def epsilon(self) -> float:
        """Cumulative ε of the federation so far."""
        return self.accountant.epsilon

    @property
    def budget_epsilon(self) -> float:
        """The federation's ε budget."""
        return self.accountant.budget.epsilon

    def noise_split(self, sampled: int) -> tuple[float, float | None]:
        """(σ_Δ, σ_b) for ``sampled`` devices: σ_Δ = σ and no σ_b with fixed clipping."""
        if not self.adaptive:
            return self.noise_multiplier, None
        wanted = self.clipped_count_stddev
        if wanted is None:
            wanted = max(sampled / 20, self.noise_multiplier)
        count_stddev, update_sigma = compute_adaptive_noise_params(self.noise_multiplier, sampled, wanted)
        return float(update_sigma), float(count_stddev)

    def begin_round(self, server_round: int, *, sampled: int) -> float:
        """Commit to releasing this round's aggregate of ``sampled`` devices.

        Call after the round's messages are built and before any is sent.

        Returns
        -------
        float
            The clipping norm C the devices must clip to.

        Raises
        ------
        PrivacyBudgetStop
            If the release would push ε past the budget; nothing is committed.
        ValueError
            If ``sampled`` < 1 or another round's release is still pending.
        """
        if sampled < 1:
            raise ValueError(f"A release needs at least one sampled device. Found {sampled}.")
        if self._pending:
            # One release in flight: the ε committed here is the ε recorded at release.
            raise ValueError(f"Round {next(iter(self._pending))}'s release is still pending.")
        after = self.accountant.epsilon_if(self.event)
        if not after <= self.budget_epsilon:
            raise PrivacyBudgetStop(
                f"User-level privacy budget reached before round {server_round}: epsilon "
                f"{self.epsilon:.4f} of {self.budget_epsilon:g} spent (delta {self.delta:g}, "
                f"{self.accountant.accountant}); the next release would bring it to {after:.4f}."
            )
        update_sigma, count_stddev = self.noise_split(sampled)
        self._pending[server_round] = _Pending(sampled, self.clipping_norm, update_sigma, count_stddev, after)
        return self.clipping_norm

    def _generator(self, server_round: int) -> torch.Generator:
        if self.secure_mode:
            seed = secrets.randbits(64)
        else:
            # From the server's signing key: devices know `seed` and could regenerate noise
            # seeded from it alone, then subtract it from the release.
            seed = secret_seed(self._key, self.seed, server_round, _NOISE_STREAM)
        return torch.Generator(device="cpu").manual_seed(seed)

    def release(
        self,
        server_round: int,
        current: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        clipped: Sequence[bool],
    ) -> UserRelease:
        """Clip, sum, average over m, add noise, record: the round's private aggregate.

        Parameters
        ----------
        server_round : int
            A round begun with :meth:`begin_round`.
        current : Mapping[str, np.ndarray]
            The global model the devices were sent.
        updates : Sequence[Mapping[str, np.ndarray]]
            The models of the usable replies (same keys and shapes as ``current``); may be
            empty (noise-only release).
        clipped : Sequence[bool]
            Each reply's reported update-clipped bit (adaptive clipping).

        Returns
        -------
        UserRelease
            The released model ``w + Δ̄`` and what was recorded.

        Raises
        ------
        RuntimeError
            If the round was not begun.
        ValueError
            If there are more updates than sampled devices.
        """
        pending = self._take(server_round)
        m, norm = pending.sampled, pending.clipping_norm
        if len(updates) > m:
            raise ValueError(f"{len(updates)} updates for {m} sampled devices.")
        base = {k: np.asarray(v, dtype=np.float64) for k, v in current.items()}
        total = {k: np.zeros_like(v) for k, v in base.items()}
        # Σ (b_i − ½) over the devices aggregated, b_i = 1 for an unclipped update: centred,
        # so adding or removing a device moves it by ½ whatever b_i was (the sensitivity
        # Andrew et al.'s Thm. 1 assumes for σ_Δ); an absent device counts as ½.
        centred = 0.0
        for update, reported in zip(updates, clipped, strict=True):
            delta = {k: np.asarray(update[k], dtype=np.float64) - v for k, v in base.items()}
            length = get_norm(list(delta.values()))
            # Flower's clip_inputs_inplace divides by the norm; a zero update is legal.
            scale = min(1.0, norm / length) if length > 0 else 1.0
            centred += int(not reported and length <= norm * (1 + NORM_TOLERANCE)) - 0.5
            for key, value in delta.items():
                total[key] += value * scale
        return self._release(server_round, pending, base, total, centred, len(updates))

    def release_sum(
        self,
        server_round: int,
        current: Mapping[str, np.ndarray],
        total: Mapping[str, np.ndarray],
        *,
        aggregated: int,
        unclipped: float,
    ) -> UserRelease:
        """The round's private aggregate from a securely computed sum of clipped updates.

        Under secure aggregation the server sees only ``Σ Δ_i`` of the devices' own
        clipped updates and ``Σ b_i``; it cannot re-clip, so the sensitivity C/m rests
        on the devices clipping (as in Flower's client-side clipping). Noise, the fixed
        denominator and the ledger are those of :meth:`release`.

        Parameters
        ----------
        total : Mapping[str, np.ndarray]
            ``Σ Δ_i`` over the ``aggregated`` devices whose masked vectors were summed.
        unclipped : float
            ``Σ b_i``, the number of those devices whose update was not clipped.

        Raises
        ------
        RuntimeError
            If the round was not begun.
        ValueError
            If more devices were aggregated than sampled.
        """
        pending = self._take(server_round)
        if aggregated > pending.sampled:
            raise ValueError(f"{aggregated} updates for {pending.sampled} sampled devices.")
        base = {k: np.asarray(v, dtype=np.float64) for k, v in current.items()}
        summed = {k: np.asarray(total[k], dtype=np.float64).reshape(v.shape) for k, v in base.items()}
        return self._release(server_round, pending, base, summed, unclipped - 0.5 * aggregated, aggregated)

    def abandon(self, server_round: int) -> None:
        """Forget a begun round that releases nothing (secure aggregation failed)."""
        self._pending.pop(server_round, None)

    def _take(self, server_round: int) -> _Pending:
        pending = self._pending.pop(server_round, None)
        if pending is None:
            raise RuntimeError(f"Round {server_round} was not begun: no release was committed for it.")
        return pending

    def _release(
        self,
        server_round: int,
        pending: _Pending,
        base: dict[str, np.ndarray],
        total: dict[str, np.ndarray],
        centred: float,
        aggregated: int,
    ) -> UserRelease:
        m, norm = pending.sampled, pending.clipping_norm
        generator = self._generator(server_round)
        std = compute_stdv(pending.update_noise_multiplier, norm, m)
        arrays = {
            key: base[key] + total[key] / m + gaussian_noise(std, base[key].shape, generator, secure_mode=self.secure_mode)
            for key in base
        }
        next_norm = norm
        extra: dict[str, float | int] = {
            "sampled_devices": m,
            "aggregated_devices": aggregated,
            "noise_std": std,
        }
        if pending.count_noise_stddev is not None:
            noisy = centred + float(
                gaussian_noise(pending.count_noise_stddev, (), generator, secure_mode=self.secure_mode)
            )
            # Andrew et al. 2021, Alg. 1: geometric step on the *unclipped* share b̄.
            unclipped_share = noisy / m + 0.5
            next_norm = norm * math.exp(-self.clip_lr * (unclipped_share - self.target_quantile))
            extra.update(
                update_noise_multiplier=pending.update_noise_multiplier,
                count_noise_stddev=pending.count_noise_stddev,
                next_clipping_norm=next_norm,
            )
        epsilon = pending.epsilon
        self._ledger.append(
            server_round=server_round,
            event=self.event,
            clipping_norm=norm,
            delta=self.delta,
            epsilon=epsilon,
            accountant=self.accountant.accountant,
            budget_epsilon=self.budget_epsilon,
            private_key=self._key,
            extra=extra,
        )
        self.accountant.spend(self.event)  # the same composition as begin_round's: ε == epsilon
        self.clipping_norm = next_norm
        release = UserRelease(
            server_round=server_round,
            sampled=m,
            aggregated=aggregated,
            clipping_norm=norm,
            noise_multiplier=self.noise_multiplier,
            update_noise_multiplier=pending.update_noise_multiplier,
            count_noise_stddev=pending.count_noise_stddev,
            noise_std=std,
            epsilon=epsilon,
            next_clipping_norm=next_norm,
            arrays=arrays,
        )
        self.release_count += 1
        self.last_release = release
        logger.info(
            "Round %d user-level release: %d of %d sampled devices, C=%.4g, noise std %.3g, "
            "epsilon %.4f of %g%s",
            server_round, aggregated, m, norm, std, epsilon, self.budget_epsilon,
            f", next C={next_norm:.4g}" if self.adaptive else "",
        )
        return release

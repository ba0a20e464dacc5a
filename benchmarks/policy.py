"""Emotion-management policy benchmark: reward and regret of four policies on simulated people.

For ``--users`` simulated people (``simulations.users``), each over ``--decisions``
decisions (one every 15 min, after three 5-min observations), four policies run on the same
emotion trajectories under the same safety rules (``configs/policy/actions.yaml``):

* ``random``: a uniformly random allowed action;
* ``global prior only``: the federated prior, no local learning (greedy, no exploration);
* ``local only``: LinUCB from scratch;
* ``federated prior + personalisation``: LinUCB from the federated prior, learning locally.

The prior comes from ``--prior-users`` other people (disjoint ids), each running local
LinUCB for ``--decisions`` decisions and sharing only the emotion block of its statistics
(``shared_block``) through ``privatise_statistics`` (clipped to ``--clip``: user-level
adjacency, Gaussian noise on; by default split across all prior devices, as under secure
aggregation, ``--shares 1`` for local DP), averaged by ``aggregate_priors`` and shrunk to
an estimate worth ``--prior-strength`` observations (``shrinkage_prior``), as
``emofed simulate`` does with record-level noise for its own federation. The noise
multiplier is calibrated to ``--epsilon`` at ``--delta`` for the one release
(dp-accounting PLD) unless ``--noise-multiplier`` is given. Regret is
against an oracle that knows the person's true emotion and hidden preferences and picks the
best action in expectation among those the safety rules allow at that moment.

    .venv/bin/python benchmarks/policy.py                     # about a minute on 2 cores
    .venv/bin/python benchmarks/policy.py --encoder hashing --users 20 --prior-users 100
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from emofed.protocol import POLICY_VARIANT_LABELS
from policy.expression import MessageBank, build_encoder
from policy.federated import variants
from policy.release import aggregate_priors, privatise_statistics, shared_block, shrinkage_prior
from policy.rules import Policy, PolicyConfig, load_policy_config
from policy.state import PolicyStatistics
from privacy.accounting import PrivacyEvent, calibrate_noise, compute_epsilon
from simulations.users import Outcome, UserProfile, make_population, run_policy

ACCOUNTANT = "dpa_pld"


def build_prior(
    config: PolicyConfig,
    bank: MessageBank,
    people: Sequence[UserProfile],
    *,
    decisions: int,
    clip: float,
    noise_multiplier: float,
    shares: int,
    strength: float,
    seed: int,
) -> tuple[PolicyStatistics, dict, list[float]]:
    """Local LinUCB on every prior person; privatise each one's shared block; average; shrink.

    The same prior ``emofed simulate`` builds (``server.policy``), with user-level
    clipping of each person's whole block instead of record-level noise on the device.
    """
    local = replace(config, bandit=replace(config.bandit, kind="linucb", learn=True))
    rng = np.random.default_rng([seed, 99])
    shared, norms, params = [], [], {}
    for person in people:
        policy = Policy(local, bank=bank)
        run_policy(policy, person, decisions=decisions, seed=seed)
        stats = shared_block(policy.local_statistics())
        norms.append(stats.norm())
        noised, params = privatise_statistics(
            stats, clip=clip, noise_multiplier=noise_multiplier, rng=rng, shares=shares
        )
        shared.append(noised)
    mean = aggregate_priors(shared, device_noise_stddev=params["device_noise_stddev"])
    return shrinkage_prior(mean, strength=strength, ridge=config.bandit.ridge), params, norms


def _row(name: str, outcomes: Sequence[Outcome], window: int, quiet: str) -> str:
    reward = np.array([o.rewards.sum() for o in outcomes])
    regret = np.array([o.regret.sum() for o in outcomes])
    sem = regret.std(ddof=1) / np.sqrt(len(regret)) if len(regret) > 1 else 0.0
    first = np.mean([o.regret[:window].sum() for o in outcomes])
    last = np.mean([o.regret[-window:].sum() for o in outcomes])
    interventions = np.mean([sum(a != quiet for a in o.actions) for o in outcomes])
    distress = np.mean([sum(r == "sustained_distress" for r in o.rules) for o in outcomes])
    return (
        f"| {name} | {reward.mean():.1f} | {regret.mean():.1f} ± {sem:.1f} | {first:.1f} | "
        f"{last:.1f} | {interventions:.0f} | {distress:.1f} |"
    )


def main(argv: list[str]) -> int:
    """Build the prior, run the four policies, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50, help="evaluated people")
    parser.add_argument("--prior-users", type=int, default=300, help="other people, who build the prior")
    parser.add_argument("--decisions", type=int, default=300, help="decisions per person")
    parser.add_argument("--clip", type=float, default=25.0, help="L2 clip of each device's shared statistics")
    parser.add_argument(
        "--epsilon", type=float, default=3.0, help="target epsilon of the prior's release"
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--noise-multiplier", type=float, default=None, help="instead of calibrating to --epsilon"
    )
    parser.add_argument(
        "--shares", type=int, default=None, help="noise split across (default: all prior devices)"
    )
    parser.add_argument(
        "--encoder", choices=("minilm", "hashing"), default="minilm", help="message encoder"
    )
    parser.add_argument(
        "--prior-strength", type=float, default=3.0, help="pseudo-observations the prior is worth (policy.prior_strength)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/policy")
    args = parser.parse_args(argv)
    started = time.monotonic()
    config = load_policy_config(overrides=args.overrides)
    bank = MessageBank(
        config.messages, {a.name: a.description for a in config.actions}, build_encoder(args.encoder)
    )
    sigma = args.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(
            target_epsilon=args.epsilon,
            delta=args.delta,
            sample_rate=1.0,
            steps=1,
            sampling="no-amplification",
            accountant=ACCOUNTANT,
        )
    shares = args.shares or args.prior_users
    prior_people = make_population(
        args.prior_users, config.action_names, seed=args.seed, first_id=1_000_000
    )
    people = make_population(args.users, config.action_names, seed=args.seed)
    prior, params, norms = build_prior(
        config,
        bank,
        prior_people,
        decisions=args.decisions,
        clip=args.clip,
        noise_multiplier=sigma,
        shares=shares,
        strength=args.prior_strength,
        seed=args.seed,
    )
    epsilon = compute_epsilon([PrivacyEvent.from_dict(params)], delta=args.delta, accountant=ACCOUNTANT)
    built = time.monotonic() - started
    window = min(100, args.decisions)
    lines = [
        f"| policy | cumulative reward | cumulative regret | regret, first {window} | "
        f"regret, last {window} | interventions | distress rule fired |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (variant, variant_prior) in variants(config, prior).items():
        name = POLICY_VARIANT_LABELS[name]
        outcomes = [
            run_policy(
                Policy(variant, prior=variant_prior, bank=bank),
                person,
                decisions=args.decisions,
                seed=args.seed,
            )
            for person in people
        ]
        lines.append(_row(name, outcomes, window, config.safety.quiet_action))
    total = time.monotonic() - started
    mode = "local DP" if shares == 1 else f"split across {shares} devices under secure aggregation"
    print("\n".join(lines))
    print(
        f"\nMean per person over {args.users} people × {args.decisions} decisions (regret ± standard error; "
        f"expected rewards under feedback.rewards). Prior from {args.prior_users} other people: statistics "
        f"clipped to L2 norm {args.clip:g} (median norm before clipping {np.median(norms):.0f}), Gaussian "
        f"noise multiplier {sigma:.3f} ({mode}; each device adds noise of std "
        f"{params['device_noise_stddev']:.1f} to each of {params['dimension']} coordinates, "
        f"{params['device_noise_stddev'] * np.sqrt(args.prior_users):.1f} on the sum), "
        f"ε = {epsilon:.2f} at δ = {args.delta:g} for the {'device' if shares == 1 else 'sum'}'s release "
        f"({ACCOUNTANT}). Message encoder: {args.encoder}. Prior built in {built:.0f} s; "
        f"total {total:.0f} s.\nReproduce: `.venv/bin/python {('benchmarks/policy.py ' + ' '.join(argv)).strip()}`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

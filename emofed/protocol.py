"""What the coordinator and the devices say to each other, beyond Flower's own records.

Both sides import these names; neither imports the other's package.
"""

from __future__ import annotations

from pathlib import Path

# Config record keys of a training message (besides emofed.config.MESSAGE_CONFIG_KEY).
SERVER_ROUND_KEY = "server-round"  # set by Flower's strategies
CLIPPING_NORM_KEY = "clipping-norm"  # user-level DP: the norm each device clips its update to

# Training metrics every device sends; which extra ones depends on the privacy config.
TRAIN_METRICS = frozenset({"num-examples", "train-loss", "steps"})
DEVICE_DP_METRICS = frozenset(
    {
        "dp-epsilon",  # the device's cumulative epsilon after this round
        "dp-noise-multiplier",  # sigma of this round's DP-SGD
        "dp-sample-rate",  # Poisson sampling rate q of this round's DP-SGD
    }
)
UPDATE_CLIPPED_KEY = "update-clipped"  # 1 if the device's update was longer than the clipping norm
USER_DP_METRICS = frozenset({UPDATE_CLIPPED_KEY})

# Error codes of a declined request (Flower's own codes are below 1000).
ERROR_UNUSABLE_DATA = 1001
ERROR_BAD_REQUEST = 1002
ERROR_TRAINING_FAILED = 1003
ERROR_BUDGET_EXHAUSTED = 1004  # the device's privacy budget cannot pay for this round
ERROR_HELDOUT = 1005  # a held-out (test-only) device never trains


def train_metric_keys(device_dp: bool, user_dp: bool) -> frozenset[str]:
    """The exact metric keys of a training reply under the given privacy settings."""
    keys = set(TRAIN_METRICS)
    if device_dp:
        keys |= DEVICE_DP_METRICS
    if user_dp:
        keys |= USER_DP_METRICS
    return frozenset(keys)

# Evaluation metrics every device sends (per modality: the fused path with only that sensor).
# "heldout" is 1 on a test-only device of the held-out population, else 0; "skipped-*"
# count the device's samples (or one modality of them) it could not use, by modality
# ("skipped-other": unreadable lines, unknown labels, samples with nothing usable).
SKIPPED_METRICS = ("skipped-face", "skipped-voice", "skipped-text", "skipped-other")
EVAL_METRICS = frozenset(
    {"num-examples", "loss", "accuracy", "confusion", "heldout", *SKIPPED_METRICS}
    | {f"{m}-{kind}" for m in ("face", "voice", "text") for kind in ("correct", "total")}
)
# With personal layers on (``personal.enabled``): the personalised model's accuracy on
# the same test split; ``accuracy`` stays the global model's.
PERSONAL_ACCURACY_KEY = "personal-accuracy"
PERSONAL_EVAL_METRICS = frozenset({PERSONAL_ACCURACY_KEY})


def eval_metric_keys(personal: bool) -> frozenset[str]:
    """The exact metric keys of an evaluation reply, with or without personal layers."""
    return EVAL_METRICS | PERSONAL_EVAL_METRICS if personal else EVAL_METRICS

# Of those, the ones a coordinator accepts missing (read as 0): a device that predates
# held-out evaluation is a training device that reported no skips.
EVAL_OPTIONAL_METRICS = frozenset({"heldout", *SKIPPED_METRICS})

# The policy's federated prior (``server.policy``, ``policy.federated``): array keys of the
# released statistics (train.policy) and of the prior sent back (evaluate.policy), the
# compared policies, and the metrics of an evaluate.policy reply.
POLICY_STATISTICS_KEY = "policy-statistics"
POLICY_PRIOR_KEY = "policy-prior"
POLICY_VARIANTS = ("random", "prior", "local", "federated")
POLICY_VARIANT_LABELS = {
    "random": "random",
    "prior": "global prior only",
    "local": "local only",
    "federated": "federated prior + personalisation",
}
POLICY_SCORES = ("reward", "regret", "regret-first", "regret-last", "interventions")
POLICY_EVAL_METRICS = frozenset(f"policy-{v}-{s}" for v in POLICY_VARIANTS for s in POLICY_SCORES)
POLICY_TRAIN_METRICS = frozenset({"dp-epsilon"})

# Run-config key (simulation only): where simulated devices keep their own stores.
DEVICE_ROOT_KEY = "device-root"
# Node-config keys (deployment): the device's own store and its name in the ledger.
DEVICE_DIR_KEY = "device-dir"
DEVICE_ID_KEY = "device-id"


def simulated_device_root(run_dir: Path) -> Path:
    """Where simulated devices keep their stores: inside the run's working directory.

    The ServerApp writes the run to ``<run_dir>.incomplete`` and renames it when done
    (``server.rundir``), so the device stores end up in ``<run_dir>/simulated-devices``.
    """
    return run_dir.with_name(run_dir.name + ".incomplete") / "simulated-devices"

# Lines the ServerApp and the command line print for the user start with this prefix
# (`emofed simulate` keeps only these from Flower's log stream).
PROGRESS_PREFIX = "emofed |"

# Record names of every message and reply, and the metric FedAvg weights by.
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
WEIGHT_KEY = "num-examples"
DEVICE_EPSILON_KEY = "dp-epsilon"

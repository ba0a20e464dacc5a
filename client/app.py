"""The Flower ClientApp: what a device does when the coordinator asks it to train or evaluate.

Everything the device sends is built here: the shared-weight arrays the server sent
(updated), numeric metrics, and under device-level DP its signed privacy ledger.
Raw samples and features never leave this module, and every reply passes the
outgoing-message guard (:class:`DeviceGuardMod`) before it leaves the device.

A training reply carries (``emofed.protocol``):

* ``"arrays"``: the shared weights the server sent, same keys, shapes and dtypes;
  under user-level DP the update (new − received) is clipped to the message's
  ``clipping-norm`` before it is added back;
* ``"metrics"``: exactly ``train_metric_keys(device_dp, user_dp)``;
* ``"privacy.ledger"`` (device-level DP only): the device's whole signed chain.

Under secure aggregation (``client.secagg``) the update is masked after the guard and
no array leaves the device in the clear.

A device that must not train answers with an error reply instead: ``ERROR_*`` codes
of ``emofed.protocol``, with a one-line reason.
"""

from __future__ import annotations

# isort: off
import emofed.preload  # noqa: F401  (first: see emofed/preload.py)
# isort: on
import logging
import secrets
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.data import DeviceData, UnusableDeviceData, load_device_data
from client.dp import (
    DevicePrivacy,
    DeviceStore,
    DPSGDSettings,
    check_device_delta,
    clip_update,
    plan_device_budget,
    plan_dp_sgd,
    release_privately,
    user_clipping_norm,
)
from client.personal import existing_device_store, personal_arrays_in, personalise
from client.secagg import secure_aggregation_mod
from client.train import evaluate_local, select_device, train_local
from corpora.folder import FederationFolderError
from device.layout import PERSONAL_OBJECT, POLICY_PRIOR_OBJECT, POLICY_STATE_OBJECT
from device.store import StoreError
from emofed.config import MESSAGE_CONFIG_KEY, ConfigError, EmofedConfig, fingerprint, from_json
from emofed.protocol import (
    DEVICE_DIR_KEY,
    DEVICE_DP_METRICS,
    ERROR_BAD_REQUEST,
    ERROR_BUDGET_EXHAUSTED,
    ERROR_HELDOUT,
    ERROR_TRAINING_FAILED,
    ERROR_UNUSABLE_DATA,
    EVAL_METRICS,
    PERSONAL_ACCURACY_KEY,
    PERSONAL_EVAL_METRICS,
    POLICY_EVAL_METRICS,
    POLICY_PRIOR_KEY,
    POLICY_STATISTICS_KEY,
    SERVER_ROUND_KEY,
    SKIPPED_METRICS,
    TRAIN_METRICS,
    USER_DP_METRICS,
)
from models import NUM_CLASSES, MultimodalEmotionNet, build_model, get_state, set_state
from policy.federated import (
    policy_config,
    prior_size,
    statistics_from_state,
    statistics_size,
)
from policy.release import SHARED_NORM_BOUND, privatise_events, shared_block
from policy.state import NUM_FEATURES, PolicyStatistics
from privacy.errors import GuardViolation, LedgerTampered, PrivacyBudgetExceeded
from privacy.guard import LEDGER_RECORD, OutgoingGuardMod
from privacy.keys import public_key_to_string

logger = logging.getLogger(__name__)

__all__ = [
    "ERROR_BAD_REQUEST",
    "ERROR_BUDGET_EXHAUSTED",
    "ERROR_TRAINING_FAILED",
    "ERROR_UNUSABLE_DATA",
    "METRIC_ALLOWLIST",
    "DeviceGuardMod",
    "app",
    "evaluate",
    "train",
]

# Every metric a reply may carry; the handlers send exactly the protocol's set per reply.
METRIC_ALLOWLIST = (
    TRAIN_METRICS
    | DEVICE_DP_METRICS
    | USER_DP_METRICS
    | EVAL_METRICS
    | PERSONAL_EVAL_METRICS
    | POLICY_EVAL_METRICS
)
CONFUSION_KEY = "confusion"


class DeviceGuardMod(OutgoingGuardMod):
    """The outgoing-message guard, with the device's own ledger key settled per reply.

    One mod serves every device of a (simulation) process, so the key that shipped
    ledger entries must be signed with (this device's, read from its store; the
    record's ``public_key`` must be it) is looked up after the ClientApp answered.
    A reply array equal to one of the device's personal layers (``client.personal``)
    is refused too: the global version of a personal module has the same name and
    shape, so only the values can tell a personal layer leaking out.
    Everything else, including evaluation's ``confusion`` counts (``count_vectors``),
    is the base guard's.
    """

    def __call__(
        self, msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        """Run the ClientApp, then let its reply out only if the guard allows it."""
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        try:
            key = _ledger_key(reply.content, ctxt)
            _no_personal_layers(reply.content, ctxt, msg.content)
        except GuardViolation as err:
            logger.error("%s", err)
            return self._blocked(msg, "privacy guard blocked the reply: " + ", ".join(err.kinds))
        kwargs = {**self.guard_kwargs, "ledger_public_key": key}
        guard = OutgoingGuardMod(self.metric_allowlist, **kwargs)
        checked = guard(msg, ctxt, lambda _msg, _ctxt: reply)
        return checked if checked.has_error() else reply


def _no_personal_layers(content: RecordDict, ctxt: Context, received: RecordDict) -> None:
    if not any(len(record) for record in content.array_records.values()):
        return
    try:
        store = existing_device_store(ctxt)
        personal = None
        if store is not None:
            with store:
                personal = store.get_arrays(PERSONAL_OBJECT) if PERSONAL_OBJECT in store else None
    except (OSError, ValueError, StoreError) as err:
        # Fail closed: a device that cannot read its personal layers cannot tell them apart.
        raise GuardViolation(
            f"Outgoing message blocked: the device's store is unusable ({err}).",
            kinds=("personal layer",),
        ) from None
    leaked = personal_arrays_in(content, personal, received) if personal else []
    if leaked:
        raise GuardViolation(
            f"Outgoing message blocked: array(s) {sorted(leaked)[:4]} hold the device's personal layers.",
            kinds=("personal layer",),
        )


def _ledger_key(content: RecordDict, ctxt: Context) -> str | None:
    if LEDGER_RECORD not in content.config_records:
        return None
    try:
        key = public_key_to_string(DeviceStore.from_context(ctxt).public_key())
    except (OSError, ValueError) as err:
        raise GuardViolation(
            f"Outgoing message blocked: the device's ledger key is unusable ({err}).",
            kinds=("ledger key",),
        ) from None
    if content.config_records[LEDGER_RECORD].get("public_key") != key:
        raise GuardViolation(
            "Outgoing message blocked: ledger public_key is not this device's key.",
            kinds=("ledger key",),
        )
    return key


# The guard checks what the app answers; secure aggregation (outermost) then masks the
# guarded update and drops every array, and answers the protocol's key-exchange stages.
app = ClientApp(
    mods=[
        secure_aggregation_mod,
        DeviceGuardMod(
            METRIC_ALLOWLIST,
            allow_ledger=True,
            count_vectors={CONFUSION_KEY: NUM_CLASSES * NUM_CLASSES},
        )
    ]
)

_MODELS: dict[str, MultimodalEmotionNet] = {}


def _config(msg: Message) -> EmofedConfig:
    try:
        record = msg.content["config"]
        text = record[MESSAGE_CONFIG_KEY]
    except KeyError:
        raise ConfigError(f"message carries no '{MESSAGE_CONFIG_KEY}' in its config record") from None
    if not isinstance(text, str):
        raise ConfigError(f"'{MESSAGE_CONFIG_KEY}' must be a JSON string")
    return from_json(text)


def _model(cfg: EmofedConfig, arrays: ArrayRecord) -> MultimodalEmotionNet:
    # One network per process and model config: building the text encoder is the slow part.
    key = fingerprint(cfg.model)
    if key not in _MODELS:
        torch.manual_seed(cfg.seed)
        _MODELS[key] = build_model(cfg.model)
    model = _MODELS[key]
    set_state(model, {k: a.numpy() for k, a in arrays.items()})
    return model


def _seed(cfg: EmofedConfig, msg: Message, context: Context) -> int:
    server_round = int(msg.content["config"].get(SERVER_ROUND_KEY, 0))
    node = str(context.node_config.get("partition-id", context.node_id))
    return zlib.crc32(f"{cfg.seed}:{server_round}:{node}".encode())


def _server_round(config: ConfigRecord) -> int:
    value = config.get(SERVER_ROUND_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"Training message config '{SERVER_ROUND_KEY}' must be a round number. Found {value!r}."
        )
    return value


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    logger.warning("Declining %s request: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _answer(msg: Message, work: Callable[[], Message]) -> Message:
    """Run ``work``; turn what can go wrong on a device into a one-line error reply."""
    try:
        return work()
    except (UnusableDeviceData, FederationFolderError) as err:
        return _error_reply(msg, ERROR_UNUSABLE_DATA, f"unusable device data: {err}")
    except PrivacyBudgetExceeded as err:
        return _error_reply(msg, ERROR_BUDGET_EXHAUSTED, str(err))
    except LedgerTampered as err:
        return _error_reply(msg, ERROR_TRAINING_FAILED, f"device ledger fails verification: {err}")
    except (ConfigError, ValueError, KeyError, TypeError) as err:
        return _error_reply(msg, ERROR_BAD_REQUEST, f"{type(err).__name__}: {err}")
    except FloatingPointError as err:
        return _error_reply(msg, ERROR_TRAINING_FAILED, str(err))
    except (OSError, StoreError) as err:
        return _error_reply(msg, ERROR_TRAINING_FAILED, f"device store unusable: {err}")


def _handle(msg: Message, context: Context, *, train: bool) -> Message:
    return _answer(msg, lambda: _handle_model(msg, context, train=train))


def _handle_model(msg: Message, context: Context, *, train: bool) -> Message:
    cfg = _config(msg)
    torch.set_num_threads(cfg.runtime.threads)
    data = load_device_data(cfg, context.node_config)
    if train and data.heldout:
        return _error_reply(msg, ERROR_HELDOUT, f"{data.device_id} is a held-out device: it evaluates, never trains")
    if "arrays" not in msg.content.array_records:
        raise ConfigError("message carries no 'arrays' record")
    arrays = msg.content["arrays"]
    model = _model(cfg, arrays)
    device = select_device(cfg.runtime)
    if train:
        return _train(cfg, msg, context, model, arrays, data.train, device)
    metrics = _evaluate(cfg, model, data.test, device)
    if cfg.personal.enabled and data.heldout:
        # Nothing to fine-tune on: a held-out device's personalised model is the global one.
        metrics[PERSONAL_ACCURACY_KEY] = metrics["accuracy"]
    elif cfg.personal.enabled:
        with DeviceStore.from_context(context).open_store() as store:
            metrics[PERSONAL_ACCURACY_KEY] = personalise(
                model,
                data.train,
                data.test,
                store,
                cfg=cfg.personal,
                batch_size=cfg.train.batch_size,
                aux_weight=cfg.model.fusion.aux_weight,
                device=device,
                seed=_seed(cfg, msg, context),
            )
    metrics.update(heldout_and_skips(data))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _train(
    cfg: EmofedConfig,
    msg: Message,
    context: Context,
    model: MultimodalEmotionNet,
    arrays: ArrayRecord,
    data: Any,
    device: torch.device,
) -> Message:
    config = msg.content["config"]
    proximal_mu = float(config.get("proximal-mu", 0.0))
    # Everything that can refuse the round is settled before training.
    clipping_norm = user_clipping_norm(config) if cfg.privacy.user.enabled else None
    settings: DPSGDSettings | None = None
    if cfg.privacy.device.enabled:
        server_round = _server_round(config)
        check_device_delta(cfg.privacy.delta, num_examples=len(data))
        plan = plan_dp_sgd(
            len(data), batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs
        )
        settings = plan_device_budget(cfg, plan).dp_sgd

    def train_and_clip(seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        result = train_local(
            model,
            data,
            cfg=cfg.train,
            aux_weight=cfg.model.fusion.aux_weight,
            device=device,
            seed=seed,
            proximal_mu=proximal_mu,
            dp=settings,
        )
        updated = get_state(model, list(arrays.keys()))
        metrics: dict[str, Any] = {
            "num-examples": len(data), "train-loss": result.loss, "steps": result.steps
        }
        if clipping_norm is not None:
            received = {k: a.numpy() for k, a in arrays.items()}
            metrics["update-clipped"] = int(clip_update(updated, received, clipping_norm=clipping_norm))
        return updated, metrics

    ledger = None
    if settings is None:
        updated, metrics = train_and_clip(_seed(cfg, msg, context))
    else:
        dp_sgd = settings
        privacy = DevicePrivacy.open(DeviceStore.from_context(context), cfg.privacy)
        extra = {
            "examples": len(data),
            "batch_size": cfg.train.batch_size,
            "local_epochs": cfg.train.local_epochs,
        }
        released = release_privately(
            privacy,
            dp_sgd.event,
            server_round=server_round,
            mechanism=lambda: (
                train_and_clip(privacy.noise_seed(cfg.seed, server_round)),
                dp_sgd.max_grad_norm,
                extra,
            ),
        )
        (updated, metrics), ledger = released.value, released.ledger
        metrics["dp-epsilon"] = released.epsilon
        metrics["dp-noise-multiplier"] = dp_sgd.noise_multiplier
        metrics["dp-sample-rate"] = dp_sgd.plan.sample_rate
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in updated.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    if ledger is not None:
        content[LEDGER_RECORD] = ledger
    return Message(content, reply_to=msg)


def _evaluate(
    cfg: EmofedConfig, model: MultimodalEmotionNet, data: Any, device: torch.device
) -> dict[str, Any]:
    result = evaluate_local(model, data, batch_size=max(cfg.train.batch_size, 64), device=device)
    metrics: dict[str, Any] = {
        "num-examples": result.num_examples,
        "loss": result.loss,
        "accuracy": result.accuracy,
        CONFUSION_KEY: [int(c) for c in result.confusion.reshape(-1)],
    }
    # Every key always (zeros for a missing sensor): the server accepts one key set.
    for modality, total in result.modality_total.items():
        metrics[f"{modality}-correct"] = int(result.modality_correct[modality])
        metrics[f"{modality}-total"] = int(total)
    return metrics


def heldout_and_skips(data: DeviceData) -> dict[str, int]:
    """The ``heldout`` flag and ``skipped-*`` counts of an evaluation reply (counts only).

    Skip reasons are grouped by modality from their prefix (``face: ...``,
    ``face/...``); anything else (unreadable lines, unknown labels, samples with
    nothing usable) is ``skipped-other``. The reasons themselves stay in the device's log.
    """
    counts = dict.fromkeys(SKIPPED_METRICS, 0)
    for reason, n in data.skipped.items():
        modality = reason.replace("/", ":").split(":", 1)[0].strip()
        key = f"skipped-{modality}"
        counts[key if key in counts else "skipped-other"] += int(n)
    return {"heldout": int(data.heldout), **counts}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the shared layers on this device's training split (DP-SGD under device DP)."""
    return _handle(msg, context, train=True)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this device's test split.

    With personal layers on, the device first fine-tunes them (``client.personal``) and
    also reports the personalised model's accuracy on the same split.
    """
    return _handle(msg, context, train=False)


# -- the policy's federated prior (policy.federated, server.policy) ----------------------


def _policy_array(msg: Message, key: str, size: int) -> np.ndarray:
    record = msg.content.array_records.get("arrays")
    if record is None or key not in record:
        raise ConfigError(f"message carries no '{key}' array")
    vector = record[key].numpy()
    if vector.shape != (size,) or vector.dtype != np.float64:
        raise ValueError(
            f"'{key}' must be float64 of shape ({size},) for the policy catalogue. "
            f"Found {vector.dtype} {vector.shape}."
        )
    if not np.isfinite(vector).all():
        raise ValueError(f"'{key}' holds values that are not finite.")
    return vector


def _simulated(context: Context) -> bool:
    return not context.node_config.get(DEVICE_DIR_KEY)


def _policy_statistics(cfg: EmofedConfig, context: Context) -> PolicyStatistics:
    device_id = DeviceStore.from_context(context).device_id
    if _simulated(context):
        from simulations.users import history_statistics, simulated_person  # simulation only

        return history_statistics(cfg, simulated_person(cfg, device_id))
    with DeviceStore.from_context(context).open_store() as store:
        state = store.get_json(POLICY_STATE_OBJECT) if POLICY_STATE_OBJECT in store else None
    if state is None:
        raise UnusableDeviceData("no policy feedback recorded on this device yet (run `emofed device run`)")
    return statistics_from_state(cfg, state)


def _train_policy(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    if not cfg.policy.enabled:
        raise ConfigError("the policy prior is off in this run (policy.enabled=false)")
    _policy_array(msg, POLICY_STATISTICS_KEY, statistics_size(cfg))  # the template the guard holds the reply to
    stats = shared_block(_policy_statistics(cfg, context))
    vector = stats.to_vector()
    metrics: dict[str, Any] = {}
    ledger = None
    event = plan_device_budget(cfg).policy_release
    if event is not None:
        server_round = _server_round(msg.content["config"])
        privacy = DevicePrivacy.open(DeviceStore.from_context(context), cfg.privacy)

        def privatise() -> tuple[PolicyStatistics, float, dict[str, int | float]]:
            seed = (
                secrets.randbits(128)
                if cfg.privacy.secure_mode
                else privacy.noise_seed("policy", cfg.seed, server_round)
            )
            noised, params = privatise_events(
                stats,
                noise_multiplier=event.noise_multiplier,
                reward_bound=policy_config(cfg).feedback.reward_bound,
                rng=np.random.default_rng(seed),
                feature_bound=SHARED_NORM_BOUND,
            )
            return noised, params["sensitivity"], {"policy_statistics": 1, "dimension": params["dimension"]}

        released = release_privately(privacy, event, server_round=server_round, mechanism=privatise)
        metrics["dp-epsilon"] = released.epsilon
        ledger = released.ledger
        vector = released.value.to_vector()
    content = RecordDict(
        {
            "arrays": ArrayRecord({POLICY_STATISTICS_KEY: Array(np.ascontiguousarray(vector, dtype=np.float64))}),
            "metrics": MetricRecord(metrics),
        }
    )
    if ledger is not None:
        content[LEDGER_RECORD] = ledger
    return Message(content, reply_to=msg)


def _evaluate_policy(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    if not cfg.policy.enabled:
        raise ConfigError("the policy prior is off in this run (policy.enabled=false)")
    actions = policy_config(cfg).action_names
    prior = PolicyStatistics.from_vector(_policy_array(msg, POLICY_PRIOR_KEY, prior_size(cfg)), actions, NUM_FEATURES)
    with DeviceStore.from_context(context).open_store() as store:
        store.put_json(POLICY_PRIOR_OBJECT, prior.to_dict())  # what `emofed device run` starts from
    metrics: dict[str, Any] = {}
    if _simulated(context):
        device_id = DeviceStore.from_context(context).device_id
        from simulations.users import evaluate_policies, simulated_person  # simulation only

        metrics = evaluate_policies(cfg, prior, simulated_person(cfg, device_id))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train("policy")
def train_policy(msg: Message, context: Context) -> Message:
    """Share this device's policy statistics (privatised under device-level DP)."""
    return _answer(msg, lambda: _train_policy(msg, context))


@app.evaluate("policy")
def evaluate_policy(msg: Message, context: Context) -> Message:
    """Adopt the federated policy prior; a simulated device also scores four policies with it."""
    return _answer(msg, lambda: _evaluate_policy(msg, context))

"""Tests of the device runtime: `emofed device run` on a generated clip, its store, its inputs."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
import torch
from safetensors.numpy import save_file

from cli.main import main
from device.capture import CaptureError, TextSource, VideoSource, read_feedback
from device.layout import POLICY_PRIOR_OBJECT, POLICY_STATE_OBJECT, has_store, open_device_store
from device.recognition import ModelLoadError, apply_personal_layers, load_global_model
from device.runtime import EVENT_KEYS, STAGES
from device.store import EncryptedStore, generate_key_file
from emofed.config import load_config, to_json, to_yaml
from models import MODALITIES, build_model, get_state, shared_state_keys
from models.labels import EMOTIONS
from policy.rules import RULES, load_policy_config
from simulations.clips import write_clip

APP = Path(__file__).resolve().parents[2]
WINDOW = 2.0
CLIP = (("happy", 3.0), ("sad", 3.0))  # 6 s: three windows


def _make_run(root: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """A run directory as `emofed simulate` leaves it, with untrained smoke-config weights."""
    torch.manual_seed(0)
    cfg = load_config(APP / "configs" / "smoke.yaml")
    model = build_model(cfg.model, device="cpu")
    keys = [k for k in shared_state_keys(model) if not k.startswith(drop)] if drop else shared_state_keys(model)
    arrays = {k: np.ascontiguousarray(v) for k, v in get_state(model, keys).items()}
    root.mkdir(parents=True)
    save_file(arrays, str(root / "model.safetensors"), metadata={"config": to_json(cfg), "keys": ",".join(keys)})
    (root / "config.yaml").write_text(to_yaml(cfg))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run directory and a 6 s clip (video, WAV, text)."""
    root = tmp_path_factory.mktemp("runtime")
    run = _make_run(root / "run")
    clip = write_clip(root / "clip", schedule=CLIP, fps=10.0, text_every_s=2.0, seed=3)
    return {"run": run, "video": clip.video, "audio": clip.audio, "text": clip.text, "root": root}


def _key(tmp_path: Path, name: str = "store.key") -> Path:
    return generate_key_file(tmp_path / "keys" / name)


def _run(capsys: pytest.CaptureFixture[str], device: Path, assets: dict[str, Path], *extra: str,
         inputs: tuple[str, ...] = ("video", "audio", "text")) -> tuple[int, list[dict], str]:
    argv = ["device", "run", "--device-dir", str(device), "--model", str(assets["run"]), "--window", str(WINDOW)]
    for name in inputs:
        argv += [f"--{name}", str(assets[name])]
    code = main([*argv, *extra])
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return code, events, err


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file() and p.name != "runtime.lock"
    }


def _check_decision(event: dict, window_s: float = WINDOW) -> None:
    """Raise AssertionError unless ``event`` is a well-formed decision event."""
    config = load_policy_config()
    assert tuple(event) == EVENT_KEYS
    assert event["type"] == "decision" and isinstance(event["id"], int)
    window = event["window"]
    assert math.isclose(window["end_s"] - window["start_s"], window_s)
    assert math.isclose(window["start_s"], window["index"] * window_s)
    assert event["modalities"] and set(event["modalities"]) <= set(MODALITIES)
    assert set(event["by_modality"]) == set(event["modalities"])
    for probabilities in (event["emotion"]["probabilities"], event["smoothed"]):
        assert tuple(probabilities) == EMOTIONS
        assert all(0.0 <= p <= 1.0 for p in probabilities.values())
        assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-3)
    top = max(event["emotion"]["probabilities"], key=event["emotion"]["probabilities"].get)
    assert event["emotion"]["label"] == top
    assert -1.0 <= event["valence"] <= 1.0 and -1.0 <= event["arousal"] <= 1.0
    assert event["action"] in config.action_names
    assert event["rule"] is None or event["rule"] in RULES
    quiet = event["action"] == config.safety.quiet_action
    assert (event["message"] is None) == quiet and (event["message_id"] is None) == quiet
    assert tuple(event["expression"]) == config.expression.blendshapes
    assert all(0.0 <= w <= 1.0 for w in event["expression"].values())


def test_device_run_emits_well_formed_events_and_latency(tmp_path, assets, capsys):
    """A 6 s video + WAV + text clip gives one well-formed decision per window and a latency table."""
    code, events, err = _run(capsys, tmp_path / "device", assets, "--key-file", str(_key(tmp_path)))
    assert code == 0, err
    assert [e["window"]["index"] for e in events] == [0, 1, 2]
    assert [e["id"] for e in events] == [0, 1, 2]
    for event in events:
        _check_decision(event)
    used = {m for e in events for m in e["modalities"]}
    assert used == set(MODALITIES)  # faces detected, voice above silence, text lines placed
    assert all(e["timestamp"] < f["timestamp"] for e, f in zip(events, events[1:], strict=False))
    assert "Traceback" not in err
    table = err[err.index("latency per window"):]
    for stage in (*STAGES, "total"):
        assert f"\n{stage} " in table


def test_state_survives_a_restart_encrypted_on_disk(tmp_path, assets, capsys):
    """A second run continues the first one's policy, and nothing in the folder is plaintext state."""
    device = tmp_path / "device"
    key = _key(tmp_path)
    code, first, _ = _run(capsys, device, assets, "--key-file", str(key))
    assert code == 0
    with EncryptedStore.open(device / "store", key_file=key) as store:
        saved = store.get_json(POLICY_STATE_OBJECT)
    assert saved["step"] == len(first)
    code, second, err = _run(capsys, device, assets, "--key-file", str(key))
    assert code == 0, err
    assert second[0]["id"] == len(first)
    assert second[0]["timestamp"] > first[-1]["timestamp"]
    with EncryptedStore.open(device / "store", key_file=key) as store:
        state = store.get_json(POLICY_STATE_OBJECT)
    assert state["step"] == len(first) + len(second)
    for path in device.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for marker in (b"bandit", b"tracker", b"no_action", b"interventions"):
                assert marker not in blob, path


def test_default_key_file_is_created_owner_only(tmp_path, assets, capsys):
    """Without a key option the store's key goes to DIR/keys/store.key (0600) and reopens the store."""
    device = tmp_path / "device"
    code, events, err = _run(capsys, device, assets, inputs=("text",))
    assert code == 0, err and events
    key = device / "keys" / "store.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
    with EncryptedStore.open(device / "store", key_file=key) as store:
        assert POLICY_STATE_OBJECT in store


def test_wrong_key_is_refused_cleanly_and_the_store_is_untouched(tmp_path, assets, capsys):
    """Another key file or a passphrase on a key-file store: a one-line error, the store's bytes unchanged."""
    device = tmp_path / "device"
    assert _run(capsys, device, assets, "--key-file", str(_key(tmp_path)), inputs=("text",))[0] == 0
    before = _tree_digest(device)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("not the key\n")
    for option in (["--key-file", str(_key(tmp_path, "other.key"))], ["--passphrase-file", str(passphrase)]):
        code, events, err = _run(capsys, device, assets, *option, inputs=("text",))
        assert code == 2 and events == []
        assert err.startswith("emofed: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _tree_digest(device) == before


def test_passphrase_store_round_trips(tmp_path, assets, capsys):
    """A passphrase-file store opens again with the same passphrase and refuses another one."""
    device = tmp_path / "device"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("correct horse battery staple\n")
    bad.write_text("correct horse battery stable\n")
    assert _run(capsys, device, assets, "--passphrase-file", str(good), inputs=("text",))[0] == 0
    code, _, err = _run(capsys, device, assets, "--passphrase-file", str(bad), inputs=("text",))
    assert code == 2 and "Wrong passphrase" in err
    code, events, _ = _run(capsys, device, assets, "--passphrase-file", str(good), inputs=("text",))
    assert code == 0 and events[0]["id"] == 3


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [(("audio", "text"), {"voice", "text"}), (("video",), {"face"}), (("text",), {"text"})],
)
def test_missing_modalities_still_yield_events(tmp_path, assets, capsys, inputs, expected):
    """Without a camera, microphone or text the others still give well-formed decisions."""
    code, events, err = _run(capsys, tmp_path / "device", assets, "--key-file", str(_key(tmp_path)), inputs=inputs)
    assert code == 0, err
    assert events
    for event in events:
        _check_decision(event)
    assert {m for e in events for m in e["modalities"]} == expected


def test_feedback_updates_the_policy_state(tmp_path, assets, capsys):
    """'helped' answers the first intervention: a feedback event, and the bandit's statistics change."""
    feedback = tmp_path / "feedback.txt"
    feedback.write_text("# my answers\nhelped\n")
    states = {}
    for name, extra in (("without", ()), ("with", ("--feedback", str(feedback)))):
        device = tmp_path / name
        key = _key(tmp_path, f"{name}.key")
        code, events, err = _run(capsys, device, assets, "--key-file", str(key), *extra)
        assert code == 0, err
        with EncryptedStore.open(device / "store", key_file=key) as store:
            states[name] = store.get_json(POLICY_STATE_OBJECT)
        if extra:
            answers = [e for e in events if e["type"] == "feedback"]
            first = next(e for e in events if e["type"] == "decision" and e["action"] != "no_action")
            assert answers == [{"type": "feedback", "decision": first["id"], "response": "helped", "reward": 1.0}]
    assert states["with"]["bandit"] != states["without"]["bandit"]
    pending = {e["id"] for e in states["with"]["pending"]}
    assert answers[0]["decision"] not in pending


def test_feedback_by_id_answers_a_decision_of_an_earlier_session(tmp_path, assets, capsys):
    """'ID RESPONSE' answers a decision the previous run made, kept pending in the store."""
    device, key = tmp_path / "device", _key(tmp_path)
    code, events, _ = _run(capsys, device, assets, "--key-file", str(key), inputs=("text",))
    assert code == 0
    feedback = tmp_path / "feedback.txt"
    feedback.write_text(f"{events[0]['id']} dismissed\n")
    code, again, _ = _run(capsys, device, assets, "--key-file", str(key), "--feedback", str(feedback), inputs=("text",))
    assert code == 0
    assert again[0] == {"type": "feedback", "decision": events[0]["id"], "response": "dismissed", "reward": -0.5}


def _write_bad(tmp_path: Path, kind: str) -> tuple[str, Path]:
    path = tmp_path / f"bad-{kind}"
    rng = np.random.default_rng(0)
    if kind == "garbage-video":
        path.write_bytes(rng.bytes(4000))
        return "video", path
    if kind == "empty-video":
        path.write_bytes(b"")
        return "video", path
    if kind == "garbage-wav":
        path.write_bytes(b"RIFF" + rng.bytes(4000))
        return "audio", path
    if kind == "empty-wav":
        soundfile.write(str(path.with_suffix(".wav")), np.zeros(0, dtype=np.float32), 16000)
        return "audio", path.with_suffix(".wav")
    if kind == "empty-text":
        path.write_text("\n  \n")
        return "text", path
    if kind == "binary-text":
        path.write_bytes(b"\xff\xfe\x00bad")
        return "text", path
    path.write_text("helped\nmaybe later\n")  # bad feedback
    return "feedback", path


@pytest.fixture(scope="module")
def used_device(assets: dict[str, Path]) -> tuple[Path, Path, dict[str, str]]:
    """A device folder after one session, its key file and the digest of its files."""
    device = assets["root"] / "used-device"
    key = generate_key_file(assets["root"] / "used-keys" / "store.key")
    argv = ["device", "run", "--device-dir", str(device), "--model", str(assets["run"]), "--text", str(assets["text"])]
    assert main([*argv, "--key-file", str(key)]) == 0
    return device, key, _tree_digest(device)


@pytest.mark.parametrize(
    "kind", ["garbage-video", "empty-video", "garbage-wav", "empty-wav", "empty-text", "binary-text", "bad-feedback"]
)
def test_bad_inputs_give_one_line_errors_and_leave_the_store_alone(tmp_path, assets, used_device, capsys, kind):
    """A corrupt or empty input: exit 2, one line on stderr, no traceback, the store's bytes unchanged."""
    device, key, before = used_device
    option, path = _write_bad(tmp_path, kind)
    inputs = ("text",) if option == "feedback" else ()
    code, events, err = _run(capsys, device, assets, "--key-file", str(key), f"--{option}", str(path), inputs=inputs)
    assert code == 2 and events == []
    assert err.startswith("emofed: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _tree_digest(device) == before
    fresh = tmp_path / "fresh"
    assert _run(capsys, fresh, assets, f"--{option}", str(path), inputs=inputs)[0] == 2
    assert not (fresh / "store").exists()  # nothing created for a session that cannot start


def test_tampered_policy_state_is_a_clean_error(tmp_path, assets, capsys):
    """A modified policy-state object: a one-line error naming it, not a silent reset."""
    device, key = tmp_path / "device", _key(tmp_path)
    assert _run(capsys, device, assets, "--key-file", str(key), inputs=("text",))[0] == 0
    target = device / "store" / "objects" / f"{POLICY_STATE_OBJECT}.bin"
    blob = bytearray(target.read_bytes())
    blob[40] ^= 0x01
    target.write_bytes(bytes(blob))
    code, events, err = _run(capsys, device, assets, "--key-file", str(key), inputs=("text",))
    assert code == 1 and events == []
    assert "failed authentication" in err and err.count("\n") == 1
    assert target.read_bytes() == bytes(blob)  # not replaced by a fresh state


def test_personal_layers_in_the_store_replace_the_global_head(tmp_path, assets):
    """Personal layers saved by federated personalisation are what the runtime's model uses."""
    from client.personal import personal_keys, save_personal

    loaded = load_global_model(assets["run"])
    keys = personal_keys(loaded.model, loaded.config.personal.layers)
    personal = {k: np.full_like(v, 0.25) for k, v in get_state(loaded.model, keys).items()}
    assert not has_store(tmp_path / "device")
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    assert has_store(tmp_path / "device")
    save_personal(store, personal)
    apply_personal_layers(loaded, store)
    assert loaded.personal == keys
    for key, value in get_state(loaded.model, keys).items():
        np.testing.assert_array_equal(value, personal[key])


def test_a_model_without_head_weights_needs_personal_layers(tmp_path):
    """Global weights lacking the head, and no personal layers in the store: a clear error."""
    run = _make_run(tmp_path / "run", drop=("head.",))
    loaded = load_global_model(run)
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    with pytest.raises(ModelLoadError, match="no weights for head"):
        apply_personal_layers(loaded, store)


def test_text_lines_land_in_their_windows():
    """'[SECONDS] text' goes to the window holding that second; plain file lines fill windows in order."""
    source = TextSource(["first", "[5.1] stamped", "", "second", "[0.5] early"], window=2.0)
    assert [source.read(i) for i in range(4)] == ["first early", "second", "stamped", None]
    assert source.windows_needed == 3
    with pytest.raises(CaptureError, match="holds no text"):
        TextSource(["", "   "], window=2.0)


def test_feedback_lines_parse_or_fail_with_the_line_number():
    """Feedback lines: RESPONSE or ID RESPONSE, comments ignored, unknown responses refused."""
    lines = read_feedback(["# header", "helped", "7 Dismissed  # late", ""], ["helped", "dismissed"])
    assert [(x.decision, x.response, x.line) for x in lines] == [(None, "helped", 2), (7, "dismissed", 3)]
    with pytest.raises(CaptureError, match="feedback line 2: response must be one of helped"):
        read_feedback(["helped", "great"], ["helped"])


def test_video_source_returns_the_middle_frame_of_each_window(tmp_path):
    """At 10 fps and 1 s windows, window k gets frame 10k+5 (frames carry their index as brightness)."""
    path = tmp_path / "ramp.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 32))
    for index in range(25):
        writer.write(np.full((32, 32, 3), index * 8, dtype=np.uint8))
    writer.release()
    video = VideoSource(str(path))
    levels = []
    for k in range(4):
        frame = video.read(k * 1.0, (k + 1) * 1.0)
        levels.append(None if frame is None else round(float(frame.mean()) / 8))
    assert levels[:3] == [5, 15, 24]
    assert video.exhausted and levels[3] is None


def test_live_text_lines_belong_to_the_window_they_arrive_in():
    """On a live stdin a plain line goes to the current window, a stamped one to its own."""
    import io
    import time

    from device.capture import LiveLines

    live = LiveLines(io.StringIO("hello there\n[5.0] later on\n"))
    deadline = time.monotonic() + 5.0
    while not live.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    source = TextSource([], window=2.0, live=live)
    assert [source.read(i) for i in (3, 4, 2)] == ["hello there", None, "later on"]
    assert source.exhausted


def test_message_embeddings_are_kept_in_the_store(tmp_path, monkeypatch):
    """The bank's texts are embedded once; a restart reuses the stored vectors and ranks alike."""
    from device import runtime
    from device.runtime import load_policy
    from policy.expression import HashingEncoder

    calls: list[int] = []

    class Counting:
        path = "hashing-512"

        def __call__(self, texts):
            calls.append(len(texts))
            return HashingEncoder()(texts)

    class Refusing:
        path = "hashing-512"

        def __call__(self, texts):
            raise AssertionError(f"embedded {len(texts)} texts again")

    config = load_policy_config()
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    first = load_policy(store, config, encoder=Counting())
    monkeypatch.setattr(runtime, "_EMBEDDED", {})  # as in a new process
    second = load_policy(store, config, encoder=Refusing())
    assert len(calls) == 1 and calls[0] >= len(config.messages.bank)
    for emotion in EMOTIONS:
        for action in config.action_names[1:]:
            assert first.bank.ranking(emotion, action) == second.bank.ranking(emotion, action)


def test_live_session_times_decisions_by_the_wall_clock(tmp_path, assets):
    """A live source (a camera; here a file read as one) is windowed by the clock and stops when it ends."""
    from device.recognition import Recogniser
    from device.runtime import RuntimeConfig, load_policy, run_session
    from policy.expression import HashingEncoder

    loaded = load_global_model(assets["run"])
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    policy = load_policy(store, load_policy_config(), encoder=HashingEncoder())
    events: list[dict] = []
    clock = iter(range(1000, 2000, 7))
    report = run_session(
        recogniser=Recogniser(loaded.model, loaded.config.model, silence_db=-50.0),
        policy=policy, store=store, config=RuntimeConfig(window_s=0.5, duration_s=30.0),
        video=VideoSource(str(assets["video"]), live=True), emit=events.append, clock=lambda: float(next(clock)),
    )
    assert report.decisions == len(events) >= 1
    assert [e["timestamp"] for e in events] == [1007.0 + 7 * i for i in range(len(events))]
    assert all(e["modalities"] == ["face"] for e in events)
    assert set(report.latency) == {*STAGES, "total"}


def test_switched_off_actions_stay_off_across_sessions(tmp_path, assets, capsys):
    """--switch-off is kept in the store: later sessions never choose the action, until --switch-on."""
    device, key = tmp_path / "device", _key(tmp_path)
    off = ["--switch-off", "breathing_exercise", "--switch-off", "suggest_break"]
    code, first, _ = _run(capsys, device, assets, "--key-file", str(key), *off, inputs=("text",))
    code2, second, _ = _run(capsys, device, assets, "--key-file", str(key), inputs=("text",))
    assert code == code2 == 0
    assert not {e["action"] for e in first + second} & {"breathing_exercise", "suggest_break"}
    with EncryptedStore.open(device / "store", key_file=key) as store:
        assert store.get_json(POLICY_STATE_OBJECT)["switched_off"] == ["breathing_exercise", "suggest_break"]
    assert _run(capsys, device, assets, "--key-file", str(key), "--switch-on", "suggest_break", inputs=("text",))[0] == 0
    with EncryptedStore.open(device / "store", key_file=key) as store:
        assert store.get_json(POLICY_STATE_OBJECT)["switched_off"] == ["breathing_exercise"]
    code, _, err = _run(capsys, device, assets, "--key-file", str(key), "--switch-off", "yoga", inputs=("text",))
    assert code == 2 and "unknown action 'yoga'" in err


def test_a_fresh_policy_starts_from_the_federated_prior_in_the_store(tmp_path):
    """The prior the federation sent (policy.federated) is adopted; the device's own statistics stay."""
    import numpy as np

    from device.runtime import DeviceRuntimeError, load_policy
    from policy.expression import HashingEncoder
    from policy.state import NUM_FEATURES, PolicyStatistics

    config = load_policy_config()
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    k = len(config.action_names)
    theta = np.random.default_rng(0).normal(size=(k, NUM_FEATURES))
    xx = np.broadcast_to(3.0 * np.eye(NUM_FEATURES), (k, NUM_FEATURES, NUM_FEATURES))
    prior = PolicyStatistics(config.action_names, xx, 3.0 * theta)
    store.put_json(POLICY_PRIOR_OBJECT, prior.to_dict())
    policy = load_policy(store, config, encoder=HashingEncoder())
    assert np.allclose(policy.bandit.prior.rx, prior.rx)
    assert np.allclose(policy.local_statistics().xx, 0.0)
    store.put_json(POLICY_PRIOR_OBJECT, {"actions": ["a"], "xx": [[[1.0]]], "rx": [[1.0]]})
    with pytest.raises(DeviceRuntimeError, match="policy prior"):
        load_policy(store, config, encoder=HashingEncoder())

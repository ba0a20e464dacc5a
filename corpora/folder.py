"""The federation-folder format: what devices keep, importers write and simulations export.

Layout (``emofed-federation/1``)::

    DIR/
      federation.json        {"format": "emofed-federation/1", "devices": [...],
                              "heldout": [...] (optional), ...}
      <device-id>/
        samples.jsonl        {"id", "label", "split": "train"|"test", "face", "voice", "text"}
        face/*.png           paths in samples.jsonl are relative to the device folder
        voice/*.wav

Devices listed under ``heldout`` (the importers' identity-disjoint test population) are
test-only. Readers skip what they cannot use and count it by reason; writers build a folder
under a temporary name and rename it into place, so no reader sees a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import EMOTIONS, RawSample, UnusableInput, load_audio

FEDERATION_FILE = "federation.json"
SAMPLES_FILE = "samples.jsonl"
FEDERATION_FORMAT = "emofed-federation/1"


class FederationFolderError(ValueError):
    """A federation folder is missing or malformed; the message names what."""


def read_federation(path: str | Path) -> dict[str, Any]:
    """Read and check ``federation.json`` of a federation folder.

    Raises
    ------
    FederationFolderError
        If the folder or its index is missing or malformed.
    """
    root = Path(path)
    if not root.is_dir():
        raise FederationFolderError(f"data folder not found: {root}")
    index = root / FEDERATION_FILE
    if not index.is_file():
        raise FederationFolderError(f"{root} is not a federation folder: {FEDERATION_FILE} is missing")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FederationFolderError(f"{index}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FEDERATION_FORMAT:
        raise FederationFolderError(f"{index}: 'format' must be {FEDERATION_FORMAT!r}")
    devices = meta.get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
        raise FederationFolderError(f"{index}: 'devices' must be a non-empty list of folder names")
    heldout = meta.get("heldout", [])
    if not isinstance(heldout, list) or not all(isinstance(d, str) for d in heldout):
        raise FederationFolderError(f"{index}: 'heldout' must be a list of folder names")
    if set(heldout) & set(devices):
        raise FederationFolderError(f"{index}: a device is listed under both 'devices' and 'heldout'")
    missing = [d for d in [*devices, *heldout] if not (root / d).is_dir()]
    if missing:
        raise FederationFolderError(f"{index}: device folders missing: {', '.join(missing[:5])}")
    return meta


def heldout_devices(meta: Mapping[str, Any]) -> list[str]:
    """The test-only devices of a checked federation index (empty when it has none)."""
    return list(meta.get("heldout", []))


def read_device_folder(folder: str | Path) -> tuple[list[RawSample], list[RawSample], Counter[str]]:
    """Read a device folder into raw train and test samples.

    Unreadable lines, unknown labels and undecodable or missing media are skipped
    (a missing medium only hides that modality) and counted by reason.

    Raises
    ------
    FederationFolderError
        If the folder or its ``samples.jsonl`` is missing.
    """
    root = Path(folder)
    index = root / SAMPLES_FILE
    if not index.is_file():
        raise FederationFolderError(f"device folder {root} has no {SAMPLES_FILE}")
    skipped: Counter[str] = Counter()
    train: list[RawSample] = []
    test: list[RawSample] = []
    with open(index, "rb") as handle:
        for raw_line in handle:
            if not raw_line.strip():
                continue
            try:
                record = json.loads(raw_line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except (UnicodeDecodeError, ValueError):
                skipped["malformed line"] += 1
                continue
            label = record.get("label")
            if label not in EMOTIONS:
                skipped["unknown label"] += 1
                continue
            split = record.get("split", "train")
            if split not in ("train", "test"):
                skipped["unknown split"] += 1
                continue
            voice = _read_voice(root, record.get("voice"), skipped)
            sample = RawSample(
                label=EMOTIONS.index(label),
                face=_read_face(root, record.get("face"), skipped),
                voice=None if voice is None else voice[0],
                voice_rate=None if voice is None else voice[1],
                text=_read_text(record.get("text"), skipped),
            )
            if sample.face is None and sample.voice is None and sample.text is None:
                skipped["no usable modality"] += 1
                continue
            (train if split == "train" else test).append(sample)
    return train, test, skipped


def device_file(root: Path, rel: Any, skipped: Counter[str], kind: str) -> Path | None:
    """The file ``rel`` names inside the device folder ``root``, or None (counted in ``skipped``).

    A path that is not a non-empty string, leaves the folder or names no file is refused
    with a ``"<kind>: ..."`` reason; None (no such medium) is not counted.
    """
    if rel is None:
        return None
    if not isinstance(rel, str) or not rel:
        skipped[f"{kind}: bad path"] += 1
        return None
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        skipped[f"{kind}: path outside the device folder"] += 1
        return None
    if not path.is_file():
        skipped[f"{kind}: file missing"] += 1
        return None
    return path


def _read_face(root: Path, rel: Any, skipped: Counter[str]) -> np.ndarray | None:
    path = device_file(root, rel, skipped, "face")
    if path is None:
        return None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        skipped["face: undecodable image"] += 1
        return None
    return image


def _read_voice(root: Path, rel: Any, skipped: Counter[str]) -> tuple[np.ndarray, int] | None:
    path = device_file(root, rel, skipped, "voice")
    if path is None:
        return None
    try:
        return load_audio(path)
    except UnusableInput:
        skipped["voice: undecodable audio"] += 1
        return None


def _read_text(text: Any, skipped: Counter[str]) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        skipped["text: empty or not a string"] += 1
        return None
    return text


def device_name(device_id: int) -> str:
    """Folder name of a device, e.g. ``device-007``."""
    return f"device-{device_id:03d}"


def user_name(user: int) -> str:
    """Written name of a synthetic user, e.g. ``user-007``."""
    return f"user-{user:03d}"


def sample_name(index: int) -> str:
    """Written id of a sample, e.g. ``s00012``; unique across the federation."""
    return f"s{index:05d}"


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that exists and is not empty.

    Raises
    ------
    FileExistsError
        If ``out`` exists and is not an empty directory.
    """
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; refusing to overwrite it.")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to build a folder in; rename it into place on success.

    A reader never sees a half-written folder: on any exception the temporary folder is
    removed and ``out`` is left as it was (absent or empty, see :func:`check_output_folder`).
    """
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():  # a leftover of an earlier crash of this same process id
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():  # empty, checked by the caller
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_index(folder: Path, index: Mapping[str, Any]) -> None:
    """Write ``federation.json`` of a federation folder."""
    (folder / FEDERATION_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

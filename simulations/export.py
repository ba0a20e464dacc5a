"""Write a synthetic federation to disk in the federation-folder format devices read.

Layout (``emofed-federation/1``)::

    DIR/
      federation.json   {"format", "source", "labels", "devices", "seed", "config"}
      device-000/
        samples.jsonl   {"id", "label", "split", "user", "face", "voice", "text"} per line
        face/*.png
        voice/*.wav     PCM 16-bit at data.voice_sample_rate

Labels are written as names; a training sample carries its observed (possibly noisy)
label, as a device would store it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import soundfile

from corpora.folder import (
    FEDERATION_FORMAT,
    SAMPLES_FILE,
    check_output_folder,
    device_name,
    sample_name,
    staged_folder,
    user_name,
    write_index,
)
from models.labels import EMOTIONS

if TYPE_CHECKING:  # the generator pulls in torch; writing a folder does not need it
    from simulations.synthetic import SyntheticFederation

logger = logging.getLogger(__name__)

def write_federation(fed: SyntheticFederation, out_dir: Path) -> Path:
    """Render every device of ``fed`` and write the federation folder ``out_dir``.

    The folder is built next to ``out_dir`` under a temporary name and renamed into place,
    so a reader never sees a half-written federation.

    Parameters
    ----------
    fed : SyntheticFederation
        The federation to write.
    out_dir : Path
        Destination folder; it must not exist or be empty.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    FileExistsError
        If ``out_dir`` exists and is not an empty directory.
    OSError
        If a file cannot be written; the temporary folder is removed.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    with staged_folder(out_dir) as tmp:
        devices = [device_name(d) for d in range(fed.num_devices)]
        for d, name in enumerate(devices):
            _write_device(fed, d, tmp / name)
        index = {
            "format": FEDERATION_FORMAT,
            "source": "synthetic",
            "labels": list(EMOTIONS),
            "devices": devices,
            "seed": fed.seed,
            "config": dataclasses.asdict(fed.config),
        }
        write_index(tmp, index)
    logger.info("Wrote synthetic federation of %d devices to %s", fed.num_devices, out_dir)
    return out_dir


def _write_device(fed: SyntheticFederation, device_id: int, folder: Path) -> None:
    """Render one device and write its media and ``samples.jsonl``."""
    (folder / "face").mkdir(parents=True)
    (folder / "voice").mkdir()
    rate = fed.config.voice_sample_rate
    lines = []
    for index in fed.device_indices(device_id):
        meta = fed.info(int(index))
        sample = fed.render(int(index))
        sid = sample_name(meta.index)
        face = voice = None
        if sample.face is not None:
            face = f"face/{sid}.png"
            if not cv2.imwrite(str(folder / face), sample.face):
                raise OSError(f"OpenCV could not write {folder / face}")
        if sample.voice is not None:
            voice = f"voice/{sid}.wav"
            soundfile.write(str(folder / voice), sample.voice, rate, subtype="PCM_16")
        record = {
            "id": sid,
            "label": EMOTIONS[sample.label],
            "split": meta.split,
            "user": user_name(meta.user),
            "face": face,
            "voice": voice,
            "text": sample.text,
        }
        lines.append(json.dumps(record))
    (folder / SAMPLES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")

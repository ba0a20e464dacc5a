r"""Real-data benchmark: centralised vs federated vs federated with DP, on held-out people.

For a federation folder written by ``emofed data import`` this runs, with the same model
and training settings:

* ``central``: the same network trained on the pooled training splits of every training
  device, no federation, no privacy (``rounds x train.local_epochs`` epochs: each sample
  is seen as often as in a federated run);
* ``federated``: ``emofed simulate`` with ``privacy.preset=off``;
* ``dp-eps8``: ``emofed simulate`` with ``privacy.preset=research`` (device-level
  DP-SGD, ε=8 per device over the run);
* ``dp-eps3``: ``emofed simulate`` with ``privacy.preset=balanced`` (ε=3).

Every run is scored on the held-out devices (identities, or the corpus's evaluation
split, that never train): accuracy, macro-F1 and unweighted average recall (UAR), with
its wall time. Federated runs also give the devices' own local test splits. The table
is printed as markdown and everything is written to a JSON file.

To fit a small machine the folder can be subsampled first (a copy with hard links, so
no media are duplicated): ``--max-train`` / ``--max-test`` samples per training device,
``--max-heldout`` samples over all held-out devices, each stratified by label::

    emofed data import fer2013 ../shared/data/fer2013 --out /tmp/fer
    .venv/bin/python benchmarks/real_data.py /tmp/fer --rounds 5 --max-train 300 \
        --max-heldout 1000 --json /tmp/fer-bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS: dict[str, str | None] = {
    # run name -> privacy preset of the federated run (None: the centralised baseline)
    "central": None,
    "federated": "off",
    "dp-eps8": "research",
    "dp-eps3": "balanced",
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _stratified(records: list[dict[str, Any]], limit: int | None, rng: np.random.Generator) -> list[dict[str, Any]]:
    """At most ``limit`` records, the same share of every label (order kept)."""
    if limit is None or len(records) <= limit:
        return records
    by_label: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_label.setdefault(str(record.get("label")), []).append(i)
    share = limit / len(records)
    chosen: list[int] = []
    for indices in by_label.values():
        take = max(1, int(round(share * len(indices))))
        chosen.extend(rng.choice(indices, size=min(take, len(indices)), replace=False).tolist())
    return [records[i] for i in sorted(chosen)[:limit]]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def subsample_federation(
    src: Path,
    dst: Path,
    *,
    max_train: int | None,
    max_test: int | None,
    max_heldout: int | None,
    seed: int,
) -> dict[str, int]:
    """Write a subsampled copy of the federation folder ``src`` to ``dst`` (media hard-linked).

    Returns the samples kept: ``train``, ``test`` (training devices' local test splits)
    and ``heldout``.

    Raises
    ------
    FileExistsError
        If ``dst`` exists.
    ValueError
        If ``src`` is not a federation folder with held-out devices.
    """
    meta = json.loads((src / "federation.json").read_text(encoding="utf-8"))
    heldout = list(meta.get("heldout", []))
    if not heldout:
        raise ValueError(f"{src} has no held-out devices; import it with --heldout-share > 0")
    if dst.exists():
        raise FileExistsError(f"{dst} exists")
    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    heldout_records = {d: _read_jsonl(src / d / "samples.jsonl") for d in heldout}
    total_heldout = sum(len(r) for r in heldout_records.values())
    for device in [*meta["devices"], *heldout]:
        records = heldout_records.get(device) or _read_jsonl(src / device / "samples.jsonl")
        if device in heldout_records:
            limit = None if max_heldout is None else max(1, round(max_heldout * len(records) / total_heldout))
            kept = _stratified(records, limit, rng)
            counts["heldout"] += len(kept)
        else:
            train = _stratified([r for r in records if r.get("split") != "test"], max_train, rng)
            test = _stratified([r for r in records if r.get("split") == "test"], max_test, rng)
            kept = train + test
            counts["train"] += len(train)
            counts["test"] += len(test)
        folder = dst / device
        folder.mkdir(parents=True)
        for record in kept:
            for key in ("face", "voice"):
                if record.get(key):
                    _link(src / device / record[key], folder / record[key])
        (folder / "samples.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8"
        )
    meta = {**meta, "subsampled": {"from": str(src), "max_train": max_train, "max_test": max_test,
                                   "max_heldout": max_heldout, "seed": seed, **counts}}
    (dst / "federation.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return dict(counts)


def _scores(confusion: np.ndarray) -> dict[str, float]:
    from server.strategy import confusion_scores, unweighted_average_recall

    accuracy, macro_f1 = confusion_scores(confusion)
    return {"accuracy": accuracy, "macro_f1": macro_f1, "uar": unweighted_average_recall(confusion)}


def run_central(folder: Path, overrides: list[str]) -> dict[str, Any]:
    """Train the same network on the pooled training splits; score it on the held-out devices."""
    import torch
    from torch.utils.data import TensorDataset

    from client.data import UnusableDeviceData, preprocess_device
    from client.train import evaluate_local, select_device, train_local
    from corpora.folder import heldout_devices, read_device_folder, read_federation
    from emofed.config import load_config
    from models import build_model

    started = time.monotonic()
    cfg = load_config(ROOT / "configs" / "default.yaml", [*overrides, "privacy.preset=off"])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta = read_federation(folder)
    train_sets, test_sets, heldout_sets, unusable = [], [], [], []
    for device in [*meta["devices"], *heldout_devices(meta)]:
        train_raw, test_raw, skipped = read_device_folder(folder / device)
        try:
            if device in meta["devices"]:
                data = preprocess_device(cfg, device, train_raw, test_raw, skipped)
                train_sets.append(data.train)
                test_sets.append(data.test)
            else:
                data = preprocess_device(cfg, device, [], train_raw + test_raw, skipped, heldout=True)
                heldout_sets.append(data.test)
        except UnusableDeviceData as err:  # left out, as the federation leaves it out
            unusable.append(str(err))

    def pool(sets: list[TensorDataset]) -> TensorDataset:
        return TensorDataset(*(torch.cat(parts) for parts in zip(*(s.tensors for s in sets), strict=True)))

    model = build_model(cfg.model)
    device = select_device(cfg.runtime)
    train_cfg = dataclasses.replace(cfg.train, local_epochs=cfg.rounds * cfg.train.local_epochs)
    result = train_local(
        model, pool(train_sets), cfg=train_cfg, aux_weight=cfg.model.fusion.aux_weight, device=device, seed=cfg.seed
    )
    batch = max(cfg.train.batch_size, 64)
    heldout = evaluate_local(model, pool(heldout_sets), batch_size=batch, device=device)
    local = evaluate_local(model, pool(test_sets), batch_size=batch, device=device)
    return {
        "heldout": {**_scores(heldout.confusion), "examples": heldout.num_examples},
        "local_test": _scores(local.confusion),
        "train_loss": result.loss,
        "unusable_devices": unusable,
        "epsilon": None,
        "seconds": round(time.monotonic() - started, 1),
    }


def run_federated(folder: Path, preset: str, overrides: list[str], work: Path, name: str) -> dict[str, Any]:
    """``emofed simulate`` on the folder with a privacy preset; its held-out and local scores."""
    started = time.monotonic()
    command = [
        sys.executable, "-m", "cli", "simulate", "data.source=folder", f"data.path={folder}",
        *overrides, f"privacy.preset={preset}", f"output.dir={work}", f"output.name={name}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = round(time.monotonic() - started, 1)
    (work / f"{name}.out").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    summary_path = work / name / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}", "seconds": seconds}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    heldout = summary.get("heldout") or {}
    privacy = summary.get("privacy") or {}
    return {
        "heldout": {k: heldout.get(k) for k in ("accuracy", "macro_f1", "uar", "examples")},
        "local_test": heldout.get("local_test") or {k: summary["final"].get(k) for k in ("accuracy", "macro_f1")},
        "train_loss": summary["final"].get("train_loss"),
        "epsilon": (privacy.get("device") or {}).get("epsilon"),
        "status": summary.get("status"),
        "rounds_completed": summary.get("rounds_completed"),
        "failed_device_replies": summary.get("failed_device_replies"),
        "seconds": seconds,
        "run_dir": str(work / name),
    }


def _cell(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(corpus: str, results: dict[str, dict[str, Any]]) -> str:
    """One markdown table of a corpus's runs."""
    lines = [
        f"| {corpus} | held-out acc | held-out macro-F1 | held-out UAR | local-test acc | ε (device) | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, r in results.items():
        if "error" in r:
            lines.append(f"| {run} | failed: {r['error']} | | | | | {r['seconds']} |")
            continue
        h, local = r["heldout"], r.get("local_test") or {}
        lines.append(
            f"| {run} | {_cell(h.get('accuracy'))} | {_cell(h.get('macro_f1'))} | {_cell(h.get('uar'))} | "
            f"{_cell(local.get('accuracy'))} | {_cell(r.get('epsilon'), '.2f')} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a federation folder written by `emofed data import`")
    parser.add_argument("--name", help="corpus name in the table (default: the folder's source)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--max-train", type=int, help="training samples kept per training device")
    parser.add_argument("--max-test", type=int, help="local test samples kept per training device")
    parser.add_argument("--max-heldout", type=int, help="samples kept over all held-out devices")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample and the runs")
    parser.add_argument("--work", help="working folder (default: a new temporary folder)")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every run")
    args = parser.parse_intermixed_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    src = Path(args.folder).resolve()
    meta = json.loads((src / "federation.json").read_text(encoding="utf-8"))
    corpus = args.name or str(meta.get("source", src.name))
    work = Path(args.work or tempfile.mkdtemp(prefix=f"emofed-bench-{corpus}-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = src
    counts = None
    if any(v is not None for v in (args.max_train, args.max_test, args.max_heldout)):
        folder = work / "data"
        counts = subsample_federation(
            src, folder, max_train=args.max_train, max_test=args.max_test, max_heldout=args.max_heldout, seed=args.seed
        )
        print(f"subsampled {src} -> {folder}: {counts}", flush=True)
    overrides = [
        f"seed={args.seed}", f"rounds={args.rounds}", f"train.local_epochs={args.local_epochs}", *args.overrides
    ]
    results: dict[str, dict[str, Any]] = {}
    for run in runs:
        print(f"{corpus}: {run} ...", flush=True)
        preset = RUNS[run]
        results[run] = (
            run_central(folder, overrides) if preset is None else run_federated(folder, preset, overrides, work, run)
        )
        print(f"{corpus}: {run} -> {json.dumps(results[run])}", flush=True)
    table = markdown_table(corpus, results)
    print()
    print(table)
    report = {
        "corpus": corpus, "folder": str(src), "subsample": counts, "overrides": overrides,
        "devices": len(meta["devices"]), "heldout_devices": len(meta.get("heldout", [])),
        "results": results, "table": table,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`emofed pretrain`: fit the public feature space on public data, never on device data.

The coordinator's public data is a federation folder of a public corpus (``--data``) or,
in the synthetic world, synthetic people drawn from a seed of their own (``--synthetic N``),
disjoint from every device of a run whose ``seed`` differs. The result is one JSON file that
a run loads by path (``model.features.public=FILE``); it records which data and extractors
it was fitted on, and the run directory records it in turn.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cli.common import PROGRESS_PREFIX, add_config_args, fail, resolve_config
from emofed.config import ConfigError, EmofedConfig

__all__ = ["PUBLIC_SYNTHETIC_SEED", "add_pretrain_parser", "cmd_pretrain"]

# Seed of the public synthetic people of the packaged space; a run with this seed is refused.
PUBLIC_SYNTHETIC_SEED = 1_000_003
_CHUNK = 256  # samples preprocessed at a time (bounded memory on large corpora)


def add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``emofed pretrain`` to the top-level subparsers."""
    pretrain = sub.add_parser(
        "pretrain",
        help="fit the public feature space (standardisation + LDA per modality) on public data",
    )
    add_config_args(pretrain)
    source = pretrain.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FOLDER", help="a federation folder of public data (every device, every split)")
    source.add_argument("--synthetic", type=int, metavar="N", help="N public synthetic people (no device's)")
    pretrain.add_argument("--seed", type=int, default=PUBLIC_SYNTHETIC_SEED, help="seed of the public synthetic people")
    pretrain.add_argument("--samples", type=int, default=60, help="samples per public synthetic person (default 60)")
    pretrain.add_argument("--components", type=int, default=6, help="projected size per modality (default 6)")
    pretrain.add_argument("--out", "-o", required=True, help="output file (JSON)")
    pretrain.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Fit and write the public feature space."""
    try:
        cfg, _ = resolve_config(args)
        if args.components < 1:
            raise ConfigError(f"--components must be at least 1, found {args.components}")
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ConfigError(f"--out: folder {out.parent} does not exist")
        started = time.monotonic()
        space = fit(cfg, args)
        space.save(out)
    except (ConfigError, ValueError, OSError) as err:
        return fail(str(err))
    dims = ", ".join(f"{m} {space.modalities[m].mean.size}→{space.dim(m)}" for m in space.modalities)
    print(f"{PROGRESS_PREFIX} wrote {out} ({dims}) in {time.monotonic() - started:.0f} s")
    print(f"{PROGRESS_PREFIX} use it with: emofed simulate model.features.public={out}")
    return 0


def fit(cfg: EmofedConfig, args: argparse.Namespace):  # -> PublicFeatureSpace (torch-heavy import)
    """Preprocess the public samples, extract raw features and fit the space."""
    import dataclasses

    from models.features import FeatureExtractor, fit_public_space
    from models.preprocess import MultimodalPreprocessor

    raw_config = dataclasses.replace(cfg.model, kind="cnn")  # the preprocessor's tensors, not features
    preprocess = MultimodalPreprocessor(raw_config)
    extractor = FeatureExtractor(cfg.model, fitted=False)
    samples, provenance = _public_samples(cfg, args)
    parts: dict[str, list[np.ndarray]] = {"face": [], "voice": [], "text": []}
    masks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for start in range(0, len(samples), _CHUNK):
        dataset, _ = preprocess(samples[start : start + _CHUNK])
        raw = extractor.raw(dataset)
        for name in parts:
            parts[name].append(raw[name].numpy())
        masks.append(dataset.tensors[4].numpy() > 0)
        labels.append(dataset.tensors[5].numpy())
        print(f"{PROGRESS_PREFIX} features of {min(start + _CHUNK, len(samples))} of {len(samples)} public samples", flush=True)
    mask = np.concatenate(masks)
    return fit_public_space(
        {name: np.concatenate(chunks) for name, chunks in parts.items()},
        {name: mask[:, index] for index, name in enumerate(parts)},
        np.concatenate(labels),
        extractors=extractor.names,
        components=args.components,
        provenance=provenance,
    )


def _public_samples(cfg: EmofedConfig, args: argparse.Namespace) -> tuple[Sequence, dict[str, object]]:
    """The public raw samples and a record of where they came from."""
    if args.synthetic is not None:
        if args.synthetic < 2:
            raise ConfigError(f"--synthetic must be at least 2 people, found {args.synthetic}")
        import dataclasses

        from simulations.synthetic import SyntheticFederation

        # Every public person has every modality: the space is fitted on all three.
        data = dataclasses.replace(
            cfg.data, source="synthetic", samples_per_device=args.samples,
            p_no_camera=0.0, p_no_microphone=0.0, p_missing_text=0.0, label_noise=0.0, partition="natural",
        )
        federation = SyntheticFederation(data, num_devices=args.synthetic, seed=args.seed)
        samples = [s for d in range(args.synthetic) for s in federation.device(d)]
        print(f"{PROGRESS_PREFIX} rendered {len(samples)} samples of {args.synthetic} public synthetic people", flush=True)
        return samples, {"source": "synthetic", "people": args.synthetic, "seed": args.seed, "samples": len(samples)}
    from corpora.folder import read_device_folder, read_federation

    meta = read_federation(args.data)
    samples = []
    for name in [*meta["devices"], *meta.get("heldout", [])]:
        train, test, _ = read_device_folder(Path(args.data) / name)
        samples.extend(train + test)
    digest = hashlib.sha256((Path(args.data) / "federation.json").read_bytes()).hexdigest()[:16]
    print(f"{PROGRESS_PREFIX} read {len(samples)} public samples from {args.data}", flush=True)
    return samples, {"source": "folder", "path": str(Path(args.data).resolve()), "index_sha256": digest, "samples": len(samples)}

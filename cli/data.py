"""The ``emofed data import CORPUS SRC --out DIR`` command (wired in by ``cli.main``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import PROGRESS_PREFIX as _PREFIX

__all__ = ["add_import_parser", "add_pair_parser", "cmd_data_import", "cmd_data_pair"]


def add_import_parser(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import`` subcommand to the subparsers of ``emofed data``.

    Parameters
    ----------
    data_subparsers : argparse._SubParsersAction
        What ``add_subparsers`` returned for the ``data`` command.

    Returns
    -------
    argparse.ArgumentParser
        The new subparser; its default ``func`` is :func:`cmd_data_import`.
    """
    from corpora.registry import IMPORTERS

    names = ", ".join(IMPORTERS)
    parser = data_subparsers.add_parser(
        "import",
        help="import a public emotion corpus into a federation folder",
        description=(
            "Read a public emotion corpus in its usual distributed form and write a "
            "federation folder: one device per speaker/actor/subject where the corpus "
            "has identities (a share held out as test-only devices), Dirichlet "
            f"label-skewed devices otherwise. Corpora: {names}."
        ),
    )
    parser.add_argument("corpus", help=f"corpus name: {names}")
    parser.add_argument("src", help="the corpus folder, as distributed")
    parser.add_argument("--out", "-o", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--heldout-share", type=float, default=0.2,
        help="share of identities (or samples) held out as test-only devices (default 0.2)",
    )
    parser.add_argument(
        "--test-share", type=float, default=0.2,
        help="local test share of each training device (default 0.2)",
    )
    parser.add_argument(
        "--devices", type=int, default=None,
        help="training devices (default: one per identity, or 10 for corpora without identities)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5,
        help="Dirichlet concentration for corpora without identities (default 0.5)",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the held-out choice, the partition and the splits (default 0)",
    )
    parser.add_argument(
        "--max-file-mb", type=float, default=50.0,
        help="skip media files larger than this many MiB (default 50)",
    )
    parser.add_argument(
        "--min-identity-samples", type=int, default=None,
        help="pool identities with fewer samples into one 'other' device (default: per corpus)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    parser.set_defaults(func=cmd_data_import)
    return parser


def fail(message: str) -> int:
    print(f"emofed: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def cmd_data_import(args: argparse.Namespace) -> int:
    """Import a corpus; print the report and return 0, or a one-line error and return 2."""
    from corpora.build import import_corpus

    src, out = Path(args.src), Path(args.out)
    if args.max_file_mb <= 0:
        return fail(f"--max-file-mb must be > 0. Found {args.max_file_mb}.")

    def progress(message: str) -> None:
        print(f"{_PREFIX} {message}", flush=True)

    try:
        report = import_corpus(
            args.corpus,
            src,
            out,
            heldout_share=args.heldout_share,
            test_share=args.test_share,
            devices=args.devices,
            alpha=args.alpha,
            seed=args.seed,
            progress=None if args.quiet else progress,
            max_file_bytes=max(1, int(args.max_file_mb * 2**20)),
            min_identity_samples=args.min_identity_samples,
        )
    except (ValueError, OSError) as err:
        # CorpusImportError is a ValueError; FileExistsError and FileNotFoundError OSErrors.
        return fail(str(err))
    print(report.format_text())
    print(f"train on it with: emofed simulate data.source=folder data.path={out}")
    return 0


def add_pair_parser(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``pair`` subcommand (multimodal pairing of three imported folders) to ``emofed data``."""
    parser = data_subparsers.add_parser(
        "pair",
        help="pair face, voice and text from three imported corpora by label (multimodal devices)",
        description=(
            "Build a federation whose devices carry face, voice and text samples taken from three "
            "different imported corpora and matched by emotion label within a device and split. "
            "The result is marked as paired data: the modalities of one sample are not one person's."
        ),
    )
    parser.add_argument("--face", required=True, help="federation folder of a face corpus (emofed data import)")
    parser.add_argument("--voice", required=True, help="federation folder of a voice corpus")
    parser.add_argument("--text", required=True, help="federation folder of a text corpus")
    parser.add_argument("--out", "-o", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--anchor", choices=("face", "voice", "text"), default="voice",
        help="modality whose devices and held-out devices become the result's (default voice)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw order (default 0)")
    parser.set_defaults(func=cmd_data_pair)
    return parser


def cmd_data_pair(args: argparse.Namespace) -> int:
    """Pair three imported folders; print the report and return 0, or a one-line error and return 2."""
    from corpora.pairing import pair_federations

    try:
        report = pair_federations(
            {"face": args.face, "voice": args.voice, "text": args.text}, Path(args.out),
            anchor=args.anchor, seed=args.seed,
        )
    except (ValueError, OSError) as err:
        return fail(str(err))
    print(report.format_text())
    print(f"train on it with: emofed simulate data.source=folder data.path={args.out}")
    return 0

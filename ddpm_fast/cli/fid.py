"""`ddpm-fast fid SAMPLES [REF]`: FID (and sFID, precision, recall, Inception Score) of an image set against a
reference; `--stats-out FILE.npz` saves SAMPLES's statistics, which is how a reference is made once.

Prints one `Name: value` line per metric on stdout (the names openai's evaluator prints); `--out` writes
the report (metrics, the inputs' sha256, settings) as JSON.
"""

from __future__ import annotations

import argparse
import sys

from ddpm_fast.cli import int_at_least
from ddpm_fast.errors import UserError
from ddpm_fast.metrics import evaluate
from ddpm_fast.metrics.inception import INCEPTION_FILE, default_inception_path

__all__ = ["add_arguments", "run"]

NAMES = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a(
        "samples",
        metavar="SAMPLES",
        help="a sharded run directory, an .npz (arr_0 uint8 NHWC) or an image folder",
    )
    a(
        "ref",
        metavar="REF",
        nargs="?",
        help="the same, or statistics (.npz with mu, sigma): openai's reference batches, pytorch-fid's or "
        "EDM's files, or one written by --stats-out",
    )
    a(
        "--inception",
        metavar="PATH",
        help=f"NVIDIA's TorchScript {INCEPTION_FILE} (default: $DDPM_FAST_INCEPTION, else "
        f"{default_inception_path()})",
    )
    a(
        "--batch-size",
        type=int_at_least(),
        metavar="N",
        help="images per network call (default 256 on CUDA, 32 on CPU)",
    )
    a("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    a("--out", metavar="REPORT.json", help="write the report here (atomically)")
    a("--stats-out", metavar="STATS.npz", help="write SAMPLES's statistics (mu, sigma, mu_s, sigma_s) here")
    a("--no-cache", action="store_true", help="do not read or write the feature cache beside the images")
    a("--cache-dir", metavar="DIR", help="keep feature caches here instead of beside the images")
    a("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.ref is None and args.stats_out is None:
        raise UserError("give REF (images or statistics) to compare SAMPLES with, or --stats-out FILE.npz")
    options = dict(
        inception=args.inception,
        batch_size=args.batch_size,
        device=args.device,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    if args.ref is None:
        evaluate.save_stats(args.samples, args.stats_out, **options)
        print(args.stats_out)
        return 0
    r = evaluate.fid(args.samples, args.ref, out=args.out, stats_out=args.stats_out, **options)
    metrics = r.metrics()
    for key, name in NAMES.items():
        if metrics[key] is not None:
            print(f"{name}: {metrics[key]:.6g}")
    for key, why in r.report["notes"].items():
        print(f"{NAMES.get(key, key)}: unavailable ({why})", file=sys.stderr)
    if args.out:
        print(f"report: {args.out}", file=sys.stderr)
    return 0

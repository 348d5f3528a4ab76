"""`ddpm-fast merge DIR OUT.npz`: the shards of a sharded run into one .npz in sample order."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ddpm_fast import shards
from ddpm_fast.errors import BadValue
from ddpm_fast.runs import output_kind

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a sharded run directory (holding manifest.json)")
    p.add_argument("out", metavar="OUT.npz", help="the merged .npz to write (arr_0 uint8 NHWC, index order)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"DIR {args.dir} is not a directory")
    if output_kind(args.out) != "npz":
        raise BadValue(f"OUT must end in .npz; got {args.out!r}")
    t0 = time.perf_counter()
    shape = shards.merge(args.dir, args.out, progress=not args.quiet)
    print(f"{shape[0]} images {list(shape[1:])} merged in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(args.out)
    return 0

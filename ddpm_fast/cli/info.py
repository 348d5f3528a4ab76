"""`ddpm-fast info`: versions, devices and which backends run here (and why not)."""

from __future__ import annotations

import argparse
import json

from ddpm_fast.info import _print_text, collect


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_text(info)
    return 0

"""`ddpm-fast` command line: one module per command in this package, each with `add_arguments(p)` and
`run(args) -> int`; this module builds the parser, applies --threads and turns user errors into one line.

A user error prints one line to stderr and exits 2; a bug is a traceback. User errors are the
`ddpm_fast.errors.UserError` family (a bad option or input is `BadValue` / `BadType`, a missing device or
library `Unavailable`) and OSError (a file the user named); a plain ValueError or TypeError, from torch, numpy
or our own code, is a bug. Set DDPM_FAST_DEBUG=1 to see a user error's traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ddpm_fast.devices import set_threads
from ddpm_fast.errors import BadValue, UserError

# name -> (module, one-line help, examples)
COMMANDS = {
    "sample": (
        "ddpm_fast.cli.sample",
        "sample images (a PNG grid, a folder of PNGs, an .npz, or a sharded run directory)",
        "ddpm-fast sample\n  ddpm-fast sample --num 16 --steps 250 --out grid.png\n"
        "  ddpm-fast sample --model ckpt/ --num 50000 --batch-size 256 --out run/",
    ),
    "tune": (
        "ddpm_fast.cli.tune",
        "learn a step table (timesteps' coefficients) for one model and NFE from teacher trajectories",
        "ddpm-fast tune --base unipc --nfe 5 --out tuned.safetensors",
    ),
    "merge": (
        "ddpm_fast.cli.merge",
        "merge the shards of a sharded run into one .npz in index order",
        "ddpm-fast merge run/ samples.npz",
    ),
    "fid": (
        "ddpm_fast.cli.fid",
        "FID (and sFID, precision, recall, Inception Score) of samples against a reference",
        "ddpm-fast fid run/ cifar10_train_stats.npz --out fid.json\n"
        "  ddpm-fast fid run/ VIRTUAL_imagenet64_labeled.npz\n"
        "  ddpm-fast fid cifar10_train.npz --stats-out cifar10_train_stats.npz",
    ),
    "train": (
        "ddpm_fast.cli.train",
        "train a DDPM (digits, an image folder or an .npz)",
        "ddpm-fast train --data digits --steps 2000 --out runs/digits",
    ),
    "convert": (
        "ddpm_fast.cli.convert",
        "convert a diffusers UNet2DModel/pipeline directory or an openai ADM .pt file to the native format",
        "ddpm-fast convert ./ddpm-cifar10-32 ./cifar10-native",
    ),
    "export": (
        "ddpm_fast.cli.export",
        "export a model (or a whole sampling step) to ONNX",
        "ddpm-fast export ckpt/ model.onnx\n  ddpm-fast export ckpt/ step.onnx --step",
    ),
    "bench": (
        "ddpm_fast.cli.bench",
        "benchmark the backends side by side",
        "ddpm-fast bench --device cpu --out bench/",
    ),
    "info": (
        "ddpm_fast.cli.info",
        "versions, devices and which backends are available (and why not)",
        "ddpm-fast info",
    ),
}


# What `main` reports in one line; anything else keeps its traceback (module docstring).
USER_ERRORS = (UserError, OSError)


def int_at_least(minimum: int = 1):
    """An argparse `type=` for ints >= minimum: a bad value is argparse's one-line error naming the option."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"must be an int; got {text!r}") from e
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {v}")
        return v

    return parse


def check_out_dir(path: str, name: str = "--out") -> None:
    """Refuse, before any work, an output directory the command could not make: `path` or an ancestor is a file."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise BadValue(
            f"{name} {path!r} is a file; it must name a directory (one that exists or can be made)"
        )
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BadValue(f"{name} {path!r}: {parent!r} is a file, so the directory cannot be made")


class _ArgumentError(Exception):
    """A bad option: argparse's message, reported by `main` as one line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (exit 2), like every other user error."""

    def error(self, message):
        raise _ArgumentError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm-fast", description="Fast, verified DDPM sampling.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_, examples) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog="examples:\n  " + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a part not installed: say so when the command is used
            p.set_defaults(_missing=f"'{name}' is unavailable: {e}")
            continue
        mod.add_arguments(p)
        p.add_argument(
            "--threads",
            type=int,
            metavar="N",
            help="torch CPU threads (default: the cores this process may use; under torchrun, divided by "
            "the local world size)",
        )
        p.set_defaults(_run=mod.run)
    return parser


def _close_progress_bars() -> None:
    """End any open progress bar's line, so an error message starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def _compile_cache_default() -> None:
    """Commands keep inductor's compiled kernels across runs in ~/.cache/ddpm-fast/inductor (XDG_CACHE_HOME
    honoured) unless TORCHINDUCTOR_CACHE_DIR is set; the library itself leaves torch's default alone."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "ddpm-fast", "inductor")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 2
    args._argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"ddpm-fast: error: {args._missing}", file=sys.stderr)
        return 2
    try:
        set_threads(args.threads)
        _compile_cache_default()
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("ddpm-fast: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        _close_progress_bars()
        if os.environ.get("DDPM_FAST_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ddpm-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

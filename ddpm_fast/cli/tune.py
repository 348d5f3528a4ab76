"""`ddpm-fast tune --model M --base unipc --nfe 5 --out tuned.safetensors`: learn a step table for one model
and NFE (`ddpm_fast.tune`); prints the held-out RMSE before and after and the time it took."""

from __future__ import annotations

import argparse

from ddpm_fast.checkpoint import default_model, load_model
from ddpm_fast.errors import BadValue
from ddpm_fast.samplers import family
from ddpm_fast.tuning import tune

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--base", default="unipc", help="the method whose table is tuned (default unipc)")
    p.add_argument("--nfe", type=int, required=True, help="model evaluations of the tuned table")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where the table is written")
    p.add_argument("--train", type=int, default=256, help="training noise samples (default 256)")
    p.add_argument("--val", type=int, default=256, help="held-out noise samples (default 256)")
    p.add_argument(
        "--iters", type=int, default=40, help="at most this many L-BFGS iterations a round (default 40)"
    )
    p.add_argument("--rounds", type=int, default=2, help="timestep-search and fit alternations (default 2)")
    p.add_argument("--teacher-steps", type=int, default=100, help="NFE of the teacher walk (default 100)")


def run(args) -> int:
    family(args.base)  # an unknown base is one line before the model loads
    if not str(args.out).endswith(".safetensors"):
        raise BadValue(f"--out must end in .safetensors; got {args.out!r}")
    if args.nfe < 1:
        raise BadValue(f"--nfe must be >= 1; got {args.nfe}")
    model = default_model() if args.model is None else load_model(args.model)
    tune(
        model,
        base=args.base,
        nfe=args.nfe,
        train=args.train,
        val=args.val,
        iters=args.iters,
        rounds=args.rounds,
        teacher_steps=args.teacher_steps,
        out=args.out,
    )
    print(args.out)
    return 0

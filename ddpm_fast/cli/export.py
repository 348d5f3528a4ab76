"""`ddpm-fast export MODEL OUT.onnx [--step] [--fp16] [--opset N]`: write and validate an ONNX graph.

MODEL is a checkpoint directory or `digits`, the bundled model (ddpm_fast/assets/digits; `./digits` names a
directory of that name).
"""

from __future__ import annotations

import argparse
import os
import sys

from ddpm_fast.checkpoint import BUNDLED_NAME as BUNDLED
from ddpm_fast.checkpoint import default_model, load_model
from ddpm_fast.errors import BadValue, Unavailable
from ddpm_fast.export.onnx_export import OPSET, export_onnx
from ddpm_fast.plan import make_plan
from ddpm_fast.samplers import METHODS
from ddpm_fast.steps import VARIANCES

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="native checkpoint or diffusers UNet2DModel/pipeline directory, "
        f"or {BUNDLED!r} (the bundled model)",
    )
    p.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write (atomically)")
    p.add_argument(
        "--step",
        action="store_true",
        help="export one whole sampling step (x_t, step, z) -> x_{t-1} instead of the noise model (x, t) -> eps",
    )
    p.add_argument("--fp16", action="store_true", help="float16 weights; GroupNorm and softmax stay float32")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        help="torch exporter (default: dynamo on torch >= 2.6)",
    )
    g = p.add_argument_group("step graph (--step): the run it is exported for")
    g.add_argument("--steps", type=int, help="sampling steps, evenly respaced (default: all of the schedule)")
    g.add_argument("--method", default="ddpm", choices=METHODS, help="sampler (default ddpm)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (default 0)")
    g.add_argument("--variance", choices=VARIANCES, help="(default: the checkpoint's)")
    g.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clip x0 (default: the checkpoint's)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")


def _load(spec: str):
    """The model MODEL names, on the CPU."""
    if spec == BUNDLED:
        try:
            return default_model(device="cpu")
        except RuntimeError as e:  # an install without its assets
            raise Unavailable(str(e)) from e
    if not os.path.isdir(spec):
        raise FileNotFoundError(
            f"MODEL must be a checkpoint directory or {BUNDLED!r} (the bundled model); got {spec!r}"
        )
    return load_model(spec, device="cpu")


def run(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise BadValue(f"--steps must be >= 1; got {args.steps}")
    if not args.step and (
        args.steps is not None
        or args.method != "ddpm"
        or args.eta != 0.0
        or args.variance is not None
        or args.clip is not None
    ):
        raise BadValue("--steps, --method, --eta, --variance and --clip describe a step graph: add --step")
    model = _load(args.model)
    plan = None
    if args.step:
        if model.schedule is None:
            raise BadValue(f"{args.model} names no noise schedule; a step graph needs one")
        plan = make_plan(
            model,
            None,
            (1, *model.defaults.image_shape),
            steps=args.steps,
            method=args.method,
            eta=args.eta,
            variance=args.variance,
            clip=args.clip,
        )
    report = export_onnx(
        model,
        args.out,
        plan=plan,
        fp16=args.fp16,
        opset=args.opset,
        exporter=args.exporter,
        validate=not args.no_validate,
    )
    print(report.summary(), file=sys.stderr)
    print(report.path)
    return 0

"""`ddpm-fast sample`: images from a model into a PNG grid, an .npz, or a sharded, resumable run directory.

`--nproc-per-node N` starts the torchrun job itself (through `torch.distributed.run`), one process per
device, each drawing whole shards of a directory run; under an outer torchrun the command joins that job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np
import torch

from ddpm_fast import adm_io
from ddpm_fast.adm_io import classifier_preset_for_file, load_classifier
from ddpm_fast.checkpoint import BUNDLED_NAME as BUNDLED
from ddpm_fast.checkpoint import default_model, load_model
from ddpm_fast.cli import int_at_least
from ddpm_fast.devices import resolve_device
from ddpm_fast.distributed import Dist, env_world, join
from ddpm_fast.errors import BadValue, Unavailable
from ddpm_fast.export.runtime import load_onnx
from ddpm_fast.guidance import ClassifierGuidance
from ddpm_fast.plan import make_plan
from ddpm_fast.runs import DEFAULT_SHARD_SIZE, check_out, check_world_out, default_batch_size, generate
from ddpm_fast.samplers import METHODS, check_params
from ddpm_fast.sampling import BACKENDS, GRAPH_BACKENDS, openvino_bf16_here
from ddpm_fast.schedule import SPACINGS, Schedule
from ddpm_fast.shards import SHARD_FORMATS

__all__ = ["add_arguments", "run", "DTYPES"]

log = logging.getLogger("ddpm_fast")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options in --help order: what to sample and how, where to, with what guidance."""
    _sampler_arguments(p.add_argument)
    _output_arguments(p.add_argument)
    _guidance_arguments(p.add_argument)


def _sampler_arguments(a) -> None:
    a(
        "--model",
        metavar="DIR|FILE.onnx",
        help="checkpoint directory or .onnx file (default: the bundled model)",
    )
    a("--num", type=int_at_least(), default=64, metavar="N", help="number of samples (default 64)")
    a(
        "--batch-size",
        type=int_at_least(),
        metavar="B",
        help="samples per model call (default 256 on CUDA, 64 on CPU)",
    )
    a(
        "--steps",
        type=int_at_least(),
        metavar="S",
        help="sampling steps, the timesteps --spacing keeps (default: the checkpoint's recorded count, else the whole schedule; "
        "the bundled model: 100)",
    )
    a("--method", default="ddpm", choices=METHODS, help="sampler (default ddpm)")
    a(
        "--tuned",
        metavar="FILE",
        help="with --method tuned: a table from `ddpm-fast tune` (default: the checkpoint's own for --steps)",
    )
    a(
        "--spacing",
        choices=SPACINGS,
        help="which --steps timesteps to keep (default: uniform for ddpm/ddim, linspace for the solvers)",
    )
    a(
        "--eta",
        type=float,
        default=0.0,
        metavar="E",
        help="DDIM noise scale in [0, 1]: 0 deterministic, 1 DDPM's posterior variance (default 0)",
    )
    a(
        "--seed",
        type=int_at_least(0),
        default=0,
        metavar="K",
        help="noise seed; sample n depends only on (seed, n)",
    )
    a("--backend", default="auto", choices=("auto", *BACKENDS), help="(default auto)")
    a(
        "--device",
        metavar="D",
        help="torch device (default: cuda if available, else cpu; cuda:LOCAL_RANK under torchrun)",
    )
    a("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")


def _output_arguments(a) -> None:
    a(
        "--out",
        default="samples.png",
        metavar="PATH",
        help="FILE.png: one grid; FILE.npz: arr_0 uint8 NHWC; DIR: sharded, resumable run (default samples.png)",
    )
    a(
        "--shard-size",
        type=int_at_least(),
        metavar="N",
        help=f"samples per shard of a DIR run (default {DEFAULT_SHARD_SIZE})",
    )
    a(
        "--format",
        dest="shard_format",
        choices=SHARD_FORMATS,
        help="shards of a DIR run (default npz)",
    )
    a("--no-merge", action="store_true", help="DIR run: do not write DIR/samples.npz at the end")


def _guidance_arguments(a) -> None:
    a(
        "--labels",
        metavar="random|K|FILE.npy",
        help="class-conditional models: random (per sample, from the seed), one class K for all, or an .npy of "
        "--num ints; an .npz output holds them as arr_1",
    )
    a(
        "--classifier",
        metavar="FILE.pt",
        help="classifier guidance (ADM-G): a guided-diffusion noisy classifier; needs --labels",
    )
    a(
        "--classifier-flags",
        metavar='"--image_size 128 ..."',
        help="the classifier's CLASSIFIER_FLAGS as guided-diffusion's README prints them (default: from a "
        "published file name)",
    )
    a(
        "--classifier-scale",
        type=float,
        metavar="S",
        help="guidance scale (default: the flags' --classifier_scale, a published classifier's README value, else 1)",
    )
    a(
        "--nproc-per-node",
        type=int_at_least(),
        metavar="N",
        help="start N processes (torchrun) that share a DIR run; one per GPU",
    )
    a("--quiet", action="store_true", help="no progress bar")


def _load_model(spec: str | None, device: torch.device):
    """(model, backend it requires or None)."""
    if spec is None or spec == BUNDLED:
        try:
            return default_model(device=device), None
        except RuntimeError as e:
            raise Unavailable(f"the bundled model is not available ({e}); pass --model DIR") from e
    if spec.lower().endswith(".onnx"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--model {spec}: no such file")
        model = load_onnx(spec)  # onnxruntime itself is imported there, where a session is made
        if model.defaults.image_shape is None:  # the command has no option for the shape the graph takes
            if not model.metadata:
                raise BadValue(f"--model {spec} has no ddpm-fast metadata; export it with `ddpm-fast export`")
            raise BadValue(
                f"--model {spec}: its metadata names no image shape; export it with `ddpm-fast export`"
            )
        return model, "onnx"
    if os.path.isfile(spec) and adm_io.preset_for_file(os.path.basename(spec)) is None:
        raise BadValue(
            f"--model {spec} is a file: sample takes a checkpoint directory or an .onnx file; convert an openai "
            f'ADM .pt file first: ddpm-fast convert {spec} DIR --adm-flags "..." (its README\'s MODEL_FLAGS)'
        )
    try:
        return load_model(spec, device=device), None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model {spec}: {e}") from e


def _labels(spec: str | None, num: int):
    """--labels as make_plan takes it: None, "random", an int, or the int64 tensor an .npy file holds."""
    if spec is None or spec == "random":
        return spec
    if spec.lstrip("-").isdigit():
        return int(spec)
    if not spec.endswith(".npy"):
        raise BadValue(f"--labels must be random, a class number or FILE.npy; got {spec!r}")
    try:
        arr = np.load(spec, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadValue(f"--labels {spec}: cannot read it as an .npy of ints ({e})") from e
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.shape[0] != num:
        raise BadValue(f"--labels {spec} must hold {num} ints (one per sample); got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype("int64"))


def _classifier(args, device: torch.device):
    """The --classifier file as an ADMClassifier on `device` (None without one); errors name --classifier."""
    if args.classifier is None:
        return None
    file = args.classifier
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--classifier {file}: no such file")
    if args.classifier_flags is None and classifier_preset_for_file(os.path.basename(file)) is None:
        raise BadValue(
            f"--classifier {file}: pass --classifier-flags (the README's CLASSIFIER_FLAGS); the file name is "
            "not a published classifier's"
        )
    try:
        return load_classifier(file, flags=args.classifier_flags).to(device)
    except BadValue as e:
        why = str(e).removeprefix(f"{file}: ")
        raise BadValue(f"--classifier {file}: {why}") from e


def _guidance(args, classifier, dtype):
    """--classifier as a ClassifierGuidance (None without one); the classifier in `dtype` when given."""
    if classifier is None:
        return None
    if dtype is not None:
        classifier = classifier.to(dtype)
    scale = args.classifier_scale
    if scale is None:
        scale = classifier.default_scale if classifier.default_scale is not None else 1.0
    return ClassifierGuidance(classifier, scale)


def _check(args) -> str:
    """Everything that can be refused before a model is loaded; returns the output kind."""
    check_params(args.method, eta=args.eta)  # the registry's rule, before a model loads
    if args.tuned is not None and args.method != "tuned":
        raise BadValue(f"--tuned applies to --method tuned; got --method {args.method}")
    if args.method == "tuned" and args.spacing is not None:
        raise BadValue("--spacing does not apply to --method tuned (the table has its own timesteps)")
    kind = check_out(args.out, "--out")
    onnx_file = args.model is not None and args.model.lower().endswith(".onnx")
    if args.backend == "onnx" and not onnx_file:
        raise BadValue(
            f"--backend onnx needs --model FILE.onnx; got --model {args.model or '(the bundled model)'}"
        )
    backend = BACKENDS.get(args.backend)  # None: auto
    if backend is not None and backend.check:  # before a model loads: a missing extra is the one line
        backend.load("check")()
    dtype = DTYPES[args.dtype]
    # auto runs an .onnx file in bf16 on openvino where its CPU plugin has bf16 (sampling.auto_rule)
    auto_onnx = (
        onnx_file and args.backend == "auto" and not (dtype == torch.bfloat16 and openvino_bf16_here())
    )
    if (args.backend == "onnx" or auto_onnx) and dtype != torch.float32:
        raise BadValue(
            f"--backend onnx computes in float32 (the graph's inputs and outputs); got --dtype {args.dtype}"
        )
    if onnx_file and backend is not None and not backend.graph:
        raise BadValue(
            f"--model {args.model} is an ONNX file: use --backend {' or '.join(GRAPH_BACKENDS)} (or auto); got "
            f"--backend {args.backend}"
        )
    if args.classifier is None and (args.classifier_flags is not None or args.classifier_scale is not None):
        raise BadValue("--classifier-flags and --classifier-scale need --classifier FILE.pt")
    if args.classifier is not None and args.labels is None:
        raise BadValue(
            "--classifier (classifier guidance) needs --labels random|K|FILE.npy: the class to steer to"
        )
    if kind != "dir":  # these describe a sharded run; with a file output they were ignored
        given = [("--shard-size", args.shard_size is not None), ("--format", args.shard_format is not None),
                 ("--no-merge", args.no_merge)]  # fmt: skip
        for flag, used in given:
            if used:
                raise BadValue(f"{flag} applies to --out DIR (a sharded run) only; got --out {args.out}")
    if args.nproc_per_node and kind != "dir":
        raise BadValue(f"--nproc-per-node needs --out DIR (a sharded run); got --out {args.out}")
    check_world_out(kind, args.out, env_world()[1])
    return kind


def _launch(args, argv: list[str]) -> int:
    """Run this same command under torchrun with N processes (torch.distributed.run), minus --nproc-per-node."""
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    launch = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(args.nproc_per_node), "-m", "ddpm_fast.cli", "--", *rest]
    )
    torchrun(launch)
    return 0


def run(args) -> int:
    kind = _check(args)
    if args.nproc_per_node and env_world()[1] == 1:
        return _launch(args, args._argv)
    rank, world, local = env_world()
    device = resolve_device(args.device, local, world)
    dist = join(device) if kind == "dir" else Dist()
    try:
        classifier = _classifier(args, device)  # a bad file is refused before the model loads
        model, required = _load_model(args.model, device)
        backend = required if required and args.backend == "auto" else args.backend
        schedule = None
        if model.defaults.schedule is None:
            schedule = Schedule.linear(1000)
            if dist.rank == 0:
                log.warning("the model names no noise schedule: using DDPM's linear betas over 1000 steps")
        steps = args.steps
        if steps is None and args.method != "tuned":  # a tuned table knows its NFE
            # an ONNX step graph samples exactly the run it was exported for; a checkpoint records its count
            steps = getattr(model, "steps", None) or model.defaults.steps
        dtype = DTYPES[args.dtype]
        if backend == "auto" and dtype == torch.float64:
            backend = "reference"  # sampling.choose_backend's rule, needed here already to cast the model
        cast = backend == "reference" and dtype != torch.float32
        if cast and isinstance(model, torch.nn.Module):
            model = model.to(dtype)  # the reference runs in the caller's dtype end to end
        guidance = _guidance(args, classifier, dtype if cast else None)
        batch = args.batch_size or default_batch_size(device)
        plan = make_plan(
            model,
            schedule,
            (min(batch, args.num), *model.defaults.image_shape),
            steps=steps,
            method=args.method,
            spacing=args.spacing,
            eta=args.eta,
            seed=args.seed,
            device=device,
            dtype=dtype,
            labels=_labels(args.labels, args.num),
            guidance=guidance,
            tuned=args.tuned,
        )
        summary = generate(
            model,
            args.out,
            plan,
            num=args.num,
            backend=backend,
            shard_size=args.shard_size,
            shard_format=args.shard_format or "npz",
            merge=not args.no_merge,
            progress=not args.quiet,
            dist=dist,
        )
    finally:
        dist.close()
    if dist.rank == 0:
        _report(summary)
    return 0


def _report(s: dict) -> None:
    rate = s["new"] / s["seconds"] if s["seconds"] > 0 else float("inf")
    line = f"{s['new']} images in {s['seconds']:.1f} s ({rate:.1f} img/s)"
    if "shards" in s:
        line += f"; {s['skipped']} already done; {s['num']} in {s['shards']} shards"
        if s["world_size"] > 1:
            line += f" over {s['world_size']} processes"
        if "merged" in s:
            line += f"; merged in {s['merge_seconds']:.1f} s"
    print(line, file=sys.stderr)
    print(s.get("merged", s["out"]))

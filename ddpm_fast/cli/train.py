"""`ddpm-fast train`: train a DDPM (`ddpm_fast.train`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

from ddpm_fast.cli import check_out_dir
from ddpm_fast.distributed import env_world
from ddpm_fast.train import PRESETS, TrainConfig, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument(
        "--data",
        default=d.data,
        help="'digits' (scikit-learn, 8x8), an image folder, or an .npz (arr_0 NHWC)",
    )
    p.add_argument("--out", default="runs/digits", help="output directory (default: %(default)s)")
    p.add_argument("--preset", default=d.preset, choices=PRESETS, help="U-Net size (default: %(default)s)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="train resolution (default: the data's; required for folders)",
    )
    p.add_argument(
        "--channels", type=int, default=None, choices=(1, 3), help="convert the data to 1 or 3 channels"
    )
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips")
    p.add_argument("--schedule", default=d.schedule, choices=("linear", "cosine"))
    p.add_argument(
        "--timesteps",
        dest="num_timesteps",
        type=int,
        default=d.num_timesteps,
        help="T (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in all (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (default: %(default)s)"
    )
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--variance",
        default=d.variance,
        choices=("fixed_small", "fixed_large"),
        help="sampling variance recorded in the checkpoint (default: %(default)s)",
    )
    p.add_argument(
        "--save-every", type=int, default=1000, help="checkpoint every N steps (default: %(default)s)"
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        default=100,
        help="respaced steps for the sample grid at each checkpoint; 0: no grid (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out that holds a run, deleting its model, state, log and sample grids",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    check_out_dir(args.out)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    t0 = time.perf_counter()
    train(
        cfg,
        args.out,
        resume=args.resume,
        force=args.force,
        device=args.device,
        save_every=args.save_every,
        sample_steps=args.sample_steps,
        compile=args.compile,
        progress=not args.no_progress,
    )
    if env_world()[0] == 0:
        print(f"trained to step {cfg.steps} in {time.perf_counter() - t0:.0f} s; model in {args.out}")
    return 0

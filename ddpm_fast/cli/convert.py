"""`ddpm-fast convert SRC DST`: a diffusers UNet2DModel or pipeline directory (or a native one), or an openai
improved-/guided-diffusion .pt file with --adm-flags / --adm-preset, -> native format."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ddpm_fast.adm_io import preset_for_file
from ddpm_fast.checkpoint import CONFIG_FILE, load_model, save_model
from ddpm_fast.errors import BadValue

log = logging.getLogger("ddpm_fast")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="diffusers UNet2DModel dir, pipeline dir (unet/ + scheduler/), native checkpoint, or an openai "
        "improved-/guided-diffusion .pt file (with --adm-flags or --adm-preset)",
    )
    p.add_argument("dst", help="output directory (config.json + model.safetensors)")
    p.add_argument(
        "--variance",
        choices=("fixed_small", "fixed_large", "learned_range"),
        help="override the sampling variance stored with the model",
    )
    p.add_argument("--no-clip", action="store_true", help="store clip=False (do not clip predicted x0)")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already at DST")
    p.add_argument(
        "--adm-flags",
        metavar="FLAGS",
        help="an openai .pt file's MODEL_FLAGS and DIFFUSION_FLAGS as its README prints them, e.g. "
        '"--attention_resolutions 32,16,8 --class_cond True ..." (flags left out take that repository\'s defaults)',
    )
    p.add_argument(
        "--adm-source",
        choices=("improved", "guided"),
        help="the repository the .pt file comes from, where the file and flags do not tell",
    )
    p.add_argument(
        "--adm-preset",
        metavar="NAME",
        help="a published openai checkpoint's flags, e.g. guided-imagenet64-cond (README: openai checkpoints)",
    )


def run(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise BadValue(f"dst must differ from src; got {dst} for both")
    if (dst / CONFIG_FILE).exists() and not args.force:
        raise BadValue(f"dst {dst} already holds a checkpoint; pass --force to overwrite it")
    openai = args.adm_flags is not None or args.adm_source is not None or args.adm_preset is not None
    if src.is_file() and not openai:
        if preset_for_file(src.name) is None:
            raise BadValue(
                f'{src} is a file: convert an openai ADM .pt file with --adm-flags "..." (its README\'s '
                "MODEL_FLAGS and DIFFUSION_FLAGS) or --adm-preset NAME"
            )
    model = load_model(src, adm_flags=args.adm_flags, adm_source=args.adm_source, adm_preset=args.adm_preset)
    changes = {}
    if args.variance:
        changes["variance"] = args.variance
    if args.no_clip:
        changes["clip"] = False
    save_model(model, dst, sampling=changes)
    d = load_model(dst).defaults
    n = sum(p.numel() for p in model.parameters())
    sched = "none" if d.schedule is None else f"T={d.schedule.num_timesteps}"
    print(f"wrote {dst}: {n:,} parameters, schedule {sched}, variance {d.variance}, clip {d.clip}")
    return 0

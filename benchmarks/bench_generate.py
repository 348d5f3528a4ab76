"""Generation throughput: the whole `ddpm-fast sample` pipeline against the sampler alone, in images/s.

    python benchmarks/bench_generate.py                                   # CPU: tiny U-Net, 10 steps, a few minutes
    python benchmarks/bench_generate.py --device cuda --preset cifar10 --steps 100 --num 4096 --batch-size 256
    python benchmarks/bench_generate.py --model ckpt/ --steps 1000 --json gen.json

Providers (same model, settings, backend and batch cuts; a fresh output directory per repeat):
- sampler:      `ddpm_fast.sample` per batch, nothing else (the ceiling);
- shards-npz:   `generate(..., out=DIR)`: sample, uint8, shard .npz written atomically by the writer
                thread, manifest after every shard; no merge;
- shards-png:   the same with a folder of PNGs per shard;
- file-npz:     `generate(..., out=FILE.npz)`: one .npz streamed batch by batch;
- merge:        `ddpm-fast merge` of the shards-npz run alone (images/s of merging);
- write-npz / write-png: encoding and writing shards of random uint8 images alone (no sampling): the
                per-image cost writing adds, whatever the step count.

`x sampler` is a provider's images/s over the sampler's: 1.0 means writing costs nothing, because the
writer thread overlaps it with drawing the next shard. Medians with 20/80 quantiles over --repeats,
taken round-robin over the providers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import ddpm_fast as df
from ddpm_fast import sampling, shards
from ddpm_fast.plan import make_plan
from ddpm_fast.runs import Sampler, generate, model_digest, resolve_backend

PRESETS = ("tiny", "digits", "cifar10")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def load(model: str | None, preset: str, device: torch.device):
    if model:
        if model.endswith(".onnx"):
            from ddpm_fast.export.runtime import load_onnx

            return load_onnx(model)
        return df.load_model(model, device=device)
    torch.manual_seed(0)
    m = df.UNet(getattr(df.UNetConfig, preset)()).eval().to(device)
    m.schedule = df.Schedule.linear(1000)
    return m


def run(
    model=None,
    preset="tiny",
    device="cpu",
    num=256,
    batch_size=64,
    shard_size=256,
    steps=10,
    backend="auto",
    repeats=3,
    tmp=None,
) -> list[dict]:
    device = torch.device(device)
    m = load(model, preset, device)
    shape = m.defaults.image_shape
    plan = make_plan(m, None, (min(batch_size, num), *shape), steps=steps, device=device, seed=0)
    backend, plan = resolve_backend(m, plan, backend, num)  # resolved once, shared by every provider
    sampler = Sampler(m, plan, backend)
    model_id = model_digest(m)
    sampler(0, min(batch_size, num))  # warm-up: compile, capture, cuDNN choices
    _sync(device)

    def t_sampler(_):
        for off in range(0, num, batch_size):
            sampling.run(m, plan.rows(min(batch_size, num - off), off), backend)
        _sync(device)

    def t_generate(fmt):
        def go(d):
            generate(
                m, os.path.join(d, "run"), plan, num=num, backend=backend, shard_size=shard_size,
                shard_format=fmt, merge=False, model_id=model_id,
            )  # fmt: skip
            _sync(device)

        return go

    def t_file(d):
        generate(m, os.path.join(d, "one.npz"), plan, num=num, backend=backend)
        _sync(device)

    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (shard_size, shape[1], shape[2], shape[0]), dtype=np.uint8)

    def t_write(fmt):
        def go(d):
            os.makedirs(os.path.join(d, shards.SHARDS))
            for k, (start, count) in enumerate(shards.shard_ranges(num, shard_size)):
                shards.write_shard(d, k, start, fake[:count], fmt)

        return go

    merge_src = {}

    def prep_merge(d):
        t_generate("npz")(d)
        merge_src["dir"] = os.path.join(d, "run")

    def t_merge(d):
        shards.merge(merge_src["dir"], os.path.join(d, "all.npz"))

    providers = [
        ("sampler", t_sampler, None),
        ("shards-npz", t_generate("npz"), None),
        ("shards-png", t_generate("png"), None),
        ("file-npz", t_file, None),
        ("merge", t_merge, prep_merge),
        ("write-npz", t_write("npz"), None),
        ("write-png", t_write("png"), None),
    ]
    common = {
        "model": model or f"random {preset}",
        "image_shape": list(shape),
        "backend": backend,
        "num": num,
    }
    common.update(batch_size=batch_size, shard_size=shard_size, steps=steps)
    secs = _round_robin(providers, repeats, tmp)
    return _rows(providers, secs, common, num, device)


def _round_robin(providers, repeats: int, tmp) -> dict[str, list[float]]:
    """Seconds of each provider per repeat, each run in a fresh directory. Repeats go round-robin over the
    providers, so a slow spell on a shared machine hits them all alike."""
    secs = {name: [] for name, _, _ in providers}
    with tempfile.TemporaryDirectory(dir=tmp) as root:
        prep_dir = tempfile.mkdtemp(dir=root)
        for _, _, prep in providers:
            if prep is not None:
                prep(prep_dir)
        for _ in range(repeats):
            for name, fn, _ in providers:
                d = tempfile.mkdtemp(dir=root)
                t0 = time.perf_counter()
                fn(d)
                secs[name].append(time.perf_counter() - t0)
    return secs


def _rows(providers, secs: dict, common: dict, num: int, device) -> list[dict]:
    """One row per provider: the run's settings, images/s (median, 20/80 quantiles), device and versions."""
    common = {"device": str(device), "device_name": _device_name(device), **common}
    common.update(torch=torch.__version__, python=platform.python_version(), numpy=np.__version__)
    rows = []
    base = None
    for name, _, _ in providers:
        med, p20, p80 = _quantiles([num / s for s in secs[name]])
        if name == "sampler":
            base = med
        rows.append(
            {
                **common,
                "provider": name,
                "images_per_s": med,
                "p20": p20,
                "p80": p80,
                "ms_per_image": 1e3 / med,
                "x_sampler": med / base if name.startswith(("shards", "file")) else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (
        f"Generation, {r0['model']} {r0['image_shape']}, {r0['steps']} steps, backend {r0['backend']}, "
        f"{r0['num']} images, batch {r0['batch_size']}, shard {r0['shard_size']}; {r0['device_name']}; "
        f"torch {r0['torch']}, python {r0['python']}\n\n"
        "| provider | images/s (p20-p80) | ms/image | x sampler |\n|---|---|---|---|\n"
    )
    lines = [
        f"| {r['provider']} | {r['images_per_s']:.1f} ({r['p20']:.1f}-{r['p80']:.1f}) | {r['ms_per_image']:.3f} "
        f"| {'' if r['x_sampler'] is None else format(r['x_sampler'], '.3f')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir or .onnx (default: random weights of --preset)")
    ap.add_argument("--preset", default="tiny", choices=PRESETS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--tmp", help="where the outputs go (default: the system temp dir); its disk is measured too"
    )
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        rows = run(
            args.model, args.preset, args.device, args.num, args.batch_size, args.shard_size, args.steps,
            args.backend, args.repeats, args.tmp,
        )  # fmt: skip
    except (ValueError, RuntimeError, OSError) as e:
        print(f"bench_generate: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    if args.json:
        shards.atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

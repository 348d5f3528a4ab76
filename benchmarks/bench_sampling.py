"""Sampling providers side by side (reference, fast with each option on/off, diffusers, onnx) on one device.

    python benchmarks/bench_sampling.py --device cpu --out bench/cpu        # tiny U-Net, batch 1 and 4
    python benchmarks/bench_sampling.py --device cuda --out bench/cuda      # cifar10 U-Net, batch 1..256

The measuring lives in `ddpm_fast.bench` (the `ddpm-fast bench` command); this driver is the same with
the benchmark suite's defaults, and `run()` is what benchmarks/gpu_check.py calls.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ddpm_fast import bench

CUDA_DEFAULTS = dict(model="cifar10", batch_sizes=(1, 16, 64, 256), steps=20, repeats=3)
CPU_DEFAULTS = dict(model="tiny", batch_sizes=(1, 4), steps=10, repeats=3)


def run(device="cuda", *, model=None, batch_sizes=None, steps=None, repeats=None, providers=None, out=None):
    """Rows of `ddpm_fast.bench.benchmark` with this suite's defaults; writes sampling.md/.json/.png to `out`."""
    device = torch.device(device)
    d = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    name = model or d["model"]
    net = bench.build_model(name, device)
    rows = bench.benchmark(
        net,
        device=device,
        batch_sizes=batch_sizes or d["batch_sizes"],
        steps=steps or d["steps"],
        repeats=repeats or d["repeats"],
        providers=providers,
    )
    if out is not None:
        bench.write_report(
            rows, out, stem="sampling", meta={"model": name, "parameters": net.num_parameters()}
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    args = p.parse_args(argv)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())

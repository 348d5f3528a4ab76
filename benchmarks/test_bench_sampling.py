"""pytest-benchmark suite for whole sampling runs, CPU-sized (run: pytest benchmarks/test_bench_sampling.py).

One full run (STEPS steps, batch BATCH) per round, per provider of `ddpm_fast.bench.PROVIDERS`; the first
call (compile, warm-up, capture) happens before timing. images/s, ms/step, max |diff| against the reference
(same noise), the device and versions go to each result's extra_info.
"""

from __future__ import annotations

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import bench
from ddpm_fast.errors import Unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = "cifar10" if DEVICE.type == "cuda" else "tiny"
BATCH = 64 if DEVICE.type == "cuda" else 2
STEPS = 20 if DEVICE.type == "cuda" else 4
PROVIDERS = bench.DEFAULT_PROVIDERS[DEVICE.type]


@pytest.fixture(scope="module")
def setup():
    model = bench.build_model(MODEL, DEVICE)
    schedule = df.Schedule.linear(STEPS)
    shape = (BATCH, *model.config.image_shape)
    ref = bench.PROVIDERS["reference"](model, schedule, shape, STEPS, DEVICE)()
    return model, schedule, shape, ref


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sampling_run(benchmark, setup, provider):
    model, schedule, shape, ref = setup
    try:
        fn = bench.PROVIDERS[provider](model, schedule, shape, STEPS, DEVICE)
    except (Unavailable, ImportError) as e:
        pytest.skip(f"{provider} unavailable: {e}")
    out = fn()  # compile / warm-up / capture, untimed

    def run():
        y = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return y

    benchmark.pedantic(run, rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    check = fn.reference() if hasattr(fn, "reference") else ref
    diff = (out.double().cpu() - check.double().cpu()).abs().max().item()
    assert diff < 1e-2  # same noise, same model: only rounding (and bf16) separates the providers
    benchmark.extra_info.update(
        {
            "images_per_s": BATCH / median,
            "ms_per_step": 1e3 * median / STEPS,
            "batch": BATCH,
            "steps": STEPS,
            "model": MODEL,
            "max_abs_diff": diff,
            **bench.device_info(DEVICE),
        }
    )

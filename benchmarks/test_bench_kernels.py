"""pytest-benchmark suite for the posterior step, CPU-sized (run: pytest benchmarks/test_bench_kernels.py).

Providers and bytes as in bench_kernels.py; GB/s, the device and versions go to each result's extra_info.
"""

from __future__ import annotations

import pytest
import torch
from bench_kernels import device_info, step_callables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (256, 3, 32, 32) if DEVICE == "cuda" else (8, 3, 32, 32)
PROVIDERS = ["eager", "twin", "compiled"] + (["triton", "triton_graph"] if DEVICE == "cuda" else [])


@pytest.fixture(scope="module")
def callables():
    return step_callables(SHAPE, DEVICE, torch.float32, PROVIDERS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_posterior_step(benchmark, callables, provider):
    fns, compile_s, nbytes = callables
    fn = fns[provider]
    if DEVICE == "cuda":
        sync = torch.cuda.synchronize

        def run():
            fn()
            sync()
    else:
        run = fn
    benchmark(run)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "size": "x".join(map(str, SHAPE)),
            "bytes": nbytes,
            "gbps": nbytes / median / 1e9,
            "compile_s": compile_s.get(provider),
            **device_info(DEVICE),
        }
    )

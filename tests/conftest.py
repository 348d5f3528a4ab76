"""Test set-up: without CUDA, Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton is first imported, so it is decided here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # float32 comparisons against float64 need float32 arithmetic: TF32 convolutions and matmuls (cuDNN's
    # default on Ampere and later) round to 10 mantissa bits, a thousand times coarser.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

VERSIONED = ("torch", "triton", "numpy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "diffusers")


def pytest_report_header(config):
    """The resolved versions of what decides the numerics, at the top of every run's output."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ["ddpm-fast numerics: " + ", ".join(found), "ddpm-fast machine: " + _machine()]


def _machine() -> str:
    """The processor and the ATen vector kernels in use: a numeric failure names the CPU it happened on."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{model}, {os.cpu_count()} cores, ATen CPU capability {cap}" + (
        f" (ATEN_CPU_CAPABILITY={forced})" if forced else ""
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by benchmarks/gpu_check.py)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

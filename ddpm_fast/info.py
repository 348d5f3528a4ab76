"""`ddpm-fast info`: versions, devices, and which backends and parts are available here (and why not).

Every probe catches its own failure and reports the reason, so `info` itself never fails on a machine
that lacks a GPU, Triton, ONNX Runtime or a C++ compiler: finding that out is its purpose.

Versions come from package metadata, and a package is imported only where its answer needs it (onnxruntime
for its providers, OpenVINO for its CPU plugin's bf16, Triton where it would run): on a 2-core CPU collect()
takes 0.1 s, plus 0.19 s where OpenVINO is installed (it took 1.8 s importing diffusers, which pulls in
torch._dynamo and sympy, triton and onnx), so `info` costs about what `--help` does.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys

__all__ = ["collect"]

DISTRIBUTIONS = (
    "ddpm-fast",
    "torch",
    "numpy",
    "safetensors",
    "triton",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "diffusers",
    "scikit-learn",
    "pillow",
    "tqdm",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> dict:
    import torch

    out = {
        "cpu": {
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
    }
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    # Native bf16 (sm80+). is_bf16_supported() asks the current device, not device i, and
                    # below sm80 allocates a tensor to test emulation, which creates a CUDA context.
                    "bf16": p.major >= 8,
                }
            )
        out["cuda"] = {"available": True, "version": torch.version.cuda, "devices": gpus}
    else:
        reason = (
            "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device or driver found"
        )
        out["cuda"] = {"available": False, "why": reason}
    return out


def _probe_import(module: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return (
            False,
            f"import {module} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        )
    return True, None


def _probe_installed(module: str) -> tuple[bool, str | None]:
    """Whether `module` is installed, without importing it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        return False, f"{module} cannot be found: {type(e).__name__}: {e}"
    return found, None if found else f"{module} is not installed"


def _backends() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    out = {"reference": {"available": True, "note": "eager PyTorch on any device; the oracle"}}

    ok, why = _probe_import("ddpm_fast.engine")
    fast: dict = {"available": ok}
    if not ok:
        fast["why"] = why
    else:
        parts = []
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        # Imported only where the kernel would run (kernels.use_triton's rule): elsewhere, installed is enough.
        tri_ok, tri_why = _probe_import("triton") if cuda or interpret else _probe_installed("triton")
        if cuda and tri_ok:
            parts.append("fused Triton step kernel")
        elif interpret and tri_ok:
            parts.append("Triton kernel through the interpreter (TRITON_INTERPRET=1; slow, for tests)")
        else:
            parts.append(
                "torch twin of the step kernel ("
                + (tri_why or "Triton runs on CUDA only; set TRITON_INTERPRET=1 to interpret it on CPU")
                + ")"
            )
        if hasattr(torch, "compile"):
            cc = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
            if cuda or cc:
                parts.append("torch.compile")
            else:
                parts.append("no torch.compile on CPU (no C++ compiler found; set CXX)")
        parts.append("CUDA graphs" if cuda else "no CUDA graphs (CPU)")
        fast["note"] = "; ".join(parts)
    out["fast"] = fast

    ort_ok, ort_why = _probe_import("onnxruntime")
    onnx: dict = {"available": ort_ok}
    if ort_ok:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        onnx["providers"] = providers
        if cuda and "CUDAExecutionProvider" not in providers:
            onnx["note"] = (
                "CUDA is present but this onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu"
            )
        elif not cuda and "CUDAExecutionProvider" in providers:
            onnx["note"] = (
                "no CUDA device here: the CPU provider runs (a GPU build lists its providers anyway)"
            )
    else:
        onnx["why"] = ort_why + " (pip install 'ddpm-fast[onnx]')"
    exp_ok, exp_why = _probe_installed("onnx")
    onnx["export"] = True if exp_ok else exp_why
    out["onnx"] = onnx

    out["openvino"] = _openvino()

    dif_ok, dif_why = _probe_installed("diffusers")
    out["diffusers"] = {
        "available": dif_ok,
        "note": "only benchmarks and equivalence tests use it; checkpoints load without it"
        if dif_ok
        else dif_why,
    }
    return out


def _openvino() -> dict:
    """backend "openvino": whether it runs here, and its precisions (importing OpenVINO to ask its CPU plugin
    for bf16 kernels costs 0.19 s on a 2-core Xeon)."""
    ok, why = _probe_import("openvino")
    if not ok:
        return {"available": False, "why": why + " (pip install 'ddpm-fast[openvino]')"}
    try:  # our module imported inside the probe too: a broken install is this row's reason, not info's crash
        from ddpm_fast.export.openvino_runtime import bf16_supported

        bf16 = bf16_supported()
    except Exception as e:  # a broken install, no CPU plugin: say so rather than fail
        return {"available": False, "why": f"OpenVINO's CPU plugin: {type(e).__name__}: {e}"}
    note = "CPU; float32, and bfloat16 " + (
        "(this CPU has bf16 kernels)" if bf16 else "refused: no bf16 on this CPU"
    )
    exp_ok, exp_why = _probe_installed("onnx")
    if not exp_ok:
        note += f"; a loaded model needs the exporter: {exp_why} (pip install 'ddpm-fast[openvino]')"
    return {"available": True, "bf16": bf16, "note": note}


def _bundled_model() -> dict:
    try:  # imported inside the probe: a checkpoint stack that fails to import is this row's reason
        from ddpm_fast.checkpoint import DEFAULT_MODEL_DIR, load_model

        m = load_model(DEFAULT_MODEL_DIR)
    except Exception as e:
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    return {
        "available": True,
        "path": str(DEFAULT_MODEL_DIR),
        "image_shape": list(m.config.image_shape),
        "parameters": m.num_parameters(),
        "sampling": getattr(m, "sampling", None),
    }


def collect() -> dict:
    """Everything `ddpm-fast info` reports, as a JSON-able dict."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in DISTRIBUTIONS},
        "devices": _devices(),
        "backends": _backends(),
        "bundled_model": _bundled_model(),
    }


def _print_text(info: dict) -> None:
    print(f"ddpm-fast {info['versions']['ddpm-fast'] or '(not installed)'}  python {info['python']}")
    print(f"platform  {info['platform']}")
    print("versions")
    for d, v in info["versions"].items():
        if d != "ddpm-fast":
            print(f"  {d:<16} {v or '-'}")
    dev = info["devices"]
    cpu = dev["cpu"]
    print("devices")
    print(
        f"  cpu   {cpu['machine']}, {cpu['logical_cores']} logical cores, torch threads {cpu['torch_threads']}"
    )
    cuda = dev["cuda"]
    if cuda["available"]:
        for g in cuda["devices"]:
            print(
                f"  cuda:{g['index']} {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, bf16 {g['bf16']})"
                f", CUDA {cuda['version']}"
            )
    else:
        print(f"  cuda  unavailable: {cuda['why']}")
    print("backends")
    for name, b in info["backends"].items():
        state = "yes" if b["available"] else "no"
        detail = b.get("note") or b.get("why") or ""
        if name == "onnx" and b["available"]:
            detail = "providers " + ", ".join(b["providers"]) + (f"; {b['note']}" if "note" in b else "")
            detail += "; export " + ("yes" if b["export"] is True else f"no ({b['export']})")
        print(f"  {name:<10} {state:<4} {detail}")
    m = info["bundled_model"]
    if m["available"]:
        shape = "x".join(str(s) for s in m["image_shape"])
        print(f"bundled model  {shape}, {m['parameters']:,} parameters, {m['path']}")
    else:
        print(f"bundled model  missing: {m['why']}")

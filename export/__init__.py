"""ONNX export and the ONNX Runtime sampler (installed as `ddpm_fast.export`).

    from ddpm_fast.export import export_onnx, OnnxModel
    export_onnx(model, "model.onnx")                     # (x, t) -> eps, validated against PyTorch
    export_onnx(model, "step.onnx", step=True, steps=50) # (x, step, z) -> x_prev
    df.sample("model.onnx", shape=(16, 3, 32, 32), backend="onnx", device="cuda")

Importing this package imports neither onnx nor onnxruntime; they load on first use.
"""

from __future__ import annotations

__all__ = ["export_onnx", "validate_onnx", "read_metadata", "OnnxModel", "load_onnx", "sample_onnx"]

_LAZY = {
    "export_onnx": "ddpm_fast.export.onnx_export",
    "validate_onnx": "ddpm_fast.export.onnx_export",
    "read_metadata": "ddpm_fast.export.onnx_export",
    "OnnxModel": "ddpm_fast.export.runtime",
    "load_onnx": "ddpm_fast.export.runtime",
    "sample_onnx": "ddpm_fast.export.runtime",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_fast.export' has no attribute {name!r}")

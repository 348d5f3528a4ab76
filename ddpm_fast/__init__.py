"""ddpm-fast: fast, verified DDPM sampling.

Imports nothing heavy: Triton, onnxruntime and the U-Net are loaded where they are used.
"""

from __future__ import annotations

from ddpm_fast.schedule import Schedule, spaced_timesteps

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "spaced_timesteps",
    "sample",
    "UNet",
    "UNetConfig",
    "load_model",
    "save_model",
    "default_model",
    "ADM",
    "ADMConfig",
    "ClassifierGuidance",
    "load_classifier",
    "metrics",
    "tune",
    "load_tuned",
    "__version__",
]

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "sample": "ddpm_fast.sampling",
    "UNet": "ddpm_fast.unet",
    "UNetConfig": "ddpm_fast.unet",
    "load_model": "ddpm_fast.checkpoint",
    "save_model": "ddpm_fast.checkpoint",
    "default_model": "ddpm_fast.checkpoint",
    "ADM": "ddpm_fast.adm",
    "ADMConfig": "ddpm_fast.adm",
    "ClassifierGuidance": "ddpm_fast.guidance",
    "load_classifier": "ddpm_fast.adm_io",
    "tune": "ddpm_fast.tuning",
    "load_tuned": "ddpm_fast.tuning",
}


def __getattr__(name: str):
    if name == "metrics":  # the subpackage, imported on first use like the names below
        import importlib

        return importlib.import_module("ddpm_fast.metrics")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")

"""Checkpoints: the native format, and `load_model` for it and for diffusers directories (`ddpm_fast.diffusers_io`).

Native format: a directory with

    model.safetensors   the UNet's state dict under our parameter names (float tensors, no pickle)
    config.json         {"format": "ddpm-fast", "format_version": 1, "arch": "ddpm-unet",
                         "model": UNetConfig.to_dict(),
                         "schedule": Schedule.spec or null,
                         "sampling": {"variance": "fixed_small" | "fixed_large" | "learned_range",
                                      "clip": bool, "clip_range": float,
                                      "image_shape": [C, H, W], "data_range": [-1.0, 1.0],
                                      "steps": int or null (the CLI's default step count),
                                      "num_classes": int or null},
                         "weights": {"file": "model.safetensors", "sha256": hex digest}}

Each file is written to a temporary name, fsynced and renamed into place, weights first: config.json is
written last and carries the weights' sha256, so a save interrupted half-way is detected on load.

`load_model(path)` returns the architecture the config's "arch" names (`ARCHITECTURES`; a config without
"arch" is a "ddpm-unet") in eval mode, carrying its sampling defaults as `model.defaults`
(`ddpm_fast.defaults.ModelDefaults`: schedule, variance, clip, image shape, steps, classes, arch), which
`ddpm_fast.sample` reads where the caller leaves them out.

`path` may also be a diffusers `UNet2DModel` directory (config.json + diffusion_pytorch_model.safetensors,
or .bin read with torch.load(weights_only=True)), or a pipeline directory with unet/ and scheduler/ (its
scheduler_config.json gives the schedule and the defaults), so `df.sample(model, shape=..., generator=g)`
matches DDPMPipeline for the same generator to float32 rounding. Or it may be an openai improved- or
guided-diffusion state dict file with the flags that describe it (`adm_flags=` / `adm_preset=`, read by
`ddpm_fast.adm_io`): an "adm" model whose sampling defaults come from those flags.
Every failure raises one ValueError / FileNotFoundError naming the file (and key); nothing is returned
half-loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import torch

from ddpm_fast import adm_io, diffusers_io
from ddpm_fast.defaults import defaults_of, record
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.schedule import Schedule
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.tuned import find_carried
from ddpm_fast.weights import load_state, read_json, safetensors_from_bytes

__all__ = ["save_model", "load_model", "default_model", "ARCHITECTURES", "DEFAULT_MODEL_DIR"]

FORMAT = "ddpm-fast"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "digits"
BUNDLED_NAME = "digits"  # what the commands take for DEFAULT_MODEL_DIR (`--model digits`, `export digits`)
# "arch" in config.json -> "module:ModelClass"; the class has .config (to_dict/from_dict via CONFIG_CLASS).
ARCHITECTURES = {
    "ddpm-unet": ("ddpm_fast.unet:UNet", "ddpm_fast.unet:UNetConfig"),
    "adm": ("ddpm_fast.adm:ADM", "ddpm_fast.adm:ADMConfig"),
}


def architecture(arch: str, where: str):
    """(model class, config class) registered for `arch`; an unknown one is a ValueError naming `where`."""
    if arch not in ARCHITECTURES:
        raise BadValue(f"{where}: arch must be one of {sorted(ARCHITECTURES)}; got {arch!r}")

    def obj(spec):
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)

    model_cls, config_cls = ARCHITECTURES[arch]
    return obj(model_cls), obj(config_cls)


def _arch_of(model) -> str:
    for arch, (spec, _) in ARCHITECTURES.items():
        module, name = spec.split(":")
        if isinstance(model, getattr(importlib.import_module(module), name)):
            return arch
    known = ", ".join(
        f"{a}: {spec.split(':')[0].rsplit('.', 1)[0]}.{spec.split(':')[1]}"
        for a, (spec, _) in ARCHITECTURES.items()
    )
    raise BadType(f"model must be a registered architecture ({known}); got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------- save


def save_model(model, path, *, schedule: Schedule | None = None, sampling: dict | None = None) -> Path:
    """Write `model` as a native checkpoint directory; returns the directory.

    The schedule and sampling defaults are the model's record (`model.defaults`) with `schedule` and the
    `sampling` keys given here replacing its fields.
    """
    from safetensors.torch import save as st_save

    arch = _arch_of(model)
    cfg = model.config
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadValue(f"path must be a directory; {path} is a file")
    d = defaults_of(model)
    if schedule is None:
        schedule = d.schedule
    spec = None
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise BadType(f"schedule must be a ddpm_fast.Schedule; got {type(schedule).__name__}")
        if not torch.equal(schedule.timesteps, torch.arange(schedule.num_timesteps)):
            raise BadValue(
                "schedule must be a full (not respaced) schedule; save the one it was respaced from"
            )
        spec = schedule.spec
    fields = {**d.sampling_dict(), **(sampling or {})}
    rec = record(fields, cfg, schedule=schedule, arch=arch, where="save_model")

    # Contiguous CPU copies: a channels_last model stores channels_last conv weights.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "model": cfg.to_dict(),
        "schedule": spec,
        "sampling": rec.sampling_dict(),
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
    }
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"

    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, blob)  # weights first: a config never names missing weights
    atomic_write_bytes(path / CONFIG_FILE, text.encode())
    return path


# ---------------------------------------------------------------------------------------------- load


def load_model(
    path,
    device=None,
    dtype: torch.dtype = torch.float32,
    *,
    adm_flags: str | None = None,
    adm_source: str | None = None,
    adm_preset: str | None = None,
):
    """Load a native checkpoint, a diffusers UNet2DModel directory or a diffusers pipeline directory, or an
    openai improved-/guided-diffusion .pt file described by `adm_flags` (their README's MODEL_FLAGS and
    DIFFUSION_FLAGS) or `adm_preset` (`ddpm_fast.adm_io.PRESETS`; a published file name implies its own),
    with `adm_source` "improved" | "guided" where the file and flags do not tell."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadType(f"dtype must be a floating torch.dtype; got {dtype!r}")
    openai = adm_flags is not None or adm_source is not None or adm_preset is not None
    if path.is_dir():
        if openai:
            raise BadValue(
                f"adm_flags, adm_source and adm_preset describe an openai .pt file; {path} is a directory"
            )
        model = _load_dir(path)
    else:
        if not openai and adm_io.preset_for_file(path.name) is None:
            raise BadValue(
                f"model path must be a checkpoint directory, or an openai .pt file with adm_flags= or "
                f"adm_preset=; got the file {path}"
            )
        model = adm_io.load_openai(path, flags=adm_flags, source=adm_source, preset=adm_preset)
    model.eval()
    model.checkpoint_path = path  # where a derived file (the openvino backend's ONNX export) is cached beside
    if device is not None or dtype != torch.float32:
        model.to(device=device, dtype=dtype)
    return model


def _load_dir(path: Path):
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists() and not (path / "unet" / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"{cfg_file} not found: {path} is neither a ddpm-fast checkpoint, a diffusers UNet2DModel "
            "directory nor a pipeline directory with unet/"
        )
    raw = read_json(cfg_file) if cfg_file.exists() else {}
    if raw.get("format") == FORMAT:
        model = _load_native(path, raw)
    elif "_class_name" in raw or not cfg_file.exists():
        model = (
            diffusers_io.load_diffusers_unet(path, raw) if raw else diffusers_io.load_diffusers_pipeline(path)
        )
    else:
        raise BadValue(f"{cfg_file}: not a ddpm-fast or diffusers config (no 'format' nor '_class_name' key)")
    return model


def _load_native(path: Path, raw: dict):
    cfg_file = path / CONFIG_FILE
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BadValue(
            f"{cfg_file}: format_version {version!r} is not supported (this is version {FORMAT_VERSION})"
        )
    for key in ("model", "sampling", "weights"):
        if key not in raw:
            raise BadValue(f"{cfg_file}: missing key {key!r}")
    arch = raw.get("arch", "ddpm-unet")  # checkpoints written before "arch" existed hold the DDPM U-Net
    model_cls, config_cls = architecture(arch, f"{cfg_file}: key 'arch'")
    try:
        cfg = config_cls.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise BadValue(f"{cfg_file}: key 'model': {e}") from e
    schedule = None
    if raw.get("schedule") is not None:
        try:
            schedule = Schedule.from_spec(raw["schedule"])
        except (TypeError, ValueError, KeyError) as e:
            raise BadValue(f"{cfg_file}: key 'schedule': {e}") from e
    rec = record(raw["sampling"], cfg, schedule=schedule, arch=arch, where=f"{cfg_file}: key 'sampling'")

    w = raw["weights"]
    wfile = path / (w.get("file", WEIGHTS_FILE) if isinstance(w, dict) else WEIGHTS_FILE)
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} not found (named by {cfg_file})")
    blob = wfile.read_bytes()
    digest = w.get("sha256") if isinstance(w, dict) else None
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise BadValue(
            f"{wfile}: contents do not match the sha256 in {cfg_file} (truncated, altered or an interrupted save)"
        )
    state = safetensors_from_bytes(blob, wfile)
    model = model_cls(cfg)
    load_state(model, state, wfile, rename=None)
    model.defaults = rec
    model.tuned_tables = find_carried(path)  # tuned/nfe-<N>.safetensors: method="tuned", steps=N
    return model


# ---------------------------------------------------------------------------------------------- bundled


def default_model(device=None):
    """The bundled model trained on sklearn's 8x8 digits (ddpm_fast/assets/digits/)."""
    if not (DEFAULT_MODEL_DIR / CONFIG_FILE).exists():
        raise RuntimeError(
            f"the bundled digits model is missing: {DEFAULT_MODEL_DIR} has no {CONFIG_FILE} "
            "(it is produced by `ddpm-fast train --data digits`)"
        )
    return load_model(DEFAULT_MODEL_DIR, device=device)

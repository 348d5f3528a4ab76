"""Checkpoints: the native format, and import of diffusers `UNet2DModel` / DDPM pipeline directories.

Native format: a directory with

    model.safetensors   the UNet's state dict under our parameter names (float tensors, no pickle)
    config.json         {"format": "ddpm-fast", "format_version": 1,
                         "model": UNetConfig.to_dict(),
                         "schedule": Schedule.spec or null,
                         "sampling": {"variance": "fixed_small" | "fixed_large" | "learned_range",
                                      "clip": bool, "clip_range": float,
                                      "image_shape": [C, H, W], "data_range": [-1.0, 1.0],
                                      "steps": int or null (the CLI's default step count)},
                         "weights": {"file": "model.safetensors", "sha256": hex digest}}

Each file is written to a temporary name, fsynced and renamed into place, weights first: config.json is
written last and carries the weights' sha256, so a save interrupted half-way is detected on load.

`load_model(path)` returns a `UNet` in eval mode carrying two attributes that `ddpm_fast.sample` reads
when the caller leaves them out:

    model.schedule   a ddpm_fast.Schedule, or None when the checkpoint names none
    model.sampling   dict of sampling defaults: variance, clip, clip_range, image_shape, data_range, steps

`path` may also be a diffusers `UNet2DModel` directory (config.json + diffusion_pytorch_model.safetensors,
or .bin read with torch.load(weights_only=True)), or a pipeline directory with unet/ and scheduler/ (its
scheduler_config.json gives the schedule and the defaults), so `df.sample(model, shape=..., generator=g)`
matches DDPMPipeline for the same generator to float32 rounding.
Every failure raises one ValueError / FileNotFoundError naming the file (and key); nothing is returned
half-loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ddpm_fast.schedule import Schedule
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.unet import UNet, UNetConfig, diffusers_key

__all__ = [
    "save_model",
    "load_model",
    "default_model",
    "diffusers_unet_config",
    "diffusers_schedule",
    "DEFAULT_MODEL_DIR",
]

FORMAT = "ddpm-fast"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
SAMPLING_KEYS = ("variance", "clip", "clip_range", "image_shape", "data_range", "steps")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "digits"

# diffusers' file names
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"


# ---------------------------------------------------------------------------------------------- save


def _default_sampling(cfg: UNetConfig) -> dict:
    learned = cfg.out_channels == 2 * cfg.in_channels
    return {
        "variance": "learned_range" if learned else "fixed_small",
        "clip": True,
        "clip_range": 1.0,
        "image_shape": list(cfg.image_shape),
        "data_range": [-1.0, 1.0],
        "steps": None,  # `ddpm-fast sample`'s default step count; None: the whole schedule
    }


def _check_sampling(sampling: dict, cfg: UNetConfig, where: str) -> dict:
    """Fill missing keys from the defaults and validate; `where` names the source in errors."""
    if not isinstance(sampling, dict):
        raise TypeError(f"{where}: sampling must be a dict; got {type(sampling).__name__}")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown sampling key(s) {unknown}; known: {list(SAMPLING_KEYS)}")
    out = _default_sampling(cfg)
    out.update(sampling)
    v = out["variance"]
    if v not in VARIANCES:
        raise ValueError(f"{where}: sampling variance must be one of {VARIANCES}; got {v!r}")
    want = 2 * cfg.in_channels if v == "learned_range" else cfg.in_channels
    if cfg.out_channels != want:
        raise ValueError(
            f"{where}: sampling variance {v!r} needs out_channels == {want}; the model has {cfg.out_channels}"
        )
    if not isinstance(out["clip"], bool):
        raise TypeError(f"{where}: sampling clip must be a bool; got {out['clip']!r}")
    cr = out["clip_range"]
    if isinstance(cr, bool) or not isinstance(cr, (int, float)) or not cr > 0:
        raise ValueError(f"{where}: sampling clip_range must be a positive number; got {cr!r}")
    out["clip_range"] = float(cr)
    shape = out["image_shape"]
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ValueError(f"{where}: sampling image_shape must be [C, H, W] positive ints; got {shape!r}")
    out["image_shape"] = [int(s) for s in shape]
    dr = out["data_range"]
    if not isinstance(dr, (list, tuple)) or len(dr) != 2 or not float(dr[0]) < float(dr[1]):
        raise ValueError(f"{where}: sampling data_range must be [low, high] with low < high; got {dr!r}")
    out["data_range"] = [float(dr[0]), float(dr[1])]
    st = out["steps"]
    if st is not None and (isinstance(st, bool) or not isinstance(st, int) or st < 1):
        raise ValueError(f"{where}: sampling steps must be a positive int or null; got {st!r}")
    return out


def save_model(model: UNet, path, *, schedule: Schedule | None = None, sampling: dict | None = None) -> Path:
    """Write `model` as a native checkpoint directory; returns the directory.

    `schedule` / `sampling` default to the model's own attributes (set by `load_model`), else none / the
    defaults (variance fixed_small, or learned_range for a 2C-output model; clip to [-1, 1]).
    """
    from safetensors.torch import save as st_save

    if not isinstance(model, UNet):
        raise TypeError(f"model must be a ddpm_fast.UNet; got {type(model).__name__}")
    cfg = model.config
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a directory; {path} is a file")
    if schedule is None:
        schedule = getattr(model, "schedule", None)
    spec = None
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a ddpm_fast.Schedule; got {type(schedule).__name__}")
        if not torch.equal(schedule.timesteps, torch.arange(schedule.num_timesteps)):
            raise ValueError(
                "schedule must be a full (not respaced) schedule; save the one it was respaced from"
            )
        spec = schedule.spec
    if sampling is None:
        sampling = getattr(model, "sampling", None) or {}
    sampling = _check_sampling(dict(sampling), cfg, "save_model")

    # Contiguous CPU copies: a channels_last model stores channels_last conv weights.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "schedule": spec,
        "sampling": sampling,
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
    }
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"

    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, blob)  # weights first: a config never names missing weights
    atomic_write_bytes(path / CONFIG_FILE, text.encode())
    return path


# ---------------------------------------------------------------------------------------------- load


def load_model(path, device=None, dtype: torch.dtype = torch.float32) -> UNet:
    """Load a native checkpoint, a diffusers UNet2DModel directory or a diffusers pipeline directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ValueError(f"model path must be a checkpoint directory; got the file {path}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")

    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists() and (path / "unet" / CONFIG_FILE).exists():
        model = _load_diffusers_pipeline(path)
    elif not cfg_file.exists():
        raise FileNotFoundError(
            f"{cfg_file} not found: {path} is neither a ddpm-fast checkpoint, a diffusers UNet2DModel "
            "directory nor a pipeline directory with unet/"
        )
    else:
        raw = _read_json(cfg_file)
        if raw.get("format") == FORMAT:
            model = _load_native(path, raw)
        elif "_class_name" in raw:
            model = _load_diffusers_unet(path, raw)
            model.schedule = None
            model.sampling = _check_sampling({}, model.config, str(cfg_file))
        else:
            raise ValueError(
                f"{cfg_file}: not a ddpm-fast or diffusers config (no 'format' nor '_class_name' key)"
            )
    model.eval()
    if device is not None or dtype != torch.float32:
        model.to(device=device, dtype=dtype)
    return model


def _read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object; got {type(d).__name__}")
    return d


def _load_native(path: Path, raw: dict) -> UNet:
    cfg_file = path / CONFIG_FILE
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: format_version {version!r} is not supported (this is version {FORMAT_VERSION})"
        )
    for key in ("model", "sampling", "weights"):
        if key not in raw:
            raise ValueError(f"{cfg_file}: missing key {key!r}")
    try:
        cfg = UNetConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: key 'model': {e}") from e
    schedule = None
    if raw.get("schedule") is not None:
        try:
            schedule = Schedule.from_spec(raw["schedule"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{cfg_file}: key 'schedule': {e}") from e
    sampling = _check_sampling(raw["sampling"], cfg, f"{cfg_file}: key 'sampling'")

    w = raw["weights"]
    wfile = path / (w.get("file", WEIGHTS_FILE) if isinstance(w, dict) else WEIGHTS_FILE)
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} not found (named by {cfg_file})")
    blob = wfile.read_bytes()
    digest = w.get("sha256") if isinstance(w, dict) else None
    if digest is not None and hashlib.sha256(blob).hexdigest() != digest:
        raise ValueError(
            f"{wfile}: contents do not match the sha256 in {cfg_file} (truncated, altered or an interrupted save)"
        )
    state = _safetensors_from_bytes(blob, wfile)
    model = UNet(cfg)
    _load_state(model, state, wfile, rename=None)
    model.schedule = schedule
    model.sampling = sampling
    return model


def _safetensors_from_bytes(blob: bytes, file: Path) -> dict:
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _read_weights(file: Path) -> dict:
    if file.suffix == ".safetensors":
        return _safetensors_from_bytes(file.read_bytes(), file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with globals, ...: all unreadable for us
        raise ValueError(f"{file}: cannot read weights with torch.load(weights_only=True) ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return state


def _load_state(model: UNet, state: dict, file: Path, rename) -> None:
    """Check every key and shape first, then copy; `rename(our_key) -> file_key` (None: identity)."""
    ours = model.state_dict()
    wanted = {k: (rename(k) if rename else k) for k in ours}
    theirs = set(state)
    missing = [fk for fk in wanted.values() if fk not in theirs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{file}: missing key {missing[0]!r}{more}")
    unknown = sorted(theirs - set(wanted.values()))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(f"{file}: unknown key {unknown[0]!r}{more}")
    for k, fk in wanted.items():
        t = state[fk]
        if tuple(t.shape) != tuple(ours[k].shape):
            raise ValueError(
                f"{file}: key {fk!r} has shape {tuple(t.shape)}; the model expects {tuple(ours[k].shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{file}: key {fk!r} has dtype {t.dtype}; expected a floating tensor")
    model.load_state_dict({k: state[fk] for k, fk in wanted.items()}, strict=True)


# ---------------------------------------------------------------------------------------------- diffusers

# UNet2DModel.__init__ defaults (diffusers 0.27 - 0.42): a key absent from a config.json takes these.
_UNET2D_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# DDPMScheduler.__init__ defaults.
_DDPM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}

# diffusers' variance_type -> ours (the *_log variants are the same variance computed through a log).
_VARIANCE_MAP = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}


def _block_kind(name, down: bool):
    """'DownBlock2D' -> False, 'AttnDownBlock2D' -> True (attention), anything else -> None."""
    if not isinstance(name, str):
        return None
    name = name[len("UNetRes") :] if name.startswith("UNetRes") else name
    plain, attn = ("DownBlock2D", "AttnDownBlock2D") if down else ("UpBlock2D", "AttnUpBlock2D")
    return {plain: False, attn: True}.get(name)


def diffusers_unet_config(raw: dict, where: str = "config.json") -> UNetConfig:
    """A diffusers UNet2DModel config dict -> UNetConfig; ValueError listing everything we cannot represent."""
    cls = raw.get("_class_name")
    if cls != "UNet2DModel":
        raise ValueError(f"{where}: _class_name is {cls!r}; only diffusers' UNet2DModel is supported")
    c = {**_UNET2D_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    bad = []
    if c["time_embedding_type"] != "positional":
        bad.append(f"time_embedding_type={c['time_embedding_type']!r} (only 'positional')")
    if c["class_embed_type"] is not None or c["num_class_embeds"] is not None:
        bad.append("class embeddings (class_embed_type / num_class_embeds)")
    if c["act_fn"] not in ("silu", "swish"):
        bad.append(f"act_fn={c['act_fn']!r} (only 'silu')")
    if c["mid_block_type"] != "UNetMidBlock2D":
        bad.append(f"mid_block_type={c['mid_block_type']!r} (only 'UNetMidBlock2D')")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        bad.append(f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r}")
    if c["norm_num_groups"] is None:
        bad.append("norm_num_groups=None")
    if raw.get("cross_attention_dim") or raw.get("encoder_hid_dim"):
        bad.append("cross-attention (cross_attention_dim / encoder_hid_dim)")
    ch = list(c["block_out_channels"] or [])
    downs, ups = list(c["down_block_types"] or []), list(c["up_block_types"] or [])
    if not (len(downs) == len(ups) == len(ch)):
        bad.append(
            f"{len(ch)} block_out_channels with {len(downs)} down and {len(ups)} up block types (must be equal)"
        )
    dk = [_block_kind(b, True) for b in downs]
    uk = [_block_kind(b, False) for b in ups]
    for b, k in zip(downs + ups, dk + uk):
        if k is None:
            bad.append(f"block type {b!r} (only DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D)")
    L = len(ch)
    attn_levels = [i for i, k in enumerate(dk) if k]
    if len(dk) == len(uk) and None not in dk + uk and any(dk[i] != uk[L - 1 - i] for i in range(L)):
        bad.append(f"attention in down blocks {downs} not mirrored by up blocks {ups}")
    if c["downsample_type"] != "conv" and any(dk[i] for i in range(L - 1)):
        bad.append(f"downsample_type={c['downsample_type']!r} (only 'conv')")
    if c["upsample_type"] != "conv" and any(uk[k] for k in range(L - 1)):
        bad.append(f"upsample_type={c['upsample_type']!r} (only 'conv')")
    if c["downsample_padding"] not in (0, 1):
        bad.append(f"downsample_padding={c['downsample_padding']!r} (only 0 or 1)")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) == 2 and size[0] == size[1]:
            size = size[0]
        else:
            bad.append(f"non-square sample_size={size!r}")
    if bad:
        raise ValueError(f"{where}: unsupported UNet2DModel config: " + "; ".join(bad))

    if c["attn_norm_num_groups"] is not None:
        mid_groups = c["attn_norm_num_groups"]
    else:  # diffusers: the mid attention has a GroupNorm only with the default time embedding norm
        mid_groups = None if c["resnet_time_scale_shift"] == "default" else 0
    if mid_groups == c["norm_num_groups"]:
        mid_groups = None  # our spelling of "the same groups as every other GroupNorm"
    L2 = 2 ** (L - 1)
    if size is None:
        size = 8 * L2
    try:
        return UNetConfig(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            sample_size=int(size),
            block_out_channels=tuple(ch),
            layers_per_block=c["layers_per_block"],
            attn_levels=tuple(attn_levels),
            mid_attention=bool(c["add_attention"]),
            attention_head_dim=c["attention_head_dim"],
            norm_num_groups=c["norm_num_groups"],
            mid_attn_norm_groups=mid_groups,
            norm_eps=float(c["norm_eps"]),
            dropout=float(c["dropout"]),
            time_embed_dim=c["time_embedding_dim"],
            freq_shift=float(c["freq_shift"]),
            flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            downsample_padding=c["downsample_padding"],
            scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift",
            mid_scale_factor=float(c["mid_block_scale_factor"]),
            center_input_sample=bool(c["center_input_sample"]),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: unsupported UNet2DModel config: {e}") from e


# diffusers' pre-0.14 attention names (AttentionBlock) -> the current ones.
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    """UNet2DModel(**kwargs) computing the same function as UNet(cfg): the inverse of diffusers_unet_config."""
    L = cfg.num_levels
    down = tuple("AttnDownBlock2D" if i in cfg.attn_levels else "DownBlock2D" for i in range(L))
    up = tuple("AttnUpBlock2D" if (L - 1 - k) in cfg.attn_levels else "UpBlock2D" for k in range(L))
    kw = dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        freq_shift=cfg.freq_shift,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        downsample_padding=cfg.downsample_padding,
        norm_eps=cfg.norm_eps,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
        dropout=cfg.dropout,
        add_attention=cfg.mid_attention,
        time_embedding_dim=cfg.time_embed_dim,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
        mid_block_scale_factor=cfg.mid_scale_factor,
        center_input_sample=cfg.center_input_sample,
    )
    # diffusers gives the mid attention a GroupNorm only with the default resnet time norm, unless told.
    mg = cfg.mid_attn_norm_groups
    if mg is None and cfg.scale_shift_norm:
        kw["attn_norm_num_groups"] = cfg.norm_num_groups
    elif mg:
        kw["attn_norm_num_groups"] = mg
    elif mg == 0 and not cfg.scale_shift_norm:
        raise ValueError("UNet2DModel cannot drop the mid attention's GroupNorm with the default time norm")
    return kw


def _modern_diffusers_keys(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        head, _, last = mod.rpartition(".")
        if "attentions" in k and last in _OLD_ATTN:
            k = f"{head}.{_OLD_ATTN[last]}.{leaf}"
        out[k] = v
    return out


def _load_diffusers_unet(path: Path, raw: dict) -> UNet:
    cfg = diffusers_unet_config(raw, str(path / CONFIG_FILE))
    for name in DIFFUSERS_WEIGHTS:
        wfile = path / name
        if wfile.exists():
            break
    else:
        raise FileNotFoundError(f"{path}: no weights file ({' or '.join(DIFFUSERS_WEIGHTS)})")
    state = _modern_diffusers_keys(_read_weights(wfile))
    model = UNet(cfg)
    _load_state(model, state, wfile, rename=diffusers_key)
    return model


def diffusers_schedule(raw: dict, where: str = SCHEDULER_FILE) -> tuple[Schedule, dict]:
    """A diffusers scheduler config -> (Schedule, sampling defaults {variance, clip, clip_range}).

    "linear" and "squaredcos_cap_v2" become our float64 `Schedule.linear` / `Schedule.cosine` (the same
    formulas; diffusers rounds the betas to float32, which changed the largest difference from a 50-step
    DDPMPipeline sample by at most 2e-7 of ~9e-6). Other schedules keep diffusers' float32 betas, widened.
    """
    c = {**_DDPM_SCHEDULER_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    bad = []
    if c["prediction_type"] != "epsilon":
        bad.append(f"prediction_type={c['prediction_type']!r} (only 'epsilon')")
    if c["thresholding"]:
        bad.append("thresholding=True")
    if c["rescale_betas_zero_snr"]:
        bad.append("rescale_betas_zero_snr=True")
    vt = c.get("variance_type") or "fixed_small"
    if vt not in _VARIANCE_MAP:
        bad.append(f"variance_type={vt!r} (only {sorted(_VARIANCE_MAP)})")
    T, b0, b1, kind = c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"]
    if c["trained_betas"] is None and kind not in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"):
        bad.append(f"beta_schedule={kind!r}")
    if bad:
        raise ValueError(f"{where}: unsupported scheduler config: " + "; ".join(bad))
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{where}: num_train_timesteps must be a positive int; got {T!r}")

    f32 = torch.float32
    try:
        if c["trained_betas"] is not None:
            schedule = _f32_betas(torch.tensor(c["trained_betas"], dtype=f32), "trained_betas")
        elif kind == "linear":
            schedule = Schedule.linear(T, float(b0), float(b1))
        elif kind == "squaredcos_cap_v2":
            schedule = Schedule.cosine(T)  # s = 0.008, max_beta = 0.999, as diffusers
        elif kind == "scaled_linear":
            schedule = _f32_betas(torch.linspace(b0**0.5, b1**0.5, T, dtype=f32) ** 2, kind, b0, b1)
        else:  # sigmoid
            schedule = _f32_betas(torch.sigmoid(torch.linspace(-6, 6, T)) * (b1 - b0) + b0, kind, b0, b1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e
    sampling = {
        "variance": _VARIANCE_MAP[vt],
        "clip": bool(c["clip_sample"]),
        "clip_range": c["clip_sample_range"],
    }
    return schedule, sampling


def _f32_betas(betas: torch.Tensor, kind: str, beta_start=None, beta_end=None) -> Schedule:
    b = betas.to(torch.float64)
    source = {"diffusers_beta_schedule": kind, "num_train_timesteps": b.numel()}
    if beta_start is not None:
        source.update(beta_start=beta_start, beta_end=beta_end)
    return Schedule(b, spec={"kind": "betas", "betas": b.tolist(), "source": source})


def _load_diffusers_pipeline(path: Path) -> UNet:
    unet_dir = path / "unet"
    raw = _read_json(unet_dir / CONFIG_FILE)
    model = _load_diffusers_unet(unet_dir, raw)
    sched_file = path / "scheduler" / SCHEDULER_FILE
    if sched_file.exists():
        schedule, sampling = diffusers_schedule(_read_json(sched_file), str(sched_file))
    else:
        schedule, sampling = None, {}
    model.schedule = schedule
    model.sampling = _check_sampling(sampling, model.config, str(sched_file))
    return model


# ---------------------------------------------------------------------------------------------- bundled


def default_model(device=None) -> UNet:
    """The bundled model trained on sklearn's 8x8 digits (ddpm_fast/assets/digits/)."""
    if not (DEFAULT_MODEL_DIR / CONFIG_FILE).exists():
        raise RuntimeError(
            f"the bundled digits model is missing: {DEFAULT_MODEL_DIR} has no {CONFIG_FILE} "
            "(it is produced by `ddpm-fast train --data digits`)"
        )
    return load_model(DEFAULT_MODEL_DIR, device=device)

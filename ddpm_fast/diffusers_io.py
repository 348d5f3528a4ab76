"""diffusers checkpoints: `UNet2DModel` and DDPM pipeline directories read into our `UNet`, and the config
mapping both ways (`diffusers_unet_config`, `diffusers_kwargs`), plus a diffusers scheduler config as our
`Schedule` and sampling defaults (`diffusers_schedule`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_fast.checks import is_int
from ddpm_fast.defaults import record
from ddpm_fast.errors import BadValue
from ddpm_fast.schedule import Schedule
from ddpm_fast.unet import UNet, UNetConfig, diffusers_key
from ddpm_fast.weights import load_state, read_json, read_weights

__all__ = [
    "diffusers_unet_config",
    "diffusers_kwargs",
    "diffusers_schedule",
    "load_diffusers_unet",
    "load_diffusers_pipeline",
    "CONFIG_FILE",
    "DIFFUSERS_WEIGHTS",
    "SCHEDULER_FILE",
]

CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILE = "scheduler_config.json"


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


def _unsupported(c: dict, raw: dict) -> tuple[list[str], list, list[int], object]:
    """(what the config asks for that UNetConfig cannot represent, block_out_channels, attention levels,
    sample size)."""
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
    return bad, ch, attn_levels, size


def diffusers_unet_config(raw: dict, where: str = "config.json") -> UNetConfig:
    """A diffusers UNet2DModel config dict -> UNetConfig; ValueError listing everything we cannot represent."""
    cls = raw.get("_class_name")
    if cls != "UNet2DModel":
        raise BadValue(f"{where}: _class_name is {cls!r}; only diffusers' UNet2DModel is supported")
    c = {**_UNET2D_DEFAULTS, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    bad, ch, attn_levels, size = _unsupported(c, raw)
    if bad:
        raise BadValue(f"{where}: unsupported UNet2DModel config: " + "; ".join(bad))

    if c["attn_norm_num_groups"] is not None:
        mid_groups = c["attn_norm_num_groups"]
    else:  # diffusers: the mid attention has a GroupNorm only with the default time embedding norm
        mid_groups = None if c["resnet_time_scale_shift"] == "default" else 0
    if mid_groups == c["norm_num_groups"]:
        mid_groups = None  # our spelling of "the same groups as every other GroupNorm"
    L2 = 2 ** (len(ch) - 1)
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
        raise BadValue(f"{where}: unsupported UNet2DModel config: {e}") from e


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
        raise BadValue("UNet2DModel cannot drop the mid attention's GroupNorm with the default time norm")
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


def load_diffusers_unet(path: Path, raw: dict) -> UNet:
    cfg = diffusers_unet_config(raw, str(path / CONFIG_FILE))
    for name in DIFFUSERS_WEIGHTS:
        wfile = path / name
        if wfile.exists():
            break
    else:
        raise FileNotFoundError(f"{path}: no weights file ({' or '.join(DIFFUSERS_WEIGHTS)})")
    state = _modern_diffusers_keys(read_weights(wfile))
    model = UNet(cfg)
    load_state(model, state, wfile, rename=diffusers_key)
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
        raise BadValue(f"{where}: unsupported scheduler config: " + "; ".join(bad))
    if not is_int(T) or T < 1:
        raise BadValue(f"{where}: num_train_timesteps must be a positive int; got {T!r}")

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
        raise BadValue(f"{where}: {e}") from e
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


def load_diffusers_pipeline(path: Path) -> UNet:
    unet_dir = path / "unet"
    raw = read_json(unet_dir / CONFIG_FILE)
    model = load_diffusers_unet(unet_dir, raw)
    sched_file = path / "scheduler" / SCHEDULER_FILE
    if sched_file.exists():
        schedule, sampling = diffusers_schedule(read_json(sched_file), str(sched_file))
    else:
        schedule, sampling = None, {}
    model.defaults = record(sampling, model.config, schedule=schedule, where=str(sched_file))
    return model

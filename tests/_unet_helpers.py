"""Shared by test_unet.py and test_checkpoint.py: diffusers UNet2DModel twins of our configs."""

from __future__ import annotations

import torch

from ddpm_fast.unet import UNetConfig

# google/ddpm-cifar10-32's UNet2DModel config, as published (attention_head_dim null: one head).
CIFAR10_DIFFUSERS = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
    act_fn="silu",
)


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    """UNet2DModel(**kwargs) computing the same function as UNet(cfg)."""
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


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: default init leaves GroupNorm at (1, 0) and would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def random_diffusers_unet(seed: int = 0, **kwargs):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return perturb_(UNet2DModel(**kwargs), seed=seed + 1).eval()

"""Shared by test_unet.py and test_checkpoint.py: diffusers UNet2DModel twins of our configs."""

from __future__ import annotations

import torch

from ddpm_fast.checkpoint import diffusers_kwargs  # noqa: F401  (re-exported for the tests)

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

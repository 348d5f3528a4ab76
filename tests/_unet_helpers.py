"""Shared by test_unet*.py and test_checkpoint*.py: U-Net variants, inputs, and diffusers UNet2DModel twins.

Importable without diffusers: only `random_diffusers_unet` and `small_diffusers_unet` need it, and import it
when called.
"""

from __future__ import annotations

import torch

from ddpm_fast.diffusers_io import diffusers_kwargs  # noqa: F401  (re-exported for the tests)
from ddpm_fast.unet import UNetConfig

EPS32 = torch.finfo(torch.float32).eps

VARIANTS = {
    # float64 convolutions take the slow CPU path: the wide variants stay narrow and small.
    "cifar10-narrow": UNetConfig.cifar10(
        sample_size=16, block_out_channels=(16, 32, 32, 32), norm_num_groups=8
    ),
    "celebahq-32px": UNetConfig.celebahq256(
        sample_size=32, block_out_channels=(8, 8, 16, 16, 32, 32), norm_num_groups=4
    ),
    "tiny": UNetConfig.tiny(),
    "digits-8": UNetConfig.digits(),
    "digits-16": UNetConfig.digits(sample_size=16),
    "knobs": UNetConfig.tiny(
        layers_per_block=2,
        attn_levels=(0, 1),
        attention_head_dim=16,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        norm_eps=1e-5,
        mid_scale_factor=1.4142,
        time_embed_dim=96,
        center_input_sample=True,
        out_channels=6,
    ),
    "scale-shift": UNetConfig.tiny(scale_shift_norm=True),
    "scale-shift-mid-norm": UNetConfig.tiny(scale_shift_norm=True, mid_attn_norm_groups=4),
    "no-attention": UNetConfig.tiny(attn_levels=(), mid_attention=False),
    "odd-channels": UNetConfig.tiny(
        block_out_channels=(9, 18), norm_num_groups=3, in_channels=1, out_channels=2
    ),
    "three-levels": UNetConfig.tiny(block_out_channels=(16, 32, 48), attn_levels=(2,), attention_head_dim=8),
}


def unet_inputs(cfg: UNetConfig, batch=3, size=None, seed=0):
    """(x, t) for cfg: standard normal x, t drawn from a 1000-step schedule with both ends present."""
    g = torch.Generator().manual_seed(seed)
    s = size or cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t[0] = 0  # both ends of a 1000-step schedule
    if batch > 1:
        t[-1] = 999
    return x, t


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


def small_diffusers_unet(seed: int = 0):
    """A random 3x8x8 UNet2DModel (two levels of 16 channels, attention in the second): the scheduler tests'
    model. Needs diffusers."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()

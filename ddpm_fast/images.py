"""Model-space tensors to uint8 images, and PNG grids."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from ddpm_fast.shards import atomic_write_bytes

__all__ = ["IMAGE_SUFFIXES", "to_uint8", "image_grid", "save_grid"]

# the files an image folder is read from (a training set, a FID source), matched case-insensitively
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(x: torch.Tensor, data_range=(-1.0, 1.0)) -> np.ndarray:
    """Model-space [B, C, H, W] -> uint8 [B, H, W, C], data_range mapped to 0..255 with rounding to nearest."""
    lo, hi = float(data_range[0]), float(data_range[1])
    y = ((x.float() - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] image, nrow = ceil(sqrt(N))."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, nrow: int | None = None) -> None:
    """Write uint8 [N, H, W, C] images as one PNG grid, atomically; images smaller than 32 px are upscaled."""
    from PIL import Image

    grid = image_grid(images, nrow)
    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    scale = max(1, 32 // images.shape[1])  # 8x8 digits become visible 32x32 tiles
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

"""The feature network: NVIDIA's TorchScript port of the TensorFlow Inception graph FID is defined on
(`inception-2015-12-05.pt`; StyleGAN2-ADA, StyleGAN3 and EDM use it, and clean-fid's legacy_tensorflow mode).

The file is TorchScript (torch.jit.load, not a pickle), called as

    net(img, return_features=True) -> [N, 2048] pool_3 features        img: [N, 3, H, W], values 0..255
    net(img, no_output_bias=True)  -> [N, 1008] softmax(pool_3 W^T), no bias: the Inception Score's p(y|x)

and resizes inside, as the TF graph's ResizeBilinear does (align_corners=False, no half-pixel centres):

    out[i, j] = bilinear(img, y = i H / 299, x = j W / 299), coordinates clamped at the border
    x -> (x - 128) / 128, then net.layers (convolutions and pools, 2048 x 1 x 1 out)

openai's evaluator runs the TF graph itself on the images at their own size, so both compute the same
function: the weights are the same and so is the resize; they differ only in float32 convolution arithmetic.
pytorch-fid instead resizes with F.interpolate (half-pixel centres) and clean-fid's default mode with PIL
bicubic, so their numbers are not interchangeable with these.

One pass for all three outputs: `InceptionNet` replays the resize in Python and runs net.layers child by
child, taking sFID's spatial features on the way (the first 7 channels of mixed_6/conv, 17 x 17 x 7 = 2023,
flattened in TF's HWC order as openai's evaluator flattens them), and p(y|x) from the pool features and the
file's output weight. On the first batch both are checked against the file's own forward; where they
disagree (another network) the features come from net(img, return_features=True), p(y|x) from a second
call, and sFID is unavailable. Convolutions run in float32 with TF32 off: TF32 rounds to 10 mantissa bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ddpm_fast.errors import BadValue
from ddpm_fast.metrics.sources import file_sha256

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "default_inception_path",
    "resolve_inception_path",
    "tf_resize",
    "Outputs",
    "InceptionNet",
]

log = logging.getLogger("ddpm_fast")

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
ENV = "DDPM_FAST_INCEPTION"
SIZE = 299  # the TF graph's input resolution
SPATIAL_BLOCK, SPATIAL_CHANNELS = "mixed_6", 7  # openai's evaluator: mixed_6/conv:0, [..., :7]
_AGREE = 1e-4  # relative: the one-pass path runs the same ops as the file's forward, so it agrees to rounding


def default_inception_path() -> str:
    """$DDPM_FAST_INCEPTION, else $XDG_CACHE_HOME/ddpm-fast/inception-2015-12-05.pt (~/.cache by default)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm-fast", INCEPTION_FILE)


def resolve_inception_path(path=None, name: str = "inception") -> str:
    """The weights file to use; a missing one is one line saying what to get and where to put it."""
    explicit = path is not None
    path = os.fspath(path) if explicit else default_inception_path()
    if os.path.isfile(path):
        return path
    where = f"{name} {path} does not exist" if explicit else f"no {name} file at {path}"
    raise FileNotFoundError(
        f"{where}: get {INCEPTION_FILE} (NVIDIA's TorchScript Inception, {INCEPTION_URL}) and put it at "
        f"{default_inception_path()}, or name it with --inception PATH (Python: {name}=PATH) or ${ENV}; "
        "nothing is downloaded"
    )


def tf_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) of float NCHW to size x size:
    output pixel j reads input coordinate j * W / size, clamped at the border; the same affine_grid +
    grid_sample the TorchScript file runs (theta's offset 1/W - 1/size turns half-pixel into corner-aligned
    sampling)."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@contextlib.contextmanager
def _float32_math():
    """TF32 off for our own calls only (restored after): features in the TF graph's float32."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return bool((a - b).abs().max() <= _AGREE * max(1.0, float(b.abs().max())))


@dataclass
class Outputs:
    """One batch's outputs, float32 on the CPU: pool [n, D]; spatial [n, 2023] or None; probs [n, K] or None."""

    pool: torch.Tensor
    spatial: torch.Tensor | None
    probs: torch.Tensor | None


class InceptionNet:
    """The TorchScript network at `path` on `device`; `net(images)` maps uint8 NHWC arrays to `Outputs`."""

    def __init__(self, path: str, device, name: str = "inception"):
        self.path, self.name = path, name
        self.device = torch.device(device)
        self.net = self._load()
        self.sha256 = file_sha256(path)
        with torch.no_grad(), _float32_math():
            probe = torch.zeros(1, 3, 16, 16, dtype=torch.uint8, device=self.device)
            try:
                out = self.net(probe, return_features=True)
            except Exception as e:
                raise BadValue(
                    f"{name} {path} does not take net(images, return_features=True) as {INCEPTION_FILE} "
                    f"does ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''})"
                ) from e
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
            raise BadValue(f"{name} {path}: net(images, return_features=True) must return [N, D] features")
        self.dim = int(out.shape[1])
        self.head = self._output_weight()
        self.one_pass: bool | None = None  # decided on the first batch, as is:
        self.probs_mode: str | None = None  # "head" (pool @ W^T), "call" (a second forward) or None

    def _load(self):
        try:
            net = torch.jit.load(self.path, map_location=self.device)
        except Exception as e:  # RuntimeError from the zip reader, or the TorchScript deserializer
            msg = str(e).strip().splitlines()[0] if str(e) else type(e).__name__
            raise BadValue(
                f"{self.name} {self.path} is not a TorchScript file ({msg}); expected NVIDIA's "
                f"{INCEPTION_FILE} (the .pt, not EDM's .pkl)"
            ) from e
        return net.eval()

    def _output_weight(self) -> torch.Tensor | None:
        """The one [K, D] parameter outside net.layers: the logits' weight (checked on the first batch)."""
        found = [
            p
            for n, p in self.net.named_parameters()
            if not n.startswith("layers.") and p.ndim == 2 and p.shape[1] == self.dim
        ]
        return found[0].detach().float() if len(found) == 1 else None

    def _one_pass(self, x: torch.Tensor):
        """(pool, spatial or None) from the replayed resize and net.layers' children in order."""
        h = (tf_resize(x.float()) - 128.0) / 128.0
        spatial = None
        for name, child in self.net.layers.named_children():
            if name == SPATIAL_BLOCK and hasattr(child, "conv"):
                s = child.conv(h)[:, :SPATIAL_CHANNELS]
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # TF's NHWC order
            h = child(h)
        return h.reshape(h.shape[0], -1), spatial

    def _decide(self, x: torch.Tensor):
        """First batch: does the one-pass path reproduce the file's forward, and the head its p(y|x)?
        Returns this batch's (pool, spatial)."""
        official = self.net(x, return_features=True).float()
        try:
            pool, spatial = self._one_pass(x)
            self.one_pass = _agree(pool, official)
        except Exception:  # no net.layers, or children that do not chain: not the file we know
            self.one_pass = False
        if not self.one_pass:
            log.warning(
                "%s: its layers do not reproduce its own forward; features come from the forward and "
                "sFID is unavailable",
                self.path,
            )
            pool, spatial = official, None
        try:
            probs = self.net(x, no_output_bias=True).float()
        except Exception:
            probs = None
        if probs is None:
            self.probs_mode = None
            log.warning("%s does not take net(images, no_output_bias=True): no Inception Score", self.path)
        elif self.head is not None and _agree(torch.softmax(official @ self.head.T, dim=1), probs):
            self.probs_mode = "head"
        else:
            self.probs_mode = "call"
        return pool, spatial

    def __call__(self, images: np.ndarray) -> Outputs:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise BadValue(f"images must be uint8 [N, H, W, 1 or 3]; got {images.dtype} {list(images.shape)}")
        images = np.require(
            images, requirements=["C", "W"]
        )  # torch wants writable memory (np.frombuffer's is not)
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale as RGB, as StyleGAN's and EDM's metrics do
        x = x.contiguous()
        with torch.no_grad(), _float32_math():
            if self.one_pass is None:
                pool, spatial = self._decide(x)
            elif self.one_pass:
                pool, spatial = self._one_pass(x)
            else:
                pool, spatial = self.net(x, return_features=True).float(), None
            if self.probs_mode == "head":
                probs = torch.softmax(pool @ self.head.T, dim=1)
            elif self.probs_mode == "call":
                probs = self.net(x, no_output_bias=True).float()
            else:
                probs = None
        cpu = lambda t: None if t is None else t.float().cpu()
        return Outputs(cpu(pool), cpu(spatial), cpu(probs))

"""The torch modules that become ONNX graphs: the noise model and the whole sampling step.

    EpsGraph(unet)(x [B,C,H,W] float32, t [B] int64)            -> eps [B, C_out, H, W] float32
    StepGraph(unet, table, clip_range)(x_t, step int64 [], z)   -> x_{t-1} float32

The step graph gathers row `step` of a `ddpm_fast.steps.StepTable` (float32 [S, 8], an initializer) and the
model timestep t = timesteps[step], calls the U-Net and applies the table's update (formula in
`ddpm_fast.steps`); z is an input, drawn by the caller with `ddpm_fast.noise` (slot = t), so a runtime in any
language samples by looping the graph.

`half_unet(unet)` is the float16 variant: weights float16, every GroupNorm and the attention softmax in
float32 (a float16 GroupNorm over 32x32 activations loses the mean in rounding; softmax logits overflow).

`Float16Storage()` is the float16 reference those variants are held to: a mode in which every op on float16
tensors computes in float32 and rounds its result to float16 once. PyTorch's own float16 CPU kernels are not
such a reference: which ones run depends on the processor, and a 4-step run's error against float64 differed
4x between two CPUs (0.106 on a Xeon with AVX512-FP16, 0.025 on the machine that reported the failure).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ddpm_fast.kernels.step import update_formula
from ddpm_fast.steps import StepTable
from ddpm_fast.unet import Attention

__all__ = ["EpsGraph", "StepGraph", "half_unet", "update_with_noise", "Float16Storage"]


class _Float32GroupNorm(nn.Module):
    """GroupNorm computed in float32 whatever the activation dtype; the result is cast back."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = gn.num_groups, gn.eps
        self.weight = nn.Parameter(gn.weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(gn.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class _Float32SoftmaxAttention(nn.Module):
    """`ddpm_fast.unet.Attention` with q k^T / sqrt(d) and the softmax in float32 (the rest in the weights' dtype)."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.norm = attn.norm
        self.q, self.k, self.v, self.proj = attn.q, attn.k, attn.v, attn.proj
        self.heads, self.out_scale = attn.heads, attn.out_scale

    def forward(self, x):
        B, C, H, W = x.shape
        h = x if self.norm is None else self.norm(x)
        h = h.reshape(B, C, H * W).transpose(1, 2)
        d = C // self.heads

        def heads(y):
            return y.reshape(B, H * W, self.heads, d).transpose(1, 2).float()

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        w = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d)), dim=-1)
        a = (w @ v).to(x.dtype).transpose(1, 2).reshape(B, H * W, C)
        out = x + self.proj(a).transpose(1, 2).reshape(B, C, H, W)
        return out if self.out_scale == 1.0 else out / self.out_scale


def half_unet(unet: nn.Module) -> nn.Module:
    """A float16 copy of `unet` with GroupNorms and attention softmax kept in float32."""
    m = copy.deepcopy(unet).eval().half()

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, _Float32GroupNorm(child))
            elif isinstance(child, Attention):
                swap(child)  # its own GroupNorm first
                setattr(parent, name, _Float32SoftmaxAttention(child))
            else:
                swap(child)

    swap(m)
    return m


def _has_half(tree) -> bool:
    found = []
    tree_map(
        lambda a: found.append(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else None, tree
    )
    return bool(found)


_CASTS = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.double, torch.Tensor.type}


class Float16Storage(TorchFunctionMode):
    """Float16 storage with float32 arithmetic, the same on every processor (module docstring).

    Inside `with Float16Storage():` an op with a float16 tensor argument runs on float32 copies of its
    arguments and its float32 results are rounded to float16; in-place ops write the rounded result back.
    Casts and ops on other dtypes run unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CASTS or not _has_half((args, kwargs)):
            return func(*args, **kwargs)
        up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a
        out = func(*tree_map(up, args), **tree_map(up, kwargs))
        down = lambda a: a.half() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
        out = tree_map(down, out)
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"):
            args[0].copy_(out)  # the op ran on a float32 copy of its target
            return args[0]
        return out


def _weight_dtype(unet: nn.Module) -> torch.dtype:
    for p in unet.parameters():
        if p.dtype in (torch.float16, torch.float64):  # float16 export, or a float64 oracle
            return p.dtype
    return torch.float32


class EpsGraph(nn.Module):
    """eps = unet(x, t [, y]) with float32 inputs and outputs whatever the weights' dtype; y: class labels of a
    class-conditional model (int64 [B]), a graph input."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.compute_dtype = _weight_dtype(unet)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cond = {} if y is None else {"y": y}
        return self.unet(x.to(self.compute_dtype), t, **cond).float()


def update_with_noise(
    c: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    z: torch.Tensor,
    clip_range: float | None,
    learned: bool,
    history=(),
    eps_history: bool = False,
):
    """(x_{t-1}, history entry) from one StepTable row c (float32 [8 + K]), x_t, the model output (eps or
    eps|v), z and the K earlier predictions (newest first: x0, or eps_hat with eps_history); all float32."""
    C = x.shape[1]
    v = out[:, C:] if learned else None
    return update_formula(lambda k: c[k], x, out[:, :C], v, z, clip_range, history, eps_history)


class StepGraph(nn.Module):
    """x_{t-1} = step(x_t, step index, z) for one sampling run: the U-Net plus the StepTable update.

    A multistep table (K = table.history > 0) adds an input and an output: history [K, B, C, H, W], the x0
    of the K previous steps newest first, in (zeros at step 0) and shifted out (history_out[0] = this x0, or
    this eps_hat = (SRA x - x0) / SRM1 for a table with history_of = "eps")."""

    def __init__(self, unet: nn.Module, table: StepTable, clip_range: float | None):
        super().__init__()
        self.eps = EpsGraph(unet)
        coefs, timesteps = table.to("cpu", torch.float32)
        self.register_buffer("coefs", coefs)  # [S, 8 + K]: becomes an initializer
        self.register_buffer("timesteps", timesteps)  # [S] int64
        self.clip_range = clip_range
        self.learned = table.learned
        self.history = table.history
        self.eps_history = table.history_of == "eps"

    def forward(
        self, x: torch.Tensor, step: torch.Tensor, z: torch.Tensor, history: torch.Tensor | None = None
    ):
        idx = step.reshape(1)
        c = self.coefs.index_select(0, idx).reshape(-1)  # [8 + K]
        t = self.timesteps.index_select(0, idx).expand(x.shape[0])
        out = self.eps(x, t)
        hist = () if history is None else tuple(history[k] for k in range(self.history))
        y, entry = update_with_noise(c, x, out, z, self.clip_range, self.learned, hist, self.eps_history)
        if history is None:
            return y
        return y, torch.cat([entry.unsqueeze(0), history[: self.history - 1]], dim=0)

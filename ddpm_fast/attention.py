"""Scaled dot-product attention for both U-Nets, with one CPU exception.

`attention(q, k, v)` is `F.scaled_dot_product_attention` except for float16/bfloat16 tensors on a CPU
whose ATen kernels run below AVX-512 (`ATEN_CPU_CAPABILITY=default` or `avx2`, or a processor without
AVX-512). There torch's CPU flash-attention kernel picks its packing from the processor (AMX/VNNI) but
runs the AVX2 or scalar build, and raises "pack_vnni2 is only supported when avx512 is supported" for
sequences of 64 and more. Those inputs take the math form instead: logits, softmax and the weighted sum
in float32, rounded once to the input dtype, which is what torch's own math backend computes (equal to
it bit for bit), and what the fused kernels approximate with float32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ATen picks its vector kernels once per process (ATEN_CPU_CAPABILITY is read at start), so this holds
# for the life of the process; a constant keeps the test below static under torch.compile.
_CPU_FLASH_OK = torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
_REDUCED = (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions ([..., T, d] each)."""
    if q.device.type == "cpu" and q.dtype in _REDUCED and not _CPU_FLASH_OK:
        w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return (w @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)

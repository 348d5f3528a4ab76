"""Counter-based Gaussian noise, identical on every backend.

Every normal the samplers use is a pure function of (seed, global sample index n, slot, element e),
built from Triton's own Philox-4x32-10 (`tl.philox`) and its float transforms, so the fused Triton
kernel (GPU or interpreter), the torch twin below and the ONNX sampler all draw the same numbers.

For a sample with N = C*H*W elements, let Q = ceil(N / 4). Element e uses counter lane q = e mod Q
and output k = e // Q (the four Philox outputs fill four contiguous quarters of the sample):

    (r0, r1, r2, r3) = philox4x32_10(key  = (seed mod 2^32, seed >> 32 mod 2^32),
                                     ctr  = (q, n mod 2^32, slot, n >> 32))
    u_j  = uint_to_uniform_float(r_j) = (r_j as int32 -> r if r >= 0 else ~r) * 4.6566127342e-10   (float32)
    (z0, z1) = box_muller(u0, u1),  (z2, z3) = box_muller(u2, u3)
    box_muller(a, b) = (sqrt(-2 log max(a, 1e-7)) cos(2 pi b),  sqrt(-2 log max(a, 1e-7)) sin(2 pi b))
    z[n, e] = z_k

`slot` is the model timestep t (0-based, original T scale) of the step whose z it is, and
`XT_SLOT = 2^32 - 1` for the initial x_T, so x_T never shares a stream with a step's z. Random class labels
(labels="random") use `LABEL_SLOT = 2^32 - 2` and lane q = 0: label[n] = (r0 * K) >> 32 for K classes. With
ctr = (q, 0, 0, 0) this is exactly `tl.randn4x(seed, q)`. Integers agree bit for bit everywhere;
the normals agree to float32 rounding of log/sqrt/cos/sin.
"""

from __future__ import annotations

import torch

from ddpm_fast.checks import is_int
from ddpm_fast.errors import BadType, BadValue

__all__ = [
    "XT_SLOT",
    "LABEL_SLOT",
    "random_labels",
    "philox4x32",
    "uint32_to_uniform",
    "normals",
    "sample_noise",
    "check_seed",
]

XT_SLOT = 0xFFFFFFFF
LABEL_SLOT = 0xFFFFFFFE
_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_N_ROUNDS = 10
_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit ints
_TWO_PI = 6.283185307179586
# The two as the float32 values the products use, held as Python floats: a traced or compiled step then holds
# a literal, never a host tensor (under CUDA-graph capture a CPU constant would be a host-to-device copy). Both
# operands float32 values, the product is exact in float64: rounded once to float32, it is the float32
# product whichever precision a backend multiplies in, so the noise is bit-identical (tests/test_noise.py).
_SCALE_F32 = float(torch.tensor(_SCALE, dtype=torch.float32))
_TWO_PI_F32 = float(torch.tensor(_TWO_PI, dtype=torch.float32))


def check_seed(seed) -> int:
    if not is_int(seed):
        raise BadType(f"seed must be an int; got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise BadValue(f"seed must lie in [0, 2**63); got {seed}")
    return seed


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and an int64 tensor b in [0, 2^32).

    a*b needs 64 unsigned bits, so b is split into 16-bit halves: every product stays below 2^48 and
    nothing relies on int64 wrap-around (which compiled C++ treats as undefined).
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo
    mid = a * b_hi + (p_lo >> 16)  # = floor(a*b / 2^16) < 2^48
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on int64 tensors holding uint32 values; the round function of Triton's `philox_impl`.

    The key (k0, k1) is a pair of ints or of int64 tensors, each holding a uint32 value.
    """
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uint32_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale into [0, 1)."""
    s = torch.where(r >= 2**31, r - 2**32, r)
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.int32).to(torch.float32) * _SCALE_F32


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp(u1, min=1.0e-7)
    th = u2 * _TWO_PI_F32
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def normals(seed, n: torch.Tensor, slot, numel: int) -> torch.Tensor:
    """z[i, e] for global sample indices n [B] (int64), one slot (int or int64 [B]), e in [0, numel): float32 [B, numel].

    `seed` is an int or a 0-d int64 tensor (validated by the caller).
    """
    if numel < 1:
        raise ValueError(f"numel must be positive; got {numel}")
    device = n.device
    Q = (numel + 3) // 4
    n = n.to(torch.int64).reshape(-1, 1)
    q = torch.arange(Q, dtype=torch.int64, device=device).reshape(1, -1)
    slot_t = torch.as_tensor(slot, dtype=torch.int64, device=device).reshape(-1, 1) & _M32
    zero = torch.zeros((), dtype=torch.int64, device=device)
    c0 = q + zero * n
    c1 = (n & _M32) + zero * q
    c2 = slot_t + zero * c0
    c3 = ((n >> 32) & _M32) + zero * q
    r = philox4x32(c0, c1, c2, c3, seed & _M32, (seed >> 32) & _M32)
    z0, z1 = _box_muller(uint32_to_uniform(r[0]), uint32_to_uniform(r[1]))
    z2, z3 = _box_muller(uint32_to_uniform(r[2]), uint32_to_uniform(r[3]))
    return torch.cat([z0, z1, z2, z3], dim=1)[:, :numel]


def sample_noise(seed: int, start_index: int, shape, slot, device=None) -> torch.Tensor:
    """Noise for rows start_index .. start_index+B-1 of a run, shaped `shape` = (B, C, H, W), float32."""
    B = shape[0]
    numel = 1
    for d in shape[1:]:
        numel *= d
    n = torch.arange(start_index, start_index + B, dtype=torch.int64, device=device)
    return normals(seed, n, slot, numel).reshape(shape)


def random_labels(seed: int, start_index: int, batch: int, num_classes: int, device=None) -> torch.Tensor:
    """Class labels of samples start_index .. start_index+batch-1, int64 [batch] in [0, num_classes): keyed by
    (seed, global sample index) like the noise, so sample n gets the same label whatever the batching."""
    n = torch.arange(start_index, start_index + batch, dtype=torch.int64, device=device)
    zero = torch.zeros_like(n)
    r = philox4x32(zero, n & _M32, zero + LABEL_SLOT, (n >> 32) & _M32, seed & _M32, (seed >> 32) & _M32)
    return (r[0] * num_classes) >> 32

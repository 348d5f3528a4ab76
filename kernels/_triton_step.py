"""The fused posterior-step Triton kernel. Imported only when Triton is used (by `step.step_triton`).

One launch computes, for a whole batch, x_{t-1} from x_t and the model output (formula in
`ddpm_fast.kernels.step`), drawing z in registers from the counter-based Philox of `ddpm_fast.noise`:
the noise never touches memory. Bytes moved per element: read x, read eps (and v when learned),
write x_{t-1}. Everything a run changes (the step, seed, start_index) is read from device memory, so one
CUDA graph of the launch serves every step, seed and shard. The launcher, `step_triton`, lives in
`ddpm_fast.kernels.step` beside the twin, so that `ddpm_fast.kernels` imports without Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ddpm_fast import steps

__all__ = ["MAX_BLOCK", "NUM_WARPS", "block_for"]

# StepTable column indices; jit code may read only constexpr globals.
SRA = tl.constexpr(steps.SRA)
SRM1 = tl.constexpr(steps.SRM1)
C_X0 = tl.constexpr(steps.C_X0)
C_XT = tl.constexpr(steps.C_XT)
C_EPS = tl.constexpr(steps.C_EPS)
SIGMA = tl.constexpr(steps.SIGMA)
MIN_LOG = tl.constexpr(steps.MIN_LOG)
MAX_LOG = tl.constexpr(steps.MAX_LOG)
NCOLS = tl.constexpr(len(steps.COLUMNS))

# Counter lanes per program: each lane makes 4 normals, so a program updates 4 * BLOCK elements.
# 1024 lanes with 4 warps gives each thread 8 contiguous elements per quarter (vectorised 16 B loads when Q
# is a multiple of 16, as it is for 3x32x32 and 3x256x256). Not yet tuned on a GPU.
MAX_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _philox_normals(seed, q, n, slot):
    """Four float32 normals per counter lane q of sample n, noise slot `slot` (ddpm_fast.noise formula).

    seed is int64: tl.philox takes its bits as uint64 and keys Philox with (low 32 bits, high 32 bits),
    as `noise.normals` does with (seed & 0xFFFFFFFF, seed >> 32).
    """
    zero = q.to(tl.uint32) * 0
    n64 = n.to(tl.int64)
    c1 = zero + n64.to(tl.uint32)
    c2 = zero + slot.to(tl.uint32)
    c3 = zero + (n64 >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, q.to(tl.uint32), c1, c2, c3)
    z0, z1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    z2, z3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return z0, z1, z2, z3


@triton.jit
def _to_bfloat16_rne(y):
    """float32 -> bfloat16, round to nearest even, in integer ops.

    A plain `.to(tl.bfloat16)` rounds to nearest on a GPU but truncates under the Triton interpreter (3.9),
    which would make CPU checks of bf16 storage disagree with torch by an ulp; this agrees everywhere.
    """
    b = y.to(tl.uint32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    rounded = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    # NaN's payload would carry into the sign bit (0x7FFFFFFF -> -0.0): keep NaN a NaN
    return tl.where(y != y, y.to(tl.bfloat16), rounded)


@triton.jit
def _quarter(
    x_ptr,
    m_ptr,
    out_ptr,
    e,
    mask,
    z,
    sra,
    srm1,
    c_x0,
    c_xt,
    c_eps,
    sigma,
    min_log,
    max_log,
    N,
    clip_r,
    hr,
    hstride,
    h0c,
    h1c,
    h2c,
    LEARNED: tl.constexpr,
    CLIP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    HIST: tl.constexpr,
    EPS_HIST: tl.constexpr,
):
    """Update the elements e (int64 offsets inside one row, already shifted to the row) of one quarter;
    with HIST earlier predictions (hr: this row of history[0], hstride: B * N), add their terms and shift
    them (history[k] <- history[k-1], history[0] <- x0, or eps_hat = (sra x - x0) / srm1 with EPS_HIST)."""
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(m_ptr + e, mask=mask, other=0.0).to(tl.float32)
    x0 = sra * x - srm1 * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_r), clip_r)
    if LEARNED:
        # improved DDPM: log-variance interpolated between beta-tilde (MIN_LOG) and beta (MAX_LOG)
        v = tl.load(m_ptr + N + e, mask=mask, other=0.0).to(tl.float32)
        f = (v + 1.0) * 0.5
        std = sigma * tl.exp(0.5 * (f * max_log + (1.0 - f) * min_log))
    else:
        std = sigma
    y = c_x0 * x0 + c_xt * x + c_eps * eps
    if HIST >= 1:
        h0 = tl.load(hr + e, mask=mask, other=0.0)
        y = y + h0c * h0
    if HIST >= 2:
        h1 = tl.load(hr + hstride + e, mask=mask, other=0.0)
        y = y + h1c * h1
    if HIST >= 3:
        h2 = tl.load(hr + 2 * hstride + e, mask=mask, other=0.0)
        y = y + h2c * h2
    y = y + std * z
    if HIST >= 3:
        tl.store(hr + 2 * hstride + e, h1, mask=mask)
    if HIST >= 2:
        tl.store(hr + hstride + e, h0, mask=mask)
    if HIST >= 1:
        if EPS_HIST:
            tl.store(hr + e, (sra * x - x0) / srm1, mask=mask)
        else:
            tl.store(hr + e, x0, mask=mask)
    if OUT_BF16:
        y = _to_bfloat16_rne(y)
    tl.store(out_ptr + e, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_kernel(
    x_ptr,
    m_ptr,
    out_ptr,
    coefs_ptr,
    ts_ptr,
    step_ptr,
    seed_ptr,
    start_ptr,
    N,
    Q,
    blocks_per_row,
    m_row,
    clip_r,
    hist_ptr,
    hstride,
    LEARNED: tl.constexpr,
    CLIP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    ADVANCE: tl.constexpr,
    HIST: tl.constexpr,
    EPS_HIST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # 1-D grid, row-major over (sample row, block of counter lanes): any batch size fits (a 2-D grid
    # would cap the batch at 65535).
    pid = tl.program_id(0)
    row = pid // blocks_per_row
    blk = pid - row * blocks_per_row
    row64 = row.to(tl.int64)  # offsets into x and out are int64: B * N may pass 2**31

    if ADVANCE:
        # The int64 counter holds step in its low 32 bits and a ticket in its high 32 bits (zero between
        # launches). Each program reads the step through its own atomic, which also takes a ticket; the
        # program holding the last ticket is ordered after every other program's read, so it alone moves
        # the counter to (step + 1, ticket 0). One launch, no separate increment kernel.
        nprog = tl.num_programs(0).to(tl.int64)
        old = tl.atomic_add(step_ptr, 1 << 32, sem="acq_rel")
        step = old & 0xFFFFFFFF
        last = (old >> 32) == nprog - 1
        tl.atomic_add(step_ptr, 1 - (nprog << 32), mask=last, sem="acq_rel")
    else:
        step = tl.load(step_ptr).to(tl.int64)

    c = coefs_ptr + step * (NCOLS + HIST)  # a multistep table has HIST history columns after the base ones
    sra = tl.load(c + SRA)
    srm1 = tl.load(c + SRM1)
    c_x0 = tl.load(c + C_X0)
    c_xt = tl.load(c + C_XT)
    c_eps = tl.load(c + C_EPS)
    sigma = tl.load(c + SIGMA)
    min_log = tl.load(c + MIN_LOG)
    max_log = tl.load(c + MAX_LOG)
    slot = tl.load(ts_ptr + step)
    h0c = 0.0
    h1c = 0.0
    h2c = 0.0
    if HIST >= 1:
        h0c = tl.load(c + NCOLS)
    if HIST >= 2:
        h1c = tl.load(c + NCOLS + 1)
    if HIST >= 3:
        h2c = tl.load(c + NCOLS + 2)

    q = blk * BLOCK + tl.arange(0, BLOCK)
    lane = q < Q
    # The keys are int64 device scalars, not launch arguments, which a CUDA graph would freeze.
    seed = tl.load(seed_ptr)
    n = row64 + tl.load(start_ptr)

    z0 = tl.zeros([BLOCK], dtype=tl.float32)
    z1 = z0
    z2 = z0
    z3 = z0
    if sigma != 0.0:  # SIGMA = 0 (last step, DDIM eta = 0): the noise term vanishes, skip the Philox rounds
        z0, z1, z2, z3 = _philox_normals(seed, q, n, slot)

    xr = x_ptr + row64 * N
    mr = m_ptr + row64 * m_row
    orow = out_ptr + row64 * N
    hr = hist_ptr + row64 * N
    e0 = q.to(tl.int64)
    e1 = e0 + Q
    e2 = e1 + Q
    e3 = e2 + Q
    _quarter(
        xr, mr, orow, e0, lane & (e0 < N), z0, sra, srm1, c_x0, c_xt, c_eps, sigma, min_log, max_log, N, clip_r,
        hr, hstride, h0c, h1c, h2c, LEARNED, CLIP, OUT_BF16, HIST, EPS_HIST,
    )  # fmt: skip
    _quarter(
        xr, mr, orow, e1, lane & (e1 < N), z1, sra, srm1, c_x0, c_xt, c_eps, sigma, min_log, max_log, N, clip_r,
        hr, hstride, h0c, h1c, h2c, LEARNED, CLIP, OUT_BF16, HIST, EPS_HIST,
    )  # fmt: skip
    _quarter(
        xr, mr, orow, e2, lane & (e2 < N), z2, sra, srm1, c_x0, c_xt, c_eps, sigma, min_log, max_log, N, clip_r,
        hr, hstride, h0c, h1c, h2c, LEARNED, CLIP, OUT_BF16, HIST, EPS_HIST,
    )  # fmt: skip
    _quarter(
        xr, mr, orow, e3, lane & (e3 < N), z3, sra, srm1, c_x0, c_xt, c_eps, sigma, min_log, max_log, N, clip_r,
        hr, hstride, h0c, h1c, h2c, LEARNED, CLIP, OUT_BF16, HIST, EPS_HIST,
    )  # fmt: skip


def block_for(Q: int) -> int:
    """Counter lanes per program: the smallest power of two covering Q, at least 16 and at most MAX_BLOCK."""
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(Q)))

"""The posterior step x_t -> x_{t-1}: the torch twin, the Triton launcher, and the one branch that picks between them.

With eps and v the two halves of the model output (v only for learned_range) and c = coefs[step]:

    x0      = clamp(c.SRA * x_t - c.SRM1 * eps, -r, r)          (no clamp when clip_range is None)
    sigma   = c.SIGMA                                           (learned=False)
            = c.SIGMA * exp(0.5 (f c.MAX_LOG + (1 - f) c.MIN_LOG)), f = (v + 1) / 2      (learned=True)
    x_{t-1} = c.C_X0 * x0 + c.C_XT * x_t + c.C_EPS * eps + sum_k c.H_k * history[k] + sigma * z
    z[i, e] = ddpm_fast.noise.normals(seed, start_index + i, slot = timesteps[step], e)

A multistep table has K history columns H_0 .. H_{K-1} after the 8 base columns, and `history` (float32
[K, B, ...], K <= MAX_HISTORY) holds the x0 of the K previous steps, newest first; the step shifts it in
place (history[k] <- history[k-1], history[0] <- x0). With eps_history=True (a StepTable with history_of = "eps")
history[0] <- eps_hat = (c.SRA * x_t - x0) / c.SRM1 instead. One-step tables (K = 0) take no history.

All arithmetic is float32 whatever the storage dtype; the result is rounded once to x's dtype.

The noise keys (seed, start_index) are two ints, or two one-element int64 tensors on x's device that both paths
read on the device: a compiled twin or a captured kernel then serves every seed and shard unchanged.

What a run fixes (the table and its timesteps, the keys, the clip range, learned, the history and what it keeps)
is one frozen `StepArgs`, made and checked once per run by `step_args`; a step checks only what may change
from call to call (x, model_out, step, out):

    args = step_args(x, coefs, timesteps, seed=seed, start_index=start_index, clip_range=1.0)
    for i in range(S):
        posterior_step(x, model(x, timesteps[i]), args, i, out=x)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch

from ddpm_fast import noise
from ddpm_fast.checks import is_int
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.steps import C_EPS, C_X0, C_XT, COLUMNS, MAX_LOG, MIN_LOG, SIGMA, SRA, SRM1

__all__ = [
    "StepArgs",
    "step_args",
    "posterior_step",
    "step_torch",
    "step_triton",
    "use_triton",
    "make_step_counter",
    "update_formula",
    "MAX_HISTORY",
]

log = logging.getLogger("ddpm_fast")

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HISTORY = 3  # earlier steps' predictions the kernel reads (DPM-Solver++(3M), UniPC: 2; iPNDM order 4: 3)


def make_step_counter(start: int = 0, device=None) -> torch.Tensor:
    """A device step counter for `advance=True`: int64, shape [1], value `start`."""
    if not is_int(start) or not 0 <= start < 2**31:
        raise BadValue(f"start must be an int in [0, 2**31); got {start!r}")
    return torch.full((1,), start, dtype=torch.int64, device=device)


@dataclass(frozen=True)
class StepArgs:
    """What every step of one run reads besides x, the model output and the step index (module docstring):
    made and checked once per run by `step_args`, then passed whole to each step."""

    coefs: torch.Tensor  # float32 [S, 8 + K], StepTable.to(device)
    timesteps: torch.Tensor  # int64 [S]
    seed: int | torch.Tensor  # ints, or one-element int64 tensors on the device (read there, unchecked)
    start_index: int | torch.Tensor
    clip_range: float | None  # None: no clamp (also what an infinite range becomes)
    learned: bool  # model_out carries a variance half v (learned_range)
    history: torch.Tensor | None  # float32 [K, *shape]: the K last steps' x0 (or eps_hat), shifted
    eps_history: bool  # history keeps eps_hat instead of x0 (StepTable.history_of == "eps"); False when K = 0
    shape: tuple[int, ...]  # the x every step of the run takes
    device: torch.device


def step_args(
    x: torch.Tensor,
    coefs: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    seed,
    start_index=0,
    clip_range: float | None = None,
    learned: bool = False,
    history: torch.Tensor | None = None,
    eps_history: bool = False,
) -> StepArgs:
    """The checked `StepArgs` of a run whose steps take tensors shaped and placed like `x` (errors name the
    argument and its value). The tensors are kept, not copied: a runner may refill them between runs."""
    for name, t in (("x", x), ("coefs", coefs), ("timesteps", timesteps)):
        if not isinstance(t, torch.Tensor):
            raise BadType(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if x.ndim < 2 or x.numel() == 0:
        raise BadValue(f"x must be [B, C, ...] with at least one element; got shape {tuple(x.shape)}")
    _check_table(x, coefs, timesteps, history)
    tensors = [
        ("coefs", coefs),
        ("timesteps", timesteps),
        *([("history", history)] if history is not None else []),
    ]
    for name, t in tensors:
        if t.device != x.device:
            raise BadValue(f"{name} must be on x's device {x.device}; got {t.device}")
        if not t.is_contiguous():
            raise BadValue(f"{name} must be contiguous; got strides {t.stride()} for shape {tuple(t.shape)}")
    _check_keys(x, seed, start_index)
    if clip_range is not None:
        if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or not clip_range > 0:
            raise BadValue(f"clip_range must be a positive float or None; got {clip_range!r}")
        clip_range = None if clip_range == float("inf") else float(clip_range)
    return StepArgs(
        coefs=coefs,
        timesteps=timesteps,
        seed=seed,
        start_index=start_index,
        clip_range=clip_range,
        learned=bool(learned),
        history=history,
        eps_history=bool(eps_history) and history is not None,
        shape=tuple(x.shape),
        device=x.device,
    )


def _check_call(x, model_out, args: StepArgs, step, out, advance: bool) -> torch.Tensor:
    """What may change from one step of a run to the next: x, model_out, step and out, against the run's
    `args`; returns the out tensor (a new one for None)."""
    if not isinstance(args, StepArgs):
        raise BadType(f"args must be a StepArgs (kernels.step_args); got {type(args).__name__}")
    for name, t in (("x", x), ("model_out", model_out)):
        if not isinstance(t, torch.Tensor):
            raise BadType(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if tuple(x.shape) != args.shape:
        raise BadValue(
            f"x must have the shape its step args were made for {args.shape}; got {tuple(x.shape)}"
        )
    _check_model_out(x, model_out, args.learned)
    _check_step(step, args.coefs.shape[0], advance)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif not isinstance(out, torch.Tensor):
        raise BadType(f"out must be a torch.Tensor or None; got {type(out).__name__}")
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise BadValue(f"out must match x ({x.dtype} {tuple(x.shape)}); got {out.dtype} {tuple(out.shape)}")
    tensors = [("x", x), ("model_out", model_out), ("out", out)]
    tensors += [("step", step)] if isinstance(step, torch.Tensor) else []
    for name, t in tensors:
        if t.device != args.device:
            raise BadValue(f"{name} must be on its step args' device {args.device}; got {t.device}")
    for name, t in tensors[:3]:
        if not t.is_contiguous():
            raise BadValue(f"{name} must be contiguous; got strides {t.stride()} for shape {tuple(t.shape)}")
    return out


def _check_model_out(x, model_out, learned) -> None:
    if x.dtype not in STORAGE_DTYPES:
        raise BadValue(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if model_out.dtype not in STORAGE_DTYPES:
        raise BadValue(f"model_out must be float32, float16 or bfloat16; got {model_out.dtype}")
    C = x.shape[1]
    two_c = (x.shape[0], 2 * C, *x.shape[2:])
    if learned and tuple(model_out.shape) != two_c:
        raise BadValue(
            f"model_out must have 2C channels {two_c} when learned=True; got {tuple(model_out.shape)}"
        )
    if tuple(model_out.shape) not in (tuple(x.shape), two_c):
        raise BadValue(
            f"model_out must have x's shape {tuple(x.shape)} (or {two_c} with a variance half); "
            f"got {tuple(model_out.shape)}"
        )


def _check_table(x, coefs, timesteps, history) -> int:
    """The coefficient table, its timesteps and the x0 history agree with each other and with x; returns S."""
    K = 0 if history is None else (history.shape[0] if isinstance(history, torch.Tensor) else -1)
    if history is not None:
        if not isinstance(history, torch.Tensor):
            raise BadType(f"history must be a torch.Tensor or None; got {type(history).__name__}")
        want = (K, *x.shape)
        if history.dtype != torch.float32 or tuple(history.shape) != want or not 1 <= K <= MAX_HISTORY:
            raise BadValue(
                f"history must be float32 [K, *x.shape] with 1 <= K <= {MAX_HISTORY}; "
                f"got {history.dtype} {tuple(history.shape)}"
            )
    if (
        coefs.dtype != torch.float32
        or coefs.ndim != 2
        or coefs.shape[1] != len(COLUMNS) + K
        or coefs.shape[0] < 1
    ):
        raise BadValue(
            f"coefs must be a float32 [S, {len(COLUMNS) + K}] table (StepTable.to(device); "
            f"{len(COLUMNS)} columns plus one per history entry, {K} here); got {coefs.dtype} {tuple(coefs.shape)}"
        )
    S = coefs.shape[0]
    if timesteps.dtype != torch.int64 or tuple(timesteps.shape) != (S,):
        raise BadValue(
            f"timesteps must be int64 of shape ({S},); got {timesteps.dtype} {tuple(timesteps.shape)}"
        )
    return S


def _check_step(step, S: int, advance: bool) -> None:
    if isinstance(step, torch.Tensor):
        if step.dtype not in (torch.int32, torch.int64) or step.numel() != 1:
            raise BadValue(
                f"step must be an int or a one-element int32/int64 tensor; got {step.dtype} {tuple(step.shape)}"
            )
        if advance and (step.dtype != torch.int64 or not step.is_contiguous()):
            raise BadValue(f"advance=True needs an int64 step counter (make_step_counter); got {step.dtype}")
    elif isinstance(step, int) and not isinstance(step, bool):
        if not 0 <= step < S:
            raise BadValue(f"step must lie in [0, {S}); got {step}")
        if advance:
            raise BadValue("advance=True needs a step tensor to advance; got an int step")
    else:
        raise BadType(f"step must be an int or an int tensor; got {type(step).__name__}")


def _check_keys(x, seed, start_index) -> None:
    """(seed, start_index): two ints, or two one-element int64 tensors on x's device.

    Tensor values are taken as given (reading them would sync the device and break a compiled or captured
    step); callers validate the ints they fill them from, as `noise.check_seed` and this function do.
    """
    if not (isinstance(seed, torch.Tensor) or isinstance(start_index, torch.Tensor)):
        noise.check_seed(seed)
        if not is_int(start_index) or not 0 <= start_index:
            raise BadValue(f"start_index must be an int >= 0; got {start_index!r}")
        if start_index + x.shape[0] > 2**63:
            raise BadValue(f"start_index + batch must stay below 2**63; got {start_index} + {x.shape[0]}")
        return
    for name, v in (("seed", seed), ("start_index", start_index)):
        if not isinstance(v, torch.Tensor):
            raise BadType(f"{name} must be a tensor when the other key is one; got {type(v).__name__}")
        if v.dtype != torch.int64 or v.numel() != 1 or v.device != x.device:
            raise BadValue(
                f"{name} must be a one-element int64 tensor on {x.device}; got {v.dtype} {tuple(v.shape)} "
                f"on {v.device}"
            )


# ------------------------------------------------------------------------------------------------ twin


def update_formula(col, x, eps, v, z, clip_range: float | None, history=(), eps_history: bool = False):
    """The posterior step of the module docstring in torch ops, float32 in and out; returns (x_{t-1}, entry),
    entry what the history keeps of this step: x0, or eps_hat = (SRA x - x0) / SRM1 with eps_history.

    col(k) is StepTable column k, shaped to broadcast against x; v is the variance half of a learned_range
    model output (None otherwise); z is the step's noise; history the earlier x0 predictions, newest first
    (their weights are columns len(COLUMNS) + k). Shared by the CPU twin and the ONNX step graph.
    """
    x0 = col(SRA) * x - col(SRM1) * eps
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    sigma = col(SIGMA)
    if v is not None:
        f = (v + 1.0) * 0.5
        sigma = sigma * torch.exp(0.5 * (f * col(MAX_LOG) + (1.0 - f) * col(MIN_LOG)))
    y = col(C_X0) * x0 + col(C_XT) * x + col(C_EPS) * eps
    for k, h in enumerate(history):
        y = y + col(len(COLUMNS) + k) * h
    entry = (col(SRA) * x - x0) / col(SRM1) if eps_history else x0
    return y + sigma * z, entry


def step_torch(
    x: torch.Tensor,
    model_out: torch.Tensor,
    args: StepArgs,
    step,
    *,
    out: torch.Tensor | None = None,
    advance: bool = False,
) -> torch.Tensor:
    """The posterior step (module docstring) in plain torch ops: the CPU twin of the fused kernel.

    Tables are indexed with the step tensor (index_select), never `.item()`, so the function compiles with
    `torch.compile(fullgraph=True)` and a device-resident counter works unchanged. With tensor keys a compiled
    twin serves every seed and shard without recompiling (ints would be specialised, then turned into
    symbols that Inductor's C++ backend mistypes in the Philox arithmetic).
    """
    out = _check_call(x, model_out, args, step, out, advance)
    B = x.shape[0]
    N = x.numel() // B
    if isinstance(step, torch.Tensor):
        idx = step.reshape(1).to(torch.int64)
        c = args.coefs.index_select(0, idx)  # [1, 8 + K]
        slot = args.timesteps.index_select(0, idx)
    else:
        c = args.coefs[step : step + 1]
        slot = args.timesteps[step : step + 1]

    m = model_out.reshape(B, -1)
    xf = x.reshape(B, N).float()
    eps = m[:, :N].float()
    v = m[:, N:].float() if args.learned else None
    n = torch.arange(B, dtype=torch.int64, device=x.device)
    seed = args.seed
    if isinstance(seed, torch.Tensor):  # tensor keys: a compiled twin serves every (seed, start_index)
        seed, n = seed.reshape(()), n + args.start_index.reshape(())
    else:
        n = n + args.start_index
    z = noise.normals(seed, n, slot, N)
    history = args.history
    hist = () if history is None else history.reshape(history.shape[0], B, N)
    # c[:, k]: [1, 1] over [B, N]
    y, entry = update_formula(
        lambda k: c[:, k : k + 1], xf, eps, v, z, args.clip_range, tuple(hist), args.eps_history
    )
    if history is not None:  # shift: history[k] <- history[k-1], history[0] <- x0 or eps_hat, after the reads
        hist.copy_(torch.cat([entry.unsqueeze(0), hist[:-1]]))
    out.copy_(y.reshape(x.shape))
    if advance:
        step.add_(1)
    return out


# ---------------------------------------------------------------------------------------------- triton


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _log_fallback(reason: str) -> None:
    log.warning("fused step kernel unavailable (%s); using the torch twin", reason)


def _triton_runs_on(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """The one choice: Triton when x is on CUDA (or TRITON_INTERPRET=1 runs it on CPU) and Triton imports."""
    if not _triton_runs_on(x):
        return False
    if not _triton_importable():
        _log_fallback("triton is not installed")
        return False
    return True


def step_triton(
    x: torch.Tensor,
    model_out: torch.Tensor,
    args: StepArgs,
    step,
    *,
    out: torch.Tensor | None = None,
    advance: bool = False,
) -> torch.Tensor:
    """The posterior step (module docstring) as one fused Triton launch; the noise is drawn in registers.

    The launcher of `_triton_step._step_kernel`: checks the call, allocates `out` and the one-element device
    tensors the kernel reads an int step or int keys from, builds a 1-D grid of B * ceil(Q / BLOCK)
    programs (Q = ceil(N / 4) counter lanes per row) and launches on x's device.
    """
    if not _triton_importable():
        raise RuntimeError("step_triton needs triton, which is not installed")
    if not _triton_runs_on(x):
        raise RuntimeError(f"step_triton needs a CUDA tensor (or TRITON_INTERPRET=1); x is on {x.device}")
    out = _check_call(x, model_out, args, step, out, advance)
    from ddpm_fast.kernels import _triton_step as tk  # Triton is optional: loaded on the first fused launch

    dev = x.device
    # Int arguments, for convenience: torch.full is a fill kernel (no host copy), so this too can be captured,
    # with the values frozen in the graph; the engine passes tensors it refills instead.
    if not isinstance(step, torch.Tensor):
        step = torch.full((1,), step, dtype=torch.int64, device=dev)
    seed, start_index = args.seed, args.start_index
    if not isinstance(seed, torch.Tensor):
        seed = torch.full((1,), seed, dtype=torch.int64, device=dev)
        start_index = torch.full((1,), start_index, dtype=torch.int64, device=dev)
    B = x.shape[0]
    N = x.numel() // B
    Q = (N + 3) // 4
    BLOCK = tk.block_for(Q)
    blocks_per_row = (Q + BLOCK - 1) // BLOCK
    grid = (blocks_per_row * B,)
    clip = args.clip_range is not None
    K = 0 if args.history is None else args.history.shape[0]
    hist = out if args.history is None else args.history  # never read when K = 0
    # Triton launches on the current device; x may live on another GPU.
    with torch.cuda.device(dev) if x.is_cuda else contextlib.nullcontext():
        tk._step_kernel[grid](
            x,
            model_out,
            out,
            args.coefs,
            args.timesteps,
            step,
            seed,
            start_index,
            N,
            Q,
            blocks_per_row,
            model_out.numel() // B,
            args.clip_range if clip else 0.0,
            hist,
            B * N,
            LEARNED=args.learned,
            CLIP=clip,
            OUT_BF16=out.dtype == torch.bfloat16,
            ADVANCE=advance,
            HIST=K,
            EPS_HIST=args.eps_history,
            BLOCK=BLOCK,
            num_warps=tk.NUM_WARPS,
        )
    return out


# ---------------------------------------------------------------------------------------------- public


def posterior_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    args: StepArgs,
    step,
    *,
    out: torch.Tensor | None = None,
    advance: bool = False,
) -> torch.Tensor:
    """x_{t-1} for row `step` of the run's table (formula in the module docstring); Triton or the twin per
    `use_triton`.

    x: [B, C, ...] float32/float16/bfloat16, shaped and placed as `args` (from `step_args`) was made for;
    model_out: eps [B, C, ...] or (eps | v) [B, 2C, ...], any of those dtypes (a variance half is ignored
    unless args.learned); step: an int in [0, S), or a one-element int tensor on x's device, read on the device
    and so not range-checked (that would need a sync); advance=True adds 1 to it (int64 only). out: where to
    write (may be x), else a new tensor. Any StepTable (DDPM of every variance, DDIM, the multistep solvers,
    whose history args carries and this step shifts). Returns out.
    """
    fn = step_triton if use_triton(x) else step_torch
    return fn(x, model_out, args, step, out=out, advance=advance)

"""Noise schedules: every table in float64, named after its formula (Ho et al. 2020, Nichol & Dhariwal 2021).

Timesteps are 0-based: index i of every table is the model timestep t = i (the paper's t = i + 1).
A respaced schedule keeps a subset of the original timesteps and rebuilds its betas from the kept
alphas_cumprod, so a sampler walks it exactly like a full schedule; `timesteps[i]` is the original
timestep that index i stands for, and is what the model is called with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from ddpm_fast.checks import check_int, is_int
from ddpm_fast.errors import BadType, BadValue

__all__ = ["Schedule", "spaced_timesteps", "spacing_timesteps", "SPACINGS"]

_F64 = torch.float64


def _as_betas(betas) -> torch.Tensor:
    if isinstance(betas, torch.Tensor):
        b = betas.detach().to("cpu", _F64)
    else:
        try:
            b = torch.as_tensor(betas, dtype=_F64)
        except (TypeError, ValueError) as e:
            raise BadType(f"betas must be a 1-D sequence of floats; got {type(betas).__name__}") from e
    if b.ndim != 1 or b.numel() < 1:
        raise BadValue(f"betas must be a non-empty 1-D sequence; got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise BadValue("betas must be finite; got NaN or Inf")
    if not ((b > 0) & (b < 1)).all():
        bad = b[(b <= 0) | (b >= 1)][0].item()
        raise BadValue(f"betas must lie in (0, 1); got {bad!r}")
    return b


class Schedule:
    """A DDPM noise schedule over `num_timesteps` steps; build with `linear`, `cosine` or raw betas."""

    def __init__(self, betas, *, timesteps: Sequence[int] | None = None, spec: dict | None = None):
        b = _as_betas(betas)
        T = b.numel()
        self.betas = b
        # The original timestep each index stands for (identity unless respaced).
        ts = torch.arange(T, dtype=torch.int64) if timesteps is None else torch.as_tensor(timesteps)
        if ts.shape != (T,):
            raise BadValue(f"timesteps must have one entry per beta ({T}); got shape {tuple(ts.shape)}")
        self.timesteps = ts.to(torch.int64)
        self.spec = dict(spec) if spec is not None else {"kind": "betas", "betas": b.tolist()}

        # q(x_t | x_0)
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=_F64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde is 0 at t = 0; improved-diffusion clips the log with its value at t = 1.
        pv = self.posterior_variance
        first = pv[1] if T > 1 else b[0]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first.reshape(1), pv[1:]]))
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """DDPM's linear betas, scaled as improved-diffusion does when T != 1000 is not wanted: plain linspace."""
        T = _check_T(num_timesteps)
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise BadValue(f"beta_start and beta_end must lie in (0, 1); got {beta_start}, {beta_end}")
        betas = _linspace(beta_start, beta_end, T)
        spec = {"kind": "linear", "num_timesteps": T, "beta_start": beta_start, "beta_end": beta_end}
        return cls(betas, spec=spec)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """Improved DDPM: alphabar(t) = cos^2((t/T + s)/(1 + s) * pi/2); beta_t = min(1 - abar(t+1)/abar(t), max_beta)."""
        T = _check_T(num_timesteps)
        if not 0 < max_beta < 1:
            raise BadValue(f"max_beta must lie in (0, 1); got {max_beta}")

        def abar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
        spec = {"kind": "cosine", "num_timesteps": T, "s": s, "max_beta": max_beta}
        return cls(torch.tensor(betas, dtype=_F64), spec=spec)

    @classmethod
    def from_spec(cls, spec: dict) -> Schedule:
        """Inverse of `spec`: {"kind": "linear"|"cosine"|"betas", ...}."""
        if not isinstance(spec, dict) or "kind" not in spec:
            raise BadValue(f"schedule spec must be a dict with a 'kind'; got {spec!r}")
        kind = spec["kind"]
        args = {k: v for k, v in spec.items() if k != "kind"}
        if kind == "linear":
            return cls.linear(**args)
        if kind == "cosine":
            return cls.cosine(**args)
        if kind == "betas":
            return cls(args["betas"])
        raise BadValue(f"schedule kind must be 'linear', 'cosine' or 'betas'; got {kind!r}")

    # ------------------------------------------------------------------ respacing
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"Schedule(T={self.num_timesteps}, spec={self.spec.get('kind')})"

    def respace(self, timesteps: Sequence[int]) -> Schedule:
        """Keep `timesteps` (indices into this schedule); beta_i = 1 - abar[k_i] / abar[k_{i-1}] (improved-diffusion)."""
        kept = check_timesteps(timesteps, self.num_timesteps)
        abar = self.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=_F64), abar[:-1]])
        betas = 1.0 - abar / prev
        return Schedule(betas, timesteps=self.timesteps[kept], spec=self.spec)


def _linspace(start: float, end: float, n: int) -> torch.Tensor:
    """torch.linspace(start, end, n, dtype=float64) as its vectorized CPU kernels (AVX2, AVX-512) compute it,
    the same bits on every machine: step = (end - start) / (n - 1), then fma(step, i, start) for i < n // 2
    and fma(-step, n - 1 - i, end) above, each rounded once (exact rationals here). ATen's scalar kernel
    (ATEN_CPU_CAPABILITY=default, a CPU without AVX2) rounds the product and the sum apart and gave 216 of
    DDPM's 1000 linear betas another last bit: another schedule digest, so the bundled tuned tables, learned
    where the vector kernels ran, were refused as "learned for another schedule"."""
    if n == 1:
        return torch.tensor([start], dtype=_F64)
    step = (end - start) / (n - 1)
    a, b, d = Fraction(start), Fraction(end), Fraction(step)
    half = n // 2
    return torch.tensor(
        [float(a + d * i) if i < half else float(b - d * (n - 1 - i)) for i in range(n)], dtype=_F64
    )


def _check_T(T) -> int:
    check_int(T, "num_timesteps")
    return T


def check_timesteps(timesteps, T: int) -> torch.Tensor:
    """Validate an explicit list of kept timesteps (any order) and return it sorted ascending, int64."""
    try:
        ts = torch.as_tensor(list(timesteps) if not isinstance(timesteps, torch.Tensor) else timesteps)
    except (TypeError, ValueError) as e:
        raise BadType(f"timesteps must be a sequence of ints; got {timesteps!r}") from e
    if ts.ndim != 1 or ts.numel() == 0:
        raise BadValue(f"timesteps must be a non-empty 1-D sequence; got shape {tuple(ts.shape)}")
    if ts.is_floating_point() or ts.dtype == torch.bool:
        if ts.dtype == torch.bool or not torch.equal(ts, ts.round()):
            raise BadType(f"timesteps must be integers; got {ts.tolist()}")
    ts = ts.to(torch.int64).cpu()
    if ((ts < 0) | (ts >= T)).any():
        bad = ts[(ts < 0) | (ts >= T)][0].item()
        raise BadValue(f"timesteps must lie in [0, {T - 1}]; got {bad}")
    srt = torch.sort(ts).values
    if srt.numel() > 1 and (srt[1:] == srt[:-1]).any():
        raise BadValue(f"timesteps must not repeat; got {ts.tolist()}")
    return srt


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly over [0, T-1], both ends kept: round(i (T-1)/(steps-1)).

    This is improved-diffusion's `space_timesteps(T, [steps])` (one section); for steps == T it is all of them.
    """
    if not is_int(steps):
        raise BadType(f"steps must be an int; got {type(steps).__name__}")
    if not 1 <= steps <= num_timesteps:
        raise BadValue(f"steps must lie in [1, {num_timesteps}]; got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


SPACINGS = ("uniform", "linspace", "trailing", "logsnr", "karras")
KARRAS_RHO = 7.0  # EDM (Karras et al. 2022, eq. 5): the paper's rho, diffusers' use_karras_sigmas too


def spacing_timesteps(schedule: Schedule, steps: int, spacing: str = "uniform") -> list[int]:
    """`steps` kept timesteps of `schedule` (ascending) by rule:

    uniform   round(i (T-1)/(steps-1)), both ends (improved-diffusion; `spaced_timesteps`)
    linspace  round(linspace(0, T-1, steps+1))[1:] (diffusers' default "linspace" for its multistep solvers)
    trailing  round(arange(T, 0, -T/steps)) - 1 (diffusers' "trailing", from T-1 down)
    logsnr    uniform in lambda = log(alpha/sigma) between t = T-1 and t = 0, each at its nearest timestep
              (the DPM-Solver authors' choice for pixel-space models)
    karras    EDM's sigmas (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7,
              between the schedule's sigma = sqrt((1 - abar)/abar) at t = T-1 and t = 0, each at the timestep
              it falls on by linear interpolation in log sigma, rounded (diffusers' use_karras_sigmas; on
              squaredcos_cap_v2 diffusers truncates instead)
    Rules that put two of the N on one timestep are refused (a ValueError naming steps and spacing).
    """
    T = schedule.num_timesteps
    ids = spaced_timesteps(T, steps)  # validates steps
    if spacing == "uniform":
        return ids
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps + 1, dtype=_F64).round().long()[1:]
    elif spacing == "trailing":
        ts = (torch.arange(T, 0, -T / steps, dtype=_F64).round() - 1).long()
    elif spacing == "logsnr":
        lam = 0.5 * (
            torch.log(schedule.alphas_cumprod) - torch.log1p(-schedule.alphas_cumprod)
        )  # decreasing in t
        want = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=_F64)
        ts = (lam[None, :] - want[:, None]).abs().argmin(dim=1).sort().values
        for k in range(1, steps):  # near t = 0 lambda moves faster than one timestep: keep them distinct
            ts[k] = max(int(ts[k]), int(ts[k - 1]) + 1)
    elif spacing == "karras":
        abar = schedule.alphas_cumprod
        log_sigma = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # rising in t
        lo, hi = math.exp(float(log_sigma[0]) / KARRAS_RHO), math.exp(float(log_sigma[-1]) / KARRAS_RHO)
        sigmas = (hi + torch.linspace(0, 1, steps, dtype=_F64) * (lo - hi)) ** KARRAS_RHO
        t = np.interp(torch.log(sigmas).numpy(), log_sigma.numpy(), np.arange(T, dtype=np.float64))
        ts = torch.from_numpy(np.round(t)).long()
    else:
        raise BadValue(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    ts = torch.unique(ts.clamp(0, T - 1))
    if ts.numel() != steps:
        raise BadValue(
            f"steps={steps} with spacing={spacing!r} gives {ts.numel()} distinct timesteps of {T}; use fewer steps"
        )
    return ts.tolist()

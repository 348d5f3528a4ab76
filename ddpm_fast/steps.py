"""Per-step coefficient tables: everything one sampling run needs, built once in float64 before the loop.

Row i of a `StepTable` is the i-th step of the run (timesteps descending). A sampler family
(`ddpm_fast.samplers`) fills the columns; every path (the family's reference loop, the fused Triton kernel,
its torch twin, the ONNX step graph) computes, with eps and v the model output halves:

    x0    = SRA * x_t - SRM1 * eps                     (clipped to [-r, r] when clip is on)
    sigma = SIGMA                                      (fixed variances)
          = SIGMA * exp(0.5 (f MAX_LOG + (1 - f) MIN_LOG)),  f = (v + 1) / 2     (learned_range; SIGMA is a 0/1 gate)
    x_{t-1} = C_X0 * x0 + C_XT * x_t + C_EPS * eps + sum_k H_k * x0_{k} + sigma * z,
              z = noise(seed, n, slot = timestep, e)

where x0_{k} is the x0 predicted k + 1 steps earlier (a multistep family's history; `history` columns
H_0 .. H_{history-1} follow the 8 base columns, none for one-step families). The last step never adds noise
(SIGMA = 0). A table with history_of = "eps" (multistep on eps: iPNDM, DEIS) keeps instead, per earlier step,
the eps implied by its clipped x0 and its own x_t,

    eps_hat = (SRA * x_t - x0) / SRM1                  (= eps when nothing was clipped)

since an Adams-Bashforth sum of earlier eps reads the earlier states x_{t+k}, which no x0 history plus the
current x_t can rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_fast.schedule import Schedule

__all__ = [
    "StepTable",
    "base_columns",
    "finish",
    "fixed_sigma",
    "learned_sigma",
    "VARIANCES",
    "COLUMNS",
    "HISTORY_OF",
]

VARIANCES = ("fixed_small", "fixed_large", "learned_range")
COLUMNS = ("SRA", "SRM1", "C_X0", "C_XT", "C_EPS", "SIGMA", "MIN_LOG", "MAX_LOG")
SRA, SRM1, C_X0, C_XT, C_EPS, SIGMA, MIN_LOG, MAX_LOG = range(len(COLUMNS))
HISTORY_OF = ("x0", "eps")  # what a multistep table's history holds per earlier step (module docstring)


@dataclass(frozen=True)
class StepTable:
    """coefs: float64 [S, 8 + history] (COLUMNS, then the history weights); timesteps: int64 [S], the model
    timestep (and noise slot) of each step; `draws[i]`: whether step i draws noise (a generator's draw order)."""

    coefs: torch.Tensor
    timesteps: torch.Tensor
    method: str
    variance: str
    eta: float
    history: int = 0
    learned: bool = False  # sigma from the model's variance half (DDPM with learned_range)
    draws: tuple[bool, ...] = ()
    history_of: str = "x0"  # "eps": the history holds eps_hat = (SRA x - x0) / SRM1 (module docstring)
    final_abar: float = 1.0  # abar the last step lands on (1: x_0; DEIS as diffusers: timestep 0's)

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def to(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefs, timesteps) as device tensors, coefs in `dtype` (float32 for the kernels)."""
        return self.coefs.to(device=device, dtype=dtype).contiguous(), self.timesteps.to(device).contiguous()


def base_columns(schedule: Schedule) -> torch.Tensor:
    """float64 [S, 8] in schedule order (index 0 = cleanest) with the x0 and log-variance columns filled; the
    family fills C_X0, C_XT, C_EPS and SIGMA, then `finish` orders it."""
    s = schedule
    c = torch.zeros(s.num_timesteps, len(COLUMNS), dtype=torch.float64)
    # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    c[:, SRA] = s.sqrt_recip_alphas_cumprod
    c[:, SRM1] = s.sqrt_recipm1_alphas_cumprod
    # improved DDPM's learned log-variance interpolates between these
    c[:, MIN_LOG] = s.posterior_log_variance_clipped
    c[:, MAX_LOG] = torch.log(s.betas)
    return c


def finish(
    c: torch.Tensor, schedule: Schedule, *, method, variance, eta, learned=False, draws=None
) -> StepTable:
    """Zero the last step's noise, put rows in run order (noisiest first) and wrap them in a StepTable."""
    S = schedule.num_timesteps
    c[0, SIGMA] = 0.0  # index 0 is the last step: no noise
    order = torch.arange(S - 1, -1, -1)
    return StepTable(
        coefs=c[order].contiguous(),
        timesteps=schedule.timesteps[order].contiguous(),
        method=method,
        variance=variance,
        eta=float(eta),
        learned=learned,
        draws=tuple(draws) if draws is not None else (False,) * S,
    )


def fixed_sigma(c: torch.Tensor, v) -> torch.Tensor:
    """sigma of a fixed variance: the SIGMA column of row c."""
    return c[SIGMA]


def learned_sigma(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Improved DDPM eq. 15: sigma = exp(0.5 (f log beta + (1 - f) log beta-tilde)), f = (v + 1) / 2, gated by SIGMA."""
    f = (v + 1) / 2
    return c[SIGMA] * torch.exp(0.5 * (f * c[MAX_LOG] + (1 - f) * c[MIN_LOG]))

"""Per-step coefficient tables: everything one sampling run needs, built once in float64 before the loop.

Row i of a `StepTable` is the i-th step of the run (timesteps descending). Every fast path (fused Triton
kernel, CPU twin, ONNX step graph) computes, in float32, with eps and v the model output halves:

    x0    = SRA * x_t - SRM1 * eps                     (clipped to [-r, r] when clip is on)
    sigma = SIGMA                                      (fixed variances)
          = SIGMA * exp(0.5 (f MAX_LOG + (1 - f) MIN_LOG)),  f = (v + 1) / 2     (learned_range; SIGMA is a 0/1 gate)
    x_{t-1} = C_X0 * x0 + C_XT * x_t + C_EPS * eps + sigma * z,   z = noise(seed, n, slot = timestep, e)

DDPM (posterior q(x_{t-1} | x_t, x0)): C_X0 = posterior_mean_coef1, C_XT = posterior_mean_coef2, C_EPS = 0.
DDIM (Song et al. eq. 12): C_X0 = sqrt(abar_prev), C_XT = 0, C_EPS = sqrt(1 - abar_prev - sigma^2),
sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)), abar_prev = 1 at the last step.
The last step never adds noise (SIGMA = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_fast.schedule import Schedule

__all__ = ["StepTable", "build_step_table", "METHODS", "VARIANCES", "COLUMNS"]

METHODS = ("ddpm", "ddim")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
COLUMNS = ("SRA", "SRM1", "C_X0", "C_XT", "C_EPS", "SIGMA", "MIN_LOG", "MAX_LOG")
SRA, SRM1, C_X0, C_XT, C_EPS, SIGMA, MIN_LOG, MAX_LOG = range(len(COLUMNS))


@dataclass(frozen=True)
class StepTable:
    """coefs: float64 [S, 8] (columns COLUMNS); timesteps: int64 [S], the model timestep (and noise slot) of each step."""

    coefs: torch.Tensor
    timesteps: torch.Tensor
    method: str
    variance: str
    eta: float

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    @property
    def learned(self) -> bool:
        """True when sigma comes from the model's variance half (DDPM with learned_range)."""
        return self.method == "ddpm" and self.variance == "learned_range"

    def to(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefs, timesteps) as device tensors, coefs in `dtype` (float32 for the kernels)."""
        return self.coefs.to(device=device, dtype=dtype).contiguous(), self.timesteps.to(device).contiguous()


def build_step_table(
    schedule: Schedule, *, method: str = "ddpm", variance: str = "fixed_small", eta: float = 0.0
) -> StepTable:
    """Coefficients for walking `schedule` (already respaced if wanted) from its last index down to 0."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    s = schedule
    S = s.num_timesteps
    c = torch.zeros(S, len(COLUMNS), dtype=torch.float64)
    c[:, SRA] = s.sqrt_recip_alphas_cumprod
    c[:, SRM1] = s.sqrt_recipm1_alphas_cumprod
    c[:, MIN_LOG] = s.posterior_log_variance_clipped
    c[:, MAX_LOG] = torch.log(s.betas)
    if method == "ddpm":
        c[:, C_X0] = s.posterior_mean_coef1
        c[:, C_XT] = s.posterior_mean_coef2
        if variance == "fixed_small":
            c[:, SIGMA] = s.posterior_variance.sqrt()
        elif variance == "fixed_large":
            c[:, SIGMA] = s.betas.sqrt()
        else:
            c[:, SIGMA] = 1.0
    else:
        abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = float(eta) * var.sqrt()
        c[:, C_X0] = abar_prev.sqrt()
        c[:, C_EPS] = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
        c[:, SIGMA] = sigma
    c[0, SIGMA] = 0.0  # index 0 is the last step: no noise
    order = torch.arange(S - 1, -1, -1)
    return StepTable(
        coefs=c[order].contiguous(),
        timesteps=s.timesteps[order].contiguous(),
        method=method,
        variance=variance,
        eta=float(eta),
    )

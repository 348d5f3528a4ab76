"""DDPM ancestral sampling (Ho et al. 2020): the posterior q(x_{t-1} | x_t, x0_hat) with fixed or learned variance."""

from __future__ import annotations

import torch

from ddpm_fast.schedule import Schedule
from ddpm_fast.steps import C_X0, C_XT, SIGMA, SRA, SRM1, StepTable, base_columns, finish

__all__ = ["sample_ddpm", "ddpm_table"]


def sample_ddpm(model, x, table: StepTable, noise, *, sigma, clip, callback=None) -> torch.Tensor:
    """Ho et al. 2020 eq. 11 via eq. 7: x_{t-1} = c1 x0_hat + c2 x_t + sigma_t z, x0_hat = SRA x_t - SRM1 eps."""
    c = table.coefs.to(x)
    for i, t in enumerate(table.timesteps.tolist()):
        eps, v = model(x, t)
        x0 = clip(c[i, SRA] * x - c[i, SRM1] * eps)
        x = c[i, C_X0] * x0 + c[i, C_XT] * x + sigma(c[i], v) * noise(i, t)
        if callback is not None:
            callback(i, t, x)
    return x


def ddpm_table(schedule: Schedule, *, variance: str, eta: float = 0.0) -> StepTable:
    """Posterior mean coefficients (Ho et al. eq. 7) and sigma: sqrt(beta-tilde) (fixed_small), sqrt(beta)
    (fixed_large), or a 0/1 gate on the learned interpolation (learned_range, improved DDPM eq. 15)."""
    s = schedule
    c = base_columns(s)
    # q(x_{t-1} | x_t, x_0)
    c[:, C_X0] = s.posterior_mean_coef1
    c[:, C_XT] = s.posterior_mean_coef2
    c[:, SIGMA] = {
        "fixed_small": s.posterior_variance.sqrt(),
        "fixed_large": s.betas.sqrt(),
        "learned_range": torch.ones_like(s.betas),
    }[variance]
    S = s.num_timesteps
    return finish(
        c,
        s,
        method="ddpm",
        variance=variance,
        eta=0.0,
        learned=variance == "learned_range",
        draws=[i < S - 1 for i in range(S)],  # diffusers' DDPMPipeline: a draw at every step but the last
    )

"""DDIM (Song et al. 2021): the non-Markovian reverse process, deterministic at eta = 0."""

from __future__ import annotations

import torch

from ddpm_fast.schedule import Schedule
from ddpm_fast.steps import C_EPS, C_X0, SIGMA, SRA, SRM1, StepTable, base_columns, finish

__all__ = ["sample_ddim", "ddim_table"]


def sample_ddim(model, x, table: StepTable, noise, *, sigma, clip, callback=None) -> torch.Tensor:
    """Song et al. eq. 12: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    c = table.coefs.to(x)
    for i, t in enumerate(table.timesteps.tolist()):
        eps, v = model(x, t)
        x0 = clip(c[i, SRA] * x - c[i, SRM1] * eps)  # eps is not re-derived from the clipped x0 (diffusers)
        x = c[i, C_X0] * x0 + c[i, C_EPS] * eps + sigma(c[i], v) * noise(i, t)
        if callback is not None:
            callback(i, t, x)
    return x


def ddim_table(schedule: Schedule, *, variance: str, eta: float = 0.0) -> StepTable:
    """Song et al. eq. 16: sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)); abar_prev = 1
    at the last step. The variance setting only decides how many channels the model returns."""
    s = schedule
    c = base_columns(s)
    abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    sigma = float(eta) * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    c[:, C_X0] = abar_prev.sqrt()
    c[:, C_EPS] = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    c[:, SIGMA] = sigma
    # diffusers' DDIMScheduler draws at every step when eta > 0 (the last one multiplied by 0)
    return finish(c, s, method="ddim", variance=variance, eta=eta, draws=[eta > 0] * s.num_timesteps)

"""SDE-DPM-Solver++(2M): Lu et al. 2022 (arXiv:2211.01095), section 5: x_t = (sigma_t/sigma_s) e^{-h} x_s
+ alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z, D the 2M data estimate (dpmpp_2m.data_estimate, first
order at the first and last steps), noise at every step (diffusers' SDE order: the last draw multiplied by 0)."""

from __future__ import annotations

import math

from ddpm_fast.samplers._multistep import Solver, multistep_table, sample_multistep
from ddpm_fast.samplers.dpmpp_2m import data_estimate

__all__ = ["sample_dpmpp_2m_sde", "dpmpp_2m_sde_table", "HISTORY"]

HISTORY = 1  # earlier x0 predictions a step reads


class DPMSolverPP2MSDE(Solver):
    def __call__(self, x, ms, i):
        """x_{i+1} without its noise term (sample_multistep adds noise_scale(i) z)."""
        alpha, sigma, lam = self.w
        e = math.exp(-(lam[i + 1] - lam[i]))  # e^{-h}: 0 at the last step (h = +inf)
        d = data_estimate(ms, i, lam, 1 if i < 1 or i == self.S - 1 else 2)
        return (sigma[i + 1] / sigma[i] * e) * x + (alpha[i + 1] * (1.0 - e * e)) * d

    def noise_scale(self, i: int) -> float:
        """sigma_t sqrt(1 - e^{-2h}): 0 at the last step."""
        alpha, sigma, lam = self.w
        return sigma[i + 1] * math.sqrt(1.0 - math.exp(-2.0 * (lam[i + 1] - lam[i])))


def sample_dpmpp_2m_sde(model, x, table, noise, *, sigma, clip, callback=None):
    """The SDE update (module docstring) walked over the table's timesteps."""
    return sample_multistep(DPMSolverPP2MSDE(table), model, x, table, noise, clip=clip, callback=callback)


def dpmpp_2m_sde_table(schedule, *, variance: str, eta: float = 0.0):
    return multistep_table(
        schedule, DPMSolverPP2MSDE, HISTORY, method="dpmpp_2m_sde", variance=variance, noise=True
    )

"""DPM-Solver++(3M): Lu et al. 2022 (arXiv:2211.01095), the multistep third-order update in data prediction
(D1, D2 from three x0 predictions), warming up through the 2M update (dpmpp_2m) as diffusers'
DPMSolverMultistepScheduler does: order 1 at the first and last steps, 2 at the second, and at the one before
the last when there are fewer than 15."""

from __future__ import annotations

import math

from ddpm_fast.samplers._multistep import Solver, multistep_table, sample_multistep
from ddpm_fast.samplers.dpmpp_2m import dpmpp_2m_update

__all__ = ["sample_dpmpp_3m", "dpmpp_3m_table", "HISTORY"]

HISTORY = 2  # earlier x0 predictions a step reads


def order(i: int, S: int) -> int:
    if i < 1 or i == S - 1:
        return 1
    if i < 2 or (i == S - 2 and S < 15):
        return 2
    return 3


class DPMSolverPP3M(Solver):
    def __call__(self, x, ms, i):
        if order(i, self.S) < 3:
            return dpmpp_2m_update(x, ms, i, self.w, order(i, self.S))
        alpha, sigma, lam = self.w
        a_t, m0 = alpha[i + 1], ms[0]
        h = lam[i + 1] - lam[i]
        e = math.exp(-h)
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0, d1_1 = (m0 - ms[1]) / r0, (ms[1] - ms[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return (
            (sigma[i + 1] / sigma[i]) * x
            - (a_t * (e - 1.0)) * m0
            + (a_t * ((e - 1.0) / h + 1.0)) * d1
            - (a_t * ((e - 1.0 + h) / h**2 - 0.5)) * d2
        )


def sample_dpmpp_3m(model, x, table, noise, *, sigma, clip, callback=None):
    """The 3M update (module docstring) walked over the table's timesteps."""
    return sample_multistep(DPMSolverPP3M(table), model, x, table, noise, clip=clip, callback=callback)


def dpmpp_3m_table(schedule, *, variance: str, eta: float = 0.0):
    return multistep_table(schedule, DPMSolverPP3M, HISTORY, method="dpmpp_3m", variance=variance)

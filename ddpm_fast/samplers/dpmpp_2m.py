"""DPM-Solver++(2M): Lu et al. 2022 (arXiv:2211.01095), Algorithm 2: second-order multistep in data
prediction, x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1)(m0 + (m0 - m1) / (2 r0)), h = lambda_t - lambda_s,
r0 = h_prev / h; first order (eq. 9-10, = DDIM) at the first step and at the last (diffusers' final sigma
zero), as diffusers' DPMSolverMultistepScheduler takes it."""

from __future__ import annotations

import math

from ddpm_fast.samplers._multistep import Solver, multistep_table, sample_multistep

__all__ = ["sample_dpmpp_2m", "dpmpp_2m_table", "dpmpp_2m_update", "data_estimate", "HISTORY"]

HISTORY = 1  # earlier x0 predictions a step reads


def data_estimate(ms, i, lam, order):
    """The x0 a step moves towards: m0 (order 1), or m0 + (m0 - m1) / (2 r0) (Algorithm 2's midpoint form)."""
    if order == 1:
        return ms[0]
    r0 = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    return ms[0] + 0.5 * ((ms[0] - ms[1]) / r0)


def dpmpp_2m_update(x, ms, i, w, order):
    """x_{i+1} from x_i and the x0 predictions ms (newest first); w = walk(table)."""
    alpha, sigma, lam = w
    e = math.exp(-(lam[i + 1] - lam[i]))  # e^{-h}: 0 at the last step (h = +inf)
    return (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * (e - 1.0)) * data_estimate(ms, i, lam, order)


class DPMSolverPP2M(Solver):
    def __call__(self, x, ms, i):
        return dpmpp_2m_update(x, ms, i, self.w, 1 if i < 1 or i == self.S - 1 else 2)


def sample_dpmpp_2m(model, x, table, noise, *, sigma, clip, callback=None):
    """The 2M update (module docstring) walked over the table's timesteps."""
    return sample_multistep(DPMSolverPP2M(table), model, x, table, noise, clip=clip, callback=callback)


def dpmpp_2m_table(schedule, *, variance: str, eta: float = 0.0):
    return multistep_table(schedule, DPMSolverPP2M, HISTORY, method="dpmpp_2m", variance=variance)

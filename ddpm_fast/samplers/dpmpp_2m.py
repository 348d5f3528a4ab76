"""DPM-Solver++(2M): Lu et al. 2022 (arXiv:2211.01095), Algorithm 2: second-order multistep in data
prediction, x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1)(m0 + (m0 - m1) / (2 r0))."""

from __future__ import annotations

from ddpm_fast.samplers._multistep import DPMSolverPP, multistep_family

__all__ = ["sample_dpmpp_2m", "dpmpp_2m_table", "HISTORY"]

HISTORY = 1  # earlier x0 predictions a step reads

sample_dpmpp_2m, dpmpp_2m_table = multistep_family(
    "dpmpp_2m", lambda table: DPMSolverPP(table, order=2, sde=False), HISTORY, noise=False, doc=__doc__
)

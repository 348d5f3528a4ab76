"""SDE-DPM-Solver++(2M): Lu et al. 2022 (arXiv:2211.01095), section 5: x_t = (sigma_t/sigma_s) e^{-h} x_s
+ alpha_t (1 - e^{-2h})(m0 + (m0 - m1) / (2 r0)) + sigma_t sqrt(1 - e^{-2h}) z, noise at every step."""

from __future__ import annotations

from ddpm_fast.samplers._multistep import DPMSolverPP, multistep_family

__all__ = ["sample_dpmpp_2m_sde", "dpmpp_2m_sde_table", "HISTORY"]

HISTORY = 1  # earlier x0 predictions a step reads

sample_dpmpp_2m_sde, dpmpp_2m_sde_table = multistep_family(
    "dpmpp_2m_sde", lambda table: DPMSolverPP(table, order=2, sde=True), HISTORY, noise=True, doc=__doc__
)

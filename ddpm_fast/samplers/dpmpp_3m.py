"""DPM-Solver++(3M): Lu et al. 2022 (arXiv:2211.01095), the multistep third-order update in data
prediction (the paper's eq. for D1, D2 from three x0 predictions), warming up through orders 1 and 2."""

from __future__ import annotations

from ddpm_fast.samplers._multistep import DPMSolverPP, multistep_family

__all__ = ["sample_dpmpp_3m", "dpmpp_3m_table", "HISTORY"]

HISTORY = 2  # earlier x0 predictions a step reads

sample_dpmpp_3m, dpmpp_3m_table = multistep_family(
    "dpmpp_3m", lambda table: DPMSolverPP(table, order=3, sde=False), HISTORY, noise=False, doc=__doc__
)

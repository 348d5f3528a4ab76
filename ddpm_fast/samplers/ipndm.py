"""iPNDM: Zhang & Chen 2022 (DEIS, arXiv:2204.13902), the improved pseudo numerical method: the DDIM step
with eps replaced by the Adams-Bashforth combination of the last eps (newest first), at order
min(4, i + 1): 1; (3, -1)/2; (23, -16, 5)/12; (55, -59, 37, -9)/24 (k-diffusion's sample_ipndm)."""

from __future__ import annotations

from ddpm_fast.samplers._multistep import EpsMultistep, eps_multistep_table, sample_eps_multistep

__all__ = ["sample_ipndm", "ipndm_table", "HISTORY", "ORDER"]

ORDER = 4
HISTORY = ORDER - 1  # earlier eps a step reads
ADAMS_BASHFORTH = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


class IPNDM(EpsMultistep):
    def weights(self, i: int) -> list[float]:
        d = self.rho[i + 1] - self.rho[i]
        return [d * c for c in ADAMS_BASHFORTH[min(ORDER, i + 1) - 1]]


def sample_ipndm(model, x, table, noise, *, sigma, clip, callback=None):
    """The iPNDM step (module docstring) walked over the table's timesteps."""
    return sample_eps_multistep(IPNDM(table), model, x, table, clip=clip, callback=callback)


def ipndm_table(schedule, *, variance: str, eta: float = 0.0):
    return eps_multistep_table(schedule, IPNDM, HISTORY, method="ipndm", variance=variance)

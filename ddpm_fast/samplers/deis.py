"""DEIS-tAB: Zhang & Chen 2022 (arXiv:2204.13902), eq. 14: eps extrapolated by its Lagrange polynomial in
log rho through the last `order` steps and integrated exactly over [rho_i, rho_{i+1}] (diffusers'
DEISMultistepScheduler, algorithm_type "deis"): warm-up from first order, first order at the last step and
second order at the one before when there are fewer than 15, and the last step lands on timestep 0's abar."""

from __future__ import annotations

import math

from ddpm_fast.samplers._multistep import EpsMultistep, eps_multistep_table, sample_eps_multistep
from ddpm_fast.schedule import Schedule

__all__ = ["sample_deis", "deis_table", "sample_deis_2", "deis_2_table", "DEIS", "HISTORY", "HISTORY_2"]

HISTORY = 2  # earlier eps a step of deis (order 3) reads
HISTORY_2 = 1  # and of deis_2 (order 2)


def deis_order(i: int, S: int, order: int) -> int:
    """diffusers' order of step i of S (lower_order_final at its default)."""
    if order == 1 or i < 1 or (i == S - 1 and S < 15):
        return 1
    if order == 2 or i < 2 or (i == S - 2 and S < 15):
        return 2
    return 3


def _ind2(t, b, c):  # the integral of (log t - log c) / (log b - log c) dt
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind3(t, b, c, d):  # the integral of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d)) dt
    lt, lc, ld = math.log(t), math.log(c), math.log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((math.log(b) - lc) * (math.log(b) - ld))


class DEIS(EpsMultistep):
    def __init__(self, table, order: int):
        super().__init__(table)
        self.order = order

    def weights(self, i: int) -> list[float]:
        r = self.rho
        rt, r0 = r[i + 1], r[i]
        p = deis_order(i, self.S, self.order)
        if p == 1:
            return [rt - r0]
        if p == 2:
            r1 = r[i - 1]
            return [_ind2(rt, r0, r1) - _ind2(r0, r0, r1), _ind2(rt, r1, r0) - _ind2(r0, r1, r0)]
        r1, r2 = r[i - 1], r[i - 2]
        return [
            _ind3(rt, r0, r1, r2) - _ind3(r0, r0, r1, r2),
            _ind3(rt, r1, r2, r0) - _ind3(r0, r1, r2, r0),
            _ind3(rt, r2, r0, r1) - _ind3(r0, r2, r0, r1),
        ]


def timestep_zero_abar(schedule: Schedule) -> float:
    """abar at timestep 0 of the schedule `schedule` was respaced from (diffusers' DEIS final sigma)."""
    return float(Schedule.from_spec(schedule.spec).alphas_cumprod[0])


def sample_deis(model, x, table, noise, *, sigma, clip, callback=None):
    """DEIS-tAB of order 3 (module docstring) walked over the table's timesteps."""
    return sample_eps_multistep(DEIS(table, 3), model, x, table, clip=clip, callback=callback)


def deis_table(schedule, *, variance: str, eta: float = 0.0):
    return eps_multistep_table(
        schedule,
        lambda t: DEIS(t, 3),
        HISTORY,
        method="deis",
        variance=variance,
        final_abar=timestep_zero_abar(schedule),
    )


def sample_deis_2(model, x, table, noise, *, sigma, clip, callback=None):
    """DEIS-tAB of order 2 (module docstring) walked over the table's timesteps."""
    return sample_eps_multistep(DEIS(table, 2), model, x, table, clip=clip, callback=callback)


def deis_2_table(schedule, *, variance: str, eta: float = 0.0):
    return eps_multistep_table(
        schedule,
        lambda t: DEIS(t, 2),
        HISTORY_2,
        method="deis_2",
        variance=variance,
        final_abar=timestep_zero_abar(schedule),
    )

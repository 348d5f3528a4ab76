"""UniPC: Zhao et al. 2023 (arXiv:2302.04867), Algorithms 1-2 (UniP-2 predictor and UniC corrector) with
B(h) = e^h - 1 (bh2) in data prediction; the corrector refines x_i with the model output at x_i."""

from __future__ import annotations

import math

import numpy as np

from ddpm_fast.samplers._multistep import Solver, multistep_table, sample_multistep

__all__ = ["sample_unipc", "unipc_table", "UniPC", "HISTORY", "MIN_STEPS"]

HISTORY = 2  # earlier x0 predictions a step reads: the corrector of step i reaches one step further back
MIN_STEPS = 2  # the predictor's order (the registry's default, HISTORY + 1, would be 3)


def _unipc_coefficients(w, s0: int, t: int, prev: list[int], order: int, corrector: bool):
    """(h_phi_1, B_h, r_k, rhos) of a UniPC bh2 update from index s0 to t in data-prediction form (Zhao et
    al. 2023, arXiv:2302.04867, Algorithm 2 with B(h) = e^h - 1): rhos solve R rho = b with R_{nk} = r_k^(n-1),
    b_n = h phi_{n+1}(h) n! / B(h); the predictor of order 2 uses rho = 1/2, the corrector of order 1 too."""
    alpha, sigma, lam = w
    h = lam[t] - lam[s0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    rks = [(lam[j] - lam[s0]) / h for j in prev]
    if corrector:
        if order == 1:
            return h_phi_1, b_h, rks, [0.5]
        rows = rks + [1.0]
    else:
        if order <= 1:
            return h_phi_1, b_h, rks, []
        if order == 2:
            return h_phi_1, b_h, rks, [0.5]
        rows = rks
    n = len(rows)
    h_phi_k, fact, b = h_phi_1 / hh - 1.0, 1, []
    for k in range(1, n + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = np.array([[r ** (k - 1) for r in rows] for k in range(1, n + 1)])
    return h_phi_1, b_h, rks, list(np.linalg.solve(R, np.array(b)))


class UniPC(Solver):
    """A UniPC bh2 walk (predictor order `order` with its corrector), diffusers' UniPCMultistepScheduler at its
    defaults: order min(order, S - i, i + 1) at step i; the corrector of step i refines x_i with m_i using
    the order of step i - 1, and x_i (not the corrected state) is what the model saw."""

    def __init__(self, table, order: int = 2):
        super().__init__(table)
        self.order = order
        self.last, self.prev_order = None, None

    def corrector(self, x, ms, i):
        """x_i corrected with m_i: UniC from last = x_{i-1} (corrected), ms = [m_i, m_{i-1}, ...]."""
        alpha, sigma, lam = self.w
        order = self.prev_order
        prev = [i - 1 - k for k in range(1, order)]
        h_phi_1, b_h, rks, rhos = _unipc_coefficients(self.w, i - 1, i, prev, order, corrector=True)
        m0, a_t = ms[1], alpha[i]
        res = rhos[-1] * (ms[0] - m0)
        for k, (r, rho) in enumerate(zip(rks, rhos[:-1])):
            res = res + rho * ((ms[2 + k] - m0) / r)
        return (sigma[i] / sigma[i - 1]) * self.last - (a_t * h_phi_1) * m0 - (a_t * b_h) * res

    def predictor(self, x, ms, i, order):
        """x_{i+1}: UniP of `order` from x_i with ms = [m_i, m_{i-1}, ...]."""
        alpha, sigma, lam = self.w
        prev = [i - k for k in range(1, order)]
        h_phi_1, b_h, rks, rhos = _unipc_coefficients(self.w, i, i + 1, prev, order, corrector=False)
        m0, a_t = ms[0], alpha[i + 1]
        out = (sigma[i + 1] / sigma[i]) * x - (a_t * h_phi_1) * m0
        for k, (r, rho) in enumerate(zip(rks, rhos)):
            out = out - (a_t * b_h * rho) * ((ms[1 + k] - m0) / r)
        return out

    def __call__(self, x, ms, i):
        if i > 0:
            x = self.corrector(x, ms, i)
        order = min(self.order, self.S - i, i + 1)
        self.last, self.prev_order = x, order
        return self.predictor(x, ms, i, order)


def sample_unipc(model, x, table, noise, *, sigma, clip, callback=None):
    """UniPC bh2 of order 2 (module docstring) walked over the table's timesteps."""
    return sample_multistep(UniPC(table), model, x, table, noise, clip=clip, callback=callback)


def unipc_table(schedule, *, variance: str, eta: float = 0.0):
    return multistep_table(schedule, UniPC, HISTORY, method="unipc", variance=variance)

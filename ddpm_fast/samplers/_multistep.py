"""What the multistep solvers share: the (alpha, sigma, lambda) walk of a table, and the reduction of a
solver's natural update to the fused step's columns.

A table row i holds SRA = 1/alpha_i and SRM1 = sigma_i/alpha_i (alpha_i = sqrt(abar_i), sigma_i =
sqrt(1 - abar_i)); the walk ends at alpha = 1, sigma = 0 (diffusers' final sigma "zero"), where
lambda = log(alpha/sigma) is +inf and every update below reduces to returning the last x0 prediction.

`linear_columns` runs a solver's natural update on coefficient vectors instead of images (the basis is x_T
and the x0 predictions m_0 .. m_{S-1}); since every update is linear in the state and the m's, step i then
reads x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k m_{i-1-k}, which is what the fused kernel computes. The
noise, independent of everything, keeps its own SIGMA column.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from ddpm_fast.samplers.ddim import ddim_table
from ddpm_fast.steps import C_EPS, C_X0, C_XT, SIGMA, SRA, SRM1, StepTable

__all__ = [
    "walk",
    "linear_columns",
    "dpm_order",
    "dpmpp_update",
    "DPMSolverPP",
    "UniPC",
    "multistep_family",
    "EpsMultistep",
    "eps_multistep_family",
]


def walk(coefs: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """(alpha, sigma, lambda) per step of a run-ordered table, plus the final target (1, 0, +inf)."""
    c = coefs.tolist()
    alpha = [1.0 / row[SRA] for row in c] + [1.0]
    sigma = [row[SRM1] / row[SRA] for row in c] + [0.0]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    return alpha, sigma, lam


def linear_columns(num_steps: int, history: int, run) -> np.ndarray:
    """float64 [S, 2 + history]: (C_XT, C_X0, H_0 .. H_{history-1}) of each step, from `run(x, m, i) -> x`,
    the solver's natural update applied to step i (m: the list of x0 predictions so far, newest first).

    Raises AssertionError when the update reads an x0 older than `history` allows (a registry bug).
    """
    S = num_steps
    basis = np.eye(S + 1)  # [x_T, m_0, ..., m_{S-1}]
    x, ms = basis[0], []
    out = np.zeros((S, 2 + history))
    for i in range(S):
        ms.insert(0, basis[1 + i])
        nxt = run(x, ms, i)
        a = nxt[0] / x[0] if x[0] != 0 else 0.0
        rest = nxt - a * x
        out[i, 0] = a
        for k in range(min(history + 1, i + 1)):
            out[i, 1 + k] = rest[1 + i - k]
            rest[1 + i - k] = 0.0
        scale = max(1.0, float(np.abs(nxt).max()))
        assert np.abs(rest).max() <= 1e-12 * scale, f"step {i} reads x0 older than history={history}"
        x = nxt
    return out


# ---------------------------------------------------------------------------------------------- DPM-Solver++


def dpm_order(i: int, S: int, order: int) -> int:
    """The order of step i of S as diffusers' DPMSolverMultistepScheduler takes it: warm-up from first
    order, first order at the last step (final sigma zero), second order at the one before when S < 15."""
    if order == 1 or i < 1 or i == S - 1:
        return 1
    if order == 2 or i < 2 or (i == S - 2 and S < 15):
        return 2
    return 3


def dpmpp_update(x, ms, i, w, order, sde=False):
    """x_{i+1} from x_i and the x0 predictions ms (newest first), DPM-Solver++ (Lu et al. 2022,
    arXiv:2211.01095) in data-prediction form; w = walk(table). Multistep order 1: eq. (9)-(10) (= DDIM);
    order 2: Algorithm 2 (midpoint form D1 = (m0 - m1) / r0); order 3: the third-order multistep update;
    sde: the SDE-DPM-Solver++ variant (section 5) without its noise term (x gains sigma_t sqrt(1 - e^{-2h}) z)."""
    alpha, sigma, lam = w
    a_t, s_t, s_0 = alpha[i + 1], sigma[i + 1], sigma[i]
    h = lam[i + 1] - lam[i]
    e = math.exp(-h)  # 0 at the last step (h = +inf)
    m0 = ms[0]
    if order == 1:
        d = m0
    else:
        h0 = lam[i] - lam[i - 1]
        r0 = h0 / h
        d1_0 = (m0 - ms[1]) / r0
        if order == 2:
            d = m0 + 0.5 * d1_0
        else:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = (ms[1] - ms[2]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
            return (
                (s_t / s_0) * x
                - (a_t * (e - 1.0)) * m0
                + (a_t * ((e - 1.0) / h + 1.0)) * d1
                - (a_t * ((e - 1.0 + h) / h**2 - 0.5)) * d2
            )
    if sde:
        return (s_t / s_0 * e) * x + (a_t * (1.0 - e * e)) * d
    return (s_t / s_0) * x - (a_t * (e - 1.0)) * d


class DPMSolverPP:
    """Per-run state of a DPM-Solver++ walk: its order, whether it is the SDE variant."""

    def __init__(self, table: StepTable, order: int, sde: bool):
        self.w = walk(table.coefs)
        self.S, self.order, self.sde = table.num_steps, order, sde

    def noise_scale(self, i: int) -> float:
        """sigma_t sqrt(1 - e^{-2h}) for the SDE variant (0 at the last step), else 0."""
        if not self.sde:
            return 0.0
        alpha, sigma, lam = self.w
        return sigma[i + 1] * math.sqrt(1.0 - math.exp(-2.0 * (lam[i + 1] - lam[i])))

    def __call__(self, x, ms, i):
        return dpmpp_update(x, ms, i, self.w, dpm_order(i, self.S, self.order), self.sde)


# ---------------------------------------------------------------------------------------------- UniPC


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


class UniPC:
    """A UniPC bh2 walk (predictor order `order` with its corrector), diffusers' UniPCMultistepScheduler at its
    defaults: order min(order, S - i, i + 1) at step i; the corrector of step i refines x_i with m_i using
    the order of step i - 1, and x_i (not the corrected state) is what the model saw."""

    def __init__(self, table: StepTable, order: int):
        self.w = walk(table.coefs)
        self.S, self.order = table.num_steps, order
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

    def noise_scale(self, i: int) -> float:
        return 0.0

    def __call__(self, x, ms, i):
        if i > 0:
            x = self.corrector(x, ms, i)
        order = min(self.order, self.S - i, i + 1)
        self.last, self.prev_order = x, order
        return self.predictor(x, ms, i, order)


# ---------------------------------------------------------------------------------------------- the family parts


def multistep_table(table: StepTable, solver, history: int) -> StepTable:
    """`table` (base columns filled) with C_XT, C_X0, the history weights and SIGMA from the solver's updates."""
    S = table.num_steps
    cols = linear_columns(S, history, solver)
    c = torch.zeros(S, table.coefs.shape[1] + history, dtype=torch.float64)
    c[:, : table.coefs.shape[1]] = table.coefs
    c[:, C_XT] = torch.from_numpy(cols[:, 0])
    c[:, C_X0] = torch.from_numpy(cols[:, 1])
    c[:, C_EPS] = 0.0
    c[:, table.coefs.shape[1] :] = torch.from_numpy(cols[:, 2:])
    c[:, SIGMA] = torch.tensor([solver.noise_scale(i) for i in range(S)], dtype=torch.float64)
    return replace(table, coefs=c, history=history)


def sample_multistep(make_solver, model, x, table: StepTable, noise, *, clip, callback=None):
    """The reference loop every multistep family shares: m_i = clip(x0(x_i)), x_{i+1} = solver(x_i, m, i) + noise."""
    solver = make_solver(table)
    c = table.coefs.to(x)
    scales = [solver.noise_scale(i) for i in range(table.num_steps)]
    ms = []
    for i, t in enumerate(table.timesteps.tolist()):
        eps, _ = model(x, t)
        ms.insert(0, clip(c[i, SRA] * x - c[i, SRM1] * eps))
        del ms[table.history + 1 :]  # what the updates read; older predictions are dropped
        x = solver(x, ms, i) + scales[i] * noise(i, t)
        if callback is not None:
            callback(i, t, x)
    return x


def multistep_family(name: str, make_solver, history: int, *, noise: bool = False, doc: str = ""):
    """(reference loop, table builder) of a multistep family whose step is `make_solver(table)`'s update.

    noise=True: the solver draws z at every step (diffusers' SDE order: a draw at each step, the last one
    multiplied by 0)."""

    def loop(model, x, table: StepTable, noise_fn, *, sigma, clip, callback=None) -> torch.Tensor:
        return sample_multistep(make_solver, model, x, table, noise_fn, clip=clip, callback=callback)

    def build(schedule, *, variance: str, eta: float = 0.0) -> StepTable:
        base = ddim_table(schedule, variance=variance)  # the x0 columns (SRA, SRM1) in run order
        table = multistep_table(base, make_solver(base), history)
        return replace(table, method=name, draws=(noise,) * table.num_steps)

    loop.__name__, loop.__qualname__, loop.__doc__ = f"sample_{name}", f"sample_{name}", doc
    build.__name__, build.__qualname__ = f"{name}_table", f"{name}_table"
    build.__doc__ = (
        "x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k m_{i-1-k} + SIGMA z: the update as table columns."
    )
    return loop, build


# ---------------------------------------------------------------------------------------------- multistep on eps


class EpsMultistep:
    """A linear multistep walk on eps in y = x / alpha, rho = sigma / alpha (the probability-flow ODE
    dy/drho = eps; one term is DDIM): y_{i+1} = y_i + sum_k b_{i,k} eps_{i-k}, eps_j the eps implied by step
    j's clipped x0 and x_j. `weights(i) -> [b_{i,0}, ...]` (newest first) comes from the subclass; the last
    step lands on abar = table.final_abar (1: x_0 itself)."""

    def __init__(self, table: StepTable):
        alpha, sigma, _ = walk(table.coefs)
        alpha[-1], sigma[-1] = math.sqrt(table.final_abar), math.sqrt(1.0 - table.final_abar)
        self.alpha, self.rho = alpha, [s / a for a, s in zip(alpha, sigma)]
        self.S = table.num_steps

    def weights(self, i: int) -> list[float]:
        raise NotImplementedError

    def step(self, x, es, i):
        """x_{i+1} from x_i and the eps of steps i, i-1, ... (newest first)."""
        y = x / self.alpha[i]
        for b, e in zip(self.weights(i), es):
            y = y + b * e
        return self.alpha[i + 1] * y


def eps_multistep_table(table: StepTable, solver: EpsMultistep, history: int) -> StepTable:
    """`table` (base columns filled) with the columns of `solver`'s steps: eps_i = (x_i - alpha_i m_i) / sigma_i
    gives C_XT = alpha_{i+1} (1 / alpha_i + b_0 / sigma_i), C_X0 = -alpha_{i+1} b_0 alpha_i / sigma_i, and the
    earlier eps_{i-k}, kept in the history (history_of = "eps"), H_{k-1} = alpha_{i+1} b_k."""
    S, W = table.num_steps, table.coefs.shape[1]
    c = torch.zeros(S, W + history, dtype=torch.float64)
    c[:, :W] = table.coefs
    c[:, C_EPS] = 0.0
    c[:, SIGMA] = 0.0
    for i in range(S):
        b = solver.weights(i)
        assert len(b) <= history + 1, f"step {i} reads eps older than history={history}"
        a, a_t = solver.alpha[i], solver.alpha[i + 1]
        s = solver.rho[i] * a
        c[i, C_XT] = a_t * (1.0 / a + b[0] / s)
        c[i, C_X0] = -a_t * b[0] * a / s
        for k in range(1, len(b)):
            c[i, W + k - 1] = a_t * b[k]
    return replace(table, coefs=c, history=history, history_of="eps")


def eps_multistep_family(name: str, make_solver, history: int, *, final_abar=None, doc: str = ""):
    """(reference loop, table builder) of a deterministic multistep-on-eps family (`EpsMultistep`);
    final_abar(schedule): the abar its last step lands on (default 1, x_0)."""

    def loop(model, x, table: StepTable, noise_fn, *, sigma, clip, callback=None) -> torch.Tensor:
        solver = make_solver(table)
        c = table.coefs.to(x)
        es = []
        for i, t in enumerate(table.timesteps.tolist()):
            eps, _ = model(x, t)
            x0 = clip(c[i, SRA] * x - c[i, SRM1] * eps)
            es.insert(0, (c[i, SRA] * x - x0) / c[i, SRM1])  # eps of the clipped x0 (= eps when unclipped)
            del es[history + 1 :]
            x = solver.step(x, es, i)
            if callback is not None:
                callback(i, t, x)
        return x

    def build(schedule, *, variance: str, eta: float = 0.0) -> StepTable:
        base = ddim_table(schedule, variance=variance)  # the x0 columns (SRA, SRM1) in run order
        if final_abar is not None:
            base = replace(base, final_abar=float(final_abar(schedule)))
        table = eps_multistep_table(base, make_solver(base), history)
        return replace(table, method=name, draws=(False,) * table.num_steps)

    loop.__name__, loop.__qualname__, loop.__doc__ = f"sample_{name}", f"sample_{name}", doc
    build.__name__, build.__qualname__ = f"{name}_table", f"{name}_table"
    build.__doc__ = "x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k eps_{i-1-k}: the update as table columns."
    return loop, build

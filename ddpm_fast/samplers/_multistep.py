"""What the multistep solvers share: the (alpha, sigma, lambda) walk of a table, the reference loops, and the
reduction of a solver's natural update to the fused step's columns. Each solver's update lives in its own file.

A table row i holds SRA = 1/alpha_i and SRM1 = sigma_i/alpha_i (alpha_i = sqrt(abar_i), sigma_i =
sqrt(1 - abar_i)); the walk ends at alpha = 1, sigma = 0 (diffusers' final sigma "zero"), where
lambda = log(alpha/sigma) is +inf and every update reduces to returning the last x0 prediction.

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
    "Solver",
    "sample_multistep",
    "multistep_table",
    "EpsMultistep",
    "sample_eps_multistep",
    "eps_multistep_table",
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


# ---------------------------------------------------------------------------------------------- multistep on x0


class Solver:
    """Per-run state of a multistep walk on x0 predictions: `solver(x, ms, i) -> x_{i+1}` (ms newest first) is
    the solver file's update; `noise_scale(i)` the scale of step i's z (0: an ODE solver)."""

    def __init__(self, table: StepTable):
        self.w = walk(table.coefs)
        self.S = table.num_steps

    def __call__(self, x, ms, i):
        raise NotImplementedError

    def noise_scale(self, i: int) -> float:
        return 0.0


def sample_multistep(solver: Solver, model, x, table: StepTable, noise, *, clip, callback=None):
    """The reference loop every multistep family shares: m_i = clip(x0(x_i)), x_{i+1} = solver(x_i, m, i) + noise."""
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


def multistep_table(schedule, make_solver, history: int, *, method: str, variance: str, noise: bool = False):
    """x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k m_{i-1-k} + SIGMA z: `make_solver(table)`'s update as table
    columns. noise=True: a draw at every step (diffusers' SDE order: the last one multiplied by 0)."""
    table = ddim_table(schedule, variance=variance)  # the x0 columns (SRA, SRM1) in run order
    solver = make_solver(table)
    S, W = table.num_steps, table.coefs.shape[1]
    cols = linear_columns(S, history, solver)
    c = torch.zeros(S, W + history, dtype=torch.float64)
    c[:, :W] = table.coefs
    c[:, C_XT] = torch.from_numpy(cols[:, 0])
    c[:, C_X0] = torch.from_numpy(cols[:, 1])
    c[:, C_EPS] = 0.0
    c[:, W:] = torch.from_numpy(cols[:, 2:])
    c[:, SIGMA] = torch.tensor([solver.noise_scale(i) for i in range(S)], dtype=torch.float64)
    return replace(table, coefs=c, history=history, method=method, draws=(noise,) * S)


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


def sample_eps_multistep(solver: EpsMultistep, model, x, table: StepTable, *, clip, callback=None):
    """The reference loop of the multistep-on-eps families: eps_i of the clipped x0, x_{i+1} = solver.step."""
    c = table.coefs.to(x)
    es = []
    for i, t in enumerate(table.timesteps.tolist()):
        eps, _ = model(x, t)
        x0 = clip(c[i, SRA] * x - c[i, SRM1] * eps)
        es.insert(0, (c[i, SRA] * x - x0) / c[i, SRM1])  # eps of the clipped x0 (= eps when unclipped)
        del es[table.history + 1 :]
        x = solver.step(x, es, i)
        if callback is not None:
            callback(i, t, x)
    return x


def eps_multistep_table(schedule, make_solver, history: int, *, method: str, variance: str, final_abar=None):
    """x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k eps_{i-1-k}: `make_solver(table)`'s steps as table columns
    (final_abar: the abar the last step lands on, default 1). eps_i = (x_i - alpha_i m_i) / sigma_i gives
    C_XT = alpha_{i+1} (1 / alpha_i + b_0 / sigma_i), C_X0 = -alpha_{i+1} b_0 alpha_i / sigma_i, and the
    earlier eps_{i-k}, kept in the history (history_of = "eps"), H_{k-1} = alpha_{i+1} b_k."""
    table = ddim_table(schedule, variance=variance)  # the x0 columns (SRA, SRM1) in run order
    if final_abar is not None:
        table = replace(table, final_abar=float(final_abar))
    solver = make_solver(table)
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
    return replace(table, coefs=c, history=history, history_of="eps", method=method, draws=(False,) * S)

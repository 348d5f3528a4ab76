"""Tuned step tables: a base method's per-step coefficients learned for one model, schedule and NFE.

A step table (`ddpm_fast.steps`) is linear in the run's state: x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k
m_{i-1-k}, m_i = SRA_i x_i - SRM1_i eps(x_i, t_i). This module owns learning those columns (C_XT, C_X0 and
the history weights) and the timesteps they sit at, by minimising the mean squared distance of the run's x_0
to a high-NFE teacher's x_0 from the same x_T over training noise: a coordinate search over the timesteps
alternates with a full-batch L-BFGS fit of the columns (torch autograd through the few model calls), with
validation on held-out noise and early stopping. The file a tuned
table lives in, and how a run finds it, is `ddpm_fast.tuned`.

No data set is used: the teacher is the same model walked with the base method at `teacher_steps` steps,
clip off (the probability-flow ODE the table approximates).
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ddpm_fast.checks import is_int
from ddpm_fast.defaults import defaults_of
from ddpm_fast.errors import BadValue
from ddpm_fast.samplers import build_step_table, family
from ddpm_fast.schedule import Schedule, spacing_timesteps
from ddpm_fast.steps import C_X0, C_XT, COLUMNS, SRA, SRM1, StepTable
from ddpm_fast.tuned import FORMAT, TunedTable, load_tuned, save_tuned, schedule_digest, tuned_digest_of

__all__ = ["tune", "TunedTable", "save_tuned", "load_tuned", "schedule_digest", "run_table", "FORMAT"]


def run_table(
    model, x: torch.Tensor, coefs: torch.Tensor, timesteps: torch.Tensor, history: int
) -> torch.Tensor:
    """x_0 of a deterministic table walked from x (clip off), differentiable in `coefs`: the steps.py formula
    with C_EPS = SIGMA = 0, which every multistep table and every tuned table satisfies."""
    ms = []
    B = x.shape[0]
    for i, t in enumerate(timesteps.tolist()):
        eps = model(x, torch.full((B,), t, dtype=torch.int64, device=x.device))
        eps = eps[:, : x.shape[1]]
        c = coefs[i]
        ms.insert(0, c[SRA] * x - c[SRM1] * eps)
        nxt = c[C_XT] * x + c[C_X0] * ms[0]
        for k in range(min(history, len(ms) - 1)):
            nxt = nxt + c[len(COLUMNS) + k] * ms[1 + k]
        del ms[history + 1 :]
        x = nxt
    return x


def _base_table(schedule: Schedule, base: str, nfe: int, variance: str, kept=None) -> StepTable:
    fam = family(base)
    if kept is None:
        kept = spacing_timesteps(schedule, nfe, fam.spacing)
    return build_step_table(schedule.respace(torch.tensor(kept)), method=base, variance=variance)


class _Columns:
    """The learned part of a table: per-step offsets `delta` to the base method's columns C_XT, C_X0 and its
    history weights at whatever timesteps are kept (a step may only read x0s that exist: history k needs
    step i > k). Moving a timestep keeps the offsets and takes the base's columns at the new timestep."""

    def __init__(self, schedule, base, variance, nfe):
        self.schedule, self.base, self.variance = schedule, base, variance
        self.H = _base_table(schedule, base, nfe, variance).history
        self.learn = [C_XT, C_X0] + [len(COLUMNS) + k for k in range(self.H)]
        self.mask = torch.zeros(nfe, len(self.learn), dtype=torch.float64)
        for i in range(nfe):
            self.mask[i, :2] = 1.0
            self.mask[i, 2 : 2 + min(self.H, i)] = 1.0

    def table(self, kept) -> StepTable:
        return _base_table(self.schedule, self.base, len(kept), self.variance, kept)

    def coefs(self, table: StepTable, delta: torch.Tensor) -> torch.Tensor:
        c = table.coefs.clone()
        c[:, self.learn] = table.coefs[:, self.learn] + delta * self.mask
        return c

    def rmse(self, model, kept, delta, x, y) -> float:
        t = self.table(kept)
        with torch.no_grad():
            return math.sqrt(
                float(((run_table(model, x, self.coefs(t, delta), t.timesteps, self.H) - y) ** 2).mean())
            )


def start_timesteps(cols: _Columns, model, kept, x, y) -> list[int]:
    """The base spacing's timesteps, or a better member of a small family seen on (x, y): t_i = t_min +
    (t_max - t_min) (1 - i / (n - 1))^p, which may start below T (the columns absorb x_T's scale) and crowd
    the steps towards t = 0 (p > 1). Returned ascending."""
    T, n = cols.schedule.num_timesteps, len(kept)
    zero = torch.zeros_like(cols.mask)
    best, best_v = list(kept), cols.rmse(model, kept, zero, x, y)
    if n < 2:
        return best
    for t_max in (T - 1, int(0.9 * T), int(0.8 * T), int(0.7 * T)):
        for t_min in (int(0.03 * T), int(0.08 * T), int(0.15 * T)):
            for p in (1.0, 1.5, 2.0, 3.0):
                ts = sorted({round(t_min + (t_max - t_min) * (1 - i / (n - 1)) ** p) for i in range(n)})
                if len(ts) < n:
                    continue
                v = cols.rmse(model, ts, zero, x, y)
                if v < best_v:
                    best, best_v = ts, v
    return best


def search_timesteps(cols: _Columns, model, kept, delta, x, y, rounds: int = 3) -> tuple[list[int], float]:
    """Coordinate search over the kept timesteps (ascending ints) with the columns' offsets `delta` held:
    move one at a time by +-d, d halving from a quarter of the gap to its neighbours, keep a move if the
    RMSE of the walk's x_0 to the teacher's `y` from `x` drops. Returns (kept, its RMSE)."""
    T = cols.schedule.num_timesteps
    kept = list(kept)
    best = cols.rmse(model, kept, delta, x, y)
    for _ in range(rounds):
        moved = False
        for j in reversed(range(len(kept))):  # the noisiest step first: it sets where the walk starts
            lo = kept[j - 1] + 1 if j > 0 else 0
            hi = kept[j + 1] - 1 if j + 1 < len(kept) else T - 1
            d = max(1, (hi - lo) // 4)
            while d >= 1:
                for cand in (kept[j] - d, kept[j] + d):
                    if lo <= cand <= hi:
                        trial = kept[:j] + [cand] + kept[j + 1 :]
                        v = cols.rmse(model, trial, delta, x, y)
                        if v < best:
                            kept, best, moved = trial, v, True
                d //= 2
        if not moved:
            break
    return kept, best


def fit_columns(cols: _Columns, model, kept, delta, train, val, *, iters: int, patience: int):
    """Full-batch L-BFGS on the offsets at fixed timesteps (a few dozen parameters, a smooth loss: quasi-
    Newton converges in tens of iterations where a stochastic first-order method needed hundreds), the
    validation RMSE read every 5 iterations and its best point kept; stops after `patience` iterations
    without a better one. Returns (delta, validation RMSE, iterations run)."""
    t = cols.table(kept)
    (xt, yt), (xv, yv) = train, val
    delta = delta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=5, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((run_table(model, xt, cols.coefs(t, delta), t.timesteps, cols.H) - yt) ** 2).mean()
        loss.backward()
        return loss

    best_v, best, bad, done = cols.rmse(model, kept, delta.detach(), xv, yv), delta.detach().clone(), 0, 0
    while done < iters and bad < patience:
        opt.step(closure)
        done += 5
        v = cols.rmse(model, kept, delta.detach(), xv, yv)
        if v < best_v:
            best_v, best, bad = v, delta.detach().clone(), 0
        else:
            bad += 5
    return best, best_v, done


def _check(model, base: str, nfe: int, schedule, counts: dict):
    """(family, schedule, image shape, variance) of a tuning request, or the one-line error of its first
    bad argument."""
    if not is_int(nfe) or nfe < 1:
        raise BadValue(f"nfe must be an int >= 1; got {nfe!r}")
    fam = family(base)
    if fam.params or fam.name in ("ddpm", "dpmpp_2m_sde"):
        raise BadValue(f"base must be a deterministic solver (ddim or a multistep ODE solver); got {base!r}")
    if nfe < fam.min_steps:
        raise BadValue(f"nfe must be >= {fam.min_steps} for base={base!r}; got {nfe}")
    if build_step_table(Schedule.linear(fam.min_steps), method=base).history_of != "x0":
        # run_table and the tuned file's header read the history as x0 predictions
        raise BadValue(f"base must keep x0 predictions in its history (not ipndm or deis); got {base!r}")
    for name, v in counts.items():
        if not is_int(v) or v < 1:
            raise BadValue(f"{name} must be an int >= 1; got {v!r}")
    d = defaults_of(model)
    schedule = schedule or d.schedule
    if schedule is None:
        raise BadValue("schedule must be given (the model carries none)")
    if d.image_shape is None:
        raise BadValue("model must carry its image shape (a checkpoint's sampling.image_shape)")
    return fam, schedule, d.image_shape, d.variance


def _teacher(model, schedule, base, variance, shape, *, train, val, teacher_steps, seed):
    """(float32 working copy of the model, (x_T, teacher x_0) of the training noise, the same of the
    validation noise): noise from torch.Generator(seed) and (seed + 1)."""
    gen_t, gen_v = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    # float32 model calls: the chain's float32 rounding (~1e-5) is far below the distances learned (~1e-1),
    # and a CPU runs them several times faster than float64; the tables and the optimiser stay float64
    xt_train = torch.randn((train, *shape), generator=gen_t, dtype=torch.float64).float()
    xt_val = torch.randn((val, *shape), generator=gen_v, dtype=torch.float64).float()
    if isinstance(model, torch.nn.Module):
        model = copy.deepcopy(model).to(torch.float32).eval().requires_grad_(False)
    teacher = _base_table(schedule, base, teacher_steps, variance)
    with torch.no_grad():
        y_train = run_table(model, xt_train, teacher.coefs, teacher.timesteps, teacher.history)
        y_val = run_table(model, xt_val, teacher.coefs, teacher.timesteps, teacher.history)
    return model, (xt_train, y_train), (xt_val, y_val)


def _rounds(cols: _Columns, model, plain, train, val, *, rounds, iters, patience, search, log, t0):
    """`rounds` alternations of a timestep search and a column fit from the base's timesteps `plain`:
    (RMSE before, RMSE after the start search, (best RMSE, its kept timesteps, its offsets), iterations)."""
    (xt_train, y_train), (xt_val, y_val) = train, val
    zero = torch.zeros_like(cols.mask)
    before = cols.rmse(model, plain, zero, xt_val, y_val)
    n = min(len(xt_train), 128)  # the searches see part of the training noise: each move is one no-grad walk
    kept = start_timesteps(cols, model, plain, xt_train[:n], y_train[:n]) if search else list(plain)
    best = (cols.rmse(model, kept, zero, xt_val, y_val), kept, zero)
    if best[0] > before:  # the starting timesteps do not carry over to held-out noise: keep the base's
        best = (before, list(plain), zero)
    searched, delta, it = best[0], zero, 0
    for r in range(rounds):
        if search:
            kept, _ = search_timesteps(cols, model, kept, delta, xt_train[:n], y_train[:n])
        delta, v, k = fit_columns(cols, model, kept, delta, train, val, iters=iters, patience=patience)
        it += k
        log(f"round {r + 1}: timesteps {kept[::-1]}, held-out RMSE {v:.4f}, {time.perf_counter() - t0:.1f} s")
        if v < best[0]:
            best = (v, list(kept), delta)
        if not search:
            break
    return before, searched, best, it


def tune(
    model,
    *,
    base: str = "unipc",
    nfe: int = 5,
    schedule: Schedule | None = None,
    train: int = 256,
    val: int = 256,
    teacher_steps: int = 100,
    iters: int = 40,
    rounds: int = 2,
    patience: int = 15,
    search: bool = True,
    seed: int = 1_000_003,
    out=None,
    log=print,
) -> TunedTable:
    """Learn the timesteps and columns of `base`'s table at `nfe` steps for `model` (see the module
    docstring): `rounds` alternations of a timestep search and an L-BFGS fit of the columns (at most `iters`
    iterations each). Noise comes from torch.Generator(seed) (training) and (seed + 1) (validation), seeds
    the benchmarks do not use."""
    counts = dict(train=train, val=val, iters=iters, teacher_steps=teacher_steps, rounds=rounds)
    fam, schedule, shape, variance = _check(model, base, nfe, schedule, counts)
    t0 = time.perf_counter()
    digest = tuned_digest_of(model)  # of the model as given, before the working copy
    model, train_set, val_set = _teacher(
        model, schedule, base, variance, shape, train=train, val=val, teacher_steps=teacher_steps, seed=seed
    )
    log(
        f"teacher: {teacher_steps} steps of {base} on {train} + {val} noise draws, {time.perf_counter() - t0:.1f} s"
    )
    cols = _Columns(schedule, base, variance, nfe)
    plain = spacing_timesteps(schedule, nfe, fam.spacing)
    before, searched, (best_v, kept, best_delta), it = _rounds(
        cols, model, plain, train_set, val_set,
        rounds=rounds, iters=iters, patience=patience, search=search, log=log, t0=t0,
    )  # fmt: skip
    start = cols.table(kept)
    took = time.perf_counter() - t0
    info = {
        "rmse_before": before,
        "rmse_searched": searched,
        "rmse_after": best_v,
        "timesteps": [int(t) for t in start.timesteps],
        "seconds": took,
        "iters": it,
        "rounds": rounds,
        "teacher": teacher_steps,
    }
    log(
        f"tuned {base} at {nfe} NFE: held-out RMSE to the {teacher_steps}-step teacher {before:.4f} -> "
        f"{best_v:.4f} ({best_v / before:.2f}x) in {took:.1f} s"
    )
    table = StepTable(
        coefs=cols.coefs(start, best_delta).detach(),
        timesteps=start.timesteps.clone(),
        method="tuned",
        variance=variance,
        eta=0.0,
        history=cols.H,
        draws=(False,) * nfe,
    )
    tuned = TunedTable(table, model=digest, schedule=schedule_digest(schedule), base=base, nfe=nfe, info=info)
    if out is not None:
        save_tuned(tuned, out)
    return tuned

"""Tuned step tables: a base method's per-step coefficients learned for one model, schedule and NFE.

A step table (`ddpm_fast.steps`) is linear in the run's state: x_{i+1} = C_XT x_i + C_X0 m_i + sum_k H_k
m_{i-1-k}, m_i = SRA_i x_i - SRM1_i eps(x_i, t_i). This module owns learning those columns (C_XT, C_X0 and
the history weights, after a coordinate search over the base method's timesteps) by minimising the mean squared
distance of the run's x_0 to a high-NFE teacher's x_0 from the same x_T (torch autograd through the few
model calls), over training noise, with validation on held-out noise and early stopping. The file a tuned
table lives in, and how a run finds it, is `ddpm_fast.tuned`.

No data set is used: the teacher is the same model walked with the base method at `teacher_steps` steps,
clip off (the probability-flow ODE the table approximates).
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ddpm_fast.defaults import defaults_of
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


def search_timesteps(model, schedule, base, variance, kept, x, y, rounds: int = 3) -> tuple[list[int], float]:
    """Coordinate search over the base method's kept timesteps (ascending ints): move one at a time by
    +-d, d halving from a quarter of the gap to its neighbours, keep a move if the mean squared distance of
    the walk's x_0 to the teacher's `y` from `x` drops. Returns (kept, its RMSE)."""
    T = schedule.num_timesteps

    def loss(k):
        t = _base_table(schedule, base, len(k), variance, k)
        with torch.no_grad():
            return float(((run_table(model, x, t.coefs, t.timesteps, t.history) - y) ** 2).mean())

    kept = list(kept)
    best = loss(kept)
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
                        v = loss(trial)
                        if v < best:
                            kept, best, moved = trial, v, True
                d //= 2
        if not moved:
            break
    return kept, math.sqrt(best)


def tune(
    model,
    *,
    base: str = "unipc",
    nfe: int = 5,
    schedule: Schedule | None = None,
    train: int = 128,
    val: int = 64,
    teacher_steps: int = 100,
    iters: int = 200,
    lr: float = 2e-3,
    patience: int = 30,
    search: bool = True,
    seed: int = 1_000_003,
    out=None,
    log=print,
) -> TunedTable:
    """Learn the columns of `base`'s table at `nfe` steps for `model` (see the module docstring); noise comes
    from torch.Generator(seed) (training) and (seed + 1) (validation), seeds the benchmarks do not use."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1; got {nfe!r}")
    fam = family(base)
    if fam.params or fam.name in ("ddpm", "dpmpp_2m_sde"):
        raise ValueError(
            f"base must be a deterministic solver (ddim or a multistep ODE solver); got {base!r}"
        )
    if nfe < fam.min_steps:
        raise ValueError(f"nfe must be >= {fam.min_steps} for base={base!r}; got {nfe}")
    if build_step_table(Schedule.linear(fam.min_steps), method=base).history_of != "x0":
        # run_table and the tuned file's header read the history as x0 predictions
        raise ValueError(f"base must keep x0 predictions in its history (not ipndm or deis); got {base!r}")
    for name, v in (("train", train), ("val", val), ("iters", iters), ("teacher_steps", teacher_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    d = defaults_of(model)
    schedule = schedule or d.schedule
    if schedule is None:
        raise ValueError("schedule must be given (the model carries none)")
    shape = d.image_shape
    if shape is None:
        raise ValueError("model must carry its image shape (a checkpoint's sampling.image_shape)")
    variance = d.variance
    t0 = time.perf_counter()
    gen_t, gen_v = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    # float32 model calls: the chain's float32 rounding (~1e-5) is far below the distances learned (~1e-1),
    # and a CPU runs them several times faster than float64; the tables and the optimiser stay float64
    xt_train = torch.randn((train, *shape), generator=gen_t, dtype=torch.float64).float()
    xt_val = torch.randn((val, *shape), generator=gen_v, dtype=torch.float64).float()
    digest = tuned_digest_of(model)  # of the model as given, before the working copy
    if isinstance(model, torch.nn.Module):
        model = copy.deepcopy(model).to(torch.float32).eval().requires_grad_(False)
    teacher = _base_table(schedule, base, teacher_steps, variance)
    with torch.no_grad():
        y_train = run_table(model, xt_train, teacher.coefs, teacher.timesteps, teacher.history)
        y_val = run_table(model, xt_val, teacher.coefs, teacher.timesteps, teacher.history)
    log(
        f"teacher: {teacher_steps} steps of {base} on {train} + {val} noise draws, {time.perf_counter() - t0:.1f} s"
    )
    kept = spacing_timesteps(schedule, nfe, fam.spacing)
    if search:  # the timesteps first (on part of the training noise), then the columns at them
        n = min(train, 64)
        kept, _ = search_timesteps(model, schedule, base, variance, kept, xt_train[:n], y_train[:n])
        log(f"timesteps {kept} after the search, {time.perf_counter() - t0:.1f} s")
    start = _base_table(schedule, base, nfe, variance, kept)
    H = start.history
    learn = [C_XT, C_X0] + [len(COLUMNS) + k for k in range(H)]
    c0 = start.coefs.clone()
    delta = torch.zeros(nfe, len(learn), dtype=torch.float64, requires_grad=True)
    mask = torch.zeros_like(delta)
    for i in range(nfe):  # a step may only read x0s that exist: history k needs i > k
        mask[i, :2] = 1.0
        mask[i, 2 : 2 + min(H, i)] = 1.0

    def coefs_of(dlt):
        c = c0.clone()
        c[:, learn] = c0[:, learn] + dlt * mask
        return c

    def rmse(c, x, y, timesteps=None):
        ts = start.timesteps if timesteps is None else timesteps
        return math.sqrt(float(((run_table(model, x, c, ts, H) - y) ** 2).mean()))

    plain = _base_table(schedule, base, nfe, variance)
    with torch.no_grad():
        before = rmse(plain.coefs, xt_val, y_val, plain.timesteps)
        searched = rmse(c0, xt_val, y_val)
    if searched > before:  # the searched timesteps do not carry over to held-out noise: keep the base's
        start, c0, searched = plain, plain.coefs.clone(), before
    opt = torch.optim.Adam([delta], lr=lr)
    best, best_delta, bad = searched, delta.detach().clone(), 0
    batch = min(train, 64)
    for it in range(iters):
        idx = torch.randint(0, train, (batch,), generator=gen_t)
        loss = (
            (run_table(model, xt_train[idx], coefs_of(delta), start.timesteps, H) - y_train[idx]) ** 2
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 5 == 4 or it == iters - 1:
            with torch.no_grad():
                v = rmse(coefs_of(delta), xt_val, y_val)
            if v < best:
                best, best_delta, bad = v, delta.detach().clone(), 0
            else:
                bad += 5
                if bad >= patience:
                    break
    coefs = coefs_of(best_delta).detach()
    took = time.perf_counter() - t0
    info = {
        "rmse_before": before,
        "rmse_searched": searched,
        "rmse_after": best,
        "timesteps": [int(t) for t in start.timesteps],
        "seconds": took,
        "iters": it + 1,
        "teacher": teacher_steps,
    }
    log(
        f"tuned {base} at {nfe} NFE: held-out RMSE to the {teacher_steps}-step teacher {before:.4f} -> "
        f"{best:.4f} ({best / before:.2f}x) in {took:.1f} s"
    )
    table = StepTable(
        coefs=coefs,
        timesteps=start.timesteps.clone(),
        method="tuned",
        variance=variance,
        eta=0.0,
        history=H,
        draws=(False,) * nfe,
    )
    tuned = TunedTable(table, model=digest, schedule=schedule_digest(schedule), base=base, nfe=nfe, info=info)
    if out is not None:
        save_tuned(tuned, out)
    return tuned

"""The sampler registry: method name -> its family (reference loop, coefficient-table builder, what it takes).

A family file holds its update written out, a short reference loop in k-diffusion's style,

    loop(model, x, table, noise, *, sigma, clip, callback=None) -> x_0

over `model(x, t) -> (eps, v)` (v the variance half or None), the run's `StepTable`, `noise(i, t) -> z`
(zeros where the table's `draws` says no draw: which steps draw noise is recorded there, per step, by each
table builder), `sigma(row, v)` and `clip(x0)` (both chosen before the loop),
and its table builder `table(schedule, *, variance, eta) -> StepTable`. The fused kernel, its torch twin and
the ONNX step graph read only the table, so they serve every family whose `history` they support.
How many earlier predictions a step reads is the family file's `HISTORY`, written once: the registry and
the table builder (`StepTable.history`) read it. Adding a sampler is one file in this package plus one line
in `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.samplers import deis, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, ipndm, unipc
from ddpm_fast.samplers.ddim import ddim_table, sample_ddim
from ddpm_fast.samplers.ddpm import ddpm_table, sample_ddpm
from ddpm_fast.samplers.tuned import sample_tuned, tuned_table
from ddpm_fast.schedule import SPACINGS, Schedule
from ddpm_fast.steps import VARIANCES, StepTable

__all__ = ["Family", "FAMILIES", "METHODS", "family", "taking", "build_step_table", "check_params"]


@dataclass(frozen=True)
class Family:
    """One sampler family: its reference loop, its table builder and what a request may set for it."""

    name: str
    loop: Callable
    table: Callable
    history: int = 0  # x0 (or eps) predictions of earlier steps a step reads: the family file's HISTORY
    params: tuple[str, ...] = ()  # keyword arguments besides variance that the method takes, e.g. ("eta",)
    spacing: str = "uniform"  # the default rule for steps=N (ddpm_fast.schedule.spacing_timesteps)
    spacings: tuple[str, ...] = ("uniform",)
    # None: history + 1 (a multistep solver of order k reads k - 1 earlier steps and needs k steps)
    min_steps: int | None = None

    def __post_init__(self):
        if self.min_steps is None:
            object.__setattr__(self, "min_steps", self.history + 1)


def _solver(name: str, loop: Callable, table: Callable, history: int, **kw) -> Family:
    """A solver family. steps=N defaults to diffusers' "linspace", so steps=N walks the timesteps diffusers'
    scheduler.set_timesteps(N) gives (ddpm/ddim keep improved-diffusion's uniform spacing)."""
    return Family(name, loop, table, history, spacing="linspace", spacings=SPACINGS, **kw)


FAMILIES: dict[str, Family] = {
    "ddpm": Family("ddpm", sample_ddpm, ddpm_table),
    "ddim": Family("ddim", sample_ddim, ddim_table, params=("eta",)),
    "dpmpp_2m": _solver("dpmpp_2m", dpmpp_2m.sample_dpmpp_2m, dpmpp_2m.dpmpp_2m_table, dpmpp_2m.HISTORY),
    "dpmpp_3m": _solver("dpmpp_3m", dpmpp_3m.sample_dpmpp_3m, dpmpp_3m.dpmpp_3m_table, dpmpp_3m.HISTORY),
    "dpmpp_2m_sde": _solver(
        "dpmpp_2m_sde",
        dpmpp_2m_sde.sample_dpmpp_2m_sde,
        dpmpp_2m_sde.dpmpp_2m_sde_table,
        dpmpp_2m_sde.HISTORY,
    ),
    "unipc": _solver(
        "unipc", unipc.sample_unipc, unipc.unipc_table, unipc.HISTORY, min_steps=unipc.MIN_STEPS
    ),
    "ipndm": _solver("ipndm", ipndm.sample_ipndm, ipndm.ipndm_table, ipndm.HISTORY),
    # DEIS as two names, like dpmpp_2m/dpmpp_3m: an order is a different table and history width, and a
    # request's params are the sampling knobs every backend reads (eta), which an order is not
    "deis": _solver("deis", deis.sample_deis, deis.deis_table, deis.HISTORY),
    "deis_2": _solver("deis_2", deis.sample_deis_2, deis.deis_2_table, deis.HISTORY_2),
    "tuned": Family("tuned", sample_tuned, tuned_table),  # history: the table's own (StepTable.history)
}
METHODS = tuple(FAMILIES)


def family(method) -> Family:
    """The registered family of `method`; an unknown name is a ValueError listing the known ones."""
    if method not in FAMILIES:
        raise BadValue(f"method must be one of {METHODS}; got {method!r}")
    return FAMILIES[method]


def check_params(method: str, *, eta: float) -> None:
    """Reject a parameter the method does not take (errors name it)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise BadType(f"eta must be a float; got {eta!r}")
    if (
        not 0 <= eta <= 1
    ):  # DDIM's eta: 0 deterministic, 1 DDPM's posterior variance; above 1 no variance is left
        raise BadValue(f"eta must lie in [0, 1]; got {eta}")
    if eta != 0 and "eta" not in family(method).params:
        raise BadValue(
            f"eta applies to method={' or '.join(map(repr, taking('eta')))} only; got eta={eta} with method={method!r}"
        )


def taking(param: str) -> list[str]:
    """The methods whose families take `param` (e.g. "eta")."""
    return [m for m, f in FAMILIES.items() if param in f.params]


def build_step_table(
    schedule: Schedule, *, method: str = "ddpm", variance: str = "fixed_small", eta: float = 0.0
) -> StepTable:
    """The coefficient table for walking `schedule` (already respaced if wanted) from its last index to 0."""
    fam = family(method)
    if variance not in VARIANCES:
        raise BadValue(f"variance must be one of {VARIANCES}; got {variance!r}")
    check_params(method, eta=eta)
    if schedule.num_timesteps < fam.min_steps:
        raise BadValue(
            f"steps must be >= {fam.min_steps} for method={method!r} (a multistep solver of that order); "
            f"got {schedule.num_timesteps}"
        )
    return fam.table(schedule, variance=variance, eta=float(eta))

"""Classifier guidance, ADM-G (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", section 4, Algorithms 1-2).

    df.sample(model, ..., labels=y, guidance=df.ClassifierGuidance(classifier, scale))

`classifier(x_t, t) -> logits [B, K]` (t: the model's int64 timesteps [B]) is a noisy classifier, e.g.
guided-diffusion's (`ddpm_fast.adm.ADMClassifier`, `df.load_classifier`). Every step takes guided-diffusion's
cond_fn, with autograd in x's dtype,

    g = s * grad_x log softmax(classifier(x_t, t))[y],

and moves the step's clipped x0 prediction by it, in guided-diffusion's order (clip first, then the shift,
never clipped again); the eps a family reads is the one of the moved x0:

    x0  = clip(SRA x_t - SRM1 eps)
    x0' = x0 + K_t g
    eps' = (x_t - sqrt(abar) x0') / sqrt(1 - abar)   = eps + (SRA x_t - SRM1 eps - x0') / SRM1

  method ddpm (Algorithm 1, guided-diffusion's condition_mean): K_t = Sigma_t / C_X0, so the posterior mean
    C_X0 x0' + C_XT x_t is p_mean_variance's mean (after its clip) plus Sigma_t g. Sigma_t is the variance
    p_mean_variance returns: fixed_small beta-tilde_t (the table's SIGMA^2; 0 at the last step), fixed_large
    beta_t (SIGMA^2; beta-tilde_1 at the last step, their FIXED_LARGE), learned_range exp(f MAX_LOG +
    (1 - f) MIN_LOG), f = (v + 1) / 2, at every step (the last step draws no noise but its mean still moves).
  every other method (Algorithm 2, eq. 14, condition_score): K_t = (1 - abar) / sqrt(abar), i.e.
    eps' = eps_c - sqrt(1 - abar) g with eps_c the eps of the clipped x0, as guided-diffusion's DDIM does.

With clip off (or where it does not bind) eps_c = eps and eps' = eps - sqrt(1 - abar) g exactly as eq. 14.
Where it binds, the shift survives: shifting eps first and clipping the shifted x0 (diffusers' order for a
modified eps) truncates the x0 term of a DDIM step while its eps term still carries -sqrt(1 - abar_prev)
sqrt(1 - abar) g, which turns the guidance away from the class. Scale 0 gives the unguided run exactly for
ddpm and the solvers, which read only x0 (x0' = x0 + 0); for ddim it does wherever the clip does not bind,
and where it binds the guided ddim reads eps_c, as guided-diffusion's ddim does at any scale (our unguided
ddim reads the model's eps, diffusers' order).

No sampler family knows of guidance. The reference backend hands the family `reference(model, clip)`: the
guided model returns eps' and the clip the family calls on x0(eps') returns x0' as computed above. The fast
backend's fused update reads one model output and clips inside, so it runs with its clip off and `output`
hands it the guided prediction. A table that reads no eps (C_EPS = 0: ddpm and every solver) gets x0' itself,
and the update runs the table of `update_coefs` (SRA = 0, SRM1 = -1), whose x0 = 0 x - (-1) x0' is x0' exactly,
the value the reference uses. Recovering x0' from eps' instead (SRA x - SRM1 eps') would round eps' at
|eps'| and multiply that by SRM1 (about 157 at the first steps of a 1000-step linear schedule) and round again
at |SRA x|: a few float32 ulps of |SRA x| per step, which the reference does not have. ddim reads eps (C_EPS != 0)
and gets eps', with that rounding (exact where eps' = eps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm_fast.checks import is_int
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.steps import C_EPS, C_X0, MAX_LOG, MIN_LOG, SIGMA, SRA, SRM1, StepTable

__all__ = [
    "ClassifierGuidance",
    "Guide",
    "bind",
    "classifier_grad",
    "guidance_columns",
    "MEAN_FORM",
    "G_COLUMNS",
]

MEAN_FORM = ("ddpm",)  # methods guided through the posterior mean (Algorithm 1); every other one through eps
G_COLUMNS = ("G_SHIFT", "G_INV_C_X0")  # K_t of a fixed variance; 1 / C_X0 (ddpm with a learned variance)
G_SHIFT, G_INV_C_X0 = range(len(G_COLUMNS))


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance of scale `scale` by `classifier(x_t, t) -> logits [B, K]` (module docstring).

    num_classes: K, for labels="random" with an unconditional model and for checking labels before the run;
    left out, the classifier's own `num_classes` attribute (ADMClassifier has one), else unknown."""

    classifier: Callable
    scale: float = 1.0
    num_classes: int | None = None

    def __post_init__(self):
        if not callable(self.classifier):
            raise BadType(
                f"guidance's classifier must be callable as classifier(x_t, t) -> logits [B, K]; "
                f"got {type(self.classifier).__name__}"
            )
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise BadValue(f"guidance's scale must be a finite number; got {s!r}")
        object.__setattr__(self, "scale", float(s))
        k = self.num_classes
        if k is None:
            k = getattr(self.classifier, "num_classes", None)
        if k is not None and (not is_int(k) or k < 1):
            raise BadValue(f"guidance's num_classes must be a positive int; got {k!r}")
        object.__setattr__(self, "num_classes", k)


def classifier_grad(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float, check=True):
    """s * grad_x log softmax(classifier(x, t))[y], in x's dtype (guided-diffusion's cond_fn).

    check: validate the logits and labels (a host sync; the fast backend checks a run's first step only)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        if check:
            _check_logits(logits, x.shape[0], y)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        (g,) = torch.autograd.grad(logp.gather(1, y.reshape(-1, 1)).sum(), x_in)
    return g * scale


def _check_logits(logits, batch: int, y: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise BadType(
            f"guidance's classifier must return logits [B, K] as a tensor; got {type(logits).__name__}"
        )
    if logits.ndim != 2 or logits.shape[0] != batch or not logits.is_floating_point():
        raise BadValue(
            f"guidance's classifier must return float logits of shape [{batch}, K]; got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    K = logits.shape[1]
    if ((y < 0) | (y >= K)).any():
        raise BadValue(f"labels must lie in [0, {K}) (the guidance classifier's classes); got {y.tolist()}")
    if not torch.isfinite(logits).all():
        raise BadValue("guidance's classifier returned NaN or Inf logits")


def guidance_columns(table: StepTable, form: str) -> torch.Tensor:
    """float64 [S, 2] in run order: G_SHIFT = K_t (module docstring) where it is a number, G_INV_C_X0 = 1 / C_X0
    where K_t = Sigma_t(v) / C_X0 needs the model's variance half (ddpm with learned_range)."""
    c = table.coefs
    g = torch.zeros(table.num_steps, len(G_COLUMNS), dtype=torch.float64)
    if form == "eps":
        g[:, G_SHIFT] = c[:, SRM1] ** 2 / c[:, SRA]  # (1/abar - 1) sqrt(abar) = (1 - abar) / sqrt(abar)
        return g
    if table.learned:
        g[:, G_INV_C_X0] = 1.0 / c[:, C_X0]
        return g
    var = c[:, SIGMA] ** 2
    if table.variance == "fixed_large":  # their FIXED_LARGE: beta-tilde_1 (exp(MIN_LOG) there) at t = 0
        var[-1] = c[-1, MIN_LOG].exp()
    g[:, G_SHIFT] = var / c[:, C_X0]
    return g


@dataclass(frozen=True)
class Guide:
    """ClassifierGuidance bound to one run (`bind`, called by make_plan): its per-step columns."""

    classifier: Callable
    scale: float
    coefs: torch.Tensor  # the run's StepTable coefs, float64 [S, 8 + history]
    columns: torch.Tensor  # float64 [S, 2], run order (guidance_columns)
    learned: bool  # K_t from the model's variance half (ddpm with learned_range)
    clip_range: float | None  # the run's clip, which the guidance applies (before its shift)
    timesteps: tuple[int, ...]  # each step's model timestep: the reference finds a step's row by it
    x0_out: bool  # the table reads no eps (C_EPS = 0 at every step): `output` hands the update x0' itself

    def grad(self, x, t, y, check=True) -> torch.Tensor:
        return classifier_grad(self.classifier, x, t, y, self.scale, check)

    def guided(self, x, eps, v, g, col, gcol) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps', x0') of the module docstring; col(k) / gcol(k) read the step's table / guidance column k."""
        x0 = col(SRA) * x - col(SRM1) * eps
        x0c = x0 if self.clip_range is None else x0.clamp(-self.clip_range, self.clip_range)
        if self.learned:
            f = (v + 1) / 2
            k = gcol(G_INV_C_X0) * torch.exp(f * col(MAX_LOG) + (1 - f) * col(MIN_LOG))
        else:
            k = gcol(G_SHIFT)
        x0g = x0c + k * g
        return eps + (x0 - x0g) / col(SRM1), x0g

    def reference(self, model, labels: torch.Tensor):
        """(model, clip) for a family's reference loop: model(x, t) -> (eps', v), and the clip the family calls
        on x0(eps') right after each model call, which returns that call's x0' (computed from the model's eps)."""
        rows = {t: i for i, t in enumerate(self.timesteps)}
        pending = []

        def guided_model(x, t: int):
            eps, v = model(x, t)
            i = rows[t]
            c, gc = self.coefs[i].to(x), self.columns[i].to(x)
            tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
            g = self.grad(x, tt, labels).to(x.dtype)
            eps, x0 = self.guided(x, eps, v, g, c.__getitem__, gc.__getitem__)
            pending.append(x0)
            return eps, v

        return guided_model, lambda x0: pending.pop()

    def output(self, x, t, out, y, coefs, gcoefs, step, check=True) -> torch.Tensor:
        """The fast backend's guided model output (eps', and v unchanged) for a fused update run with its clip
        off: x float32 [B, C, H, W], out the model output, coefs / gcoefs the run's tables on the device, step
        the device step counter."""
        C = x.shape[1]
        row = coefs.index_select(0, step)  # [1, columns]: no host sync
        grow = gcoefs.index_select(0, step)

        def col(k):
            return row[:, k].reshape(1, 1, 1, 1)

        def gcol(k):
            return grow[:, k].reshape(1, 1, 1, 1)

        eps, rest = out[:, :C].float(), out[:, C:].float()  # rest: a learned_range model's v (or nothing)
        g = self.grad(x, t, y, check).float()
        eps, x0g = self.guided(x, eps, rest if self.learned else None, g, col, gcol)
        first = x0g if self.x0_out else eps
        return torch.cat([first, rest], dim=1) if rest.shape[1] else first

    def update_coefs(self, coefs: torch.Tensor) -> torch.Tensor:
        """The table the fused update runs beside `output`: with x0_out, SRA = 0 and SRM1 = -1, so that the
        update's x0 = SRA x - SRM1 out is x0' exactly; else the run's table."""
        if not self.x0_out:
            return coefs
        coefs = coefs.clone()
        coefs[:, SRA] = 0.0
        coefs[:, SRM1] = -1.0
        return coefs


def bind(guidance: ClassifierGuidance, table: StepTable, clip_range: float | None) -> Guide:
    """The run's Guide: the form of `table.method` and its guidance columns."""
    form = "mean" if table.method in MEAN_FORM else "eps"
    return Guide(
        classifier=guidance.classifier,
        scale=guidance.scale,
        coefs=table.coefs,
        columns=guidance_columns(table, form),
        learned=table.learned,
        clip_range=clip_range,
        timesteps=tuple(table.timesteps.tolist()),
        x0_out=bool((table.coefs[:, C_EPS] == 0).all()),
    )

"""`sample`: one entry point for every backend, and the reference samplers that are the oracle.

The reference backend is the seed's equations written out in eager PyTorch, in the caller's dtype,
one small function per method. Fast backends receive a validated `Plan` and a `StepTable`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddpm_fast import noise
from ddpm_fast.errors import Unavailable
from ddpm_fast.schedule import Schedule, check_timesteps, spaced_timesteps
from ddpm_fast.steps import METHODS, VARIANCES, StepTable, build_step_table

__all__ = [
    "sample",
    "Plan",
    "make_plan",
    "choose_auto",
    "ddpm_reference",
    "ddim_reference",
    "check_model_output",
]

log = logging.getLogger("ddpm_fast")

BACKENDS = ("auto", "reference", "fast", "onnx")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Plan:
    """A validated sampling request: what every backend needs besides the model."""

    shape: tuple[int, int, int, int]
    schedule: Schedule  # respaced to the kept timesteps
    table: StepTable
    method: str
    eta: float
    variance: str
    clip: bool
    clip_range: float
    seed: int
    start_index: int
    device: torch.device
    dtype: torch.dtype
    progress: bool = False
    callback: Callable | None = None
    options: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return self.shape[1] * (2 if self.variance == "learned_range" else 1)


def _model_defaults(model) -> dict:
    """Sampling defaults a loaded checkpoint carries (`model.sampling`), if any."""
    d = getattr(model, "sampling", None)
    return dict(d) if isinstance(d, dict) else {}


def make_plan(
    model,
    schedule: Schedule | None,
    shape,
    *,
    steps=None,
    timesteps=None,
    method: str = "ddpm",
    eta: float = 0.0,
    variance: str | None = None,
    clip: bool | None = None,
    clip_range: float | None = None,
    seed: int = 0,
    start_index: int = 0,
    device=None,
    dtype=torch.float32,
    progress: bool = False,
    callback=None,
    options: dict | None = None,
) -> Plan:
    """Validate arguments (errors name the argument) and build the run's respaced schedule and step table."""
    defaults = _model_defaults(model)
    if schedule is None:
        schedule = getattr(model, "schedule", None)
        if schedule is None:
            raise ValueError("schedule must be given (the model carries none)")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a ddpm_fast.Schedule; got {type(schedule).__name__}")
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as e:
        raise TypeError(f"shape must be a sequence of 4 ints (B, C, H, W); got {shape!r}") from e
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be 4-D (B, C, H, W) with positive sizes; got {shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if variance is None:
        variance = defaults.get("variance", "fixed_small")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    if clip is None:
        clip = bool(defaults.get("clip", True))
    if clip_range is None:
        clip_range = float(defaults.get("clip_range", 1.0))
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool; got {clip!r}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be positive; got {clip_range}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float; got {eta!r}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    if method == "ddpm" and eta != 0:
        raise ValueError(f"eta applies to method='ddim' only; got eta={eta} with method='ddpm'")
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}; got {dtype!r}")
    noise.check_seed(seed)
    if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
        raise ValueError(f"start_index must be an int >= 0; got {start_index!r}")
    T = schedule.num_timesteps
    if timesteps is not None:
        kept = check_timesteps(timesteps, T)
    elif steps is not None:
        kept = torch.tensor(spaced_timesteps(T, steps))
    else:
        kept = None
    run_schedule = schedule if kept is None or kept.numel() == T else schedule.respace(kept)
    table = build_step_table(run_schedule, method=method, variance=variance, eta=eta)
    if device is None:
        device = _model_device(model)
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"device must name a torch device; got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"device {device} was asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:  # a CUDA tensor's device always has an index
        device = torch.device("cuda", torch.cuda.current_device())
    return Plan(
        shape=shape,
        schedule=run_schedule,
        table=table,
        method=method,
        eta=float(eta),
        variance=variance,
        clip=clip,
        clip_range=clip_range,
        seed=seed,
        start_index=start_index,
        device=device,
        dtype=dtype,
        progress=progress,
        callback=callback,
        options=dict(options or {}),
    )


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def sample(
    model,
    schedule: Schedule | None = None,
    shape=None,
    *,
    steps=None,
    timesteps=None,
    method: str = "ddpm",
    eta: float = 0.0,
    variance: str | None = None,
    clip: bool | None = None,
    seed: int = 0,
    start_index: int = 0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    device=None,
    dtype=torch.float32,
    progress: bool = False,
    callback: Callable | None = None,
    **options,
) -> torch.Tensor:
    """Run the reverse chain x_T ~ N(0, I) -> x_0; returns a float tensor [B, C, H, W] in model space [-1, 1].

    `model(x, t) -> eps` ([B, 2C, H, W] for variance="learned_range"), t int64 [B], 0-based.
    `variance` and `clip` default to what a loaded checkpoint says, else "fixed_small" and True; `schedule`
    defaults to the checkpoint's. Noise is counter-based (`seed`, `start_index`: row i is global sample
    start_index + i) unless a `generator` is given (reference backend only: diffusers' DDPMPipeline order).
    `callback(i, t, x)` is called after each step with the new x. Extra keyword `options` go to the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if shape is None:
        raise ValueError("shape must be given as (B, C, H, W)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if backend not in ("auto", "reference"):
            raise ValueError(
                f"generator works with backend='reference' only (diffusers-order noise); got backend={backend!r}. "
                "Use seed= for counter-based noise on other backends."
            )
        backend = "reference"
    if backend in ("auto", "onnx") and (
        isinstance(model, (str, os.PathLike)) or type(model).__name__ == "InferenceSession"
    ):
        from ddpm_fast.export.runtime import as_onnx_model  # the file's metadata supplies the defaults

        model = as_onnx_model(model)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t); got {type(model).__name__}")
    plan = make_plan(
        model,
        schedule,
        shape,
        steps=steps,
        timesteps=timesteps,
        method=method,
        eta=eta,
        variance=variance,
        clip=clip,
        seed=seed,
        start_index=start_index,
        device=device,
        dtype=dtype,
        progress=progress,
        callback=callback,
        options=options,
    )
    if backend == "auto":
        backend = choose_auto(model, plan)
    if backend == "reference":
        if options:
            raise TypeError(f"backend='reference' takes no extra options; got {sorted(options)}")
        return sample_reference(model, plan, generator=generator)
    if backend == "fast":
        from ddpm_fast.engine import sample_fast

        return sample_fast(model, plan)
    from ddpm_fast.export.runtime import sample_onnx

    return sample_onnx(model, plan)


def choose_auto(model, plan: Plan) -> str:
    """The backend "auto" picks for this model and plan: ONNX sessions/files go to onnx; otherwise the engine
    decides (`ddpm_fast.engine.auto_backend`; it may set plan.options["compile"])."""
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ in ("InferenceSession", "OnnxModel"):
        return "onnx"
    try:
        from ddpm_fast.engine import auto_backend
    except ImportError:
        return "reference"
    return auto_backend(model, plan)


# ---------------------------------------------------------------------------------------------- reference


def check_model_output(out, expected_shape, step: int, t: int) -> torch.Tensor:
    """The model must return a finite tensor of the expected shape; errors say at which step."""
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "sample", out)  # diffusers' UNet2DOutput
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor; got {type(out).__name__} at step {step} (t={t})")
    if tuple(out.shape) != tuple(expected_shape):
        raise ValueError(
            f"model output must have shape {tuple(expected_shape)}; got {tuple(out.shape)} at step {step} (t={t})"
        )
    if not torch.isfinite(out).all():
        raise ValueError(f"model returned NaN or Inf at step {step} (t={t})")
    return out


def _noise_source(plan: Plan, generator: torch.Generator | None):
    """(x_T, z(step, t)) in float32: diffusers' order from a generator, else counter-based."""
    shape = plan.shape
    if generator is not None:

        def draw():
            return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(
                plan.device
            )

        return draw(), lambda i, t: draw()
    x_T = noise.sample_noise(plan.seed, plan.start_index, shape, noise.XT_SLOT, plan.device)
    return x_T, lambda i, t: noise.sample_noise(plan.seed, plan.start_index, shape, t, plan.device)


def _steps(plan: Plan):
    """(step index i, schedule index j, model timestep t) from noisiest to cleanest."""
    S = plan.schedule.num_timesteps
    it = range(S)
    if plan.progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", unit="step")
    for i in it:
        j = S - 1 - i
        yield i, j, int(plan.schedule.timesteps[j])


def _model_eps(model, x, t: int, plan: Plan, i: int):
    B = plan.shape[0]
    tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
    out = check_model_output(model(x, tt), (B, plan.out_channels, *plan.shape[2:]), i, t).to(plan.dtype)
    if plan.variance == "learned_range":
        return out[:, : plan.shape[1]], out[:, plan.shape[1] :]
    return out, None


def ddpm_reference(model, plan: Plan, x: torch.Tensor, z_fn) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. eq. 7): x_{t-1} = c1 x0_hat + c2 x_t + sigma_t z, x0_hat = (x_t - sqrt(1-abar) eps)/sqrt(abar)."""
    s = plan.schedule
    for i, j, t in _steps(plan):
        eps, v = _model_eps(model, x, t, plan, i)
        x0 = s.sqrt_recip_alphas_cumprod[j].item() * x - s.sqrt_recipm1_alphas_cumprod[j].item() * eps
        if plan.clip:
            x0 = x0.clamp(-plan.clip_range, plan.clip_range)
        mean = s.posterior_mean_coef1[j].item() * x0 + s.posterior_mean_coef2[j].item() * x
        if j > 0:
            if plan.variance == "fixed_small":
                std = s.posterior_variance[j].sqrt().item()
            elif plan.variance == "fixed_large":
                std = s.betas[j].sqrt().item()
            else:  # improved DDPM: log-variance interpolated between beta-tilde and beta
                f = (v + 1) / 2
                log_var = f * s.betas[j].log().item() + (1 - f) * s.posterior_log_variance_clipped[j].item()
                std = torch.exp(0.5 * log_var)
            x = mean + std * z_fn(i, t).to(plan.dtype)
        else:
            x = mean
        if plan.callback is not None:
            plan.callback(i, t, x)
    return x


def ddim_reference(model, plan: Plan, x: torch.Tensor, z_fn) -> torch.Tensor:
    """DDIM (Song et al. eq. 12): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    s = plan.schedule
    for i, j, t in _steps(plan):
        eps, _ = _model_eps(model, x, t, plan, i)
        abar, abar_prev = s.alphas_cumprod[j].item(), s.alphas_cumprod_prev[j].item()
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
        if plan.clip:
            x0 = x0.clamp(-plan.clip_range, plan.clip_range)
        sigma = plan.eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if plan.eta > 0:
            z = z_fn(i, t).to(plan.dtype)  # drawn at every step, as diffusers' DDIMScheduler does
            x = x + sigma * z
        if plan.callback is not None:
            plan.callback(i, t, x)
    return x


def sample_reference(model, plan: Plan, *, generator: torch.Generator | None = None) -> torch.Tensor:
    x_T, z_fn = _noise_source(plan, generator)
    x = x_T.to(plan.dtype)
    run = ddpm_reference if plan.method == "ddpm" else ddim_reference
    with torch.no_grad():
        return run(model, plan, x, z_fn)

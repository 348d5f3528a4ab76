"""A validated sampling request (`Plan`): what every backend needs besides the model.

`make_plan` checks every argument (errors name it), fills what the caller left out from the model's record
(`ddpm_fast.defaults`), respaces the schedule and builds the run's coefficient table through the sampler
registry. Backends receive a Plan and never re-validate or re-derive any of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ddpm_fast import noise
from ddpm_fast.checks import check_int
from ddpm_fast.defaults import defaults_of
from ddpm_fast.distributed import env_world
from ddpm_fast.errors import BadType, BadValue, Unavailable
from ddpm_fast.guidance import ClassifierGuidance, Guide, bind
from ddpm_fast.samplers import build_step_table, check_params, family
from ddpm_fast.schedule import Schedule, check_timesteps, spacing_timesteps
from ddpm_fast.steps import VARIANCES, StepTable
from ddpm_fast.tuned import tuned_table_for

__all__ = ["Plan", "make_plan", "check_model_output", "model_device", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Plan:
    """A validated sampling request. Row i of the result is global sample start_index + i."""

    shape: tuple[int, int, int, int]
    schedule: Schedule  # respaced to the kept timesteps
    table: StepTable  # its method, variance and eta are the run's (the properties below)
    clip: bool
    clip_range: float
    seed: int
    start_index: int
    device: torch.device
    dtype: torch.dtype
    progress: bool = False
    callback: Callable | None = None
    options: dict = field(default_factory=dict)  # backend keyword options (fast: compile, cuda_graph, ...)
    generator: torch.Generator | None = None  # diffusers-order noise (reference backend only)
    full_schedule: Schedule | None = None  # the schedule before respacing (what a checkpoint records)
    labels: torch.Tensor | None = None  # class labels of these rows, int64 [B] on device (conditional models)
    label_spec: object = None  # what was asked: an int, "random", or a tensor of labels from label_base on
    label_base: int = 0
    num_classes: int | None = None
    label_model: bool = True  # labels go to the model (False: unconditional; they serve the guidance only)
    guidance: Guide | None = None  # classifier guidance bound to this run's table (ddpm_fast.guidance)

    @property
    def method(self) -> str:
        return self.table.method

    @property
    def variance(self) -> str:
        return self.table.variance

    @property
    def eta(self) -> float:
        return self.table.eta

    @property
    def out_channels(self) -> int:
        return self.shape[1] * (2 if self.variance == "learned_range" else 1)

    def rows(self, batch: int, start_index: int) -> Plan:
        """The same run for `batch` rows starting at global sample `start_index` (a batch of a larger run)."""
        labels = _labels_for(
            self.label_spec, self.label_base, self.num_classes, self.seed, start_index, batch, self.device
        )
        return replace(self, shape=(batch, *self.shape[1:]), start_index=start_index, labels=labels)


def _labels_for(
    spec, base: int, num_classes, seed: int, start: int, batch: int, device
) -> torch.Tensor | None:
    """The labels of rows start .. start+batch-1 of a run asked with `spec` (module docstring of make_plan)."""
    if spec is None:
        return None
    if isinstance(spec, str):  # "random": keyed by (seed, global sample index), as the noise
        return noise.random_labels(seed, start, batch, num_classes, device)
    if isinstance(spec, int):
        return torch.full((batch,), spec, dtype=torch.int64, device=device)
    lo, hi = start - base, start - base + batch
    if lo < 0 or hi > spec.numel():
        raise ValueError(
            f"labels cover samples {base} .. {base + spec.numel() - 1}; rows {start} .. {start + batch - 1} were asked"
        )
    return spec[lo:hi].to(device)


def _check_labels(labels, num_classes, batch: int, guided: bool = False):
    """labels as asked (None, an int, "random" or a 1-D int tensor of batch entries), validated; errors name it.

    guided: the labels also (or only, for an unconditional model) serve classifier guidance, whose class
    count may be unknown until the classifier runs (num_classes None: only checked to be >= 0)."""
    if labels is None:
        if num_classes:
            raise BadValue(
                f"labels must be given for this class-conditional model ({num_classes} classes): "
                "a 1-D int tensor with one class per sample, an int, or 'random'"
            )
        return None
    if not num_classes and not guided:
        raise BadValue("labels were given but the model is unconditional (its record names no classes)")
    if isinstance(labels, str):
        if labels != "random":
            raise BadValue(f"labels must be a 1-D int tensor, an int or 'random'; got {labels!r}")
        if not num_classes:
            raise BadValue(
                "labels='random' needs the number of classes, which neither the model's record nor the guidance "
                "classifier gives: pass ClassifierGuidance(..., num_classes=K) or explicit labels"
            )
        return labels
    if isinstance(labels, bool):
        raise BadType(f"labels must be a 1-D int tensor, an int or 'random'; got {labels!r}")
    if isinstance(labels, int):
        if labels < 0 or (num_classes and labels >= num_classes):
            raise BadValue(f"labels must lie in [0, {num_classes or 'K'}); got {labels}")
        return labels
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise BadType(
            f"labels must be a 1-D int tensor, an int or 'random'; got {t.dtype} of shape {tuple(t.shape)}"
        )
    if t.numel() < batch:  # more: the labels of a whole run, of which these rows are the first
        raise BadValue(f"labels must hold one class per sample ({batch}); got {t.numel()}")
    out = (t < 0) | (t >= num_classes) if num_classes else t < 0
    if out.any():
        raise BadValue(f"labels must lie in [0, {num_classes or 'K'}); got {t[out][0].item()}")
    return t.to(torch.int64).cpu()


def make_plan(
    model,
    schedule: Schedule | None,
    shape,
    *,
    steps=None,
    timesteps=None,
    method: str = "ddpm",
    spacing: str | None = None,
    eta: float = 0.0,
    variance: str | None = None,
    clip: bool | None = None,
    clip_range: float | None = None,
    seed: int = 0,
    start_index: int = 0,
    generator: torch.Generator | None = None,
    labels=None,
    guidance=None,
    tuned=None,
    device=None,
    dtype=torch.float32,
    progress: bool = False,
    callback=None,
    options: dict | None = None,
) -> Plan:
    """Validate arguments (errors name the argument) and build the run's respaced schedule and step table.

    labels (class-conditional models, whose record gives num_classes): a 1-D int tensor with one class per
    row, an int for every row, or "random" (drawn per global sample index from the seed, so sample n gets the
    same label whatever the batch or world size).

    method="tuned": the table learned for this model (`ddpm_fast.tuned`): `tuned` a path or TunedTable, or
    without it the one the model's checkpoint carries for `steps` NFE; refused for another model, schedule or NFE.

    guidance: a `ddpm_fast.guidance.ClassifierGuidance` (classifier guidance, ADM-G); it needs labels, which
    then also serve an unconditional model's run (their classes are the classifier's).
    """
    d = defaults_of(model)
    schedule = _check_schedule(d.schedule if schedule is None else schedule)
    shape = _check_shape(shape)
    spacing = _check_spacing(method, spacing, steps, timesteps, tuned)
    variance = d.variance if variance is None else variance
    clip = d.clip if clip is None else clip
    clip_range = d.clip_range if clip_range is None else clip_range
    _check_scalars(variance, clip, clip_range, dtype, seed, start_index, generator)
    run_schedule, table = _schedule_and_table(
        model, schedule, method, steps, timesteps, spacing, variance, eta, tuned
    )
    device = _plan_device(model_device(model) if device is None else device)
    guide, num_classes = None, d.num_classes
    if guidance is not None:
        num_classes = _guidance_classes(guidance, labels, num_classes)
        guide = bind(guidance, table, float(clip_range) if clip else None)
    label_spec = _check_labels(labels, num_classes, shape[0], guided=guide is not None)
    return Plan(
        shape=shape,
        schedule=run_schedule,
        table=table,
        clip=clip,
        clip_range=float(clip_range),
        seed=seed,
        start_index=start_index,
        device=device,
        dtype=dtype,
        progress=progress,
        callback=callback,
        options=dict(options or {}),
        generator=generator,
        full_schedule=schedule,
        labels=_labels_for(label_spec, start_index, num_classes, seed, start_index, shape[0], device),
        label_spec=label_spec,
        label_base=start_index,
        num_classes=num_classes,
        label_model=d.num_classes is not None,
        guidance=guide,
    )


def _check_schedule(schedule) -> Schedule:
    if schedule is None:
        raise BadValue("schedule must be given (the model carries none)")
    if not isinstance(schedule, Schedule):
        raise BadType(f"schedule must be a ddpm_fast.Schedule; got {type(schedule).__name__}")
    return schedule


def _check_shape(shape) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as e:
        raise BadType(f"shape must be a sequence of 4 ints (B, C, H, W); got {shape!r}") from e
    if len(shape) != 4 or min(shape) < 1:
        raise BadValue(f"shape must be 4-D (B, C, H, W) with positive sizes; got {shape}")
    return shape


def _check_spacing(method: str, spacing, steps, timesteps, tuned) -> str:
    """The method's spacing (its default for None), checked with the arguments that choose timesteps."""
    fam = family(method)  # an unknown method lists the known ones
    if method == "tuned" and (timesteps is not None or spacing is not None):
        raise BadValue("method='tuned' walks its table's own timesteps: timesteps= and spacing= do not apply")
    if tuned is not None and method != "tuned":
        raise BadValue(f"tuned= applies to method='tuned'; got method={method!r}")
    spacing = fam.spacing if spacing is None else spacing
    if spacing not in fam.spacings:
        raise BadValue(f"spacing must be one of {fam.spacings} for method={method!r}; got {spacing!r}")
    if spacing != fam.spacing and steps is None:
        raise BadValue(f"spacing={spacing!r} needs steps=N (it chooses which N timesteps to keep)")
    return spacing


def _check_scalars(variance, clip, clip_range, dtype, seed, start_index, generator) -> None:
    if variance not in VARIANCES:
        raise BadValue(f"variance must be one of {VARIANCES}; got {variance!r}")
    if not isinstance(clip, bool):
        raise BadType(f"clip must be a bool; got {clip!r}")
    if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or not clip_range > 0:
        raise BadValue(f"clip_range must be positive; got {clip_range!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise BadType(f"dtype must be one of {[str(t) for t in FLOAT_DTYPES]}; got {dtype!r}")
    noise.check_seed(seed)
    check_int(start_index, "start_index", minimum=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise BadType(f"generator must be a torch.Generator; got {type(generator).__name__}")


def _schedule_and_table(model, schedule: Schedule, method, steps, timesteps, spacing, variance, eta, tuned):
    """(the respaced schedule of the run, its step table): kept timesteps from the tuned table, `timesteps`,
    `steps` with `spacing`, or all of them."""
    T = schedule.num_timesteps
    table = None
    if method == "tuned":  # the table is learned for this model, schedule and NFE (ddpm_fast.tuned)
        check_params(method, eta=eta)
        table = tuned_table_for(model, schedule, steps, tuned).table
        if table.variance != variance:
            raise BadValue(
                f"variance must be the tuned table's {table.variance!r} (what it was learned with); got {variance!r}"
            )
        kept = torch.sort(table.timesteps).values
    elif timesteps is not None:
        kept = check_timesteps(timesteps, T)
    elif steps is not None:
        kept = torch.tensor(spacing_timesteps(schedule, steps, spacing))
    else:
        kept = None
    run_schedule = schedule if kept is None or kept.numel() == T else schedule.respace(kept)
    if table is None:
        table = build_step_table(run_schedule, method=method, variance=variance, eta=eta)
    return run_schedule, table


def _plan_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise BadValue(f"device must name a torch device; got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"device {device} was asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:  # a CUDA tensor's device always has an index
        # Under torchrun a bare "cuda" is this process's GPU, cuda:LOCAL_RANK, as the CLI's --device reads
        # it: current_device() is 0 on every rank until something sets it, so each rank would use GPU 0.
        _, world, local_rank = env_world()
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    return device


def _guidance_classes(guidance, labels, num_classes: int | None) -> int | None:
    """The run's class count once `guidance` is checked: the model record's, else the classifier's."""
    if not isinstance(guidance, ClassifierGuidance):
        raise BadType(
            f"guidance must be a ddpm_fast.ClassifierGuidance(classifier, scale); got {type(guidance).__name__}"
        )
    if labels is None:
        raise BadValue(
            "guidance needs labels: classifier guidance steers each sample toward its class; pass labels= "
            "(a 1-D int tensor, an int or 'random')"
        )
    k = guidance.num_classes
    if k is not None and num_classes is not None and k != num_classes:
        raise BadValue(f"guidance's classifier has {k} classes but the model's record names {num_classes}")
    return num_classes or k


def model_device(model) -> torch.device:
    """Where a module's parameters live (cpu for other callables)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def check_model_output(out, expected_shape, step: int, t: int) -> torch.Tensor:
    """The model must return a finite tensor of the expected shape; errors say at which step."""
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "sample", out)  # diffusers' UNet2DOutput
    if not isinstance(out, torch.Tensor):
        raise BadType(f"model must return a tensor; got {type(out).__name__} at step {step} (t={t})")
    if tuple(out.shape) != tuple(expected_shape):
        raise BadValue(
            f"model output must have shape {tuple(expected_shape)}; got {tuple(out.shape)} at step {step} (t={t})"
        )
    if not torch.isfinite(out).all():
        raise BadValue(f"model returned NaN or Inf at step {step} (t={t})")
    return out

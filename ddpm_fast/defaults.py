"""What a loaded model says about how to sample it: one typed record, read in one place (`defaults_of`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace

from ddpm_fast.checks import is_int
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.schedule import Schedule

__all__ = ["ModelDefaults", "ConfigRecord", "defaults_of", "record", "SAMPLING_KEYS", "VARIANCES", "ARCHS"]

ARCHS = ("ddpm-unet", "adm")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
SAMPLING_KEYS = ("variance", "clip", "clip_range", "image_shape", "data_range", "steps", "num_classes")


class ConfigRecord:
    """to_dict / from_dict / replace for a model's frozen dataclass config, as config.json stores it (tuples
    as lists; unknown keys refused, naming the class and the known fields)."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise BadType(f"{cls.__name__}.from_dict needs a dict; got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadValue(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults a checkpoint carries; `ddpm_fast.sample` uses each where the caller leaves it out.

    schedule      the training noise schedule (None: the caller must pass one)
    variance      "fixed_small" | "fixed_large" | "learned_range"
    clip          clip the predicted x0 to [-clip_range, clip_range]
    image_shape   (C, H, W) the model generates (None: unknown)
    data_range    model-space range mapped to 0..255 when images are written
    steps         `ddpm-fast sample`'s default step count (None: the whole schedule)
    num_classes   class-conditional models: the number of labels (None: unconditional)
    arch          the architecture recorded in the checkpoint ("ddpm-unet", ...)
    """

    schedule: Schedule | None = None
    variance: str = "fixed_small"
    clip: bool = True
    clip_range: float = 1.0
    image_shape: tuple[int, int, int] | None = None
    data_range: tuple[float, float] = (-1.0, 1.0)
    steps: int | None = None
    num_classes: int | None = None
    arch: str = field(default="ddpm-unet")

    def replace(self, **changes) -> ModelDefaults:
        return replace(self, **changes)

    def sampling_dict(self) -> dict:
        """The JSON-able fields (all but schedule and arch), as checkpoints store them under "sampling"."""
        out = {}
        for f in fields(self):
            if f.name in ("schedule", "arch"):
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def defaults_of(model) -> ModelDefaults:
    """The model's record (`model.defaults`), or an empty one for a callable that carries none."""
    d = getattr(model, "defaults", None)
    return d if isinstance(d, ModelDefaults) else ModelDefaults()


def record(
    sampling: dict, cfg, *, schedule: Schedule | None, arch: str = "ddpm-unet", where: str
) -> ModelDefaults:
    """A checkpoint's "sampling" dict (missing keys take the defaults of `cfg`: variance learned_range for a
    2C-output model, else fixed_small) validated into a ModelDefaults; errors name `where` and the key."""
    if not isinstance(sampling, dict):
        raise BadType(f"{where}: sampling must be a dict; got {type(sampling).__name__}")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise BadValue(f"{where}: unknown sampling key(s) {unknown}; known: {list(SAMPLING_KEYS)}")
    learned = cfg.out_channels == 2 * cfg.in_channels
    out = {"variance": "learned_range" if learned else "fixed_small", "image_shape": list(cfg.image_shape)}
    out.update(sampling)
    base = ModelDefaults()
    v = out["variance"]
    if v not in VARIANCES:
        raise BadValue(f"{where}: sampling variance must be one of {VARIANCES}; got {v!r}")
    want = 2 * cfg.in_channels if v == "learned_range" else cfg.in_channels
    if cfg.out_channels != want:
        raise BadValue(
            f"{where}: sampling variance {v!r} needs out_channels == {want}; the model has {cfg.out_channels}"
        )
    clip = out.get("clip", base.clip)
    if not isinstance(clip, bool):
        raise BadType(f"{where}: sampling clip must be a bool; got {clip!r}")
    cr = out.get("clip_range", base.clip_range)
    if isinstance(cr, bool) or not isinstance(cr, (int, float)) or not cr > 0:
        raise BadValue(f"{where}: sampling clip_range must be a positive number; got {cr!r}")
    shape = out["image_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or any(not is_int(s) or s < 1 for s in shape):
        raise BadValue(f"{where}: sampling image_shape must be [C, H, W] positive ints; got {shape!r}")
    dr = out.get("data_range", base.data_range)
    if not isinstance(dr, (list, tuple)) or len(dr) != 2 or not float(dr[0]) < float(dr[1]):
        raise BadValue(f"{where}: sampling data_range must be [low, high] with low < high; got {dr!r}")
    for key in ("steps", "num_classes"):
        n = out.get(key)
        if n is not None and (not is_int(n) or n < 1):
            raise BadValue(f"{where}: sampling {key} must be a positive int or null; got {n!r}")
    if arch not in ARCHS:
        raise BadValue(f"{where}: arch must be one of {ARCHS}; got {arch!r}")
    return ModelDefaults(
        schedule=schedule,
        variance=v,
        clip=clip,
        clip_range=float(cr),
        image_shape=tuple(int(s) for s in shape),
        data_range=(float(dr[0]), float(dr[1])),
        steps=out.get("steps"),
        num_classes=out.get("num_classes"),
        arch=arch,
    )

"""`ddpm-fast sample` and `ddpm-fast merge`: images to a PNG grid, one .npz, or a sharded, resumable run.

A sharded run cuts global sample indices 0..N-1 into fixed-size shards. Shard k holds samples
k*S .. k*S+n-1, drawn with counter-based noise at start_index = k*S, so its bytes depend only on the model,
the sampler settings, the seed and the indices: never on the number of processes, on which process drew
it, or on whether the run was interrupted. Under torchrun the shards still to do are dealt round-robin
(todo[i] -> rank i % world); every rank writes its own shards (atomically, see `ddpm_fast.shards`), and
rank 0 alone writes the manifest, from the records all ranks gather after each round. A shard's final
file name is the truth about whether it is done; the manifest lists only shards whose files exist.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ddpm_fast import shards
from ddpm_fast.devices import env_world, resolve_device
from ddpm_fast.errors import Unavailable, UserError
from ddpm_fast.schedule import Schedule

__all__ = [
    "Sampler",
    "generate",
    "to_uint8",
    "image_grid",
    "save_grid",
    "model_digest",
    "check_out",
    "add_arguments",
    "add_arguments_sample",
    "add_arguments_merge",
    "run_sample",
    "run_merge",
]

log = logging.getLogger("ddpm_fast")

DEFAULT_SHARD_SIZE = 1024  # 49 shards for 50k samples; a multiple of every power-of-two batch up to 1024
MAX_GRID = 4096  # a PNG grid holds everything in memory; larger runs go to an .npz or a directory
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}
_NOT_A_DIR = {
    ".png",
    ".npz",
    ".npy",
    ".jpg",
    ".jpeg",
    ".gif",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".pt",
    ".pth",
}


# ---------------------------------------------------------------------------------------------- images


def to_uint8(x: torch.Tensor, data_range=(-1.0, 1.0)) -> np.ndarray:
    """Model-space [B, C, H, W] -> uint8 [B, H, W, C], data_range mapped to 0..255 with rounding to nearest."""
    lo, hi = float(data_range[0]), float(data_range[1])
    y = ((x.float() - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] image, nrow = ceil(sqrt(N))."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, nrow: int | None = None) -> None:
    """Write uint8 [N, H, W, C] images as one PNG grid, atomically; images smaller than 32 px are upscaled."""
    import io

    from PIL import Image

    grid = image_grid(images, nrow)
    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    scale = max(1, 32 // images.shape[1])  # 8x8 digits become visible 32x32 tiles
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    shards.atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- model


def model_digest(model) -> str:
    """sha256 naming the model's function: an ONNX file's bytes, or a Module's config and state_dict tensors."""
    h = hashlib.sha256()
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
    if path is not None and not isinstance(model, torch.nn.Module):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model_id must be given for a model that is neither a torch Module nor a file; got {type(model).__name__}"
        )
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_shape(model) -> tuple[int, int, int]:
    sampling = getattr(model, "sampling", None)
    if isinstance(sampling, dict) and sampling.get("image_shape"):
        return tuple(int(d) for d in sampling["image_shape"])
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "image_shape"):
        return tuple(cfg.image_shape)
    shape = getattr(model, "image_shape", None)
    if shape is None:
        raise ValueError("image_shape must be given (the model does not say what it generates)")
    return tuple(int(d) for d in shape)


def _model_device(model) -> str:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return str(p.device)
    return "cpu"


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- sampler


@dataclass
class Sampler:
    """Draws global samples [start, start+count) in batches of `batch_size`; returns uint8 [count, H, W, C].

    Batches are cut from the start of each request, so a shard is always computed in the same batches
    (bit-identical output whichever process draws it).
    """

    model: object
    image_shape: tuple[int, int, int]
    batch_size: int
    kwargs: dict = field(default_factory=dict)  # df.sample keywords besides shape and start_index
    data_range: tuple[float, float] = (-1.0, 1.0)
    _steps: int | None = field(default=None, init=False, repr=False)

    def __call__(
        self, start: int, count: int, on_images: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """uint8 [count, H, W, C]; `on_images(n)` is told after every step, n = rows / steps (fractions of images)."""
        from ddpm_fast.sampling import sample

        out = np.empty((count, self.image_shape[1], self.image_shape[2], self.image_shape[0]), np.uint8)
        steps = self.num_steps() if on_images is not None else 1
        for off in range(0, count, self.batch_size):
            b = min(self.batch_size, count - off)
            callback = None if on_images is None else (lambda i, t, x, b=b: on_images(b / steps))
            x = sample(
                self.model,
                shape=(b, *self.image_shape),
                start_index=start + off,
                callback=callback,
                **self.kwargs,
            )
            out[off : off + b] = to_uint8(x, self.data_range)
        return out

    def num_steps(self) -> int:
        """Steps per sample of this run (the respaced schedule's length)."""
        if self._steps is None:
            self._steps = _plan(
                self.model, {**self.kwargs, "device": "cpu"}, (1, *self.image_shape)
            ).table.num_steps
        return self._steps


def _plan(model, kwargs: dict, shape):
    """The validated Plan `ddpm_fast.sample` would build for these keywords."""
    from ddpm_fast.sampling import make_plan

    names = ("steps", "timesteps", "method", "eta", "variance", "clip", "seed", "device", "dtype")
    schedule = kwargs.get("schedule") or getattr(model, "schedule", None)
    return make_plan(model, schedule, shape, **{k: kwargs[k] for k in names if k in kwargs})


def resolve_backend(model, sampler: Sampler, num: int, dist: Dist) -> None:
    """Fix the backend (and its options) once per run, on rank 0's judgement, in `sampler.kwargs`.

    "auto" decided per batch could pick differently from one batch to the next (it times a forward), and
    ranks could disagree: both would make a shard's bytes depend on who drew it. The estimate is made for
    the whole run (shape [num, ...]), which is what compiling has to pay off against. The fast backend gets
    one bucket, the batch size: a shard's short last batch is padded to it, so the graph a batch runs in
    never depends on what the process ran before.
    """
    kw = sampler.kwargs
    choice = None
    if kw.get("backend", "auto") == "auto" and dist.rank == 0:
        from ddpm_fast.sampling import choose_auto

        plan = _plan(model, kw, (num, *sampler.image_shape))
        choice = (choose_auto(model, plan), dict(plan.options))
    if kw.get("backend", "auto") == "auto":
        backend, options = dist.broadcast(choice)
        kw["backend"] = backend
        kw.update(options)
    if kw["backend"] == "fast":
        kw.setdefault("buckets", (sampler.batch_size,))


def run_settings(model, sampler: Sampler, *, model_id: str, shard_size: int, fmt: str) -> dict:
    """Everything a sample's bytes depend on; a resumed run must match it exactly."""
    kw = sampler.kwargs
    base = kw.get("schedule") or getattr(model, "schedule", None)
    plan = _plan(model, {**kw, "device": "cpu"}, (1, *sampler.image_shape))
    spec = {k: v for k, v in (base.spec or {}).items() if k != "betas"}
    return {
        "model_sha256": model_id,
        "image_shape": list(sampler.image_shape),
        "data_range": list(sampler.data_range),
        "schedule": spec,
        "num_timesteps": base.num_timesteps,
        "betas_sha256": _tensor_sha(base.betas),
        "steps": plan.schedule.num_timesteps,
        "timesteps_sha256": _tensor_sha(plan.schedule.timesteps),
        "method": plan.method,
        "eta": plan.eta,
        "variance": plan.variance,
        "clip": plan.clip,
        "clip_range": plan.clip_range,
        "dtype": str(plan.dtype).replace("torch.", ""),
        "seed": plan.seed,
        "shard_size": shard_size,
        "format": fmt,
    }


def _settings_difference(ours: dict, theirs: dict) -> str | None:
    for k in sorted(set(ours) | set(theirs)):
        if ours.get(k) != theirs.get(k):
            return f"{k} is {ours.get(k)!r} here but {theirs.get(k)!r} in the manifest"
    return None


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_distributed(device: torch.device) -> Dist:
    """Join torchrun's process group (NCCL for CUDA devices, gloo for CPU) when WORLD_SIZE > 1."""
    rank, world, local = env_world()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise Unavailable("torch.distributed is not available in this PyTorch build, but WORLD_SIZE > 1")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=True)


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """One tqdm bar in images (rank 0 only), advanced after every step, with images/s and time left."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self, total: int, done: int, enabled: bool, desc: str = "sampling"):
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=done,
                unit="img",
                desc=desc,
                dynamic_ncols=True,
                smoothing=0.1,
                bar_format=self.FORMAT,
            )

    def update(self, n: float) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------- runs


def generate(
    model,
    out: str,
    *,
    num: int = 64,
    batch_size: int | None = None,
    schedule: Schedule | None = None,
    image_shape=None,
    model_id: str | None = None,
    shard_size: int | None = None,
    shard_format: str = "npz",
    merge: bool = True,
    progress: bool = False,
    dist: Dist | None = None,
    **sample_kwargs,
) -> dict:
    """Draw samples 0..num-1 of `model` into `out` and return a summary dict (paths, counts, seconds).

    `out` ending in .png: one PNG grid; in .npz: one .npz (`arr_0` uint8 NHWC), streamed batch by batch;
    anything else: a sharded, resumable run directory (merged into out/samples.npz at the end unless
    merge=False). Under torchrun (WORLD_SIZE > 1) with `dist` None, a directory run joins the process group
    (or uses the one already initialised). `sample_kwargs` go to `ddpm_fast.sample` (steps, method, eta,
    seed, backend, device, dtype, variance, clip, ...).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int; got {num!r}")
    if batch_size is None:
        dev = sample_kwargs.get("device")
        batch_size = 256 if dev is not None and torch.device(dev).type == "cuda" else 64
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if shard_format not in shards.SHARD_FORMATS:
        raise ValueError(f"shard_format must be one of {shards.SHARD_FORMATS}; got {shard_format!r}")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path; got {type(out).__name__}")
    out = os.fspath(out)
    if dist is None:
        # Under torchrun, a directory run joins the job (and leaves it at the end); a file run is refused below.
        own_dist = env_world()[1] > 1 and output_kind(out) == "dir"
        dev = sample_kwargs.get("device")
        dist = (
            init_distributed(torch.device(dev) if dev is not None else torch.device("cpu"))
            if own_dist
            else Dist()
        )
        if dist.owns_group:
            try:
                return generate(
                    model, out, num=num, batch_size=batch_size, schedule=schedule, image_shape=image_shape,
                    model_id=model_id, shard_size=shard_size, shard_format=shard_format, merge=merge,
                    progress=progress, dist=dist, **sample_kwargs,
                )  # fmt: skip
            finally:
                dist.close()
        if env_world()[1] > 1 and dist.world == 1 and output_kind(out) != "dir":
            raise UserError(f"under torchrun, out must be a directory (a sharded run); got {out!r}")
    shape = tuple(int(d) for d in image_shape) if image_shape is not None else _image_shape(model)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes; got {shape}")
    sampling = getattr(model, "sampling", None)
    data_range = tuple(sampling.get("data_range", (-1.0, 1.0))) if isinstance(sampling, dict) else (-1.0, 1.0)
    if schedule is not None:
        sample_kwargs["schedule"] = schedule
    sampler = Sampler(model, shape, min(batch_size, num), sample_kwargs, data_range)

    kind = check_out(out)
    if kind != "dir" and dist.world > 1:
        raise UserError(f"under torchrun, --out must be a directory (a sharded run); got {out!r}")
    resolve_backend(model, sampler, num, dist)
    progress = progress and dist.rank == 0
    if kind == "png":
        if num > MAX_GRID:
            raise ValueError(
                f"num={num} is too many for one PNG grid (at most {MAX_GRID}); use --out DIR or .npz"
            )
        bar = Progress(num, 0, progress)
        try:
            images = sampler(0, num, bar.update)
        finally:
            seconds = bar.close()  # an error prints on its own line, not on the bar's
        save_grid(images, out)
        return {"out": out, "num": num, "new": num, "seconds": seconds}
    if kind == "npz":
        bar = Progress(num, 0, progress)
        try:
            with shards.NpzWriter(out, (num, shape[1], shape[2], shape[0])) as w:
                for start in range(0, num, sampler.batch_size):
                    w.write(sampler(start, min(sampler.batch_size, num - start), bar.update))
        finally:
            seconds = bar.close()
        return {"out": out, "num": num, "new": num, "seconds": seconds}

    if model_id is None:
        model_id = model_digest(model)
    if shard_size is None:
        old = _read_manifest_quietly(out)
        shard_size = int(old["settings"]["shard_size"]) if old else DEFAULT_SHARD_SIZE
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int; got {shard_size!r}")
    settings = run_settings(model, sampler, model_id=model_id, shard_size=shard_size, fmt=shard_format)
    return _run_sharded(sampler, out, num, settings, dist, progress, merge)


def output_kind(out: str) -> str:
    """'png' | 'npz' | 'dir' from the --out path; other file-like suffixes are refused."""
    ext = os.path.splitext(out.rstrip("/\\"))[1].lower()
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return "dir"
    if ext in (".png", ".npz"):
        return ext[1:]
    if ext in _NOT_A_DIR:
        raise ValueError(f"out must end in .png (a grid) or .npz, or name a directory; got {out!r}")
    return "dir"


def check_out(out: str, name: str = "out") -> str:
    """Refuse, before any sampling, an output the run could not write; returns output_kind(out).

    A file (.png, .npz) needs an existing, writable directory; a run directory needs its path free of
    files: the nearest existing ancestor must be a writable directory. Errors are one line naming `name`.
    """
    kind = output_kind(out)
    path = os.path.abspath(out.rstrip("/\\") or out)
    if kind == "dir":
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{name} {out!r} must name a directory for a sharded run, but it is a file")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{name} {out!r}: {parent!r} is a file, so the run directory cannot be made")
    else:
        if out.endswith(("/", os.sep)):
            raise ValueError(f"{name} {out!r} ends in / but names a .{kind} file")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            what = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise ValueError(f"{name} {out!r}: directory {os.path.dirname(out) or '.'!r} {what}")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{name} {out!r}: {parent!r} is not writable")
    return kind


def _read_manifest_quietly(run_dir: str) -> dict | None:
    try:
        return shards.read_manifest(run_dir) if os.path.isdir(run_dir) else None
    except ValueError:
        return None  # reported properly by _prepare on rank 0


@contextlib.contextmanager
def _run_lock(run_dir: str):
    """Hold an exclusive flock on DIR/.lock: two separate runs must not write one directory at once."""
    f = open(os.path.join(run_dir, ".lock"), "a")
    try:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no flock (Windows): nothing to enforce it with
        except BlockingIOError as e:
            raise UserError(f"{run_dir} is being written by another running `ddpm-fast sample`") from e
        except OSError:
            pass  # a filesystem without locks (some network mounts)
        yield
    finally:
        f.close()


def _manifest(num: int, settings: dict, info: dict, done: dict) -> dict:
    from ddpm_fast import __version__

    ranges = shards.shard_ranges(num, settings["shard_size"])
    C, H, W = settings["image_shape"]
    return {
        "format": "ddpm-fast-samples",
        "format_version": 1,
        "library_version": __version__,
        "num": num,
        "num_shards": len(ranges),
        "image_hwc": [H, W, C],
        "settings": settings,
        "info": info,
        "done": {str(k): done[k] for k in sorted(done)},
        "complete": len(done) == len(ranges),
    }


def _prepare(run_dir: str, num: int, settings: dict, info: dict) -> tuple[dict, list[int]]:
    """Rank 0: check the manifest's settings, keep valid shards, drop damaged ones and stale temporaries.

    Returns (done records {k: {count, sha256}}, shard ids still to draw).
    """
    from ddpm_fast import __version__

    os.makedirs(os.path.join(run_dir, shards.SHARDS), exist_ok=True)
    old = shards.read_manifest(run_dir)
    if old is not None:
        why = _settings_difference(settings, old["settings"])
        if why is not None:
            raise UserError(
                f"{run_dir} holds a run with other settings ({why}); rerun with the original settings "
                "or use a new --out directory"
            )
        if old.get("library_version") != __version__:
            log.warning(
                "%s was started by ddpm-fast %s; this is %s", run_dir, old.get("library_version"), __version__
            )
    removed = shards.remove_stale_temps(run_dir)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    fmt = settings["format"]
    C, H, W = settings["image_shape"]
    recorded = old.get("done", {}) if old else {}
    done, todo = {}, []
    for k, (start, count) in enumerate(shards.shard_ranges(num, settings["shard_size"])):
        path = shards.shard_path(run_dir, k, fmt)
        rec = recorded.get(str(k))
        sha = rec.get("sha256") if isinstance(rec, dict) and rec.get("count") == count else None
        why = shards.check_shard(path, fmt, start, count, (H, W, C), sha)
        if why is None:
            done[k] = {"count": count, "sha256": sha or shards.shard_digest(path, fmt)}
            continue
        if why != "missing":
            log.warning("shard %d (%s) is %s: drawing it again", k, path, why)
            _remove(path)
        todo.append(k)
    shards.atomic_write_json(os.path.join(run_dir, shards.MANIFEST), _manifest(num, settings, info, done))
    return done, todo


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _write_error(e: BaseException, k: int, path: str) -> BaseException:
    if isinstance(e, OSError):
        return OSError(e.errno, f"cannot write shard {k} to {path}: {e.strerror or e}")
    return e


def _run_sharded(
    sampler: Sampler, run_dir: str, num: int, settings: dict, dist: Dist, progress: bool, merge: bool
):
    info = {
        "world_size": dist.world,
        "batch_size": sampler.batch_size,
        "backend": str(sampler.kwargs.get("backend", "auto")),
        "device": str(sampler.kwargs.get("device") or _model_device(sampler.model)),
        "torch": torch.__version__,
    }
    fmt, size = settings["format"], settings["shard_size"]
    ranges = shards.shard_ranges(num, size)
    manifest_path = os.path.join(run_dir, shards.MANIFEST)

    # Rank 0 checks the directory; every rank learns the verdict, so a refusal stops all of them alike.
    lock = contextlib.nullcontext()
    verdict = None
    done: dict = {}
    if dist.rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            lock = _run_lock(run_dir)
            lock.__enter__()
            done, todo = _prepare(run_dir, num, settings, info)
            verdict = ("ok", todo)
        except (UserError, ValueError, OSError) as e:
            verdict = ("error", f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
    verdict = dist.broadcast(verdict)
    closers = []
    try:
        if verdict[0] == "error":
            if dist.rank != 0:
                raise SystemExit(2)  # rank 0 reports it; one message, not one per rank
            raise UserError(verdict[1])
        todo = verdict[1]
        skipped = num - sum(ranges[k][1] for k in todo)
        bar = Progress(num, skipped, progress)
        closers.append(bar.close)
        mine = todo[dist.rank :: dist.world]
        rounds = math.ceil(len(todo) / dist.world)
        new_images = 0

        # One writer thread: encoding and writing shard k overlaps drawing shard k+1. At most two shards
        # wait in memory, so memory stays a few shards whatever num is.
        pending: list[tuple[int, Future]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:

            def harvest(block: bool) -> tuple[list, BaseException | None]:
                records, exc = [], None
                while pending and (block or pending[0][1].done() or len(pending) > 2):
                    k, fut = pending.pop(0)
                    try:
                        records.append((k, {"count": ranges[k][1], "sha256": fut.result()}))
                    except Exception as e:
                        exc = exc or _write_error(e, k, shards.shard_path(run_dir, k, fmt))
                return records, exc

            carried = None  # rank 0's manifest write failure, told to every rank at the next gather
            for r in range(rounds + 1):  # the extra round waits for the last writes
                drawn, failure, carried = 0, carried, None
                if failure is None and r < len(mine):
                    k = mine[r]
                    start, count = ranges[k]
                    try:
                        images = sampler(start, count, bar.update if dist.rank == 0 and progress else None)
                        pending.append((k, writer.submit(shards.write_shard, run_dir, k, start, images, fmt)))
                        drawn = count
                        del images
                    except Exception as e:  # every rank hears of it below, so none waits forever
                        failure = e
                records, write_failure = harvest(block=r >= rounds or failure is not None)
                failure = failure or write_failure
                message = None if failure is None else f"{type(failure).__name__}: {failure}"
                gathered = dist.gather((drawn, records, message))
                new_images += sum(g[0] for g in gathered)
                if dist.rank == 0:
                    bar.update(sum(g[0] for g in gathered[1:]))
                    fresh = [rec for g in gathered for rec in g[1]]
                    if fresh:
                        done.update(fresh)
                        try:
                            shards.atomic_write_json(manifest_path, _manifest(num, settings, info, done))
                        except OSError as e:
                            carried = OSError(e.errno, f"cannot write {manifest_path}: {e.strerror or e}")
                            if r >= rounds:  # no gather left to wait for: the other ranks are done
                                raise carried from e
                if failure is not None:
                    raise failure
                errors = [(i, g[2]) for i, g in enumerate(gathered) if g[2]]
                if errors:
                    if dist.rank != 0:
                        raise SystemExit(2)  # the failing rank and rank 0 report it
                    raise UserError(f"rank {errors[0][0]} failed: {errors[0][1]}")
                if r >= rounds:
                    break
        seconds = bar.close()
    finally:
        for close in closers:
            close()
        lock.__exit__(None, None, None)

    summary = {
        "out": run_dir,
        "num": num,
        "new": new_images,
        "skipped": skipped,
        "shards": len(ranges),
        "seconds": seconds,
        "world_size": dist.world,
    }
    if merge and dist.rank == 0:
        merged = os.path.join(run_dir, "samples.npz")
        t0 = time.perf_counter()
        shards.merge(run_dir, merged)
        summary.update(merged=merged, merge_seconds=time.perf_counter() - t0)
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments_sample(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a(
        "--model",
        metavar="DIR|FILE.onnx",
        help="checkpoint directory or .onnx file (default: the bundled model)",
    )
    a("--num", type=int, default=64, metavar="N", help="number of samples (default 64)")
    a("--batch-size", type=int, metavar="B", help="samples per model call (default 256 on CUDA, 64 on CPU)")
    a(
        "--steps",
        type=int,
        metavar="S",
        help="sampling steps, evenly respaced (default: the checkpoint's recorded count, else the whole schedule; "
        "the bundled model: 100)",
    )
    a("--method", default="ddpm", metavar="M", help="ddpm (ancestral) or ddim (default ddpm)")
    a("--eta", type=float, default=0.0, metavar="E", help="DDIM noise scale (default 0)")
    a("--seed", type=int, default=0, metavar="K", help="noise seed; sample n depends only on (seed, n)")
    a("--backend", default="auto", metavar="B", help="auto, reference, fast or onnx (default auto)")
    a(
        "--device",
        metavar="D",
        help="torch device (default: cuda if available, else cpu; cuda:LOCAL_RANK under torchrun)",
    )
    a("--dtype", default="float32", metavar="T", help=f"compute dtype: {', '.join(DTYPES)} (default float32)")
    a(
        "--out",
        default="samples.png",
        metavar="PATH",
        help="FILE.png: one grid; FILE.npz: arr_0 uint8 NHWC; DIR: sharded, resumable run (default samples.png). "
        "Under torchrun put `--` before `sample`: torchrun would read --num as its own --numa-binding",
    )
    a(
        "--shard-size",
        type=int,
        metavar="N",
        help=f"samples per shard of a DIR run (default {DEFAULT_SHARD_SIZE})",
    )
    a(
        "--format",
        default="npz",
        dest="shard_format",
        metavar="F",
        help="shards of a DIR run: npz or png (default npz)",
    )
    a("--no-merge", action="store_true", help="DIR run: do not write DIR/samples.npz at the end")
    a("--quiet", action="store_true", help="no progress bar")


def add_arguments_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a sharded run directory (holding manifest.json)")
    p.add_argument("out", metavar="OUT.npz", help="the merged .npz to write (arr_0 uint8 NHWC, index order)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


add_arguments = add_arguments_sample


def _load_cli_model(spec: str | None, device: torch.device):
    """(model, backend override or None, schedule fallback)."""
    if spec is None:
        try:
            from ddpm_fast.checkpoint import default_model

            return default_model(device=device), None
        except (ImportError, RuntimeError) as e:
            raise Unavailable(f"the bundled model is not available ({e}); pass --model DIR") from e
    if spec.lower().endswith(".onnx"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--model {spec}: no such file")
        try:
            from ddpm_fast.export.runtime import load_onnx
        except ImportError as e:
            raise Unavailable(f"--model {spec}: ONNX models need ddpm_fast.export.runtime ({e})") from e
        return load_onnx(spec), "onnx"
    from ddpm_fast.checkpoint import load_model

    try:
        return load_model(spec, device=device), None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model {spec}: {e}") from e


def _check_int(name: str, v, minimum: int = 1) -> None:
    if v is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {v}")


def run_sample(args) -> int:
    from ddpm_fast.sampling import BACKENDS
    from ddpm_fast.steps import METHODS

    _check_int("--num", args.num)
    _check_int("--batch-size", args.batch_size)
    _check_int("--steps", args.steps)
    _check_int("--shard-size", args.shard_size)
    _check_int("--seed", args.seed, 0)
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {args.method!r}")
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {args.backend!r}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {args.dtype!r}")
    if args.shard_format not in shards.SHARD_FORMATS:
        raise ValueError(
            f"--format must be one of {', '.join(shards.SHARD_FORMATS)}; got {args.shard_format!r}"
        )
    if args.method == "ddpm" and args.eta != 0:
        raise ValueError(f"--eta applies to --method ddim only; got --eta {args.eta} with --method ddpm")
    kind = check_out(args.out, "--out")
    onnx_file = args.model is not None and args.model.lower().endswith(".onnx")
    if args.backend == "onnx" and not onnx_file:
        raise ValueError(
            f"--backend onnx needs --model FILE.onnx; got --model {args.model or '(the bundled model)'}"
        )
    if (onnx_file or args.backend == "onnx") and DTYPES[args.dtype] != torch.float32:
        raise ValueError(
            f"--backend onnx computes in float32 (the graph's inputs and outputs); got --dtype {args.dtype}"
        )
    if onnx_file and args.backend not in ("auto", "onnx"):
        raise ValueError(
            f"--model {args.model} is an ONNX file: use --backend onnx (or auto); got --backend {args.backend}"
        )

    rank, world, local = env_world()
    if world > 1 and kind != "dir":
        raise UserError(f"under torchrun, --out must be a directory (a sharded run); got {args.out!r}")
    device = resolve_device(args.device, local, world)
    dist = init_distributed(device) if kind == "dir" else Dist()
    try:
        model, backend = _load_cli_model(args.model, device)
        backend = backend or args.backend
        schedule = None
        if getattr(model, "schedule", True) is None:
            schedule = Schedule.linear(1000)
            if dist.rank == 0:
                log.warning("the model names no noise schedule: using DDPM's linear betas over 1000 steps")
        steps = args.steps
        if steps is None and getattr(model, "steps", None):
            steps = model.steps  # an ONNX step graph samples exactly the run it was exported for
        elif steps is None and isinstance(getattr(model, "sampling", None), dict):
            steps = model.sampling.get("steps")  # the checkpoint's documented default (digits: 100)
        dtype = DTYPES[args.dtype]
        if backend == "auto" and dtype == torch.float64:
            backend = "reference"  # the only backend computing in float64
        if backend == "reference" and dtype != torch.float32 and isinstance(model, torch.nn.Module):
            model = model.to(dtype)  # the reference runs in the caller's dtype end to end
        summary = generate(
            model,
            args.out,
            num=args.num,
            batch_size=args.batch_size,
            schedule=schedule,
            shard_size=args.shard_size,
            shard_format=args.shard_format,
            merge=not args.no_merge,
            progress=not args.quiet,
            dist=dist,
            steps=steps,
            method=args.method,
            eta=args.eta,
            seed=args.seed,
            backend=backend,
            device=device,
            dtype=dtype,
        )
    finally:
        dist.close()
    if dist.rank == 0:
        _report(summary)
    return 0


def _report(s: dict) -> None:
    rate = s["new"] / s["seconds"] if s["seconds"] > 0 else float("inf")
    line = f"{s['new']} images in {s['seconds']:.1f} s ({rate:.1f} img/s)"
    if "shards" in s:
        line += f"; {s['skipped']} already done; {s['num']} in {s['shards']} shards"
        if s["world_size"] > 1:
            line += f" over {s['world_size']} processes"
        if "merged" in s:
            line += f"; merged in {s['merge_seconds']:.1f} s"
    print(line, file=sys.stderr)
    print(s.get("merged", s["out"]))


def run_merge(args) -> int:
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"DIR {args.dir} is not a directory")
    if output_kind(args.out) != "npz":
        raise ValueError(f"OUT must end in .npz; got {args.out!r}")
    t0 = time.perf_counter()
    shape = shards.merge(args.dir, args.out, progress=not args.quiet)
    print(f"{shape[0]} images {list(shape[1:])} merged in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(args.out)
    return 0

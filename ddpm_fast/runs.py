"""Sampling runs: images to a PNG grid, one .npz, or a sharded, resumable run directory (`generate`).

A sharded run cuts global sample indices 0..N-1 into fixed-size shards. Shard k holds samples
k*S .. k*S+n-1, drawn with counter-based noise at start_index = k*S, so its bytes depend only on the model,
the sampler settings, the seed and the indices: never on the number of processes, on which process drew
it, or on whether the run was interrupted. Under torchrun the shards still to do are dealt round-robin
(todo[i] -> rank i % world); every rank writes its own shards (atomically, see `ddpm_fast.shards`), and
rank 0 alone writes the manifest, from the records all ranks gather after each round. A shard's final
file name is the truth about whether it is done; the manifest lists only shards whose files exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from ddpm_fast import __version__, sampling, shards
from ddpm_fast.checks import check_int
from ddpm_fast.defaults import defaults_of
from ddpm_fast.distributed import Dist, env_world, join
from ddpm_fast.errors import BadType, BadValue, UserError
from ddpm_fast.images import save_grid, to_uint8
from ddpm_fast.plan import Plan, make_plan, model_device
from ddpm_fast.progress import progress_bar
from ddpm_fast.weights import model_digest

__all__ = [
    "Sampler",
    "generate",
    "model_digest",
    "check_out",
    "check_world_out",
    "output_kind",
    "Progress",
    "DEFAULT_SHARD_SIZE",
    "default_batch_size",
]

log = logging.getLogger("ddpm_fast")

DEFAULT_SHARD_SIZE = 1024  # 49 shards for 50k samples; a multiple of every power-of-two batch up to 1024
MAX_GRID = 4096  # a PNG grid holds everything in memory; larger runs go to an .npz or a directory
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


# ---------------------------------------------------------------------------------------------- model


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- sampler


@dataclass
class Sampler:
    """Draws global samples [start, start+count) in batches of the plan's batch size on one backend;
    returns uint8 [count, H, W, C]. Batches are cut from the start of each request, so a shard is always
    computed in the same batches (bit-identical output whichever process draws it)."""

    model: object
    plan: Plan  # plan.shape[0] is the batch size
    backend: str = "auto"
    data_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def batch_size(self) -> int:
        return self.plan.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.plan.shape[1:])

    def __call__(
        self, start: int, count: int, on_images: Callable[[float], None] | None = None
    ) -> np.ndarray:
        """uint8 [count, H, W, C]; `on_images(n)` is told after every step, n = rows / steps (fractions of images)."""
        C, H, W = self.image_shape
        out = np.empty((count, H, W, C), np.uint8)
        steps = self.plan.table.num_steps
        for off in range(0, count, self.batch_size):
            b = min(self.batch_size, count - off)
            plan = self.plan.rows(b, start + off)
            if on_images is not None:
                user = plan.callback

                def step(i, t, x, b=b, user=user):
                    on_images(b / steps)
                    if user is not None:
                        user(i, t, x)

                plan = replace(plan, callback=step)
            out[off : off + b] = to_uint8(sampling.run(self.model, plan, self.backend), self.data_range)
        return out


def resolve_backend(model, plan: Plan, backend: str, num: int) -> tuple[str, Plan]:
    """The backend for a whole run of `num` samples (auto's pure rule, so every rank agrees), and the plan to
    run: the fast backend gets one bucket, the batch size, so a shard's short last batch is padded to it and
    the graph a batch runs in never depends on what the process ran before."""
    if backend == "auto":
        backend = sampling.choose_backend(model, plan.rows(num, 0))
    if backend == "fast" and "buckets" not in plan.options:
        plan = replace(plan, options={**plan.options, "buckets": (plan.shape[0],)})
    return backend, plan


def run_settings(plan: Plan, *, model_id: str, shard_size: int, fmt: str, data_range) -> dict:
    """Everything a sample's bytes depend on; a resumed run must match it exactly."""
    base = plan.full_schedule or plan.schedule
    spec = {k: v for k, v in (base.spec or {}).items() if k != "betas"}
    return {
        "model_sha256": model_id,
        "image_shape": list(plan.shape[1:]),
        "data_range": list(data_range),
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
        # a tuned table's columns are learned, so its bytes are a setting (None for every built-in method,
        # as a manifest written before this key reads it)
        "tuned_table_sha256": _tensor_sha(plan.table.coefs.to(torch.float64))
        if plan.method == "tuned"
        else None,
    }


def guidance_settings(plan: Plan, classifier_id: str | None = None) -> dict:
    """The classifier guidance a run's samples depend on: the classifier (its file's sha256 and the flags it was
    read with, as `load_classifier` records them, else `classifier_id` or a digest of the Module) and the scale.
    All None for an unguided run, as a manifest written before these keys were recorded reads them."""
    guide = plan.guidance
    if guide is None:
        return {"classifier_sha256": None, "classifier_flags": None, "classifier_scale": None}
    source = getattr(guide.classifier, "source", None) or {}
    sha = classifier_id or source.get("sha256")
    if sha is None:
        if not isinstance(guide.classifier, torch.nn.Module):
            raise BadType(
                "classifier_id must be given for a sharded run guided by a classifier that is not a torch "
                f"Module; got {type(guide.classifier).__name__}"
            )
        sha = model_digest(guide.classifier)
    return {
        "classifier_sha256": sha,
        "classifier_flags": source.get("flags"),
        "classifier_scale": guide.scale,
    }


def _settings_difference(ours: dict, theirs: dict) -> str | None:
    for k in sorted(set(ours) | set(theirs)):
        if ours.get(k) != theirs.get(k):
            return f"{k} is {ours.get(k)!r} here but {theirs.get(k)!r} in the manifest"
    return None


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """One tqdm bar in images (rank 0 only), advanced after every step, with images/s and time left."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self, total: int, done: int, enabled: bool, desc: str = "sampling"):
        self.t0 = time.perf_counter()
        self.bar = progress_bar(
            total,
            desc,
            "img",
            enabled=enabled,
            initial=done,
            dynamic_ncols=True,
            smoothing=0.1,
            bar_format=self.FORMAT,
        )

    def update(self, n: float) -> None:
        if self.bar is not None and n:
            # per-step fractions (rows / steps) sum to the batch up to float rounding: never pass the total
            self.bar.update(min(n, self.bar.total - self.bar.n))

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------- runs


def generate(
    model,
    out,
    plan: Plan | None = None,
    *,
    num: int = 64,
    batch_size: int | None = None,
    backend: str = "auto",
    image_shape=None,
    model_id: str | None = None,
    classifier_id: str | None = None,
    shard_size: int | None = None,
    shard_format: str = "npz",
    merge: bool = True,
    progress: bool = False,
    dist: Dist | None = None,
    **plan_kwargs,
) -> dict:
    """Draw samples 0..num-1 of `model` into `out` and return a summary dict (paths, counts, seconds).

    `plan` (`ddpm_fast.plan.make_plan`, its batch the batch size) says how; without one, `plan_kwargs`
    (schedule, steps, method, seed, device, dtype, ... as `make_plan` takes them) and `batch_size` (default 256
    on CUDA, 64 elsewhere) build it. `out` ending in .png: one PNG grid; in .npz: one .npz (`arr_0` uint8
    NHWC), streamed batch by batch; anything else: a sharded, resumable run directory (merged into
    out/samples.npz at the end unless merge=False). Under torchrun (WORLD_SIZE > 1) with `dist` None, a
    directory run joins the process group (or uses the one already initialised). A directory run records
    what its samples depend on and refuses a rerun that differs: `model_id` and `classifier_id` name a model
    or guidance classifier that is neither a torch Module nor a file (default: their sha256 digests).
    """
    check_int(num, "num")
    if shard_format not in shards.SHARD_FORMATS:
        raise BadValue(f"shard_format must be one of {shards.SHARD_FORMATS}; got {shard_format!r}")
    if not isinstance(out, (str, os.PathLike)):
        raise BadType(f"out must be a path; got {type(out).__name__}")
    out = os.fspath(out)
    kind = check_out(out)
    if plan is None:
        plan = _make_plan(model, batch_size, image_shape, plan_kwargs)
    elif plan_kwargs or batch_size is not None or image_shape is not None:
        raise BadType(
            f"give either plan or its arguments; got plan and {sorted(plan_kwargs) or 'batch_size'}"
        )
    if not isinstance(plan, Plan):
        raise BadType(f"plan must be a ddpm_fast.plan.Plan (make_plan); got {type(plan).__name__}")
    plan = plan.rows(min(plan.shape[0], num), 0)
    if dist is None:
        # Under torchrun, a directory run joins the job (and leaves it at the end); a file run is refused below.
        dist = join(plan.device) if env_world()[1] > 1 and kind == "dir" else Dist()
        if dist.owns_group:
            try:
                return generate(
                    model, out, plan, num=num, backend=backend, model_id=model_id, classifier_id=classifier_id,
                    shard_size=shard_size, shard_format=shard_format, merge=merge, progress=progress, dist=dist,
                )  # fmt: skip
            finally:
                dist.close()
    check_world_out(kind, out, max(dist.world, env_world()[1]))
    data_range = defaults_of(model).data_range
    labels = None if plan.labels is None else plan.rows(num, 0).labels.cpu().numpy()  # every sample's class
    backend, plan = resolve_backend(model, plan, backend, num)
    sampler = Sampler(model, plan, backend, data_range)
    progress = progress and dist.rank == 0
    if kind == "png":
        return _write_grid(sampler, out, num, progress)
    if kind == "npz":
        return _write_npz(sampler, out, num, progress, labels)
    settings = _dir_settings(model, out, plan, model_id, classifier_id, shard_size, shard_format, labels)
    return _run_sharded(sampler, out, num, settings, dist, progress, merge, labels)


def check_world_out(kind: str, out, world: int) -> None:
    """Under torchrun (world > 1) only a directory run (`check_out`'s kind "dir") is shared out by shards."""
    if kind != "dir" and world > 1:
        raise UserError(f"under torchrun, out must be a directory (a sharded run); got {out!r}")


def _write_grid(sampler: Sampler, out: str, num: int, progress: bool) -> dict:
    if num > MAX_GRID:
        raise BadValue(f"num={num} is too many for one PNG grid (at most {MAX_GRID}); use --out DIR or .npz")
    bar = Progress(num, 0, progress)
    try:
        images = sampler(0, num, bar.update)
    finally:
        seconds = bar.close()  # an error prints on its own line, not on the bar's
    save_grid(images, out)
    return {"out": out, "num": num, "new": num, "seconds": seconds}


def _write_npz(sampler: Sampler, out: str, num: int, progress: bool, labels) -> dict:
    """One .npz streamed batch by batch: arr_0 uint8 NHWC, and arr_1 the labels (guided-diffusion's layout)."""
    C, H, W = sampler.image_shape
    bar = Progress(num, 0, progress)
    try:
        extra = {} if labels is None else {"arr_1": labels}
        with shards.NpzWriter(out, (num, H, W, C), extra=extra) as w:
            for start in range(0, num, sampler.batch_size):
                w.write(sampler(start, min(sampler.batch_size, num - start), bar.update))
    finally:
        seconds = bar.close()
    return {"out": out, "num": num, "new": num, "seconds": seconds}


def _dir_settings(
    model, out: str, plan: Plan, model_id, classifier_id, shard_size, shard_format, labels
) -> dict:
    """A directory run's settings (what its samples depend on); the shard size defaults to the run's own."""
    if model_id is None:
        model_id = model_digest(model)
    if shard_size is None:
        old = _read_manifest_quietly(out)
        shard_size = int(old["settings"]["shard_size"]) if old else DEFAULT_SHARD_SIZE
    check_int(shard_size, "shard_size")
    data_range = defaults_of(model).data_range
    settings = run_settings(
        plan, model_id=model_id, shard_size=shard_size, fmt=shard_format, data_range=data_range
    )
    settings.update(guidance_settings(plan, classifier_id))
    settings["labels_sha256"] = None if labels is None else shards.labels_digest(labels)
    return settings


def default_batch_size(device: torch.device) -> int:
    """Samples per model call when the caller names none: 256 on CUDA, 64 elsewhere."""
    return 256 if device.type == "cuda" else 64


def _make_plan(model, batch_size, image_shape, kwargs: dict) -> Plan:
    """The run's plan from generate's keyword arguments (make_plan's own, passed through)."""
    device = kwargs.get("device")
    if batch_size is None:
        dev = torch.device(device) if device is not None else model_device(model)
        batch_size = default_batch_size(dev)
    check_int(batch_size, "batch_size")
    if image_shape is None:
        image_shape = defaults_of(model).image_shape
        if image_shape is None:
            raise BadValue("image_shape must be given (the model does not say what it generates)")
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise BadValue(f"image_shape must be (C, H, W) with positive sizes; got {shape}")
    known = set(inspect.signature(make_plan).parameters)
    plan_kw = {k: v for k, v in kwargs.items() if k in known and k not in ("schedule", "options")}
    # backend options (compile=False, ...), loose as df.sample takes them or in options=
    options = {**(kwargs.get("options") or {}), **{k: v for k, v in kwargs.items() if k not in known}}
    return make_plan(model, kwargs.get("schedule"), (batch_size, *shape), options=options, **plan_kw)


def output_kind(out: str) -> str:
    """'png' | 'npz' | 'dir' from the --out path; other file-like suffixes are refused."""
    ext = os.path.splitext(out.rstrip("/\\"))[1].lower()
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return "dir"
    if ext in (".png", ".npz"):
        return ext[1:]
    if ext in _NOT_A_DIR:
        raise BadValue(f"out must end in .png (a grid) or .npz, or name a directory; got {out!r}")
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
            raise BadValue(f"{name} {out!r} must name a directory for a sharded run, but it is a file")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise BadValue(f"{name} {out!r}: {parent!r} is a file, so the run directory cannot be made")
    else:
        if out.endswith(("/", os.sep)):
            raise BadValue(f"{name} {out!r} ends in / but names a .{kind} file")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            what = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise BadValue(f"{name} {out!r}: directory {os.path.dirname(out) or '.'!r} {what}")
    if not os.access(parent, os.W_OK):
        raise BadValue(f"{name} {out!r}: {parent!r} is not writable")
    return kind


def _read_manifest_quietly(run_dir: str) -> dict | None:
    try:
        return shards.read_manifest(run_dir) if os.path.isdir(run_dir) else None
    except ValueError:
        return None  # reported properly by _prepare on rank 0


@contextlib.contextmanager
def _run_lock(run_dir: str):
    """Hold DIR/.lock exclusively (filelock): two separate runs must not write one directory at once."""
    from filelock import FileLock, Timeout

    lock = FileLock(os.path.join(run_dir, ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout as e:
        raise UserError(f"{run_dir} is being written by another running `ddpm-fast sample`") from e
    try:
        yield
    finally:
        lock.release()


def _manifest(num: int, settings: dict, info: dict, done: dict) -> dict:
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


def _prepare(
    run_dir: str, num: int, settings: dict, info: dict, labels: np.ndarray | None
) -> tuple[dict, list[int]]:
    """Rank 0, holding the run's lock: check the manifest's settings, and only then write anything (the
    labels, the shards folder, the manifest); keep valid shards, drop damaged ones and stale temporaries.

    Returns (done records {k: {count, sha256}}, shard ids still to draw).
    """
    old = shards.read_manifest(run_dir)
    if old is not None:
        why = _settings_difference(settings, old["settings"])
        if why is not None:
            raise UserError(
                f"{run_dir} holds a run with other settings ({why}); rerun with the original settings "
                "or use a new --out directory"
            )
        if isinstance(old.get("num"), int) and num < old["num"]:
            raise UserError(
                f"{run_dir} holds a run of {old['num']} images; --num {num} would delete finished shards: "
                f"rerun with --num {old['num']} (or more), or use a new --out directory"
            )
        if old.get("library_version") != __version__:
            log.warning(
                "%s was started by ddpm-fast %s; this is %s", run_dir, old.get("library_version"), __version__
            )
    else:
        # (hidden names are temporaries, removed below)
        shard_dir = os.path.join(run_dir, shards.SHARDS)
        found = (
            [n for n in os.listdir(shard_dir) if not n.startswith(".")] if os.path.isdir(shard_dir) else []
        )
        if found:  # their settings are unknown: counting them as done could mix two runs' images
            raise UserError(
                f"{run_dir} holds {len(found)} shard(s) but no {shards.MANIFEST}, so their settings are "
                "unknown; move them away or use a new --out directory"
            )
    os.makedirs(os.path.join(run_dir, shards.SHARDS), exist_ok=True)
    if labels is not None:  # the settings agree, so these are the labels the manifest records
        buf = io.BytesIO()
        np.save(buf, labels, allow_pickle=False)
        shards.atomic_write_bytes(os.path.join(run_dir, shards.LABELS), buf.getvalue())
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
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _write_error(e: BaseException, k: int, path: str) -> BaseException:
    if isinstance(e, OSError):
        return OSError(e.errno, f"cannot write shard {k} to {path}: {e.strerror or e}")
    return e


def _run_sharded(
    sampler: Sampler,
    run_dir: str,
    num: int,
    settings: dict,
    dist: Dist,
    progress: bool,
    merge: bool,
    labels: np.ndarray | None = None,
):
    info = {
        "world_size": dist.world,
        "batch_size": sampler.batch_size,
        "backend": sampler.backend,
        "device": str(sampler.plan.device),
        "torch": torch.__version__,
    }
    ranges = shards.shard_ranges(num, settings["shard_size"])
    with contextlib.ExitStack() as stack:  # the bar closes first, then rank 0's lock is released
        done, todo = _open_run(stack, run_dir, num, settings, info, labels, dist)
        skipped = num - sum(ranges[k][1] for k in todo)
        bar = Progress(num, skipped, progress)
        stack.callback(bar.close)
        new_images = _draw_shards(sampler, run_dir, num, settings, info, dist, bar, done, todo, progress)
        seconds = bar.close()

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


def _open_run(
    stack: contextlib.ExitStack, run_dir: str, num: int, settings: dict, info: dict, labels, dist: Dist
) -> tuple[dict, list[int]]:
    """Rank 0 takes the run's lock (held until `stack` closes) and checks the directory (`_prepare`); every
    rank learns the verdict, so a refusal stops all of them alike. Returns (done records, shards to draw)."""
    verdict = None
    done: dict = {}
    if dist.rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            stack.enter_context(_run_lock(run_dir))
            done, todo = _prepare(run_dir, num, settings, info, labels)
            verdict = ("ok", todo)
        except (UserError, OSError) as e:
            verdict = ("error", f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
    verdict = dist.broadcast(verdict)
    if verdict[0] == "error":
        if dist.rank != 0:
            raise SystemExit(2)  # rank 0 reports it; one message, not one per rank
        raise UserError(verdict[1])
    return done, verdict[1]


def _draw_shards(
    sampler: Sampler,
    run_dir: str,
    num: int,
    settings: dict,
    info: dict,
    dist: Dist,
    bar,
    done,
    todo,
    progress,
) -> int:
    """Draw this rank's shards of `todo` round by round; rank 0 records every written shard in the manifest
    after each round. Returns the number of images drawn by all ranks."""
    fmt, ranges = settings["format"], shards.shard_ranges(num, settings["shard_size"])
    manifest_path = os.path.join(run_dir, shards.MANIFEST)
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
    return new_images

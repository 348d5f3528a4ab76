"""`ddpm-fast train`: the DDPM training loop (Ho et al. 2020, Algorithm 1) with EMA weights and exact resume.

One step, for a batch of x0 in [-1, 1]:

    t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = mean || eps - eps_theta(x_t, t) ||^2        (the paper's L_simple)

AdamW with linear learning-rate warm-up, gradient-norm clipping, and an EMA of the weights
(decay min(ema_decay, (1 + s) / (10 + s)) at step s) which is what gets sampled and saved.

Output directory:

    config.json, model.safetensors     the EMA model in the native format (`ddpm_fast.load_model` reads it)
    state.json, state-<step>.safetensors   training state: weights, EMA, optimizer, RNG; JSON names the tensor file
    samples/step-<step>.png             a grid sampled from the EMA at each checkpoint
    log.jsonl                           step, loss, learning rate, wall time
    train_config.json                   the options of the run

A run's files are never overwritten unasked: `--resume` continues them, `--force` deletes them and starts
over, and without either a directory that holds any of them is refused (usually a mistyped --out).

Exact resume: the batch order, t and eps of step s are drawn from generators seeded by (seed, s), so they
do not depend on what ran before; dropout draws from the global RNG, reseeded from (seed, step, rank) at
every step (so ranks drop different units, and resume is exact under DDP as well). A run stopped
at step N and resumed to 2N gives the same weights as one that ran to 2N uninterrupted (tested).

Multi-GPU: launch the same command under `torchrun`; each rank takes its slice of the global batch
(batch size per rank x world size) and DDP averages the gradients. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm_fast.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_model
from ddpm_fast.checks import check_int, is_int
from ddpm_fast.devices import resolve_device
from ddpm_fast.distributed import env_world, join
from ddpm_fast.errors import BadValue
from ddpm_fast.images import IMAGE_SUFFIXES, save_grid, to_uint8
from ddpm_fast.progress import progress_bar
from ddpm_fast.sampling import sample
from ddpm_fast.schedule import Schedule
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.unet import UNet, UNetConfig

__all__ = [
    "TrainConfig",
    "TrainLoop",
    "load_dataset",
    "train",
    "diffusion_loss",
    "save_state",
    "load_state",
]

log = logging.getLogger("ddpm_fast")

PRESETS = ("digits", "tiny", "cifar10", "celebahq256")
STATE_JSON = "state.json"
STATE_VERSION = 1
LOG_JSONL = "log.jsonl"
TRAIN_CONFIG_JSON = "train_config.json"


# ---------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that decides the weights a run produces (saved in state.json; a resume must match it)."""

    data: str = "digits"
    preset: str = "digits"
    image_size: int | None = None  # None: the preset's sample_size (digits: 8, their native size)
    channels: int | None = None  # None: the data's channel count
    dropout: float | None = None  # None: the preset's
    hflip: bool = False  # random horizontal flips (DDPM used them on CIFAR-10; wrong for digits)
    schedule: str = "linear"
    num_timesteps: int = 1000
    steps: int = 10000
    batch_size: int = 128  # per process
    lr: float = 2e-4
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    # The sampling default written into the checkpoint. On the bundled digits model fixed_small and fixed_large
    # score the same at 1000 steps and fixed_small is ahead at 250 respaced steps (0.922 vs 0.906 classifier share).
    variance: str = "fixed_small"
    bf16: bool = False

    def validate(self) -> None:
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if not is_int(v) or v < minimum:
                raise BadValue(f"{name} must be an int >= {minimum}; got {v!r}")

        for name in ("steps", "batch_size", "num_timesteps"):
            pos_int(name)
        pos_int("warmup", 0)
        pos_int("seed", 0)
        if self.preset not in PRESETS:
            raise BadValue(f"preset must be one of {PRESETS}; got {self.preset!r}")
        if self.schedule not in ("linear", "cosine"):
            raise BadValue(f"schedule must be 'linear' or 'cosine'; got {self.schedule!r}")
        if self.variance not in ("fixed_small", "fixed_large"):
            raise BadValue(f"variance must be 'fixed_small' or 'fixed_large'; got {self.variance!r}")
        if self.image_size is not None:
            pos_int("image_size")
        if self.channels is not None and self.channels not in (1, 3):
            raise BadValue(f"channels must be 1 or 3; got {self.channels!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BadValue(f"lr must be a positive float; got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise BadValue(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        if not self.grad_clip > 0:
            raise BadValue(
                f"grad_clip must be positive (use a large value to disable); got {self.grad_clip!r}"
            )
        if not 0 <= self.ema_decay < 1:
            raise BadValue(f"ema_decay must lie in [0, 1); got {self.ema_decay!r}")

    def make_schedule(self) -> Schedule:
        if self.schedule == "linear":
            return Schedule.linear(self.num_timesteps)
        return Schedule.cosine(self.num_timesteps)


# ---------------------------------------------------------------------------------------------- data


def load_dataset(source: str, *, image_size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """All training images as one uint8 or float32 tensor [N, C, H, W]; `to_model_space` maps it to [-1, 1].

    source: "digits" (scikit-learn's 8x8 digits, values 0..16, kept as float32), a folder of images
    (Pillow; resized so the short side is `image_size`, then center-cropped), or an .npz whose `arr_0` is
    uint8 NHWC (0..255) or float NHWC in [-1, 1].
    """
    if not isinstance(source, str) or not source:
        raise BadValue(f"data must be 'digits', an image folder or an .npz file; got {source!r}")
    if source == "digits":
        try:
            from sklearn.datasets import load_digits  # optional dependency: data="digits" only
        except ImportError as e:
            raise RuntimeError("data='digits' needs scikit-learn: pip install scikit-learn") from e
        x = torch.from_numpy(load_digits().images.astype(np.float32))[:, None]  # [1797, 1, 8, 8], 0..16
        x = x / 8.0 - 1.0
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"data {source!r} does not exist (expected 'digits', a folder or an .npz)"
            )
        if path.is_dir():
            x = _load_folder(path, image_size, channels)
        elif path.suffix == ".npz":
            x = _load_npz(path)
        else:
            raise BadValue(f"data must be 'digits', an image folder or an .npz file; got {source!r}")
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        else:  # ITU-R 601 luma, as Pillow's convert("L")
            luma = (to_model_space(x) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(
                1, keepdim=True
            )
            x = luma.clamp(-1, 1)
    if image_size is not None and x.shape[-1] != image_size:
        xf = to_model_space(x)
        xf = F.interpolate(
            xf, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
        x = xf.clamp(-1, 1)
    if x.shape[0] == 0:
        raise BadValue(f"data {source!r} holds no images")
    return x


def _load_npz(path: Path) -> torch.Tensor:
    try:
        with np.load(path, allow_pickle=False) as f:
            held = list(f.keys())
            a = f["arr_0"] if "arr_0" in held else None
    except (ValueError, zipfile.BadZipFile) as e:  # numpy's words for a file that is not an .npz of arrays
        raise BadValue(f"{path} is not a readable .npz file ({e})") from e
    if a is None:
        raise BadValue(f"{path} has no 'arr_0' array; found {held}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise BadValue(f"{path}: arr_0 must be NHWC with 1 or 3 channels; got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise BadValue(f"{path}: arr_0 must be uint8 or float; got {a.dtype}")
    t = t.float()
    if t.min() < -1.0001 or t.max() > 1.0001:
        raise BadValue(f"{path}: float arr_0 must lie in [-1, 1]; got [{t.min():.3g}, {t.max():.3g}]")
    return t.clamp(-1, 1)


def _load_folder(path: Path, image_size: int | None, channels: int | None) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadValue(f"data folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    if image_size is None:
        raise BadValue("image_size must be given for an image folder")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), image_size, image_size, 1 if mode == "L" else 3), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert(mode)
            w, h = im.size
            s = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            out[i] = np.asarray(im).reshape(image_size, image_size, -1)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> [-1, 1] float32; float data is already in model space."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def batch_indices(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """The dataset rows of global batch `step`: epochs are random permutations, each a function of (seed, epoch)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 1)))
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.int64)


def _mix(*xs: int) -> int:
    """A 63-bit seed from a few ints (splitmix64-style), so (seed, step) pairs never share a stream."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------- loss


def diffusion_loss(
    model, x0: torch.Tensor, schedule_buffers: dict, generator: torch.Generator
) -> torch.Tensor:
    """L_simple = mean ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2, t ~ U{0..T-1}."""
    sa, s1 = schedule_buffers["sqrt_alphas_cumprod"], schedule_buffers["sqrt_one_minus_alphas_cumprod"]
    B = x0.shape[0]
    t = torch.randint(0, sa.numel(), (B,), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = sa[t].view(B, 1, 1, 1) * x0 + s1[t].view(B, 1, 1, 1) * eps
    out = model(x_t, t)
    return F.mse_loss(out[:, : x0.shape[1]].float(), eps)


# ---------------------------------------------------------------------------------------------- state files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(path), data)


def save_state(out: Path, *, step: int, model, ema, optimizer, config: TrainConfig, extra: dict) -> None:
    """Write state-<step>.safetensors (tensors) then state.json (scalars, names the tensor file), both atomically."""
    from safetensors.torch import save

    tensors = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    for k, v in ema.state_dict().items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    scalars = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name = f"state-{step:08d}.safetensors"
    _atomic_write_bytes(out / name, save(tensors))
    meta = {
        "version": STATE_VERSION,
        "step": step,
        "tensors": name,
        "config": config.__dict__,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        **extra,
    }
    _atomic_write_bytes(out / STATE_JSON, (json.dumps(meta, indent=1) + "\n").encode())
    for old in out.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_state(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json contents, tensors) of the last checkpoint in `out`."""
    from safetensors.torch import load_file

    meta_path = out / STATE_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"--resume: no training state in {str(out)!r} (expected {STATE_JSON})")
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != STATE_VERSION:
        raise BadValue(f"{meta_path}: unsupported state version {meta.get('version')!r}")
    return meta, load_file(str(out / meta["tensors"]))


def _restore(meta: dict, tensors: dict, model, ema, optimizer) -> None:
    def sub(prefix):
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(sub("model."))
    ema.load_state_dict(sub("ema."))
    state: dict = {}
    for k, v in sub("optim.").items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for k, v in meta["optimizer"]["scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("rng.cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _run_files(out: Path) -> list[Path]:
    """The files of a training run (see the module docstring) that exist in `out`.

    The files that name others (state.json, config.json) come first, so that deleting in this order never
    leaves one behind that names a deleted file.
    """
    if not out.is_dir():
        return []
    named = [out / n for n in (STATE_JSON, CONFIG_FILE, WEIGHTS_FILE, LOG_JSONL, TRAIN_CONFIG_JSON)]
    globbed = sorted(out.glob("state-*.safetensors")) + sorted(out.glob("samples/step-*.png"))
    return [p for p in named if p.is_file()] + globbed


def _check_out(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to resume a missing run or to overwrite one unasked: both are usually a mistyped --out."""
    if resume and force:
        raise BadValue("--resume continues the run in --out and --force deletes it; pass one or the other")
    if resume:
        if not out.exists():
            raise BadValue(
                f"--resume: {str(out)!r} does not exist; check --out, or drop --resume to start a new run"
            )
        if not (out / STATE_JSON).is_file():
            if _run_files(out):  # stopped before its first checkpoint
                raise BadValue(
                    f"--resume: {str(out)!r} holds no checkpoint ({STATE_JSON}) to resume from; "
                    "pass --force instead of --resume to start over"
                )
            raise BadValue(
                f"--resume: {str(out)!r} holds no training run ({STATE_JSON}); "
                "check --out, or drop --resume to start a new run"
            )
    elif not force:
        found = _run_files(out)
        if found:
            raise BadValue(
                f"--out {str(out)!r} already holds a training run ({found[0].relative_to(out)}); "
                "pass --resume to continue it or --force to start over"
            )


def _remove_run(out: Path) -> None:
    """Delete the files of the run in `out` (`--force`); anything else in it stays."""
    for p in _run_files(out):
        p.unlink()
    samples = out / "samples"
    if samples.is_dir() and not any(samples.iterdir()):
        samples.rmdir()


# ---------------------------------------------------------------------------------------------- training


def _build_model_config(cfg: TrainConfig, data_shape):
    C, H = data_shape[1], data_shape[-1]
    overrides = {"in_channels": C, "out_channels": C, "sample_size": H}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    return getattr(UNetConfig, cfg.preset)(**overrides)


def _save_model(ema, out: Path, cfg: TrainConfig, schedule: Schedule) -> None:
    save_model(ema, out, schedule=schedule, sampling={"variance": cfg.variance, "clip": True})


def _save_grid(ema, schedule: Schedule, cfg: TrainConfig, path: Path, steps: int, n: int = 64) -> None:
    C, H = ema.config.in_channels, ema.config.sample_size
    x = sample(
        ema,
        schedule,
        (n, C, H, H),
        steps=min(steps, schedule.num_timesteps),
        variance=cfg.variance,
        seed=0,
        backend="reference",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(to_uint8(x), str(path))


def _adamw(model, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on biases and norm gains
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )


def _warmup(cfg: TrainConfig, optimizer, step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = cfg.lr * min(1, (s + 1) / warmup) at step s (cfg.lr throughout for warmup 0), placed at `step`."""
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr  # the base rate a scheduler resumed at last_epoch >= 0 needs
    factor = (lambda s: min(1.0, (s + 1) / cfg.warmup)) if cfg.warmup else (lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def _check_resumable(meta: dict, cfg: TrainConfig, out: Path) -> None:
    saved = dict(meta["config"])
    mine = dict(cfg.__dict__)
    saved.pop("steps", None), mine.pop("steps", None)  # a resume may extend the run
    if saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise BadValue(
            f"--resume: options differ from the run in {str(out)!r}: "
            + ", ".join(f"{k}={mine.get(k)!r} (saved {saved.get(k)!r})" for k in diff)
        )


class TrainLoop:
    """One run's model, EMA, optimizer, data and step (improved-diffusion's TrainLoop); `run(end)` takes
    optimizer steps up to `end`, logging every `log_every` and checkpointing every `save_every` steps."""

    def __init__(self, cfg: TrainConfig, out: Path, dev: torch.device, *, rank: int, world: int):
        self.cfg, self.out, self.dev = cfg, out, dev
        self.rank, self.world, self.main = rank, world, rank == 0
        self.data = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels)
        self.mcfg = _build_model_config(cfg, self.data.shape)
        self.schedule = cfg.make_schedule()
        self.buffers = {
            k: getattr(self.schedule, k).to(dev, torch.float32)
            for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        }
        torch.manual_seed(_mix(cfg.seed, 0xF00D))  # initial weights, the same on every rank
        self.model = UNet(self.mcfg).to(dev)
        self.ema = UNet(self.mcfg).to(dev).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = _adamw(self.model, cfg)
        self.step = 0
        self.running, self.last_loss = None, float("nan")

    def resume(self) -> None:
        meta, tensors = load_state(self.out)
        _check_resumable(meta, self.cfg, self.out)
        _restore(meta, tensors, self.model, self.ema, self.optimizer)
        self.step = int(meta["step"])
        if self.main:
            log.info("resumed %s at step %d", self.out, self.step)

    def run(
        self, end: int, *, compile: bool, progress: bool, log_every: int, save_every: int, sample_steps: int
    ):
        net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None
            )
        fwd = torch.compile(net) if compile else net
        scheduler = _warmup(self.cfg, self.optimizer, self.step)
        bar = progress_bar(
            self.cfg.steps,
            "train",
            "step",
            enabled=progress and self.main,
            initial=self.step,
            dynamic_ncols=True,
        )
        gen = torch.Generator(device=self.dev)
        t_start = time.perf_counter()
        self.model.train()
        while self.step < end:
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.train_step(fwd, gen)
            scheduler.step()
            # .item() synchronises a GPU: read the loss every 10 steps only.
            if self.step % 10 == 0 or self.step % log_every == 0 or self.step == end:
                self.read_loss(loss, lr, bar)
            if bar is not None:
                bar.update(1)
            if self.main and (self.step % log_every == 0 or self.step == end):
                rec = {"step": self.step, "loss": self.last_loss, "loss_avg": self.running, "lr": lr}
                rec["time_s"] = round(time.perf_counter() - t_start, 2)
                with open(self.out / LOG_JSONL, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if self.step % save_every == 0 or self.step == end:
                self.checkpoint(sample_steps)
        if bar is not None:
            bar.close()

    def train_step(self, fwd, gen: torch.Generator) -> torch.Tensor:
        """One optimizer step on the batch of step `self.step` (its draws keyed by (seed, step, rank))."""
        cfg, dev, step = self.cfg, self.dev, self.step
        idx = batch_indices(self.data.shape[0], step, cfg.batch_size * self.world, cfg.seed)[
            self.rank :: self.world
        ]
        x0 = to_model_space(self.data[idx]).to(dev, non_blocking=True)
        gen.manual_seed(_mix(cfg.seed, step, self.rank, 2))  # t, eps, flips
        torch.manual_seed(_mix(cfg.seed, step, self.rank, 3))  # dropout
        if cfg.hflip:
            flip = torch.rand(x0.shape[0], generator=gen, device=dev) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = diffusion_loss(fwd, x0, self.buffers, gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        _ema_update(self.ema, self.model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        self.step += 1
        return loss

    def read_loss(self, loss: torch.Tensor, lr: float, bar) -> None:
        self.last_loss = loss.item()
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"loss became {self.last_loss} at step {self.step}; lower --lr")
        self.running = self.last_loss if self.running is None else 0.9 * self.running + 0.1 * self.last_loss
        if bar is not None:
            bar.set_postfix(loss=f"{self.running:.4f}", lr=f"{lr:.2e}", refresh=False)

    def checkpoint(self, sample_steps: int) -> None:
        """state, EMA model and (sample_steps > 0) a sample grid, on rank 0; every rank waits for it."""
        if self.main:
            save_state(
                self.out,
                step=self.step,
                model=self.model,
                ema=self.ema,
                optimizer=self.optimizer,
                config=self.cfg,
                extra={
                    "loss_avg": self.running,
                    "world_size": self.world,
                    "model_config": self.mcfg.to_dict(),
                },
            )
            _save_model(self.ema, self.out, self.cfg, self.schedule)
            if sample_steps:
                path = self.out / "samples" / f"step-{self.step:08d}.png"
                _save_grid(self.ema, self.schedule, self.cfg, path, sample_steps)
        if self.world > 1:
            torch.distributed.barrier()


def train(
    cfg: TrainConfig,
    out,
    *,
    resume: bool = False,
    force: bool = False,
    device=None,
    save_every: int = 1000,
    sample_steps: int = 100,
    compile: bool = False,
    progress: bool = True,
    log_every: int = 50,
    stop_after: int | None = None,
):
    """Train to `cfg.steps` optimizer steps, writing checkpoints to `out`; returns the EMA model.

    `resume`: continue the run in `out`; `force`: delete the run in `out` and start over. Without either,
    an `out` that holds a run is refused. `stop_after`: return after this many steps of this call (tests
    use it to cut a run short).
    """
    cfg.validate()
    check_int(save_every, "save_every")
    if not is_int(sample_steps) or sample_steps < 0:
        raise BadValue(f"sample_steps must be an int >= 0 (0: no sample grids); got {sample_steps!r}")
    out = Path(out)
    _check_out(out, resume=resume, force=force)
    rank, world, local_rank = env_world()
    dev = resolve_device(device, local_rank, world, name="device")
    if cfg.bf16 and dev.type != "cuda":
        raise BadValue(f"--bf16 is for CUDA devices only; the device is {dev}")
    if world > 1:
        join(dev)  # the group stays for DistributedDataParallel; the process ends with it
        torch.distributed.barrier()  # every rank has checked --out before rank 0 changes it
    if force and rank == 0:
        _remove_run(out)
    loop = TrainLoop(cfg, out, dev, rank=rank, world=world)
    if resume:
        loop.resume()
    if rank == 0:
        _atomic_write_bytes(out / TRAIN_CONFIG_JSON, (json.dumps(cfg.__dict__, indent=1) + "\n").encode())
    end = cfg.steps if stop_after is None else min(cfg.steps, loop.step + stop_after)
    loop.run(
        end,
        compile=compile,
        progress=progress,
        log_every=log_every,
        save_every=save_every,
        sample_steps=sample_steps,
    )
    return loop.ema


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the parameters; buffers are copied from the model."""
    ep, mp = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


# ---------------------------------------------------------------------------------------------- command line

"""`ddpm-fast bench`: sampling backends side by side on one device, in one run.

    ddpm-fast bench --device cpu --out bench/                       # tiny U-Net, batch 1 and 4, 10 steps
    ddpm-fast bench --device cuda --model cifar10 --batch-sizes 1,16,64,256 --steps 20 --out bench/

Providers (`PROVIDERS`, name -> factory(model, schedule, shape, steps, device) -> callable; add one there):
reference (eager oracle), fast (compile + CUDA graph + Triton), fast-* (each option off; -bf16: conv and linear
weights cast to bf16 once, the rest under autocast; -cl: channels_last; -compile: torch.compile forced on;
-freeze: compiled with inductor's freezing, CPU),
diffusers (DDPMPipeline, float32, eager, the same weights and schedule), onnx (ddpm_fast.export), openvino
and openvino-bf16 (backend "openvino", precision hint f32 / bf16).

GFLOP/s = the model's FLOPs per image per step (torch.utils.flop_counter) x batch x steps / median run time;
on CPU each is also given as a fraction of the machine's GEMM peak for the provider's dtype (bf16 providers:
the bfloat16 peak), both peaks measured as 2048^3 matmuls in the same run (`gemm_peaks`).

Every provider runs all T steps of a linear schedule with T = --steps, so each does the same work per step
and diffusers' own step spacing never differs from ours. For each (provider, batch): the first call
(compile, warm-up, capture) is timed apart; then --repeats full runs give the median and 20/80 quantiles
(CUDA: synchronised around each run). images/s = batch / median run time; ms/step = median / steps.
max |diff|: against the reference run with the same noise (counter-based; diffusers: the same
torch.Generator), in model space [-1, 1]. Writes bench.md, bench.json and bench.png under --out.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ddpm_fast as df
from ddpm_fast.adm import ADM, ADMConfig
from ddpm_fast.adm_io import preset_config
from ddpm_fast.bench.onnx import onnx_provider
from ddpm_fast.checks import check_int
from ddpm_fast.defaults import defaults_of
from ddpm_fast.diffusers_io import diffusers_kwargs
from ddpm_fast.errors import BadValue, Unavailable
from ddpm_fast.plan import make_plan
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.unet import diffusers_key

__all__ = [
    "PROVIDERS",
    "benchmark",
    "markdown",
    "write_report",
    "diffusers_unet",
    "device_info",
]

PRESETS = ("tiny", "digits", "cifar10", "celebahq256")
SEED = 0


# ---------------------------------------------------------------------------------------------- providers


def _sampler(**kwargs) -> Callable:
    def factory(model, schedule, shape, steps, device):
        labels = "random" if defaults_of(model).num_classes else None  # a class-conditional model

        def call():
            return df.sample(model, schedule, shape, seed=SEED, device=device, labels=labels, **kwargs)

        return call

    return factory


def diffusers_unet(model):
    """A diffusers UNet2DModel computing the same function as our `model` (its weights copied by name)."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise Unavailable("the diffusers provider needs diffusers (pip install diffusers)") from e
    try:
        net = UNet2DModel(**diffusers_kwargs(model.config))
    except ValueError as e:
        raise Unavailable(f"the diffusers provider cannot build this U-Net: {e}") from e
    state = {diffusers_key(k): v for k, v in model.state_dict().items()}
    net.load_state_dict(state)
    p = next(model.parameters())
    net = net.to(p.device)
    return (net if p.dtype == torch.float32 else net.to(p.dtype)).eval()


def _diffusers_factory(model, schedule, shape, steps, device):
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.tolist(),
        variance_type="fixed_small",
        clip_sample=True,
    )
    pipe = DDPMPipeline(unet=diffusers_unet(model), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen_device = "cpu" if device.type == "cpu" else device

    def call():
        g = torch.Generator(gen_device).manual_seed(SEED)
        img = pipe(batch_size=shape[0], generator=g, num_inference_steps=steps, output_type="pt").images
        return img * 2 - 1  # the pipeline returns (x / 2 + 0.5).clamp(0, 1)

    call.reference = lambda: df.sample(  # the same noise as the pipeline: diffusers' generator order
        model, schedule, shape, generator=torch.Generator(gen_device).manual_seed(SEED), backend="reference"
    )
    return call


def _diffusers_solver(method: str, scheduler: str, **config) -> Callable:
    """A diffusers multistep scheduler driving diffusers' UNet2DModel twin of `model` (the solvers' peer);
    `reference` is ddpm-fast's reference backend with the same timesteps and generator noise."""

    def factory(model, schedule, shape, steps, device):
        import diffusers

        unet = diffusers_unet(model)
        # trailing: distinct timesteps also when steps == T (linspace then repeats one, which we refuse)
        sched = getattr(diffusers, scheduler)(
            num_train_timesteps=schedule.num_timesteps,
            trained_betas=schedule.betas.tolist(),
            timestep_spacing="trailing",
            **config,
        )
        gen_device = "cpu" if device.type == "cpu" else device

        def call():
            sched.set_timesteps(steps, device=device)
            g = torch.Generator(gen_device).manual_seed(SEED)
            x = torch.randn(shape, generator=g, device=gen_device).to(device)
            kw = {"generator": g} if "sde" in config.get("algorithm_type", "") else {}
            with torch.no_grad():
                for t in sched.timesteps:
                    x = sched.step(unet(x, t.expand(shape[0])).sample, t, x, **kw).prev_sample
            return x

        call.reference = lambda: df.sample(
            model, schedule, shape, timesteps=sched.timesteps.tolist(), method=method, clip=False,
            generator=torch.Generator(gen_device).manual_seed(SEED), backend="reference",
        )  # fmt: skip
        return call

    return factory


def _onnx_factory(model, schedule, shape, steps, device):
    plan = make_plan(model, schedule, shape, seed=SEED, device=device)
    prov = onnx_provider(model, plan)

    def call():
        return prov()

    call.setup_s = getattr(prov, "export_seconds", 0.0) + getattr(prov, "session_seconds", 0.0)
    call.keep = prov  # the temporary .onnx lives as long as the callable
    return call


PROVIDERS: dict[str, Callable] = {
    "reference": _sampler(backend="reference"),
    "fast": _sampler(backend="fast"),
    "fast-nocompile": _sampler(backend="fast", compile=False),
    "fast-nograph": _sampler(backend="fast", cuda_graph=False),
    "fast-notriton": _sampler(backend="fast", triton=False),
    "fast-bf16": _sampler(backend="fast", dtype=torch.bfloat16),
    "fast-bf16-nocompile": _sampler(backend="fast", dtype=torch.bfloat16, compile=False),
    "fast-bf16-compile": _sampler(backend="fast", dtype=torch.bfloat16, compile=True),
    "fast-bf16-cl": _sampler(backend="fast", dtype=torch.bfloat16, compile=False, channels_last=True),
    "fast-bf16-cl-compile": _sampler(backend="fast", dtype=torch.bfloat16, compile=True, channels_last=True),
    "fast-freeze": _sampler(backend="fast", freeze=True),
    "fast-bf16-freeze": _sampler(backend="fast", dtype=torch.bfloat16, freeze=True),
    "fast-bf16-cl-freeze": _sampler(backend="fast", dtype=torch.bfloat16, freeze=True, channels_last=True),
    "diffusers": _diffusers_factory,
    "diffusers-dpmpp_2m": _diffusers_solver(
        "dpmpp_2m", "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2
    ),
    "diffusers-unipc": _diffusers_solver("unipc", "UniPCMultistepScheduler", solver_order=2),
    "onnx": _onnx_factory,
    "openvino": _sampler(backend="openvino"),
    "openvino-bf16": _sampler(backend="openvino", dtype=torch.bfloat16),
}
CUDA_ONLY = ("fast-nograph",)
DEFAULT_PROVIDERS = {
    "cpu": [
        "reference",
        "fast",
        "fast-nocompile",
        "fast-bf16",
        "diffusers",
        "onnx",
        "openvino",
        "openvino-bf16",
    ],
    "cuda": ["reference", "diffusers", "fast-nocompile", "fast-bf16", "fast-bf16-nocompile", "fast"],
}


# ---------------------------------------------------------------------------------------------- measuring

GEMM_N = 2048  # the peak's matmul: 2048^3, large enough that every CPU kernel runs at its steady rate


def gemm_peaks(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a GEMM_N^3 matmul in float32 and bfloat16 on `device` (best of `repeats`): the machine's
    own limit, measured in the same run as the providers it is compared with."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(GEMM_N, GEMM_N, device=device).to(dtype)
        b = torch.randn(GEMM_N, GEMM_N, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: the kernel choice and packing buffers
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b), device)[0] for _ in range(repeats))
        out[name] = 2 * GEMM_N**3 / best / 1e9
    return out


def forward_flops(model, image_shape, device) -> int:
    """FLOPs of one forward of `model` on one image (torch.utils.flop_counter: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *image_shape), device=device)
    t = torch.zeros(1, dtype=torch.int64, device=device)
    cond = {"y": torch.zeros(1, dtype=torch.int64, device=device)} if defaults_of(model).num_classes else {}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, **cond)
    return int(counter.get_total_flops())


def provider_dtype(name: str) -> str:
    """The dtype a provider computes its GEMMs in: the peak its GFLOP/s is a fraction of."""
    return "bfloat16" if "bf16" in name else "float32"


def device_info(device: torch.device) -> dict:
    """Device name and library versions, put in every result row."""
    import importlib.metadata as md

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    if device.type == "cpu":
        name = f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "ddpm_fast": df.__version__}
    for pkg in ("triton", "diffusers", "onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    return {"device": str(device), "device_name": name, "versions": versions}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _max_diff(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    if b is None:
        return None
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


ADM_PRESETS = {"adm-imagenet64": "guided-imagenet64-cond", "adm-cifar10": "improved-cifar10-uncond"}


def build_model(spec: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A preset name (random weights: speed does not depend on them) or a checkpoint path; "adm-imagenet64"
    and "adm-cifar10" are openai's published ADM architectures (ddpm_fast.adm_io presets)."""
    if spec == "adm-tiny":  # a small class-conditional ADM: the CPU dry run of the ADM rows
        torch.manual_seed(seed)
        return ADM(ADMConfig.tiny().replace(num_classes=10)).to(device).eval()
    if spec in ADM_PRESETS:
        torch.manual_seed(seed)
        cfg, defaults = preset_config(ADM_PRESETS[spec])
        model = ADM(cfg.replace(dropout=0.0))
        model.defaults = defaults
        return model.to(device).eval()
    if spec in PRESETS:
        torch.manual_seed(seed)
        cfg = getattr(df.UNetConfig, spec)(dropout=0.0)
        return df.UNet(cfg).to(device).eval()
    return df.load_model(spec, device=device).eval()


def benchmark(
    model,
    *,
    device,
    batch_sizes=(1, 4),
    steps: int = 10,
    repeats: int = 3,
    providers=None,
    log=print,
) -> list[dict]:
    """One row per (batch size, provider) that ran; a provider that cannot run here gives a row with `error`."""
    device, providers = _check_request(device, steps, repeats, providers)
    schedule = df.Schedule.linear(steps)
    C, H, W = model.config.image_shape
    info = device_info(device)
    flops = forward_flops(model, (C, H, W), device)
    peaks = gemm_peaks(device) if device.type == "cpu" else {}
    if peaks:
        log(f"  GEMM {GEMM_N}^3 peaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    rows = []
    for B in batch_sizes:
        shape = (int(B), C, H, W)
        ref_out = None
        for name in providers:
            row = {"provider": name, "batch": shape[0], "steps": steps, "image": f"{C}x{H}x{W}", **info}
            try:
                fn = PROVIDERS[name](model, schedule, shape, steps, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                first, out = _timed(fn, device)
                times = [_timed(fn, device)[0] for _ in range(repeats)]
            except (Unavailable, ImportError, NotImplementedError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"  {name:<20} B={shape[0]:<4} unavailable: {row['error']}")
                rows.append(row)
                continue
            if name == "reference":
                ref_out = out
            ref_for = fn.reference() if hasattr(fn, "reference") else ref_out
            diff = _max_diff(out, ref_for) if name != "reference" else 0.0
            row.update(
                _figures(times, first, shape[0], steps, device, flops, diff, getattr(fn, "setup_s", 0.0))
            )
            peak = peaks.get(provider_dtype(name))
            if peak:
                row.update(
                    gemm_peak_gflops=peak, peak_dtype=provider_dtype(name), of_peak=row["gflops_per_s"] / peak
                )
            rows.append(row)
            log(
                f"  {name:<20} B={shape[0]:<4} {row['images_per_s']:10.2f} img/s {row['ms_per_step']:9.3f} ms/step"
                f"  setup {row['setup_s']:6.1f} s  max|diff| {_fmt(row['max_abs_diff'], '.2e')}"
            )
    _add_ratios(rows)
    return rows


def _check_request(device, steps, repeats, providers) -> tuple[torch.device, list[str]]:
    """`benchmark`'s arguments checked (one line naming the argument); providers with the reference first."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("device cuda was asked for but CUDA is not available")
    check_int(steps, "steps")
    check_int(repeats, "repeats")
    providers = list(providers or DEFAULT_PROVIDERS.get(device.type, DEFAULT_PROVIDERS["cpu"]))
    for p in providers:
        if p not in PROVIDERS:
            raise BadValue(f"providers must be among {sorted(PROVIDERS)}; got {p!r}")
        if p in CUDA_ONLY and device.type != "cuda":
            raise BadValue(f"provider {p!r} needs a CUDA device; got {device}")
    if "reference" in providers:  # the others are compared with it and their speed-ups are over it
        providers = ["reference"] + [p for p in providers if p != "reference"]
    return device, providers


def _figures(times, first, batch, steps, device, flops, diff, extra_setup) -> dict:
    """A row's timing, memory and throughput figures from its timed runs (`first` includes the set-up)."""
    med = statistics.median(times)
    cuda = device.type == "cuda"
    return dict(
        median_s=med,
        p20_s=_quantile(times, 0.2),
        p80_s=_quantile(times, 0.8),
        images_per_s=batch / med,
        ms_per_step=1e3 * med / steps,
        setup_s=max(first - med, 0.0) + extra_setup,
        max_abs_diff=diff,
        peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb(),
        peak_mem_kind="cuda max allocated" if cuda else "process peak RSS",
        flops_per_image_step=flops,
        gflops_per_s=flops * batch * steps / med / 1e9,
    )


def _add_ratios(rows: list[dict]) -> None:
    by = {(r["batch"], r["provider"]): r for r in rows if "images_per_s" in r}
    for r in rows:
        if "images_per_s" not in r:
            continue
        for base in ("reference", "diffusers"):
            b = by.get((r["batch"], base))
            r[f"speedup_vs_{base}"] = r["images_per_s"] / b["images_per_s"] if b else None


# ---------------------------------------------------------------------------------------------- reports


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    r0 = rows[0]
    vers = ", ".join(f"{k} {v}" for k, v in r0["versions"].items())
    lines = [
        f"Device: {r0['device_name']} ({r0['device']}); {vers}",
        f"Image {r0['image']}, {r0['steps']} steps per run; medians, [20%, 80%] quantiles.",
        "",
        "| provider | batch | images/s | ms/step [p20, p80] | setup s | x reference | x diffusers "
        "| max abs diff | peak MB | GFLOP/s | of GEMM peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peaks = {r["peak_dtype"]: r["gemm_peak_gflops"] for r in rows if "gemm_peak_gflops" in r}
    if peaks:
        lines.insert(
            2,
            f"GEMM {GEMM_N}^3 peaks measured in this run: "
            + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in sorted(peaks.items()))
            + f"; FLOPs counted on the model (torch.utils.flop_counter): "
            f"{rows[0].get('flops_per_image_step', 0) / 1e9:.2f} GFLOP per image per step.",
        )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | {r['batch']} | unavailable: {r['error']} | | | | | | | | |")
            continue
        s = r["steps"]
        lines.append(
            f"| {r['provider']} | {r['batch']} | {r['images_per_s']:.2f} | {r['ms_per_step']:.3f} "
            f"[{1e3 * r['p20_s'] / s:.3f}, {1e3 * r['p80_s'] / s:.3f}] | {r['setup_s']:.1f} "
            f"| {_fmt(r.get('speedup_vs_reference'), '.2f')} | {_fmt(r.get('speedup_vs_diffusers'), '.2f')} "
            f"| {_fmt(r.get('max_abs_diff'), '.1e')} | {_fmt(r.get('peak_mem_mb'), '.0f')} "
            f"| {_fmt(r.get('gflops_per_s'), '.1f')} "
            f"| {_fmt(r.get('of_peak'), '.2f')}{' ' + r['peak_dtype'] if r.get('peak_dtype') else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path | None:
    """images/s against batch size, one line per provider (log-log); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted(
            (r["batch"], r["images_per_s"]) for r in rows if r["provider"] == name and "images_per_s" in r
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    if rows:  # the whole device name, wrapped: a CPU's runs to ~60 characters with its core and thread counts
        r0 = rows[0]
        head = f"{r0['image']}, {r0['steps']} steps per run, {r0['device']}"
        ax.set_title("\n".join([head, *textwrap.wrap(r0["device_name"], 70)]), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    with open(tmp, "rb") as f:
        data = f.read()
    os.unlink(tmp)
    atomic_write_bytes(path, data)
    return path


def write_report(rows: list[dict], out_dir, stem: str = "bench", meta: dict | None = None) -> dict:
    """<out_dir>/<stem>.md, .json and .png (atomic writes); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(meta or {}), "rows": rows}
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json"}
    atomic_write_bytes(paths["md"], markdown(rows).encode())
    atomic_write_bytes(paths["json"], (json.dumps(doc, indent=2) + "\n").encode())
    png = plot(rows, out / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths


# ---------------------------------------------------------------------------------------------- command line

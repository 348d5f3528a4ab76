"""The posterior step, providers side by side: GB/s and speed-up over the eager chain.

    python benchmarks/bench_kernels.py --device cpu                       # CPU defaults, about a minute
    python benchmarks/bench_kernels.py --device cuda --json step.json     # batch 1/64/256 of 3x32x32, 3x256x256

Providers (one DDPM fixed_small step, t = 500 of 1000, clip on, noise on):
- eager:     the reference sampler's op chain (ten elementwise launches), noise from torch.randn
             (the cheapest noise eager torch has, so the baseline is not slowed by our Philox);
- twin:      `step_torch` run eagerly (counter-based Philox noise in int64 torch ops);
- compiled:  `torch.compile(step_torch, fullgraph=True)`, static shapes, compile time reported apart;
- triton:    the fused kernel `step_triton`, called from Python (CUDA only);
- triton_graph: the same launch captured once in a CUDA graph and replayed (as the engine runs it);
- copy:      `clone()` of a buffer moving the same bytes (the device's copy bandwidth; `frac_copy` is a
             provider's fraction of it).

Bytes per step: read x and eps, write x_{t-1}: 3 * numel * itemsize (the noise never touches memory); a
multistep solver's step (--methods dpmpp_2m,unipc) also reads and writes its K float32 x0 history entries:
+ 2 * K * numel * 4, and nothing more (its copy moves the same total; the eager chain is DDPM's only).
Times: medians with 20/80 quantiles (CUDA: triton.testing.do_bench, which flushes L2 between runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from ddpm_fast.kernels import step_args, step_torch, step_triton
from ddpm_fast.samplers import build_step_table
from ddpm_fast.schedule import Schedule

CPU_SIZES = "1x3x32x32,64x3x32x32"  # ~15 s of compile per size on 2 cores
CUDA_SIZES = "1x3x32x32,64x3x32x32,256x3x32x32,1x3x256x256,64x3x256x256,256x3x256x256"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STEP = 500  # a middle step: noise on, clip active for part of the elements


def parse_sizes(text: str) -> list[tuple[int, ...]]:
    sizes = []
    for item in text.split(","):
        try:
            shape = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"sizes must look like 64x3x32x32[,...]; got {item!r}") from None
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"sizes must be 4 positive dims BxCxHxW; got {item!r}")
        sizes.append(shape)
    return sizes


def _eager_chain(s: Schedule, j: int):
    """The reference sampler's DDPM step (fixed_small, clip) as eager ops with python-float coefficients."""
    sra, srm1 = s.sqrt_recip_alphas_cumprod[j].item(), s.sqrt_recipm1_alphas_cumprod[j].item()
    c1, c2 = s.posterior_mean_coef1[j].item(), s.posterior_mean_coef2[j].item()
    std = s.posterior_variance[j].sqrt().item()

    def step(x, eps):
        x0 = (sra * x - srm1 * eps).clamp(-1.0, 1.0)
        mean = c1 * x0 + c2 * x
        return mean + std * torch.randn(x.shape, device=x.device, dtype=torch.float32).to(x.dtype)

    return step


def _time(fn, device: torch.device, samples: int = 20) -> tuple[float, float, float]:
    """(median, 20%, 80%) milliseconds per call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, int(2e-3 / max(once, 1e-9)))  # each sample at least ~2 ms so the clock's grain is noise
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


PROVIDERS = ("eager", "twin", "compiled", "triton", "triton_graph", "copy")
CUDA_ONLY = ("triton", "triton_graph")


def providers_for(device: torch.device) -> list[str]:
    return [p for p in PROVIDERS if p not in CUDA_ONLY or device.type == "cuda"]


def step_callables(
    shape, device, dtype=torch.float32, providers=PROVIDERS, method: str = "ddpm"
) -> tuple[dict, dict, int]:
    """(provider -> zero-argument step on fresh buffers of `shape`, compile seconds per provider, bytes per step)."""
    device = torch.device(device)
    s = Schedule.linear(1000)
    table = build_step_table(s, method=method)
    coefs, ts = table.to(device)
    K = table.history
    step = torch.full((1,), s.num_timesteps - 1 - STEP, dtype=torch.int64, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    eps = torch.randn(shape, generator=g, device=device).to(dtype)
    out = torch.empty_like(x)
    history = torch.zeros((K, *shape), dtype=torch.float32, device=device) if K else None
    nbytes = 3 * x.numel() * x.element_size() + 2 * K * x.numel() * 4
    # [seed, start_index] as the engine passes them: a device tensor the launch reads
    keys = torch.zeros(2, dtype=torch.int64, device=device)
    run = step_args(x, coefs, ts, seed=keys[0:1], start_index=keys[1:2], clip_range=1.0, history=history)
    eager = _eager_chain(s, STEP)
    fns = {
        "eager": lambda: eager(x, eps),
        "twin": lambda: step_torch(x, eps, run, step, out=out),
        "triton": lambda: step_triton(x, eps, run, step, out=out),
    }
    compile_s = {}
    if "compiled" in providers:
        torch._dynamo.reset()
        compiled = torch.compile(step_torch, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        compiled(x, eps, run, step, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        compile_s["compiled"] = time.perf_counter() - t0
        fns["compiled"] = lambda: compiled(x, eps, run, step, out=out)
    if "triton_graph" in providers:
        # One replay of a captured launch: the kernel's device time without Python's per-call validation and
        # launch cost, which is how the engine runs it (one CUDA graph per step).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fns["triton"]()  # compile and warm up outside the capture
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fns["triton"]()
        fns["triton_graph"] = graph.replay
    buf = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    fns["copy"] = lambda: buf.clone()  # clone reads and writes buf: the step's bytes
    return fns, compile_s, nbytes


def device_info(device) -> dict:
    """Device name and library versions, put in every result row."""
    device = torch.device(device)
    return {"device": str(device), "device_name": _device_name(device), **_versions()}


def run(
    device="cpu", sizes=None, dtype=torch.float32, providers=None, samples: int = 20, methods=("ddpm",)
) -> list[dict]:
    """Benchmark every provider at every size and method; one dict per (method, size, provider), eager first
    (DDPM only: the eager chain is its step)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but CUDA is not available")
    if sizes is None:
        sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    if isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    providers = list(providers or providers_for(device))
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"providers must be among {PROVIDERS}; got {p!r}")
    for p in CUDA_ONLY:
        if p in providers and device.type != "cuda":
            raise ValueError(f"provider {p!r} needs a CUDA device; got {device}")
    common = {**device_info(device), "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for method, shape in [(m, sh) for m in methods for sh in sizes]:
        todo = [p for p in providers if p != "eager" or method == "ddpm"]
        fns, compile_s, nbytes = step_callables(shape, device, dtype, todo, method)
        measured = {}
        for p in todo:
            med, p20, p80 = _time(fns[p], device, samples)
            measured[p] = med
            rows.append(
                {
                    "provider": p,
                    "method": method,
                    "size": "x".join(map(str, shape)),
                    "median_ms": med,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "gbps": nbytes / (med * 1e-3) / 1e9,
                    "bytes": nbytes,
                    "compile_s": compile_s.get(p),
                    **common,
                }
            )
        for r in rows[-len(todo) :]:
            r["speedup_vs_eager"] = measured["eager"] / r["median_ms"] if "eager" in measured else None
            r["frac_copy"] = measured["copy"] / r["median_ms"] if "copy" in measured else None
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    head = (
        f"Posterior step, {r0['dtype']}, {r0['device_name']}; torch {r0['torch']}, triton {r0['triton']}, "
        f"python {r0['python']}\n\n"
        "| method | size | provider | median ms (p20-p80) | GB/s | x eager | of copy | compile s |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)
        lines.append(
            f"| {r.get('method', 'ddpm')} | {r['size']} | {r['provider']} | {r['median_ms']:.4f} ({r['p20_ms']:.4f}-{r['p80_ms']:.4f}) "
            f"| {r['gbps']:.1f} | {fmt(r['speedup_vs_eager'], '.2f')} | {fmt(r['frac_copy'], '.2f')} "
            f"| {fmt(r['compile_s'], '.1f')} |"
        )
    return head + "\n".join(lines) + "\n"


def write_json(path: str, rows: list[dict]) -> None:
    """Atomically: temp file in the target folder, fsync, rename."""
    from ddpm_fast.shards import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(rows, indent=1) + "\n").encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help=f"BxCxHxW list; default cpu {CPU_SIZES}, cuda {CUDA_SIZES}")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--providers", default=None, help=f"comma list from {','.join(PROVIDERS)}")
    ap.add_argument("--samples", type=int, default=20, help="timing samples per provider on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--methods", default="ddpm", help="comma list of sampler families (e.g. ddpm,dpmpp_2m,unipc)"
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"bench_kernels: --threads must be >= 1; got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        rows = run(
            args.device,
            args.sizes,
            DTYPES[args.dtype],
            args.providers.split(",") if args.providers else None,
            args.samples,
            tuple(args.methods.split(",")),
        )
    except (ValueError, RuntimeError) as e:
        print(f"bench_kernels: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

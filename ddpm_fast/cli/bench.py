"""`ddpm-fast bench`: the backends side by side on one device (`ddpm_fast.bench`)."""

from __future__ import annotations

from ddpm_fast.bench import PRESETS, PROVIDERS, benchmark, build_model, markdown, write_report
from ddpm_fast.cli import check_out_dir
from ddpm_fast.devices import resolve_device
from ddpm_fast.errors import BadValue


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise BadValue(f"--batch-sizes must be comma-separated positive ints; got {text!r}") from e
    if not vals or min(vals) < 1:
        raise BadValue(f"--batch-sizes must be comma-separated positive ints; got {text!r}")
    return vals


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--model", default=None, help=f"a preset ({', '.join(PRESETS)}; random weights) or a checkpoint"
    )
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: cpu 1,4; cuda 1,16,64,256)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: cpu 10, cuda 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point after the first (default 3)")
    p.add_argument("--providers", default=None, help=f"comma-separated, among {', '.join(PROVIDERS)}")
    p.add_argument("--out", default="bench", help="directory for bench.md, bench.json, bench.png")


def run(args) -> int:
    check_out_dir(args.out)  # before the benchmark, which takes minutes
    # Before build_model: moving a model to a CUDA device this machine lacks raises an AssertionError.
    # (--threads is ddpm_fast.cli's, applied before run(); device_info reports torch.get_num_threads().)
    device = resolve_device(args.device, name="--device")
    cuda = device.type == "cuda"
    model = build_model(args.model or ("cifar10" if cuda else "tiny"), device)
    batch_sizes = _int_list(args.batch_sizes) if args.batch_sizes else ([1, 16, 64, 256] if cuda else [1, 4])
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    rows = benchmark(
        model,
        device=device,
        batch_sizes=batch_sizes,
        steps=args.steps or (20 if cuda else 10),
        repeats=args.repeats,
        providers=providers,
    )
    meta = {"model": args.model or ("cifar10" if cuda else "tiny"), "parameters": model.num_parameters()}
    paths = write_report(rows, args.out, meta=meta)
    print(markdown(rows))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

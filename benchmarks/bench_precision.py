"""Does a lower precision change what is sampled? The bundled digits model's FD per backend and dtype, beside
the float32 reference at other seeds (the FD's own noise), side by side in one run.

For each method and step count, NUM = 540 samples from seed 0 on every provider, and the float32 reference
at seeds 1-4 too: the spread of those five FDs is what "unchanged within noise" is measured against. The FD
is benchmarks/bench_quality.py's (a digit classifier's 10 logits against 540 held-out real digits); the
`max |diff|` column is each provider's largest difference from the float32 reference at seed 0.

    python benchmarks/bench_precision.py [--out benchmarks/results/DIR] [--num 540]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # this checkout's ddpm_fast, not an installed one
sys.path.insert(1, str(Path(__file__).resolve().parent))
from bench_quality import frechet, judge, to_pixels  # noqa: E402

import ddpm_fast as df  # noqa: E402
from ddpm_fast.bench import cpu_model  # noqa: E402
from ddpm_fast.shards import atomic_write_bytes  # noqa: E402

CASES = (("dpmpp_2m", 20), ("ddpm", 100))
NOISE_SEEDS = (1, 2, 3, 4)
# name -> df.sample keyword arguments
PROVIDERS = {
    "reference f32": dict(backend="reference"),
    "fast bf16": dict(backend="fast", dtype=torch.bfloat16),
    "openvino f32": dict(backend="openvino"),
    "openvino bf16": dict(backend="openvino", dtype=torch.bfloat16),
}


def available(kw: dict) -> str | None:
    """None when the provider runs here, else why not."""
    if kw.get("backend") != "openvino":
        return None
    try:
        from ddpm_fast.export import openvino_runtime as ovr

        ovr.import_openvino()
    except Exception as e:  # noqa: BLE001 - the row says why it is missing
        return f"{type(e).__name__}: {e}"
    if kw.get("dtype") == torch.bfloat16 and not ovr.bf16_supported():
        return "this CPU has no bf16 instructions"
    return None


def run(num: int) -> dict:
    model = df.default_model()
    clf, real, _, _ = judge()
    shape = (num, *model.defaults.image_shape)
    rows = []
    for method, steps in CASES:
        ref = None
        for seed in (0, *NOISE_SEEDS):
            x = df.sample(model, shape=shape, steps=steps, method=method, seed=seed, backend="reference")
            fd = frechet(clf.decision_function(to_pixels(x)), real)
            rows.append(dict(method=method, steps=steps, provider="reference f32", seed=seed, fd=fd))
            ref = x if seed == 0 else ref
        for name, kw in PROVIDERS.items():
            if name == "reference f32":
                continue
            why = available(kw)
            if why is not None:
                rows.append(dict(method=method, steps=steps, provider=name, seed=0, skipped=why))
                continue
            x = df.sample(model, shape=shape, steps=steps, method=method, seed=0, **kw)
            fd = frechet(clf.decision_function(to_pixels(x)), real)
            diff = (x.float() - ref).abs().max().item()
            rows.append(dict(method=method, steps=steps, provider=name, seed=0, fd=fd, max_diff=diff))
    return {"num": num, "rows": rows}


def markdown(result: dict, seconds: float) -> str:
    lines = [
        "# Digit FD per backend and precision (benchmarks/bench_precision.py)",
        "",
        f"{result['num']} samples each, bundled digits model; {cpu_model()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {seconds:.0f} s.",
        "",
        "| method | steps | reference f32, seed 0 | reference f32, seeds 1-4 (min-max) | provider | FD, seed 0 | max diff |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for method, steps in CASES:
        rs = [r for r in result["rows"] if r["method"] == method and r["steps"] == steps]
        ref0 = next(r["fd"] for r in rs if r["provider"] == "reference f32" and r["seed"] == 0)
        other = [r["fd"] for r in rs if r["provider"] == "reference f32" and r["seed"] != 0]
        for r in rs:
            if r["provider"] == "reference f32":
                continue
            fd = f"{r['fd']:.3f}" if "fd" in r else f"skipped: {r['skipped']}"
            diff = f"{r['max_diff']:.2e}" if "max_diff" in r else "-"
            lines.append(
                f"| {method} | {steps} | {ref0:.3f} | {min(other):.3f}-{max(other):.3f} | {r['provider']} | {fd} | {diff} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for precision.md and precision.json")
    p.add_argument("--num", type=int, default=540)
    args = p.parse_args(argv)
    if args.num < 2:
        p.error(f"--num must be >= 2; got {args.num}")
    t0 = time.perf_counter()
    result = run(args.num)
    md = markdown(result, time.perf_counter() - t0)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(str(out / "precision.json"), json.dumps(result, indent=1).encode())
        atomic_write_bytes(str(out / "precision.md"), md.encode())


if __name__ == "__main__":
    main()

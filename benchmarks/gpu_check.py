"""One command for a lent GPU: every CUDA-marked test, the GPU benchmarks, a report. Under 6 minutes on one H100.

    python benchmarks/gpu_check.py OUT_DIR [--budget 330] [--skip tests,kernels,onnx,modes]

Sections, in order (each records its own wall time; a failing section is reported and the rest still run):
1. tests:    `pytest -m cuda tests/` in a subprocess (junit XML parsed into the report);
2. sampling: cifar10 U-Net 3x32x32, random weights, 20 steps per run: reference, diffusers' DDPMPipeline
             (float32 eager), fast without compile (fp32, bf16) at batch 1, 16, 64, 256; then fast compiled
             (bf16 and fp32) at batch 1 and 256, the sizes the targets name (each batch size is a compile);
3. targets:  batch 256 bf16 >= 4x diffusers images/s and >= 40% of the bf16 dense peak (989 TFLOP/s,
             12.4 GFLOP per image per step); batch 1 >= 10x diffusers' per-step speed;
4. kernels:  benchmarks/bench_kernels.py's run("cuda") when present;
5. onnx:     ddpm_fast.bench.onnx.gpu_check (ONNX Runtime's CUDA path) when present;
6. modes:    torch.compile mode "default" vs "max-autotune-no-cudagraphs" at batch 64 bf16, if the budget allows.
Writes OUT_DIR/report.md, report.json, sampling.png. Exit 0 when every test passed, 1 otherwise, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench_sampling, bench_kernels

H100_BF16_PEAK = 989e12  # dense, SXM
GFLOP_PER_IMAGE_STEP = 12.4e9  # cifar10 U-Net at 32x32 (DESIGN.md)
SECTIONS = ("tests", "sampling", "kernels", "onnx", "modes")


def run_tests(out: Path, timeout: float) -> dict:
    xml = out / "junit-cuda.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "tests",
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = (
            -1,
            f"timed out after {timeout:.0f} s\n" + ((e.stdout or b"")[-3000:].decode(errors="replace")),
        )
    res = {"returncode": rc, "output_tail": tail, "passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                res["failed"] += 1
                el = case.find("failure") if case.find("failure") is not None else case.find("error")
                res["failures"].append({"test": name, "message": (el.get("message") or "")[:500]})
            elif case.find("skipped") is not None:
                res["skipped"] += 1
            else:
                res["passed"] += 1
    res["ok"] = rc == 0
    return res


COMPILED_SAMPLING_S = 200  # four cold inductor compiles of the cifar10 U-Net plus their timed runs


def run_sampling(out: Path, left=lambda: float("inf")) -> list[dict]:
    import bench_sampling

    # Eager-U-Net providers at every batch size; compiled ones where the targets are set (1 and 256).
    rows = bench_sampling.run(
        "cuda",
        batch_sizes=(1, 16, 64, 256),
        providers=["reference", "diffusers", "fast-nocompile", "fast-bf16-nocompile"],
    )
    if left() < COMPILED_SAMPLING_S:
        rows.append(
            {
                "provider": "fast, fast-bf16",
                "skipped": f"budget: {left():.0f} s left, needs ~{COMPILED_SAMPLING_S}",
            }
        )
        return rows
    rows += bench_sampling.run(
        "cuda", batch_sizes=(1, 256), providers=["reference", "diffusers", "fast-bf16", "fast"]
    )
    # the second call's reference/diffusers rows re-measure the baselines beside the compiled runs
    return rows


def targets(rows: list[dict]) -> list[dict]:
    def get(provider, batch):
        hits = [r for r in rows if r["provider"] == provider and r["batch"] == batch and "images_per_s" in r]
        return hits[-1] if hits else None

    out = []
    d256, f256 = get("diffusers", 256), get("fast-bf16", 256)
    if d256 and f256:
        ratio = f256["images_per_s"] / d256["images_per_s"]
        out.append(
            {
                "target": "batch 256 bf16 images/s >= 4x diffusers fp32",
                "value": ratio,
                "goal": 4.0,
                "met": ratio >= 4,
            }
        )
        frac = f256["images_per_s"] * f256["steps"] * GFLOP_PER_IMAGE_STEP / H100_BF16_PEAK
        out.append(
            {
                "target": "batch 256 fraction of bf16 dense peak",
                "value": frac,
                "goal": 0.4,
                "met": frac >= 0.4,
            }
        )
    d1 = get("diffusers", 1)
    for name in ("fast-bf16", "fast"):
        f1 = get(name, 1)
        if d1 and f1:
            ratio = d1["ms_per_step"] / f1["ms_per_step"]
            out.append(
                {
                    "target": f"batch 1 per-step speed, {name} vs diffusers",
                    "value": ratio,
                    "goal": 10.0,
                    "met": ratio >= 10,
                }
            )
    return out


def run_kernels() -> list[dict]:
    import bench_kernels

    return bench_kernels.run("cuda")


def run_onnx(out: Path) -> dict:
    from ddpm_fast.bench.onnx import gpu_check

    return gpu_check(out / "onnx")


def run_modes() -> list[dict]:
    from ddpm_fast import bench

    model = bench.build_model("cifar10", torch.device("cuda"))
    res = []
    for mode in ("default", "max-autotune-no-cudagraphs"):
        bench.PROVIDERS[f"fast-bf16[{mode}]"] = bench._sampler(
            backend="fast", dtype=torch.bfloat16, compile_mode=mode
        )
        res += bench.benchmark(
            model, device="cuda", batch_sizes=(64,), steps=20, providers=[f"fast-bf16[{mode}]"]
        )
    return res


def _save(report: dict, out: Path) -> None:
    from ddpm_fast.shards import atomic_write_bytes

    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown(report).encode())


def _section(report: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        report[name] = fn(*args)
    except Exception as e:  # a broken section is a finding, not a reason to lose the others
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"   {name} failed: {type(e).__name__}: {e}", flush=True)
    report["seconds"][name] = time.perf_counter() - t0


def markdown(report: dict) -> str:
    from ddpm_fast import bench

    env = report["environment"]
    lines = [
        f"# GPU check, {report['date']}",
        "",
        f"Device: {env['device_name']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
    ]
    lines.append("Section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()))
    t = report.get("tests")
    if isinstance(t, dict) and "passed" in t:
        lines += [
            "",
            "## CUDA tests",
            "",
            f"passed {t['passed']}, failed {t['failed']}, skipped {t['skipped']} (pytest rc {t['returncode']})",
        ]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in t["failures"]]
    for name in ("sampling", "modes"):
        rows = report.get(name)
        if isinstance(rows, list) and rows:
            timed = [r for r in rows if "skipped" not in r]
            lines += ["", f"## {name}", "", bench.markdown(timed) if timed else ""]
            lines += [f"- skipped {r['provider']}: {r['skipped']}" for r in rows if "skipped" in r]
    if report.get("targets"):
        lines += [
            "",
            "## Targets (H100 figures; other GPUs: read the ratios)",
            "",
            "| target | value | goal | met |",
            "|---|---:|---:|---|",
        ]
        lines += [
            f"| {r['target']} | {r['value']:.3g} | {r['goal']} | {'yes' if r['met'] else 'no'} |"
            for r in report["targets"]
        ]
    k = report.get("kernels")
    if isinstance(k, list) and k:
        try:
            import bench_kernels

            lines += ["", "## Step kernel", "", bench_kernels.markdown(k)]
        except Exception:
            lines += ["", "## Step kernel", "", "```", json.dumps(k, indent=1)[:6000], "```"]
    for name in SECTIONS:
        v = report.get(name)
        if isinstance(v, dict) and "error" in v:
            lines += ["", f"## {name}: error", "", "```", v["traceback"], "```"]
    if isinstance(report.get("onnx"), dict) and "error" not in report["onnx"]:
        lines += [
            "",
            "## ONNX Runtime CUDA",
            "",
            "```",
            json.dumps(report["onnx"], indent=1, default=str)[:6000],
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory for report.md and report.json")
    p.add_argument(
        "--budget", type=float, default=330.0, help="seconds; optional sections are skipped past it"
    )
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip, among {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "run it where a GPU is lent",
            file=sys.stderr,
        )
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = skip - set(SECTIONS)
    if bad:
        print(f"gpu_check: --skip takes {','.join(SECTIONS)}; got {sorted(bad)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ddpm_fast import bench

    start = time.perf_counter()
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": bench.device_info(torch.device("cuda")),
        "seconds": {},
    }

    def left():
        return args.budget - (time.perf_counter() - start)

    def section(name, fn, *fargs):  # the report is rewritten after every section: a kill loses one at most
        _section(report, name, fn, *fargs)
        report["seconds"]["total"] = time.perf_counter() - start
        _save(report, out)

    if "tests" not in skip:
        section("tests", run_tests, out, max(60.0, min(150.0, left() - 150)))
    if "sampling" not in skip:
        section("sampling", run_sampling, out, left)
        if isinstance(report.get("sampling"), list):
            report["targets"] = targets([r for r in report["sampling"] if "skipped" not in r])
            bench.plot([r for r in report["sampling"] if "skipped" not in r], out / "sampling.png")
    # (section, seconds it needs) for the optional ones, cheapest first
    for name, need, fn, fargs in (
        ("kernels", 30, run_kernels, ()),
        ("onnx", 60, run_onnx, (out,)),
        ("modes", 150, run_modes, ()),
    ):
        if name in skip:
            continue
        if left() < need:
            report[name] = {"skipped": f"budget: {left():.0f} s left, needs about {need} s"}
            continue
        section(name, fn, *fargs)
    report["seconds"]["total"] = time.perf_counter() - start
    _save(report, out)
    print(markdown(report))
    t = report.get("tests")
    return 0 if not isinstance(t, dict) or t.get("ok", "error" not in t) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

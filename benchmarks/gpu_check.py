"""One command for a lent GPU: a report that is complete so far whenever it is stopped, within 8 minutes.

    python -u benchmarks/gpu_check.py --out DIR [--budget 450] [--only a,b] [--skip a,b]
    python -u benchmarks/gpu_check.py --dry-run --out DIR     # CPU: the same machinery on the CPU sections

Run from the repository root as it is (nothing installed: `ddpm_fast`, and `ddpm_fast.kernels` /
`ddpm_fast.export` through their symlinks, import from the root). Sections run in the order of what they
are worth, each in its own subprocess with its own time limit (`SECTIONS`); a section never starts with
less than its minimum left of --budget, and one that runs past its limit gets SIGINT (pytest still writes
its junit XML), then SIGKILL. Inside a section each row checks the time left before it starts (a compile
is estimated from the last one measured) and is recorded as skipped when it would not fit. A caller adds
sections with `main(argv, entry=its own file, sections=..., children=...)`: every child is started as
`python ENTRY --section NAME`, so it knows them too (tests/_gpu_check_fakes.py adds the harness's fakes).

Every row is appended to DIR/rows.jsonl and the report is rewritten at once (DIR/report.md, report.json,
report.png): a kill loses the row in progress at most. Any exception of a (provider, batch) is an error row;
a row whose compile or CUDA graph fell back is labelled (`fast-bf16-nocompile`, its reason in `fallback`).
Figures that need no peer come from our own rows: TFLOP/s per sampling row (FLOPs counted on the model),
as a fraction of the measured bf16 matmul ceiling and of the data sheet's bf16 peak; the fused step's GB/s
as a fraction of a measured device copy and of the data sheet's HBM bandwidth. diffusers is the peer where
it is importable (benchmarks/README.md: how to carry its wheel); without it its row says so.

Files in DIR (at most 7 with the device command's log): rows.jsonl, report.md, report.json, report.png,
junit.xml, pytest.log. Exit 0 when every section ended ok and no test failed, 1 otherwise, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

# This process stays free of torch: it only starts sections and writes the report, so a section that
# breaks the CUDA context, hangs in a kernel or is killed cannot take the report down with it.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Data sheets, dense (no sparsity): (name in torch.cuda.get_device_name, bf16 FLOP/s, HBM bytes/s); first match.
DATA_SHEET = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("A100", 312e12, 2.039e12),  # 80 GB SXM
)
# report.png after a sampling row at most this often, and at the end of a section (a plot costs ~1 s of a
# 2-core CPU; report.md and report.json, which hold every number, are rewritten after every row)
PLOT_EVERY_S = 20.0
SIGINT_GRACE_S = 15.0  # after SIGINT: pytest writes its junit XML, a section its last row; then SIGKILL
PYTEST_PER_TEST_S = 90  # pytest-timeout per test (the longest CUDA test compiles a narrowed cifar10 U-Net)
NO_CUDA = 3  # the smoke section's exit code when CUDA is missing: the others are not started


@dataclass(frozen=True)
class Section:
    name: str
    limit_s: float  # its own time limit (cut to what is left of the budget)
    min_s: float  # not started with less than this left
    what: str
    pytest: bool = False
    tests: tuple = ()  # a pytest section's paths (node ids, options); empty: the CUDA tests, CUDA_TEST_FILES


# In the order of what they are worth, so a budget cut drops the tail: correctness first (the fused step's
# rows, then the CUDA tests, kernel and capture proofs before anything long), the headline, the newest
# features' rows (solvers, tuned tables, deis, karras; ADM), and last what only widens the picture (ONNX,
# more dtypes and compile settings, compile modes). The first six limits sum to the default budget (450 s),
# so a run whose every section takes its whole limit still reaches the ADM rows: tests/test_gpu_check.py.
SECTIONS = (
    Section(
        "smoke",
        60,
        20,
        "CUDA, imports, a tiny captured run against the reference; bf16 matmul and copy ceilings",
    ),
    Section("kernel", 40, 15, "fused posterior step GB/s next to a device copy and the eager chain"),
    Section(
        "tests",
        120,
        30,
        "pytest -m cuda tests, -v, per-test timeout: kernel and capture proofs first (CUDA_TEST_FILES)",
        pytest=True,
    ),
    Section(
        "headline",
        130,
        60,
        "cifar10 U-Net: fast-bf16 compiled+captured at batch 256, 1, 64; reference fp32 (and diffusers) beside each",
    ),
    Section(
        "solvers",
        60,
        30,
        "dpmpp_2m, unipc, deis, dpmpp_2m karras at 10 and 20 steps; tuned tables (digits, 5 NFE): fast-bf16 vs reference",
    ),
    Section(
        "adm", 40, 30, "ADM ImageNet-64 (class-conditional, random weights): fast-bf16 vs reference fp32"
    ),
    Section("onnx", 60, 20, "ONNX Runtime's CUDA path (skipped where onnxruntime has no CUDA provider)"),
    Section(
        "more",
        150,
        40,
        "fast fp32 compiled; the compiled torch twin (triton off); fast-bf16 and fast without compile, batch 256 and 1",
    ),
    Section("modes", 200, 150, "torch.compile mode default vs max-autotune-no-cudagraphs, bf16 batch 64"),
)
# The tests section's files, in this order (pytest would run them by name, test_engine's inductor compiles
# before test_kernels): the cheap kernel and capture correctness proofs first, the long compiles last. Every
# file with a @pytest.mark.cuda test is listed (tests/test_gpu_check.py checks it).
CUDA_TEST_FILES = (
    "tests/test_kernels.py",
    "tests/test_cuda_proofs.py",
    "tests/test_cuda_capture.py",
    "tests/test_guidance.py",
    "tests/test_onnx.py",
    "tests/test_engine.py",
    "tests/test_metrics_fid.py",
)
# --dry-run: the same parent, children, rows and report on CPU, with the real sections that run there.
# tests/_gpu_check_fakes.py adds fake ones that raise, hang, overrun a pytest run and the budget, and miss a
# peer, so a test can check what the report keeps.
DRY_SECTIONS = (
    Section("smoke", 60, 1, "CPU: imports, a tiny run against the reference, ceilings"),
    Section(
        "headline",
        60,
        1,
        "CPU: tiny U-Net (the compile a stand-in), reference beside it, a missing peer",
    ),
    Section("kernel", 60, 1, "CPU: step providers next to a copy"),
)


@dataclass(frozen=True)
class Conf:
    """What the sections measure: the CUDA run, or its CPU dry run."""

    device: str = "cuda"
    model: str = "cifar10"
    steps: int = 20  # per sampling run (a linear schedule of T = steps)
    repeats: int = 5
    headline: tuple = ((256, 1, 64), ("reference", "fast-bf16", "diffusers"))
    solvers: tuple = (
        (256, 1, 64),
        (
            "reference-dpmpp_2m",
            "fast-bf16-dpmpp_2m",
            "diffusers-dpmpp_2m",
            "fast-bf16-unipc",
            "diffusers-unipc",
            "reference-deis",
            "fast-bf16-deis",
        ),
    )
    solver_steps: tuple = (10, 20)
    # the bundled digits checkpoint (its 1000-step schedule): tuned 5-NFE table, karras spacing at 10 steps
    checkpoint_rows: tuple = (
        "digits",
        (64, 1),
        ("reference-tuned", "fast-bf16-tuned", "reference-dpmpp_2m-karras", "fast-bf16-dpmpp_2m-karras"),
    )
    adm: tuple = ("adm-imagenet64", (64, 1, 256), ("reference", "fast-bf16"))
    more: tuple = ((256, 1), ("reference", "fast", "fast-bf16-twin", "fast-bf16-nocompile", "fast-nocompile"))
    modes: tuple = ("default", "max-autotune-no-cudagraphs")
    kernel_sizes: tuple = ("256x3x32x32", "64x3x256x256", "256x3x256x256")
    kernel_providers: tuple = ("eager", "triton", "triton_graph", "copy")
    matmul_n: int = 8192
    copy_mib: int = 1024
    smoke_shape: tuple = (3, 3, 16, 16)
    peer: str = "diffusers"
    # seconds a row is expected to take, before one is measured (a compile's own time replaces its estimate)
    need: dict = field(default_factory=lambda: {"compiled": 90.0, "eager": 10.0, "peer": 15.0})
    specs: dict = field(default_factory=dict)  # provider -> df.sample keywords (filled below)
    dry: bool = False


def _specs(dry: bool) -> dict:
    import torch

    bf16 = torch.bfloat16
    fast = dict(backend="fast")
    if dry:  # CPU: no CUDA graph, Triton only under TRITON_INTERPRET (slow), compile asked for explicitly
        # (on CPU the engine leaves compile out of a run this short); _dry_compile stands in for inductor
        fast = dict(backend="fast", compile=True, cuda_graph=False, triton=False)
    ref, bf16f = dict(backend="reference"), dict(fast, dtype=bf16)
    return {
        "reference": dict(backend="reference"),
        "fast": fast,
        "fast-bf16": dict(fast, dtype=bf16),
        "fast-nocompile": dict(fast, compile=False),
        # the compiled torch twin of the step in place of the Triton kernel (compile on, captured on CUDA)
        "fast-bf16-twin": dict(fast, dtype=bf16, triton=False),
        "fast-bf16-nocompile": dict(fast, dtype=bf16, compile=False),
        **{f"reference-{m}": dict(backend="reference", method=m) for m in ("dpmpp_2m", "unipc")},
        **{f"fast-bf16-{m}": dict(fast, dtype=bf16, method=m) for m in ("dpmpp_2m", "unipc", "deis")},
        "reference-deis": dict(backend="reference", method="deis"),
        # on a checkpoint's own 1000-step schedule (the digits rows): steps is the NFE
        **{
            f"{p}-tuned": dict(s, method="tuned", steps=5)
            for p, s in (("reference", ref), ("fast-bf16", bf16f))
        },
        **{
            f"{p}-dpmpp_2m-karras": dict(s, method="dpmpp_2m", spacing="karras", steps=10)
            for p, s in (("reference", ref), ("fast-bf16", bf16f))
        },
    }


CUDA_CONF = Conf()
DRY_CONF = Conf(
    device="cpu",
    model="tiny",
    steps=2,
    repeats=2,
    headline=((4, 1), ("reference", "fast-bf16", "diffusers")),
    more=((4,), ("reference", "fast-nocompile", "fast-bf16-twin")),
    kernel_sizes=("2x3x8x8",),
    kernel_providers=("eager", "twin", "copy"),
    matmul_n=256,
    copy_mib=8,
    smoke_shape=(4, 3, 8, 8),
    peer="diffusers_dry_run_not_installed",
    need={"compiled": 1.0, "eager": 0.5, "peer": 0.5},
    solvers=(
        (2,),
        ("reference-dpmpp_2m", "fast-bf16-dpmpp_2m", "fast-bf16-unipc", "reference-deis", "fast-bf16-deis"),
    ),
    checkpoint_rows=(
        "digits",
        (2,),
        ("reference-tuned", "fast-bf16-tuned", "reference-dpmpp_2m-karras", "fast-bf16-dpmpp_2m-karras"),
    ),
    solver_steps=(3,),
    adm=("adm-tiny", (2,), ("reference", "fast-bf16")),
    dry=True,
)


# ---------------------------------------------------------------------------------------------- rows on disk


def _atomic_write(path: Path, data: bytes) -> None:
    # ddpm_fast.shards.atomic_write_bytes does this too, but importing ddpm_fast imports torch, which this
    # process keeps out (module comment above).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a report is for everyone who can read the folder
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_row(out: Path, row: dict) -> None:
    """One JSON line, flushed to disk before the report is rewritten from the file."""
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(out: Path) -> list[dict]:
    rows = []
    path = out / "rows.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                pass
    return rows


# ---------------------------------------------------------------------------------------------- figures


def _sheet(device_name: str | None):
    for name, bf16, hbm in DATA_SHEET:
        if device_name and name in device_name:
            return {"name": name, "bf16_flops": bf16, "hbm_bytes_s": hbm}
    return None


def _last(rows, **match):
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def derive(rows: list[dict]) -> dict:
    """Environment, ceilings, per-row figures and targets, all from our own rows (the peer's where present)."""
    env = _last(rows, kind="environment") or {}
    sheet = _sheet(env.get("device_name"))
    matmul = _last(rows, kind="ceiling", what="bf16 matmul")
    copy = _last(rows, kind="ceiling", what="device copy")
    ceiling = matmul["flops"] if matmul else None
    flops = {r["model"]: r["flops_per_image_step"] for r in rows if r.get("kind") == "model"}
    for r in rows:
        if r.get("kind") == "sampling" and "images_per_s" in r:
            f = flops.get(r.get("model"))
            if f:
                r["tflops"] = r["images_per_s"] * r["steps"] * f / 1e12
                r["of_ceiling"] = r["tflops"] * 1e12 / ceiling if ceiling else None
                r["of_sheet"] = r["tflops"] * 1e12 / sheet["bf16_flops"] if sheet else None
            for base in ("reference", "diffusers"):
                # a solver row's bases are its own method's (reference-dpmpp_2m) at its own step count
                name = base + r["provider"][len(r["provider"].split("-")[0]) :].replace("-bf16", "", 1)
                name = name.replace("-nocompile", "").replace("-nograph", "")
                if name not in {x.get("provider") for x in rows}:
                    name = base
                b = _last(rows, kind="sampling", section=r["section"], provider=name, batch=r["batch"],
                          steps=r["steps"])  # fmt: skip
                r[f"x_{base}"] = r["images_per_s"] / b["images_per_s"] if b and "images_per_s" in b else None
        if r.get("kind") == "kernel" and sheet:
            r["of_sheet"] = r["gbps"] * 1e9 / sheet["hbm_bytes_s"]
    return {"environment": env, "sheet": sheet, "ceilings": [r for r in (matmul, copy) if r]}


def targets(rows: list[dict], big: int, small: int) -> list[dict]:
    """DESIGN.md's numbers. value None: the row it needs is missing (the reason is in `note`)."""
    out = []

    def add(target, value, goal=None, note=""):
        met = None if value is None or goal is None else value >= goal
        out.append({"target": target, "value": value, "goal": goal, "met": met, "note": note})

    head = _last(rows, kind="sampling", section="headline", provider="fast-bf16", batch=big)
    peer = _last(rows, kind="sampling", section="headline", provider="diffusers", batch=big)
    missing = _last(rows, kind="skipped", provider="diffusers")
    no_peer = (missing or {}).get("reason", "no diffusers row")
    no_head = f"no compiled fast-bf16 row at batch {big}"
    no_sheet = "" if (head or {}).get("of_sheet") is not None else "no data sheet for this device"
    add(
        f"batch {big} fast-bf16: fraction of the data sheet's bf16 peak",
        (head or {}).get("of_sheet"),
        0.40,
        no_sheet if head else no_head,
    )
    add(
        f"batch {big} fast-bf16: fraction of the measured bf16 matmul ceiling",
        (head or {}).get("of_ceiling"),
        note="" if head else no_head,
    )
    add(
        f"batch {big} fast-bf16 images/s over reference fp32",
        (head or {}).get("x_reference"),
        note="" if head else no_head,
    )
    add(
        f"batch {big} fast-bf16 images/s over diffusers fp32",
        (head or {}).get("x_diffusers"),
        4.0,
        "" if peer else no_peer,
    )
    if head:
        add(f"batch {big} fast-bf16 images/s at 1000 steps", head["images_per_s"] * head["steps"] / 1000)
    one = _last(rows, kind="sampling", section="headline", provider="fast-bf16", batch=small)
    for base, goal in (("reference", None), ("diffusers", 10.0)):
        b = _last(rows, kind="sampling", section="headline", provider=base, batch=small)
        value = b["ms_per_step"] / one["ms_per_step"] if one and b and "ms_per_step" in b else None
        if value is not None:
            note = ""
        elif not one:
            note = f"no compiled fast-bf16 row at batch {small}"
        else:
            note = no_peer if base == "diffusers" else f"no {base} row at batch {small}"
        add(f"batch {small} per-step speed, fast-bf16 over {base}", value, goal, note)
    kernels = [r for r in rows if r.get("kind") == "kernel"]
    if kernels:
        biggest = max(kernels, key=lambda r: r["bytes"])["size"]
        # DDPM's step (the one the eager-chain baseline is timed for), not the last method's row
        method = "ddpm" if any(r.get("method") == "ddpm" for r in kernels) else kernels[0].get("method")
        fused = (
            _last(rows, kind="kernel", size=biggest, provider="triton_graph", method=method)
            or _last(rows, kind="kernel", size=biggest, provider="triton", method=method)
            or _last(rows, kind="kernel", size=biggest, provider="twin", method=method)
        )
        if fused:
            what = f"fused step ({fused['provider']}, {method}, {biggest})"
            add(f"{what}: fraction of the measured device copy", fused.get("frac_copy"), 0.80)
            add(
                f"{what}: fraction of the data sheet's HBM bandwidth",
                fused.get("of_sheet"),
                0.80,
                "" if fused.get("of_sheet") is not None else "no data sheet for this device",
            )
            add(f"{what} over the eager chain", fused.get("speedup_vs_eager"), 5.0)
    return out


# ---------------------------------------------------------------------------------------------- the report


def _f(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def report(rows: list[dict]) -> dict:
    meta = _last(rows, kind="meta") or {}
    figs = derive(rows)
    sections = {}
    for r in rows:
        if r.get("kind") == "section":
            sections.setdefault(r["name"], {}).update(r)
    end = _last(rows, kind="end")
    running = [s for s in sections.values() if s.get("status") == "running"]
    if end:
        state = f"complete: {end['seconds']:.0f} s of a {meta.get('budget_s', 0):.0f} s budget, exit {end['exit']}"
    elif running:
        state = f"stopped during section {running[-1]['name']!r}: every row before the stop is below"
    else:
        state = "stopped between sections: every row before the stop is below"
    return {
        "title": meta.get("title", "GPU check"),
        "started": meta.get("started"),
        "state": state,
        "budget_s": meta.get("budget_s"),
        **figs,
        "targets": targets(rows, *meta.get("target_batches", (256, 1))),
        "sections": list(sections.values()),
        "rows": [r for r in rows if r.get("kind") not in ("section", "meta", "end")],
    }


def _sampling_table(rows):
    lines = [
        "| provider | batch | images/s | ms/step [p20, p80] | loop ms/step | setup s | x reference | x diffusers "
        "| TFLOP/s | of matmul ceiling | of data sheet | max abs diff | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["steps"]
        note = r.get("fallback", "")
        lines.append(
            f"| {r['provider']} | {r['batch']} | {r['images_per_s']:.2f} | {r['ms_per_step']:.3f} "
            f"[{1e3 * r['p20_s'] / s:.3f}, {1e3 * r['p80_s'] / s:.3f}] | {_f(r.get('loop_ms_per_step'), '.3f')} "
            f"| {r['setup_s']:.1f} "
            f"| {_f(r.get('x_reference'), '.2f')} | {_f(r.get('x_diffusers'), '.2f')} | {_f(r.get('tflops'), '.1f')} "
            f"| {_pct(r.get('of_ceiling'))} | {_pct(r.get('of_sheet'))} | {_f(r.get('max_abs_diff'), '.1e')} | {note} |"
        )
    return lines


def _kernel_table(rows):
    lines = [
        "| size | method | provider | median ms [p20, p80] | GB/s | of device copy | of data sheet HBM | x eager | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r.get('method', '-')} | {r['provider']} | {r['median_ms']:.4f} [{r['p20_ms']:.4f}, {r['p80_ms']:.4f}] "
            f"| {r['gbps']:.1f} | {_pct(r.get('frac_copy'))} | {_pct(r.get('of_sheet'))} "
            f"| {_f(r.get('speedup_vs_eager'), '.2f')} | {_f(r.get('compile_s'), '.1f')} |"
        )
    return lines


def _tests_lines(r):
    lines = [
        f"passed {r['passed']}, failed {r['failed']}, errors {r['errors']}, skipped {r['skipped']} "
        f"(pytest exit {r['rc']}; from {r['source']}); {r['per_test_timeout']}",
    ]
    if r.get("interrupted"):
        lines.append(
            f"**Stopped at the section limit** ({r['interrupted']}): the tests after it did not run."
        )
    lines += [f"- {f['outcome'].upper()} {f['test']}: {f['message']}" for f in r["failures"]]
    return [*lines, "", "Output tail:", "", "```", r["output_tail"].rstrip(), "```"]


def markdown(rep: dict) -> str:
    lines = _header_lines(rep) + _summary_tables(rep)
    by_section = collections.defaultdict(list)
    for r in rep["rows"]:
        by_section[r.get("section", "?")].append(r)
    known = {s["name"] for s in rep["sections"]}
    unrecorded = [{"name": n, "status": "no section record"} for n in by_section if n not in known]
    for s in rep["sections"] + unrecorded:
        rows = by_section.get(s["name"], [])
        if rows or s["status"] != "ok":
            lines += _section_lines(s, rows)
    return "\n".join(lines) + "\n"


def _header_lines(rep: dict) -> list[str]:
    """Title, state, device and versions, and the measured ceilings against the data sheet's."""
    env = rep["environment"]
    lines = [f"# {rep['title']}, {rep['started']}", "", f"**State:** {rep['state']}", ""]
    if env:
        vers = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        lines += [f"Device: {env.get('device_name')} ({env.get('device')}); {vers}", ""]
    sheet = rep["sheet"]
    for c in rep["ceilings"]:
        if c["what"] == "bf16 matmul":
            of = (
                f" ({_pct(c['flops'] / sheet['bf16_flops'])} of the data sheet's {sheet['bf16_flops'] / 1e12:.0f})"
                if sheet
                else ""
            )
            lines.append(f"- Measured ceiling, {c['detail']}: {c['flops'] / 1e12:.1f} TFLOP/s{of}")
        else:
            of = (
                f" ({_pct(c['bytes_s'] / sheet['hbm_bytes_s'])} of the data sheet's {sheet['hbm_bytes_s'] / 1e9:.0f})"
                if sheet
                else ""
            )
            lines.append(f"- Measured ceiling, {c['detail']}: {c['bytes_s'] / 1e9:.0f} GB/s{of}")
    if not sheet:
        lines.append("- No data sheet figures for this device: fractions of the sheet are left out.")
    return lines


def _summary_tables(rep: dict) -> list[str]:
    """The targets table and the sections table."""
    lines = [
        "",
        "## Targets (DESIGN.md)",
        "",
        "| target | value | goal | met | note |",
        "|---|---:|---:|---|---|",
    ]
    for t in rep["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['value'])} | {_f(t['goal'], 'g')} | {met} | {t['note']} |")
    lines += [
        "",
        "## Sections",
        "",
        "| section | status | seconds | limit s | what |",
        "|---|---|---:|---:|---|",
    ]
    for s in rep["sections"]:
        lines.append(
            f"| {s['name']} | {s['status']} | {_f(s.get('seconds'), '.1f')} | {_f(s.get('limit_s'), '.3g')} | {s.get('what', '')} |"
        )
    return lines


def _section_lines(s: dict, rows: list[dict]) -> list[str]:
    """One section's part of the report: its tables, a line per other row, its tracebacks and output tail."""
    lines = ["", f"## {s['name']} ({s['status']})", ""]
    if s.get("reason"):
        lines.append(f"Not run: {s['reason']}")
    sampling = [r for r in rows if r["kind"] == "sampling"]
    kernels = [r for r in rows if r["kind"] == "kernel"]
    if sampling:
        first = sampling[0]
        lines += [
            f"{first['model']} U-Net, image {first['image']}, {first['steps']} steps per run; medians "
            "of the timed runs with [20%, 80%] quantiles; x reference / x diffusers: images/s over the "
            "row of that provider at the same batch.",
            "",
        ]
        lines += _sampling_table(sampling) + [""]
    if kernels:
        lines += _kernel_table(kernels) + [""]
    for r in rows:
        lines += _row_lines(r)
    tracebacks = {r["error"]: r for r in rows if r["kind"] == "error" and r.get("traceback")}
    for r in tracebacks.values():  # one per distinct error
        lines += [
            "",
            f"Traceback ({r.get('provider', s['name'])} {r.get('batch', '')}):",
            "",
            "```",
            r["traceback"].rstrip(),
            "```",
        ]
    if s.get("output_tail") and s["status"] not in ("ok", "running", "skipped") and not s.get("pytest"):
        lines += ["", "Output tail:", "", "```", s["output_tail"].rstrip(), "```"]
    return lines


def _row_lines(r: dict) -> list[str]:
    """The report lines of one row that is not in a table (sampling and kernel rows are: none)."""
    k = r["kind"]
    if k == "smoke":
        return [f"- {'ok' if r['ok'] else '**FAILED**'}: {r['check']}: {r['detail']}"]
    if k == "model":
        return [
            f"- model {r['model']}: {r['parameters']:,} parameters, "
            f"{r['flops_per_image_step'] / 1e9:.2f} GFLOP per image per step (counted)"
        ]
    if k == "tests":
        return _tests_lines(r)
    if k == "skipped":
        what = f"{r.get('provider', '')} batch {r['batch']}" if "batch" in r else r.get("provider", "")
        return [f"- skipped {what}: {r['reason']}"]
    if k == "error":
        where = f" {r.get('provider')} batch {r.get('batch')}" if "provider" in r else ""
        return [f"- **ERROR**{where}: {r['error']}"]
    if k in ("note", "onnx"):
        return [f"- {r.get('text') or json.dumps(r.get('result'), default=str)[:3000]}"]
    return []


def render(out: Path) -> dict:
    """report.json and report.md from rows.jsonl (atomic: a reader never sees half a report)."""
    rep = report(read_rows(out))
    _atomic_write(out / "report.json", (json.dumps(rep, indent=1, default=str) + "\n").encode())
    _atomic_write(out / "report.md", markdown(rep).encode())
    return rep


# ---------------------------------------------------------------------------------------------- sections (children)


class Context:
    """What a section child gets: its deadline, the configuration and `emit(row)`."""

    def __init__(self, out: Path, section: str, until: float, conf: Conf):
        self.out, self.section, self.until, self.conf = out, section, until, conf
        self.doing = "starting"
        self.plotted_at, self.unplotted = time.time(), False

    def left(self) -> float:
        return self.until - time.time()

    def emit(self, row: dict) -> dict:
        row = {"section": self.section, "at": round(time.time(), 2), **row}
        append_row(self.out, row)
        render(self.out)
        if row["kind"] == "sampling":
            self.unplotted = True
            if time.time() - self.plotted_at > PLOT_EVERY_S:
                self.plot()
        print(f"   [{self.section}] {_one_line(row)}", flush=True)
        return row

    def fits(self, need: float, **row) -> bool:
        """Whether a row expected to take `need` seconds fits what is left; if not, a skipped row says so."""
        if self.left() >= need:
            return True
        self.emit(
            {
                "kind": "skipped",
                **row,
                "reason": f"budget: {self.left():.3g} s left in the section, needs about {need:.3g}",
            }
        )
        return False

    def plot(self) -> None:
        """report.png: images/s against batch size of every sampling row so far."""
        from ddpm_fast import bench

        rows = [r for r in read_rows(self.out) if r.get("kind") == "sampling" and "images_per_s" in r]
        if rows:
            bench.plot(rows, self.out / "report.png")
        self.plotted_at, self.unplotted = time.time(), False

    def close(self) -> None:
        if self.unplotted:
            self.plot()


def _one_line(row: dict) -> str:
    k = row["kind"]
    if k == "sampling":
        return (
            f"{row['provider']:<22} B={row['batch']:<4} {row['images_per_s']:10.2f} img/s "
            f"{row['ms_per_step']:9.3f} ms/step (loop {_f(row.get('loop_ms_per_step'), '.3f')})  "
            f"setup {row['setup_s']:.1f} s"
        )
    if k == "kernel":
        return f"{row['size']} {row.get('method', '-'):<9} {row['provider']:<12} {row['gbps']:9.1f} GB/s"
    return json.dumps(
        {x: v for x, v in row.items() if x not in ("traceback", "section", "at", "output_tail")}, default=str
    )[:300]


def _exc_row(e: BaseException, **row) -> dict:
    return {
        "kind": "error",
        **row,
        "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        "traceback": traceback.format_exc()[-3000:],
    }


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device, reps: int) -> float:
    """Median milliseconds of `reps` calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def section_smoke(ctx: Context) -> int:
    import torch

    conf = ctx.conf
    if conf.device == "cuda" and not torch.cuda.is_available():
        ctx.emit(
            {"kind": "error", "error": "CUDA is not available to torch (torch.cuda.is_available() is False)"}
        )
        return NO_CUDA
    import ddpm_fast as df
    import ddpm_fast.export
    import ddpm_fast.kernels
    from ddpm_fast import bench, engine

    dev = torch.device(conf.device)
    env = bench.device_info(dev)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    # the sampling rows run with torch's defaults: TF32 convolutions (cuDNN) on, TF32 matmuls off
    env["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    ctx.emit({"kind": "environment", **env})
    ok = True
    for mod in (ddpm_fast.kernels, ddpm_fast.export):
        inside = Path(mod.__file__).resolve().is_relative_to(ROOT)
        ok &= inside
        ctx.emit(
            {
                "kind": "smoke",
                "check": f"import {mod.__name__}",
                "ok": inside,
                "detail": f"{mod.__file__} ({'this checkout' if inside else 'NOT this checkout'})",
            }
        )
    # A tiny U-Net run through the fast path as a user gets it (graph + Triton on CUDA, compile off: seconds)
    model = bench.build_model("tiny", dev)
    s = df.Schedule.linear(1000)
    kw = dict(steps=10, seed=1, start_index=3)
    ctx.doing = "smoke sample"
    # float32 on both sides: TF32 convolutions (different algorithms for NHWC and NCHW) differ by ~1e-3
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    before = dict(engine.counters)
    t0 = time.perf_counter()
    fast = df.sample(model, s, conf.smoke_shape, backend="fast", compile=False, **kw)
    fast_s = time.perf_counter() - t0
    ref = df.sample(model, s, conf.smoke_shape, backend="reference", **kw)
    diff = (fast - ref).abs().max().item()
    captures = engine.counters["captures"] - before.get("captures", 0)
    good = diff < 1e-3 and bool(torch.isfinite(fast).all())
    ok &= good
    ctx.emit(
        {
            "kind": "smoke",
            "check": "fast (compile off) vs reference, tiny U-Net, 10 steps",
            "ok": good,
            "detail": f"max abs diff {diff:.2e} (bound 1e-3), {captures} CUDA graph capture(s), "
            f"{fast_s:.1f} s with warm-up; options "
            f"{engine.resolve_options(_plan(model, s, conf.smoke_shape, dev, {'compile': False}), model)}",
        }
    )
    _ceilings(ctx, dev)
    return 0 if ok else 1


def _ceilings(ctx: Context, dev) -> None:
    """Ceilings measured here: what a large bf16 matmul and a plain copy reach on this device."""
    import torch

    conf = ctx.conf
    ctx.doing = "bf16 matmul ceiling"
    n = conf.matmul_n
    ms = _matmul_ms(n, dev)
    ctx.emit(
        {
            "kind": "ceiling",
            "what": "bf16 matmul",
            "detail": f"{n}x{n}x{n} bf16 matmul, median of 10",
            "ms": ms,
            "flops": 2 * n**3 / (ms * 1e-3),
        }
    )
    ctx.doing = "copy ceiling"
    buf = torch.empty(conf.copy_mib * 2**20, dtype=torch.uint8, device=dev)
    ms = _time_ms(buf.clone, dev, 10)
    ctx.emit(
        {
            "kind": "ceiling",
            "what": "device copy",
            "detail": f"clone of {conf.copy_mib} MiB (read + write), median of 10",
            "ms": ms,
            "bytes_s": 2 * buf.numel() / (ms * 1e-3),
        }
    )


def _matmul_ms(n: int, dev) -> float:
    import torch

    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return _time_ms(lambda: a @ b, dev, 10)


def _plan(model, schedule, shape, device, spec=None):
    import torch

    from ddpm_fast import engine
    from ddpm_fast.plan import make_plan

    spec = spec or {}
    opts = {k: v for k, v in spec.items() if k in engine.OPTION_NAMES}
    labels = "random" if model.defaults.num_classes else None  # a class-conditional model
    return make_plan(
        model,
        schedule,
        shape,
        device=device,
        dtype=spec.get("dtype", torch.float32),
        method=spec.get("method", "ddpm"),
        steps=spec.get("steps"),
        spacing=spec.get("spacing"),
        labels=labels,
        options=opts,
    )


def _fallback(model, schedule, shape, spec, device) -> list[str]:
    """Options the row asked for (explicitly or by default) that did not run: compile failed or was refused,
    no CUDA graph, no Triton. Read from the options the engine resolved and its compiled functions."""
    from ddpm_fast import engine

    opts = engine.resolve_options(_plan(model, schedule, shape, device, spec), model)
    asked = {name: spec.get(name, True) for name in ("compile", "cuda_graph", "triton")}
    off = [name for name in asked if asked[name] and not getattr(opts, name)]
    if opts.compile:
        eng = engine._ENGINES.get(model)
        amp = spec.get("dtype") if spec.get("dtype") in engine.HALF_DTYPES else None
        key = (amp, opts.channels_last, opts.compile, opts.compile_mode, device.type)
        compiled = [eng.forwards.get(key) if eng else None]
        if not opts.triton:
            compiled.append(engine._TWINS.get(opts.compile_mode))
        if any(getattr(c, "failed", False) for c in compiled):
            off.append("compile")
    return off


class _Logs:
    """The ddpm_fast warnings (fallbacks) logged while a row ran."""

    def __enter__(self):
        import logging

        self.messages = []
        self.handler = logging.Handler()
        self.handler.emit = lambda rec: self.messages.append(rec.getMessage())
        logging.getLogger("ddpm_fast").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("ddpm_fast").removeHandler(self.handler)


class _LoopTimer:
    """The fast backend's per-step loop alone (engine.StepRunner.loop: graph replays, or eager steps), timed
    inside each df.sample call, CUDA events around it on CUDA: the whole call's plan, table copies, x_T,
    weight refresh, capture check and final finiteness check are left out. take(): seconds since the last."""

    def __init__(self, device):
        self.device, self.spans = device, []

    def __enter__(self):
        import torch

        from ddpm_fast import engine

        self.orig = orig = engine.StepRunner.loop
        spans, cuda = self.spans, self.device.type == "cuda"

        def loop(runner, do, steps, on_step=None):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                orig(runner, do, steps, on_step)
                b.record()
                spans.append((a, b))
            else:
                t0 = time.perf_counter()
                orig(runner, do, steps, on_step)
                spans.append(time.perf_counter() - t0)

        engine.StepRunner.loop = loop
        return self

    def __exit__(self, *exc):
        from ddpm_fast import engine

        engine.StepRunner.loop = self.orig

    def take(self) -> float | None:
        if not self.spans:
            return None
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            s = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        else:
            s = sum(self.spans)
        self.spans.clear()
        return s


def sampling_row(ctx: Context, model, schedule, provider: str, batch: int, ref_out=None):
    """Time one (provider, batch): first call (compile, warm-up, capture) apart, then conf.repeats runs.
    Emits a sampling, skipped or error row; returns the output (for the rows compared with it) or None."""
    import torch

    from ddpm_fast import bench

    conf, dev = ctx.conf, torch.device(ctx.conf.device)
    C, H, W = model.config.image_shape
    shape = (batch, C, H, W)
    base = {"provider": provider, "batch": batch}
    spec = conf.specs.get(provider, {})
    if "steps" in spec:  # a row on a checkpoint's own schedule: its NFE
        conf = replace(conf, steps=spec["steps"])
    if provider.split("-")[0] == "diffusers":
        kind = "peer"
    else:
        kind = "compiled" if spec.get("backend") == "fast" and spec.get("compile", True) else "eager"
    if not ctx.fits(conf.need[kind], **base):
        return None
    ctx.doing = f"{provider} batch {batch}"
    row = {
        "kind": "sampling",
        **base,
        "steps": conf.steps,
        "image": f"{C}x{H}x{W}",
        "model": conf.model,
        **bench.device_info(dev),
    }
    with _Logs() as logs:
        try:
            fn = _provider_fn(conf, provider, kind, model, schedule, shape, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with _LoopTimer(dev) as loop_timer:
                first, out = bench._timed(fn, dev)
                loop_timer.take()
                times, loops = [], []
                for _ in range(conf.repeats):
                    times.append(bench._timed(fn, dev)[0])
                    loops.append(loop_timer.take())
            ref_for = fn.reference() if hasattr(fn, "reference") else ref_out
            off = (
                _fallback(model, schedule, shape, spec, dev)
                if kind != "peer" and spec.get("backend") == "fast"
                else []
            )
        except Exception as e:  # any failure of one (provider, batch) is a row; the next row still runs
            ctx.emit(_exc_row(e, **base, log=logs.messages))
            return None
    med = statistics.median(times)
    row.update(
        median_s=med,
        p20_s=bench._quantile(times, 0.2),
        p80_s=bench._quantile(times, 0.8),
        images_per_s=batch / med,
        ms_per_step=1e3 * med / conf.steps,
        # the replay loop alone (None: no fast-backend loop in this row, the reference or the peer)
        loop_ms_per_step=1e3 * statistics.median(loops) / conf.steps if None not in loops else None,
        setup_s=max(first - med, 0.0),
        max_abs_diff=bench._max_diff(out, ref_for) if provider != "reference" else 0.0,
        peak_mem_mb=torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        log=logs.messages,
    )
    if off:  # a fallback is labelled, so its speed is never read as the compiled or captured path's
        row["requested"] = provider
        row["provider"] = provider + "".join(f"-no{'graph' if o == 'cuda_graph' else o}" for o in off)
        row["fallback"] = f"{', '.join(off)} did not run" + (f": {logs.messages[0]}" if logs.messages else "")
    elif kind == "compiled":  # the next compile is about as long as this one (new shapes recompile)
        row["compiled"] = True
        conf.need["compiled"] = max(conf.need["compiled"] * 0.5, 1.2 * row["setup_s"])
    ctx.emit(row)
    return out


def _provider_fn(conf, provider: str, kind: str, model, schedule, shape, dev):
    """The call a sampling row times: a peer's (bench.PROVIDERS) or df.sample with the provider's spec."""
    import ddpm_fast as df
    from ddpm_fast import bench

    if kind == "peer":
        return bench.PROVIDERS[provider](model, schedule, shape, conf.steps, dev)
    if provider not in conf.specs:
        raise ValueError(f"gpu_check has no provider {provider!r}; known: {sorted(conf.specs)}")
    spec = conf.specs[provider]
    labels = "random" if model.defaults.num_classes else None  # a class-conditional model

    def fn(spec=spec):
        return df.sample(model, schedule, shape, seed=bench.SEED, device=dev, labels=labels, **spec)

    return fn


def peer_status(ctx: Context) -> bool:
    """Whether the peer (diffusers) imports here; if not, one skipped row says why and how to carry it."""
    name = ctx.conf.peer
    if importlib.util.find_spec(name) is None:
        ctx.emit(
            {
                "kind": "skipped",
                "provider": "diffusers",
                "reason": f"missing peer: {name} is not importable here (carry its wheel: benchmarks/README.md); "
                "figures against it are left out, ours are computed from our own rows",
            }
        )
        return False
    try:
        importlib.import_module(name)
    except Exception as e:  # installed but broken (a dependency's version): the import error is the finding
        ctx.emit(_exc_row(e, provider="diffusers"))
        return False
    return True


def _sampling_section(ctx: Context, batches, providers) -> int:
    import torch

    import ddpm_fast as df
    from ddpm_fast import bench

    conf = ctx.conf
    have_peer = not any(p.startswith("diffusers") for p in providers) or peer_status(ctx)
    dev = torch.device(conf.device)
    earlier = [r["setup_s"] for r in read_rows(ctx.out) if r.get("compiled")]
    if earlier:  # an earlier section's compiles: the best estimate of this one's
        conf.need["compiled"] = 1.2 * max(earlier)
    ctx.doing = "building the model"
    if conf.model == "digits":  # the bundled checkpoint, with its own schedule and tuned tables
        from ddpm_fast.checkpoint import DEFAULT_MODEL_DIR

        model, schedule = bench.build_model(str(DEFAULT_MODEL_DIR), dev), None
    else:
        model, schedule = bench.build_model(conf.model, dev), df.Schedule.linear(conf.steps)
    if not any(r.get("kind") == "model" and r["model"] == conf.model for r in read_rows(ctx.out)):
        from torch.utils.flop_counter import FlopCounterMode

        C, H, W = model.config.image_shape
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            cond = (
                {"y": torch.zeros(1, dtype=torch.int64, device=dev)}
                if model.config.__dict__.get("num_classes")
                else {}
            )
            model(torch.zeros(1, C, H, W, device=dev), torch.zeros(1, dtype=torch.int64, device=dev), **cond)
        ctx.emit(
            {
                "kind": "model",
                "model": conf.model,
                "parameters": model.num_parameters(),
                "flops_per_image_step": counter.get_total_flops(),
            }
        )
    for batch in batches:
        refs = {}  # method -> the reference fp32 output at this batch, what that method's rows are held to
        for provider in providers:
            if provider.startswith("diffusers") and not have_peer:
                continue
            spec = conf.specs.get(provider, {})
            method = (spec.get("method", "ddpm"), spec.get("spacing"), spec.get("steps"))
            out = sampling_row(ctx, model, schedule, provider, batch, refs.get(method))
            if provider.split("-")[0] == "reference":
                refs[method] = out
    return 0


def _dry_compile():
    """Dry run: torch.compile returns the function itself (inductor's compile on a CPU takes minutes)."""
    import torch

    torch.compile = lambda fn, **kw: fn


def section_headline(ctx: Context) -> int:
    if ctx.conf.dry:
        _dry_compile()
    batches, providers = ctx.conf.headline
    return _sampling_section(ctx, batches, providers)


def section_solvers(ctx: Context) -> int:
    batches, providers = ctx.conf.solvers
    base = ctx.conf
    for steps in base.solver_steps:  # the schedule is T = steps long: NFE = steps
        ctx.conf = replace(base, steps=steps)
        _sampling_section(ctx, batches, providers)
    model, batches, providers = base.checkpoint_rows
    ctx.conf = replace(base, model=model)
    try:
        return _sampling_section(ctx, batches, providers)
    finally:
        ctx.conf = base


def section_adm(ctx: Context) -> int:
    model, batches, providers = ctx.conf.adm
    base = ctx.conf
    ctx.conf = replace(base, model=model)
    try:
        return _sampling_section(ctx, batches, providers)
    finally:
        ctx.conf = base


def section_more(ctx: Context) -> int:
    batches, providers = ctx.conf.more
    return _sampling_section(ctx, batches, providers)


def section_kernel(ctx: Context) -> int:
    import bench_kernels

    for size in ctx.conf.kernel_sizes:
        if not ctx.fits(ctx.conf.need["eager"], provider="kernel", size=size):
            break
        # the solvers' step also moves its history (x0; ipndm: three eps entries); one method at a time, so
        # a failure in one is its error row and the rows of the others stay
        for method in ("ddpm", "dpmpp_2m", "unipc", "ipndm"):
            ctx.doing = f"kernel {method} {size}"
            try:
                rows = bench_kernels.run(
                    ctx.conf.device,
                    sizes=size,
                    providers=list(ctx.conf.kernel_providers),
                    samples=5 if ctx.conf.dry else 20,
                    methods=(method,),
                )
            except Exception as e:
                ctx.emit(_exc_row(e, provider="kernel", size=size, method=method))
                continue
            for r in rows:
                ctx.emit({**r, "kind": "kernel"})
    return 0


def section_onnx(ctx: Context) -> int:
    from ddpm_fast.bench.onnx import gpu_check as onnx_gpu_check

    res = onnx_gpu_check(None, full=True, budget_s=max(ctx.left() - 5, 10))
    ctx.emit({"kind": "onnx", "result": res})
    return 0 if res.get("status") in ("ok", "skipped") else 1


def section_modes(ctx: Context) -> int:
    import torch

    import ddpm_fast as df
    from ddpm_fast import bench

    conf = ctx.conf
    for mode in conf.modes:
        conf.specs[f"fast-bf16[{mode}]"] = dict(backend="fast", dtype=torch.bfloat16, compile_mode=mode)
    model = bench.build_model(conf.model, torch.device(conf.device))
    schedule = df.Schedule.linear(conf.steps)
    conf.need["compiled"] = 150.0  # max-autotune tunes every conv: minutes
    for mode in conf.modes:
        sampling_row(ctx, model, schedule, f"fast-bf16[{mode}]", 64)
    return 0


CHILDREN = {
    "smoke": section_smoke,
    "headline": section_headline,
    "kernel": section_kernel,
    "more": section_more,
    "solvers": section_solvers,
    "adm": section_adm,
    "onnx": section_onnx,
    "modes": section_modes,
}


def child_main(args, out: Path, children: dict) -> int:
    sys.path[:0] = [str(ROOT), str(HERE)]  # ddpm_fast from this checkout; bench_kernels beside this file
    conf = DRY_CONF if args.dry_run else CUDA_CONF
    if args.section in CHILDREN:  # ours: the providers' specs (imports torch); an added section gets none
        conf = replace(conf, specs=_specs(conf.dry), need=dict(conf.need))
    ctx = Context(out, args.section, args.until, conf)
    try:
        return (CHILDREN.get(args.section) or children[args.section])(ctx)
    except KeyboardInterrupt:
        ctx.emit({"kind": "error", "error": f"stopped at the section's time limit during: {ctx.doing}"})
        return 130
    except Exception as e:  # the section's own failure: a row, and the parent goes on with the next section
        ctx.emit(_exc_row(e, during=ctx.doing))
        return 1
    finally:
        ctx.close()


# ---------------------------------------------------------------------------------------------- pytest section


def pytest_command(out: Path, tests: tuple = ()) -> tuple[list[str], str]:
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'junit.xml'}",
        "--durations=10",
    ]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PYTEST_PER_TEST_S}")
        note = f"per-test timeout {PYTEST_PER_TEST_S} s (pytest-timeout)"
    else:
        note = "no per-test timeout (pytest-timeout is not installed here); the section limit still applies"
    cmd += list(tests) or ["-m", "cuda", *(str(ROOT / f) for f in CUDA_TEST_FILES)]
    return cmd, note


def tests_row(out: Path, rc: int, status: str, tail: str, note: str) -> dict:
    """Counts and failures from the junit XML (pytest writes it on SIGINT too), else from the -v log; the
    test that was running when the section was stopped, from the log's last line naming one without outcome."""
    log = (out / "pytest.log").read_text(errors="replace") if (out / "pytest.log").exists() else tail
    outcomes, running = {}, None
    for line in log.splitlines():
        parts = line.split()
        if parts and "::" in parts[0] and not line.startswith(("FAILED", "ERROR")):
            if len(parts) >= 2 and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"):
                outcomes[parts[0]], running = parts[1], None
            else:
                running = parts[0]
    res = {
        "kind": "tests",
        "section": "tests",
        "rc": rc,
        "passed": 0,
        "failed": 0,
        "errors": 0,
        "skipped": 0,
        "failures": [],
        "per_test_timeout": note,
        "output_tail": tail[-8000:],
        "interrupted": None if status == "ok" else f"{status}, while running {running or 'no test'}",
    }

    def fail(test, outcome, message=""):
        res["failed" if outcome == "failure" else "errors"] += 1
        res["failures"].append(
            {"test": test, "outcome": outcome, "message": " / ".join(message.splitlines())[:500]}
        )

    try:
        cases = list(ET.parse(out / "junit.xml").getroot().iter("testcase"))
        res["source"] = "junit.xml"
    except (OSError, ET.ParseError):
        res["source"] = "the pytest -v log (no readable junit.xml)"
        for test, outcome in outcomes.items():
            if outcome in ("FAILED", "ERROR"):
                fail(test, "failure" if outcome == "FAILED" else "error")
            else:
                res["skipped" if outcome == "SKIPPED" else "passed"] += 1
        return res
    for case in cases:
        if case.get("name") is None:  # the test a SIGINT stopped: written without a name or an outcome
            continue
        test = f"{case.get('classname')}::{case.get('name')}"
        bad = next((el for el in (case.find("failure"), case.find("error")) if el is not None), None)
        if bad is not None:
            fail(test, bad.tag, bad.get("message") or "")
        else:
            res["skipped" if case.find("skipped") is not None else "passed"] += 1
    return res


# ---------------------------------------------------------------------------------------------- the parent


def run_child(cmd: list[str], limit: float, log_path: Path | None = None) -> tuple[int, str, str]:
    """Run `cmd` in its own process group, its output teed here; SIGINT at `limit` s, SIGKILL after the grace.
    Returns (exit code, status: ok / failed / timeout / killed, output tail)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **group)
    tail = collections.deque(maxlen=400)
    log = open(log_path, "w") if log_path else None

    def tee():
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            if log:
                log.write(line)
                log.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    status = None
    try:
        rc = proc.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        status = "timeout"
        _signal_group(proc, signal.SIGINT)
        try:
            rc = proc.wait(timeout=min(SIGINT_GRACE_S, max(1.0, limit)))
        except subprocess.TimeoutExpired:
            status = "killed"
            _signal_group(proc, signal.SIGKILL)
            rc = proc.wait()
    except BaseException:  # this process is being stopped: take the section down with it
        _signal_group(proc, signal.SIGKILL)
        raise
    reader.join(timeout=5)
    if log:
        log.close()
    if status is None:
        status = "ok" if rc == 0 else "failed"
    return rc, status, "".join(tail)[-6000:]


def _signal_group(proc, sig) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None, *, entry: str = __file__, sections: tuple = (), children: dict | None = None) -> int:
    """`sections` follow the run's own (SECTIONS, or DRY_SECTIONS with --dry-run), `children` maps each added
    section's name to its function, `entry` is the script every child runs (the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="same as --out")
    p.add_argument(
        "--out", help="directory for the report (made if missing; a relative path is resolved here)"
    )
    p.add_argument(
        "--budget", type=float, default=450.0, help="seconds for all sections (default 450: 7.5 min)"
    )
    p.add_argument("--only", default="", help="comma-separated sections to run")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    p.add_argument("--dry-run", action="store_true", help="CPU sections: checks the machinery")
    p.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this one section
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)  # a child: its deadline (time.time())
    args = p.parse_args(argv)
    if not (args.out or args.out_dir):
        p.error("give the report's directory: --out DIR")
    out = Path(args.out or args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        return child_main(args, out, children or {})
    sections = (*(DRY_SECTIONS if args.dry_run else SECTIONS), *sections)
    names = [s.name for s in sections]
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    bad = sorted(set(only + skip) - set(names))
    if bad:
        print(f"gpu_check: --only/--skip take {','.join(names)}; got {bad}", file=sys.stderr)
        return 2
    sections = [s for s in sections if (not only or s.name in only) and s.name not in skip]
    return run_all(out, sections, args.budget, args.dry_run, entry)


def run_all(out: Path, sections, budget: float, dry: bool, entry: str = __file__) -> int:
    for name in ("rows.jsonl", "report.md", "report.json", "report.png", "junit.xml", "pytest.log"):
        (out / name).unlink(missing_ok=True)
    start = time.time()
    conf = DRY_CONF if dry else CUDA_CONF
    big, small = conf.headline[0][0], conf.headline[0][1]
    append_row(
        out,
        {
            "kind": "meta",
            "title": "GPU check (dry run on CPU)" if dry else "GPU check",
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
            "budget_s": budget,
            "commit": _git_commit(),
            "python": sys.version.split()[0],
            "argv": sys.argv,
            "target_batches": [big, small],
        },
    )
    render(out)
    exit_code, stop = 0, None
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and process managers stop with SIGTERM
    try:
        for sec in sections:
            left = budget - (time.time() - start)
            base = {"kind": "section", "name": sec.name, "what": sec.what, "pytest": sec.pytest}
            if stop or left < sec.min_s:
                reason = stop or f"budget: {left:.0f} s left, the section needs at least {sec.min_s:.0f}"
                append_row(out, {**base, "status": "skipped", "reason": reason})
                render(out)
                continue
            limit = min(sec.limit_s, left)
            print(f"== {sec.name} (limit {limit:.0f} s): {sec.what}", flush=True)
            append_row(out, {**base, "status": "running", "limit_s": limit})
            render(out)
            t0 = time.time()
            rc, status, tail = _run_section(sec, out, t0, limit, dry, entry)
            if sec.name == "smoke" and rc == NO_CUDA:
                status, stop, exit_code = "no CUDA", "no CUDA device (see smoke)", 2
            elif status != "ok" and exit_code == 0:
                exit_code = 1
            append_row(
                out,
                {
                    **base,
                    "status": status,
                    "rc": rc,
                    "seconds": round(time.time() - t0, 1),
                    "limit_s": limit,
                    "output_tail": tail,
                },
            )
            render(out)
    except KeyboardInterrupt:  # the running section was killed with its group; the report says where
        render(out)
        print(f"\ngpu_check: interrupted; report so far: {out / 'report.md'}", flush=True)
        return 130
    append_row(out, {"kind": "end", "seconds": round(time.time() - start, 1), "exit": exit_code})
    rep = render(out)
    print(f"\ngpu_check: {rep['state']}\nreport: {out / 'report.md'}", flush=True)
    return exit_code


def _run_section(sec, out: Path, t0: float, limit: float, dry: bool, entry: str) -> tuple[int, str, str]:
    """One section in its own process group, stopped at `limit` s: pytest (its row written here) or a child
    of the entry script; returns (exit code, status, output tail)."""
    if sec.pytest:
        cmd, note = pytest_command(out, sec.tests)
        rc, status, tail = run_child(cmd, limit, out / "pytest.log")
        append_row(out, tests_row(out, rc, status, tail, note))
        if rc == 5:  # no test collected: nothing failed (the row shows the zero counts)
            status = "ok"
        return rc, status, tail
    cmd = [
        sys.executable,
        "-u",
        entry,
        "--section",
        sec.name,
        "--out",
        str(out),
        "--until",
        str(t0 + limit),
    ]
    return run_child(cmd + (["--dry-run"] if dry else []), limit)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())

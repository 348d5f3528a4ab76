"""benchmarks/gpu_check.py proven on CPU: the report a lent GPU hands back survives what can go wrong there.

The dry run (`--dry-run`) of tests/_gpu_check_fakes.py, which adds fake sections to the script's, runs the
real parent, subprocesses, limits and report on them: one raises, a pytest run outlives its section (SIGINT;
the junit XML is still read), one ignores SIGINT (SIGKILL), rows overrun a section's time, a section never
fits the budget, the peer is not installed. The CPU sections (smoke, headline, kernel) run in this process
with the dry configuration: their rows, fallback labels, error rows and figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

import ddpm_fast.kernels
from ddpm_fast import engine

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "_gpu_check_fakes.py"  # gpu_check with the harness's fake sections
sys.path.insert(0, str(ROOT / "benchmarks"))
import _gpu_check_fakes as fakes  # noqa: E402
import gpu_check  # noqa: E402


def _rows(out: Path, **match) -> list[dict]:
    return [r for r in gpu_check.read_rows(out) if all(r.get(k) == v for k, v in match.items())]


def _section(rep: dict, name: str) -> dict:
    return next(s for s in rep["sections"] if s["name"] == name)


def test_dry_run_report_survives_raise_pytest_timeout_kill_budget_and_missing_peer(tmp_path):
    """About 8 s: the fake pytest run needs its 4 s section to start pytest and run two tests."""
    out = tmp_path / "rel"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(FAKES), "--dry-run", "--budget", "60",
         "--only", "raises,tests,hang,budget,peer,modes", "--out", "rel"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a section failed: exit 1
    assert {p.name for p in out.iterdir()} == {
        "rows.jsonl",
        "report.md",
        "report.json",
        "junit.xml",
        "pytest.log",
    }
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert rep["state"].startswith("complete")
    # a section that raises: an error row with its traceback, and the next section still runs
    assert _section(rep, "raises")["status"] == "failed"
    (err,) = _rows(out, section="raises", kind="error")
    assert "a section that raises" in err["error"] and "Traceback" in err["traceback"]
    # pytest stopped by SIGINT at the section limit: the junit XML written on the interrupt is read
    assert _section(rep, "tests")["status"] == "timeout"
    (tests,) = _rows(out, kind="tests")
    assert tests["source"] == "junit.xml"
    assert (tests["passed"], tests["failed"]) == (1, 1)
    assert "test_outlives_the_section" in tests["interrupted"]
    assert (
        "test_fails" in tests["failures"][0]["test"] and "a failing test" in tests["failures"][0]["message"]
    )
    assert "test_passes PASSED" in tests["output_tail"]
    # a section deaf to SIGINT is killed; the row it wrote before stays
    assert _section(rep, "hang")["status"] == "killed"
    assert len(_rows(out, section="hang", kind="note")) == 1
    # the budget inside a section: rows that no longer fit are skipped rows, with the reason
    done, skipped = _rows(out, section="budget", kind="note"), _rows(out, section="budget", kind="skipped")
    assert len(done) >= 1 and len(skipped) >= 1 and len(done) + len(skipped) == 6
    assert all(r["reason"].startswith("budget:") for r in skipped)
    # the budget across sections: a section that cannot fit is recorded, not started
    modes = _section(rep, "modes")
    assert modes["status"] == "skipped" and modes["reason"].startswith("budget:")
    # the missing peer is a row that says how to bring it, and the targets that need it say why they are empty
    (peer,) = _rows(out, section="peer", kind="skipped")
    assert "missing peer" in peer["reason"] and "README" in peer["reason"]
    assert "## tests (timeout)" in md and "**ERROR**" in md and "missing peer" in md


def _run_sections(out, names, target_batches, conf=None):
    """Run the named CPU sections in this process (no new torch import) with the dry configuration."""
    engine.clear_cache()
    gpu_check.append_row(
        out, {"kind": "meta", "title": "test", "budget_s": 60, "target_batches": target_batches}
    )
    conf = conf or gpu_check.replace(
        gpu_check.DRY_CONF, specs=gpu_check._specs(True), need=dict(gpu_check.DRY_CONF.need)
    )
    for name in names:
        ctx = gpu_check.Context(out, name, until=1e18, conf=conf)
        assert gpu_check.CHILDREN[name](ctx) == 0
        ctx.close()
    engine.clear_cache()


def test_cpu_sections_rows_labels_errors_and_figures(tmp_path, monkeypatch):
    """smoke, headline and kernel with the dry configuration, in this process (no new torch import); the
    headline with a provider that raises and a compile that fails at batch 1 (tests/_gpu_check_fakes.py)."""
    monkeypatch.setattr(torch, "compile", torch.compile)  # headline's dry run replaces it; restored after
    monkeypatch.setattr(gpu_check, "_dry_compile", fakes.compile_failing_at_batch_1)
    monkeypatch.setattr(engine, "_logged", set())
    # smoke checks that ddpm_fast comes from the script's checkout, which its own child process puts first on
    # sys.path; in this process the test run's import decides (a wheel in site-packages under a plain
    # `pytest`, this tree under `python -m pytest`), so the checkout is wherever that import came from
    monkeypatch.setattr(gpu_check, "ROOT", Path(ddpm_fast.kernels.__file__).resolve().parents[2])
    _run_sections(
        tmp_path, ("smoke", "headline", "kernel"), target_batches=[4, 1], conf=fakes.headline_conf()
    )

    assert all(r["ok"] for r in _rows(tmp_path, kind="smoke"))
    assert {r["what"] for r in _rows(tmp_path, kind="ceiling")} == {"bf16 matmul", "device copy"}
    (model,) = _rows(tmp_path, kind="model")
    assert model["flops_per_image_step"] > model["parameters"]  # counted convs: more FLOPs than weights
    sampling = {(r["provider"], r["batch"]): r for r in _rows(tmp_path, kind="sampling")}
    # batch 4 compiled (the dry run's stand-in compile); batch 1's compile fails: labelled, with the reason
    assert ("fast-bf16", 4) in sampling and ("fast-bf16", 1) not in sampling
    fallback = sampling[("fast-bf16-nocompile", 1)]
    assert fallback["requested"] == "fast-bf16" and "simulated compile failure" in fallback["fallback"]
    assert fallback["max_abs_diff"] < 0.1  # bf16 U-Net, float32 update: still the same images
    # an exception per (provider, batch) is an error row; the next rows still ran
    errors = _rows(tmp_path, kind="error", provider=fakes.RAISES)
    assert [r["batch"] for r in errors] == [4, 1] and "compile must be a bool" in errors[0]["error"]
    assert _rows(tmp_path, kind="skipped", provider="diffusers")[0]["reason"].startswith("missing peer")
    kernels = _rows(tmp_path, kind="kernel")
    assert {r["provider"] for r in kernels} == {"eager", "twin", "copy"}
    assert {r["method"] for r in kernels} == {"ddpm", "dpmpp_2m", "unipc", "ipndm"}  # history: x0, and eps

    rep = gpu_check.render(tmp_path)
    row = next(r for r in rep["rows"] if r.get("provider") == "fast-bf16" and r.get("batch") == 4)
    assert row["tflops"] > 0 and 0 < row["of_ceiling"] and row["of_sheet"] is None  # no data sheet for a CPU
    assert row["x_reference"] > 0
    # the replay loop alone, beside the whole call: part of it; the reference has no such loop
    assert 0 < row["loop_ms_per_step"] < row["ms_per_step"], row
    assert next(r for r in rep["rows"] if r.get("provider") == "reference")["loop_ms_per_step"] is None
    assert "loop ms/step" in (tmp_path / "report.md").read_text()
    targets = {t["target"]: t for t in rep["targets"]}
    assert targets["batch 4 fast-bf16 images/s over reference fp32"]["value"] == row["x_reference"]
    over_peer = targets["batch 4 fast-bf16 images/s over diffusers fp32"]
    assert over_peer["value"] is None and over_peer["note"].startswith("missing peer")
    for t in rep["targets"]:  # every figure the report names has its value or says why not
        assert t["value"] is not None or t["note"], t
    fused = [t for t in rep["targets"] if t["target"].startswith("fused step")]
    assert fused and all("ddpm" in t["target"] for t in fused)  # DDPM's kernel row, not the last method's
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "fast-bf16-nocompile" in (tmp_path / "report.md").read_text()


def test_a_report_cut_short_says_where_it_stopped(tmp_path):
    gpu_check.append_row(
        tmp_path, {"kind": "meta", "title": "t", "budget_s": 450, "target_batches": [256, 1]}
    )
    gpu_check.append_row(tmp_path, {"kind": "section", "name": "smoke", "status": "running"})
    gpu_check.append_row(tmp_path, {"kind": "section", "name": "smoke", "status": "ok", "seconds": 9.0})
    gpu_check.append_row(tmp_path, {"kind": "section", "name": "headline", "status": "running"})
    with open(tmp_path / "rows.jsonl", "a") as f:
        f.write('{"kind": "sampling", "provi')  # a kill in the middle of a write
    rep = gpu_check.render(tmp_path)
    assert rep["state"].startswith("stopped during section 'headline'")
    assert [s["status"] for s in rep["sections"]] == ["ok", "running"]


def test_tests_row_falls_back_to_the_verbose_log(tmp_path):
    (tmp_path / "pytest.log").write_text(
        "tests/test_a.py::test_one PASSED   [ 33%]\n"
        "tests/test_a.py::test_two FAILED   [ 66%]\n"
        "tests/test_b.py::test_slow \n"
        "FAILED tests/test_a.py::test_two - AssertionError\n"
    )
    row = gpu_check.tests_row(tmp_path, rc=-9, status="killed", tail="", note="")
    assert row["source"].startswith("the pytest -v log")
    assert (row["passed"], row["failed"]) == (1, 1)
    assert row["interrupted"] == "killed, while running tests/test_b.py::test_slow"


def test_imports_from_the_repository_root_without_installing():
    """The device runs the checkout as it is: no install, so ddpm_fast.kernels/.export resolve through the
    symlinks in ddpm_fast/. `-S` skips site-packages' .pth files (this venv's editable install)."""
    site = sysconfig.get_paths()["purelib"]
    code = "import ddpm_fast.kernels, ddpm_fast.export; print(ddpm_fast.kernels.__file__, ddpm_fast.export.__file__)"
    env = dict(os.environ, PYTHONPATH=site, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in proc.stdout.split():
        assert Path(path).resolve().is_relative_to(ROOT) and "site-packages" not in path


def test_a_stopped_run_keeps_its_rows_and_its_section_dies_with_it(tmp_path):
    """SIGTERM to the parent (a `timeout`, the device tool's limit): the section's process group is killed,
    the rows written so far stay, and the report says which section was running."""
    proc = subprocess.Popen(
        [sys.executable, str(FAKES), "--dry-run", "--only", "budget",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # wait for the first row of the section
        if "row 0 took" in line:
            break
    proc.terminate()
    assert proc.wait(timeout=30) == 130
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["state"].startswith("stopped during section 'budget'")
    assert len(_rows(tmp_path, section="budget", kind="note")) >= 1


def test_solver_and_adm_sections_on_cpu(tmp_path, monkeypatch):
    """The solver rows (method in the provider name, NFE in steps) and the ADM rows (a class-conditional model:
    labels drawn per sample) run with the dry configuration, each against its reference."""
    monkeypatch.setattr(engine, "_logged", set())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the dry run's compile: the eager function
    _run_sections(tmp_path, ("solvers", "adm"), target_batches=[2, 1])
    rows = {(r["model"], r["provider"]): r for r in _rows(tmp_path, kind="sampling")}
    assert not _rows(tmp_path, kind="error"), _rows(tmp_path, kind="error")
    for p in ("fast-bf16-dpmpp_2m", "fast-bf16-unipc"):
        assert rows[("tiny", p)]["steps"] == 3 and rows[("tiny", p)]["images_per_s"] > 0
    assert rows[("tiny", "fast-bf16-dpmpp_2m")]["max_abs_diff"] < 0.1  # bf16 U-Net against its fp32 reference
    assert rows[("adm-tiny", "fast-bf16")]["max_abs_diff"] < 0.1 and rows[("adm-tiny", "reference")]
    # the new work's rows: deis, and on the bundled digits checkpoint the tuned 5-NFE table and karras spacing,
    # each beside its own reference (same method, spacing and NFE)
    for p, nfe in (("fast-bf16-tuned", 5), ("fast-bf16-dpmpp_2m-karras", 10)):
        r = rows[("digits", p)]
        assert r["steps"] == nfe and r["max_abs_diff"] < 0.1 and r["loop_ms_per_step"] > 0, r
    rep = gpu_check.render(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "fast-bf16-tuned" in md and "fast-bf16-dpmpp_2m-karras" in md and "fast-bf16-deis" in md
    for p in ("fast-bf16-tuned", "fast-bf16-deis", "fast-bf16-dpmpp_2m-karras"):
        assert next(r for r in rep["rows"] if r.get("provider") == p)["x_reference"] > 0, p


class _FakeClock:
    """gpu_check's `time` module for a simulated run: time moves only when a section runs, by its whole limit."""

    def __init__(self):
        self.now = 1.0e9

    def time(self):
        return self.now

    def strftime(self, fmt, t):
        return "simulated"

    def gmtime(self, t):
        return None


def test_a_budget_cut_drops_the_least_valuable_sections(tmp_path, monkeypatch):
    """The shipped SECTIONS at --budget 450 with every section running to its own limit (the worst case): the
    correctness sections, the headline and the newest features' rows (solvers with the tuned, deis and karras
    rows; ADM) run; what a cut drops is the tail of the value order (ONNX, more, modes); the tests section
    runs the kernel and capture proofs before the long compiles."""
    clock = _FakeClock()
    ran, commands = [], []

    def run_child(cmd, limit, log_path=None):
        commands.append(cmd)
        ran.append(cmd[cmd.index("--section") + 1] if "--section" in cmd else "tests")
        clock.now += limit
        return 0, "ok", ""

    monkeypatch.setattr(gpu_check, "time", clock)
    monkeypatch.setattr(gpu_check, "run_child", run_child)
    monkeypatch.setattr(gpu_check, "render", lambda out: {"state": "simulated"})
    assert gpu_check.run_all(tmp_path, gpu_check.SECTIONS, 450.0, dry=False) == 0
    skipped = [r["name"] for r in _rows(tmp_path, kind="section", status="skipped")]
    order = [s.name for s in gpu_check.SECTIONS]
    assert ran == ["smoke", "kernel", "tests", "headline", "solvers", "adm"]
    assert skipped == ["onnx", "more", "modes"] == order[len(ran) :]  # a cut drops the tail only
    assert all(r["reason"].startswith("budget:") for r in _rows(tmp_path, kind="section", status="skipped"))
    # the same run with a smaller budget drops more of the tail, never a section before one that ran
    clock.now, ran[:] = 1.0e9, []
    gpu_check.run_all(tmp_path, gpu_check.SECTIONS, 300.0, dry=False)
    assert ran == order[: len(ran)] and "solvers" not in ran and ran[:3] == ["smoke", "kernel", "tests"]
    # the tests section: the listed files in their order, kernel and capture proofs first
    (cmd,) = {tuple(c) for c in commands if "pytest" in c}
    files = [Path(a).relative_to(ROOT).as_posix() for a in cmd if a.endswith(".py")]
    assert files == list(gpu_check.CUDA_TEST_FILES)
    assert files[:3] == ["tests/test_kernels.py", "tests/test_cuda_proofs.py", "tests/test_cuda_capture.py"]
    assert files.index("tests/test_engine.py") > files.index("tests/test_cuda_capture.py")


def test_every_file_with_a_cuda_test_is_in_the_tests_section():
    marked = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "tests").glob("test_*.py")
        if re.search(r"^\s*@pytest\.mark\.cuda$|marks=pytest\.mark\.cuda\)", p.read_text(), re.M)
    )
    assert sorted(gpu_check.CUDA_TEST_FILES) == marked

"""The `onnx` provider for `ddpm-fast bench`, and `gpu_check()` for benchmarks/gpu_check.py.

    run = onnx_provider(model, plan)      # exports once (run.export_seconds), creates the session, warms up
    x0 = run()                            # one full sampling run of `plan` through ONNX Runtime
    run.close()                           # removes the temporary .onnx

Export and session creation are set-up, reported apart from the timed runs (STYLE 5).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import ddpm_fast as df
from ddpm_fast.export.graphs import EpsGraph, half_unet
from ddpm_fast.export.onnx_export import export_onnx
from ddpm_fast.export.runtime import (
    OnnxModel,
    as_onnx_model,
    import_onnxruntime,
    reference_tolerance,
    sample_onnx,
)
from ddpm_fast.plan import make_plan
from ddpm_fast.reference import run as sample_reference
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.unet import UNet, UNetConfig

__all__ = ["OnnxProvider", "onnx_provider", "gpu_check"]


class OnnxProvider:
    """A zero-argument callable sampling `plan` with ONNX Runtime; see `onnx_provider`."""

    def __init__(self, onnx_model, plan, *, export_seconds: float = 0.0, tmpdir: str | None = None):
        self.model = as_onnx_model(onnx_model)
        self.plan = plan
        self.export_seconds = export_seconds
        self._tmpdir = tmpdir
        t0 = time.perf_counter()
        self.model.session(plan.device, threads=plan.options.get("threads"))
        self.session_seconds = time.perf_counter() - t0
        self.name = "onnx" + ("-step" if self.model.kind == "step" else "")

    def __call__(self) -> torch.Tensor:
        out = sample_onnx(self.model, self.plan)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __del__(self):
        self.close()


def onnx_provider(
    model, plan, *, fp16: bool = False, step_graph: bool = False, validate: bool = False, **export_kwargs
) -> OnnxProvider:
    """A callable running `plan` (a ddpm_fast.plan.Plan) through ONNX Runtime on plan.device.

    `model`: an nn.Module (exported to a temporary file first: the eps graph, or with step_graph=True the
    step graph for exactly this plan) or an .onnx path / OnnxModel / InferenceSession (used as is).
    `export_kwargs` go to `export_onnx` (e.g. exporter="torchscript").
    """
    if not isinstance(model, torch.nn.Module):
        return OnnxProvider(model, plan)
    tmpdir = tempfile.mkdtemp(prefix="ddpm_fast_onnx_")
    path = Path(tmpdir) / ("step.onnx" if step_graph else "model.onnx")
    kw = dict(export_kwargs)
    if step_graph:
        kw.update(plan=plan, schedule=plan.full_schedule)
    try:
        cpu_model = model if _on_cpu(model) else copy.deepcopy(model).cpu()
        report = export_onnx(cpu_model, path, fp16=fp16, validate=validate, **kw)
        return OnnxProvider(path, plan, export_seconds=report.export_seconds, tmpdir=tmpdir)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


# ---------------------------------------------------------------------------------------------- GPU check


def gpu_check(out_dir=None, *, full: bool = True, budget_s: float = 60.0) -> dict:
    """ONNX Runtime's CUDA path on this machine: onnx backend (CUDA EP + IO binding) vs reference, and speed.

    Returns a JSON-able dict with "status" ("ok", "failed" or "skipped") and the measurements, also written
    to OUT_DIR/onnx_gpu_check.json when `out_dir` is given (the .onnx files stay in a temporary directory);
    never raises for a missing GPU or CUDA provider (status "skipped", with the reason). `full` adds the
    CIFAR-10 U-Net (random weights) images/s at batch 64 for onnx fp32/fp16 and the reference backend, when
    the tiny-model checks left at least half of `budget_s`.
    """
    # float32 on both sides: TF32 (cuDNN's default for torch convolutions) would put ~1e-3 between them;
    # ONNX Runtime's session follows these flags (export.runtime.create_session)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = _gpu_check(full, budget_s)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            Path(out_dir) / "onnx_gpu_check.json", json.dumps(result, indent=1, default=str).encode()
        )
    return result


def _gpu_check(full: bool, budget_s: float, device: str = "cuda") -> dict:
    """gpu_check's body; device='cpu' runs the same checks on the CPU provider (a dry run of its logic)."""
    result = {"status": "skipped", "torch": torch.__version__}
    dev = torch.device(device)
    if not _onnx_ready(dev, result):
        return result
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ddpm_fast_gpu_check_"))
    checks = result["checks"] = []
    ok = True
    try:
        torch.manual_seed(0)
        tiny = UNet(UNetConfig.tiny()).eval()
        tiny.schedule = df.Schedule.linear(1000)
        shape = (4, 3, 16, 16)
        exact = sample_reference(
            copy.deepcopy(tiny).double().to(dev),
            make_plan(tiny, None, shape, steps=20, device=dev, dtype=torch.float64),
        )
        for kind, fp16 in (("eps", False), ("eps", True), ("step", False)):
            path = work / f"tiny_{kind}{'_fp16' if fp16 else ''}.onnx"
            plan = make_plan(tiny, None, shape, steps=20, device=dev)
            step_plan = make_plan(tiny, None, shape, steps=20) if kind == "step" else None  # exported on CPU
            rep = export_onnx(tiny, path, plan=step_plan, fp16=fp16)
            got = df.sample(str(path), shape=shape, steps=20, backend="onnx", device=dev)
            with torch.no_grad():
                want = sample_reference(copy.deepcopy(tiny).to(dev), plan)
            diff = (got - want).abs().max().item()
            tol = reference_tolerance(plan)
            err = diff
            if fp16:  # STYLE 6: vs float64, at most twice the error of the reference run with a float16 U-Net
                with torch.no_grad():
                    torch16 = sample_reference(EpsGraph(half_unet(tiny)).to(dev), plan)
                err = (got.double() - exact).abs().max().item()
                tol += 2 * (torch16.double() - exact).abs().max().item()
            sess = OnnxModel.load(path).session(dev)
            entry = {
                "graph": kind,
                "fp16": fp16,
                "export_s": round(rep.export_seconds, 2),
                "mib": round(rep.file_bytes / 2**20, 2),
                "providers": sess.get_providers(),
                "onnx_vs_reference_max_abs": diff,
                "checked_error": err,
                "bound": tol,
                "pass": err <= tol
                and (dev.type != "cuda" or sess.get_providers()[0] == "CUDAExecutionProvider"),
            }
            ok &= entry["pass"]
            checks.append(entry)
        spent = time.perf_counter() - start
        if full and spent < budget_s / 2:
            result["cifar10"] = _cifar10_speed(work, dev)
        elif full:
            result["cifar10"] = {"skipped": f"budget: tiny checks took {spent:.0f} s of {budget_s:.0f}"}
    except Exception as e:  # noqa: BLE001 - the report names the failure; gpu_check.py keeps going
        result["error"] = f"{type(e).__name__}: {e}"
        ok = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["status"] = "ok" if ok else "failed"
    return result


def _onnx_ready(dev: torch.device, result: dict) -> bool:
    """Whether ONNX Runtime can run on `dev`; records its version and providers, or the reason it cannot."""
    if dev.type == "cuda" and not torch.cuda.is_available():
        result["reason"] = "CUDA is not available to torch"
        return False
    try:
        ort = import_onnxruntime()
    except RuntimeError as e:
        result["reason"] = str(e)
        return False
    result.update(onnxruntime=ort.__version__, providers=ort.get_available_providers())
    result["device_name"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    if dev.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        result["reason"] = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu for this CUDA)"
        return False
    return True


def _cifar10_speed(work: Path, dev: torch.device, batch: int = 64, steps: int = 10) -> dict:
    """images/s of a `steps`-step run at `batch` for onnx fp32 / fp16 and the reference, same CUDA device."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).eval()
    model.schedule = df.Schedule.linear(1000)
    shape = (batch, 3, 32, 32)
    out = {"batch": batch, "steps": steps}
    for fp16 in (False, True):
        path = work / f"cifar10{'_fp16' if fp16 else ''}.onnx"
        rep = export_onnx(model, path, fp16=fp16, validate=False)
        plan = make_plan(model, None, shape, steps=steps, device=dev)
        run = onnx_provider(str(path), plan)
        run()  # warm-up (cuDNN algorithm search)
        t = _median_seconds(run)
        out["onnx_fp16" if fp16 else "onnx_fp32"] = {
            "images_per_s": batch / t,
            "export_s": round(rep.export_seconds, 1),
            "mib": round(rep.file_bytes / 2**20, 1),
        }
    gpu_model = copy.deepcopy(model).to(dev)
    plan = make_plan(gpu_model, None, shape, steps=steps, device=dev)

    def ref():
        with torch.no_grad():
            x = sample_reference(gpu_model, plan)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return x

    ref()
    out["reference_fp32"] = {"images_per_s": batch / _median_seconds(ref)}
    return out


def _median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":  # python -m ddpm_fast.bench.onnx: the GPU check alone
    import json

    print(json.dumps(gpu_check(os.environ.get("DDPM_FAST_GPU_CHECK_DIR")), indent=2, default=str))

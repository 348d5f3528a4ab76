"""`sample`: one entry point for every backend. A request becomes a `Plan` (`ddpm_fast.plan`); the backend
named in `BACKENDS` runs it as `run(model, plan) -> Tensor`.

Backend "auto" (`choose_backend`, the rule `auto_rule`) is a pure function of the model's kind and size, the
device, the dtype, the step count, the batch, whether this process already compiled the model, and whether
OpenVINO is installed with bf16 kernels on this CPU, so every torchrun rank reaches the same answer without a
broadcast; nothing is timed:

    an ONNX file, session or OnnxModel            -> onnx; openvino for CPU bfloat16 where the extra has bf16
                                                      kernels here (onnx computes in float32 only)
    generator= given, or dtype float64             -> reference (the only backend that does either)
    CPU bfloat16, our U-Net or ADM, no guidance,   -> openvino where the [openvino] extra is installed and its
    no fast options, parameters x pixels x steps      CPU plugin has bf16 here (1.04x-1.89x fast-bf16 per
    x batch > OPENVINO_PAYS (the export pays)         step on the cifar10 U-Net, two CPUs); no bf16 on this CPU:
                                                      fast, logged once; no extra: the rows below
    CUDA, CPU bfloat16/float16, or fast options    -> fast (CPU half: it autocasts; the reference would need
                                                      the model itself cast)
    CPU float32                                    -> fast when compiling pays (`ddpm_fast.engine.compile_pays`:
                                                      compiled already, or an eager run above ~3 minutes),
                                                      else reference (an uncompiled fast step costs the same)
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm_fast.adm import ADM
from ddpm_fast.engine import compile_pays
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.export.openvino_runtime import bf16_supported
from ddpm_fast.export.runtime import OnnxModel, as_onnx_model
from ddpm_fast.plan import Plan, make_plan
from ddpm_fast.schedule import Schedule
from ddpm_fast.unet import UNet

__all__ = [
    "sample",
    "run",
    "choose_backend",
    "auto_rule",
    "OPENVINO_PAYS",
    "openvino_bf16_here",
    "is_onnx_model",
    "Backend",
    "BACKENDS",
    "GRAPH_BACKENDS",
]


@dataclass(frozen=True)
class Backend:
    """One row of the backend table: where its `run(model, plan) -> Tensor` lives and what it accepts."""

    target: str  # "module:function", imported on first use
    graph: bool = False  # runs an exported graph: takes an .onnx file, no guidance (no classifier gradient)
    generator: bool = False  # takes generator= (diffusers-order noise)
    check: str | None = None  # "module:function" raising Unavailable before a model loads (a missing extra)

    def load(self, attr: str = "target") -> Callable:
        module, name = getattr(self, attr).split(":")
        return getattr(importlib.import_module(module), name)


BACKENDS = {
    "reference": Backend("ddpm_fast.reference:run", generator=True),
    "fast": Backend("ddpm_fast.engine:run"),
    "onnx": Backend("ddpm_fast.export.runtime:run", graph=True),
    "openvino": Backend(
        "ddpm_fast.export.openvino_runtime:run",
        graph=True,
        check="ddpm_fast.export.openvino_runtime:import_openvino",
    ),
}
GRAPH_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.graph)
HALF_DTYPES = (torch.float16, torch.bfloat16)
log = logging.getLogger("ddpm_fast")


def is_onnx_model(model) -> bool:
    """An .onnx path, an onnxruntime.InferenceSession or a ddpm_fast OnnxModel (real type checks)."""
    if isinstance(model, (str, os.PathLike)):
        return True
    ort = sys.modules.get("onnxruntime")  # an optional dependency: a session exists only once it is imported
    if ort is not None and isinstance(model, ort.InferenceSession):
        return True
    return isinstance(model, OnnxModel)


def choose_backend(model, plan: Plan) -> str:
    """The backend "auto" runs `plan` on (module docstring); no timing, no side effect."""
    return _auto(model, plan)[0]


def _auto(model, plan: Plan) -> tuple[str, str | None]:
    """`auto_rule` with this machine's facts, looked up only where the rule would ask (importing OpenVINO to
    read its CPU plugin's capabilities costs a fraction of a second, once)."""
    asks = _cpu_bf16(plan) and is_onnx_model(model) or _openvino_pays(model, plan)
    installed = asks and _openvino_installed()
    return auto_rule(model, plan, openvino=installed, openvino_bf16=installed and openvino_bf16_here())


def auto_rule(model, plan: Plan, *, openvino: bool, openvino_bf16: bool) -> tuple[str, str | None]:
    """(backend, a fallback to log or None): the rule of the module docstring, a pure function of the request
    and two facts about this machine: whether the [openvino] extra is installed (`openvino`) and whether its
    CPU plugin has bf16 kernels here (`openvino_bf16`)."""
    if is_onnx_model(model):
        if _cpu_bf16(plan) and openvino and openvino_bf16:  # onnx computes in float32 only
            return "openvino", None  # OpenVINO runs the file in bf16, with no export to pay for
        return "onnx", None
    if plan.generator is not None or plan.dtype == torch.float64:
        return "reference", None
    if openvino and _openvino_pays(model, plan):
        if openvino_bf16:
            return "openvino", None
        return "fast", (
            "dtype=bfloat16: this CPU has no bf16 instructions, which backend 'openvino' needs; auto runs "
            "backend 'fast' (autocast, bf16 emulated in float32 arithmetic)"
        )
    if plan.device.type == "cuda" or plan.dtype in HALF_DTYPES or plan.options:
        return "fast", None
    return ("fast" if compile_pays(model, plan) else "reference"), None


# CPU bfloat16, cifar10 U-Net (35.7M parameters, 3x32x32), ms per step, fast-bf16 (eager, weights cast once)
# against openvino-bf16, `ddpm-fast bench --device cpu --model cifar10`: on a 2-core Xeon with AMX 66.5 / 55.4
# at batch 1 and 357.4 / 189.6 at batch 8; on a 2-core EPYC with avx512_bf16 and no AMX 57.2 / 40.0 and
# 304.6 / 294.1 (3 steps; another run 318.2 / 298.3). Exporting the model once (validated by ONNX Runtime)
# took 13.8 s and compiling it for OpenVINO 0.7 s (EPYC). The export pays for a run of w = parameters x
# pixels x steps x batch (compile_pays' measure) when w > 14.5 s x rate / gain, rate = w per second of
# fast-bf16, gain = 1 - openvino/fast: Xeon 4.8e13 (batch 1) and 2.5e13 (8), EPYC 3.1e13 (1) and 4.0e14
# (8: rate 9.6e11, gain 0.034). The largest: it pays on both machines at every batch measured (a 50k-sample
# run is 1.8e18). Float32 stays as it was: openvino f32 ran 109.8 ms at batch 1 and 748.6 at batch 8 against
# the reference's 107.7 and 775.9 on the Xeon (within 4%, not worth an export).
OPENVINO_PAYS = 4.0e14


def _openvino_pays(model, plan: Plan) -> bool:
    """A CPU bfloat16 run of one of our architectures (their export is tested), without guidance or fast
    options, long enough to pay for the one export of its weights (OPENVINO_PAYS)."""
    if not _cpu_bf16(plan) or plan.options or plan.guidance is not None:
        return False
    if not isinstance(model, (UNet, ADM)):
        return False
    params = sum(p.numel() for p in model.parameters())
    B, _, H, W = plan.shape
    return params * H * W * plan.table.num_steps * B > OPENVINO_PAYS


def _cpu_bf16(plan: Plan) -> bool:
    return plan.device.type == "cpu" and plan.dtype == torch.bfloat16


def _openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_bf16_here() -> bool:
    """Whether the [openvino] extra is installed and its CPU plugin has bf16 kernels on this machine."""
    if not _openvino_installed():
        return False
    return bf16_supported()  # imports OpenVINO, an optional dependency, only now


_logged: set = set()


def run(model, plan: Plan, backend: str = "auto") -> torch.Tensor:
    """Run a validated plan on `backend` ("auto": `choose_backend`)."""
    if backend == "auto":
        backend, note = _auto(model, plan)
        if note is not None and note not in _logged:  # once per process
            _logged.add(note)
            log.warning("%s", note)
    if backend not in BACKENDS:
        raise BadValue(f"backend must be one of {('auto', *BACKENDS)}; got {backend!r}")
    if plan.guidance is not None and BACKENDS[backend].graph:
        raise BadValue(
            "guidance needs the classifier's gradient at every step, which an ONNX step graph cannot take; "
            "use backend='reference' or 'fast'"
        )
    if plan.generator is not None and not BACKENDS[backend].generator:
        raise BadValue(
            f"generator works with backend='reference' only (diffusers-order noise); got backend={backend!r}. "
            "Use seed= for counter-based noise on other backends."
        )
    out = BACKENDS[backend].load()(model, plan)
    # every backend's samples, in this one place (the onnx backend checks nothing itself): never garbage, exit 0
    if not torch.isfinite(out).all():
        raise BadValue(
            f"backend={backend!r} returned NaN or Inf samples: the model's output is not finite "
            "(backend='reference' checks every step and names the first one that is not)"
        )
    return out


def sample(
    model,
    schedule: Schedule | None = None,
    shape=None,
    *,
    steps=None,
    timesteps=None,
    method: str = "ddpm",
    spacing: str | None = None,
    eta: float = 0.0,
    variance: str | None = None,
    clip: bool | None = None,
    seed: int = 0,
    start_index: int = 0,
    generator: torch.Generator | None = None,
    labels=None,
    guidance=None,
    tuned=None,
    backend: str = "auto",
    device=None,
    dtype=torch.float32,
    progress: bool = False,
    callback: Callable | None = None,
    **options,
) -> torch.Tensor:
    """Run the reverse chain x_T ~ N(0, I) -> x_0; returns a float tensor [B, C, H, W] in model space [-1, 1].

    `model(x, t) -> eps` ([B, 2C, H, W] for variance="learned_range"), t int64 [B], 0-based, called as
    model(x, t, y=labels) for a class-conditional model (`labels`: see `ddpm_fast.plan.make_plan`); or an .onnx path
    or ONNX Runtime session. `variance`, `clip` and `schedule` default to what the model's record says
    (`ddpm_fast.defaults`), else "fixed_small" and True. Noise is counter-based (`seed`, `start_index`: row i
    is global sample start_index + i) unless a `generator` is given (reference backend only: diffusers'
    pipeline order). `callback(i, t, x)` is called after each step with the new x. Extra keyword `options`
    go to the backend. `guidance=df.ClassifierGuidance(classifier, scale)`: classifier guidance (ADM-G,
    `ddpm_fast.guidance`; needs labels, backend reference or fast). `method="tuned"`: a table learned for
    the model (`ddpm-fast tune`), from `tuned=PATH` or the checkpoint's own for `steps` NFE.
    """
    if backend not in ("auto", *BACKENDS):
        raise BadValue(f"backend must be one of {('auto', *BACKENDS)}; got {backend!r}")
    if shape is None:
        raise BadValue("shape must be given as (B, C, H, W)")
    if (backend == "auto" or BACKENDS[backend].graph) and is_onnx_model(model):
        model = as_onnx_model(model)  # the file's metadata supplies the defaults
    if not callable(model):
        raise BadType(f"model must be callable as model(x, t); got {type(model).__name__}")
    if isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.numel() != shape[0]:
        raise BadValue(f"labels must hold one class per sample ({shape[0]}); got {labels.numel()}")
    plan = make_plan(
        model,
        schedule,
        shape,
        steps=steps,
        timesteps=timesteps,
        method=method,
        spacing=spacing,
        eta=eta,
        variance=variance,
        clip=clip,
        seed=seed,
        start_index=start_index,
        generator=generator,
        labels=labels,
        guidance=guidance,
        tuned=tuned,
        device=device,
        dtype=dtype,
        progress=progress,
        callback=callback,
        options=options,
    )
    return run(model, plan, backend)

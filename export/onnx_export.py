"""Export a DDPM U-Net (or one whole sampling step) to ONNX, with the metadata that says how to sample from it.

    report = export_onnx(model, "model.onnx")                        # eps graph: (x, t) -> eps
    report = export_onnx(model, "step.onnx", step=True, steps=50)    # step graph: (x, step, z) -> x_prev
    report = export_onnx(model, "model16.onnx", fp16=True)           # float16 weights, float32 I/O

Opset 18 by default: it is the lowest opset the torch.export-based exporter emits (asking it for 17 runs a
version conversion that fails on Pad), ONNX Runtime has run it since 1.14 (our floor, onnxruntime-gpu 1.18,
covers it), and every op the U-Net needs (InstanceNormalization for GroupNorm, Softmax, Resize, Pad) is in it.

Exporter: torch's torch.export-based exporter (`dynamo=True`, default since torch 2.9; needs onnxscript) on
torch >= 2.6, where it handles a dynamic batch axis reliably; the TorchScript exporter on older torch or
without onnxscript (it is deprecated upstream and warns). `exporter=` forces one.

The graph is checked with `onnx.checker`, written to a temporary file beside the output and, unless
`validate=False`, that file is run by ONNX Runtime at batch 1 and batch 3 against the PyTorch module on random
inputs (`validate_onnx`); only then is it renamed onto the output, so a file that fails never replaces it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ddpm_fast import noise
from ddpm_fast.checks import is_int
from ddpm_fast.defaults import defaults_of
from ddpm_fast.errors import BadType, BadValue, Unavailable
from ddpm_fast.export.graphs import EpsGraph, Float16Storage, StepGraph, half_unet
from ddpm_fast.export.runtime import OnnxModel, forget
from ddpm_fast.plan import Plan
from ddpm_fast.schedule import Schedule
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.weights import model_digest

__all__ = [
    "OPSET",
    "MIN_OPSET",
    "META_PREFIX",
    "ExportReport",
    "export_onnx",
    "validate_onnx",
    "read_metadata",
    "default_exporter",
]

log = logging.getLogger("ddpm_fast")

OPSET = 18
MIN_OPSET = 14  # the TorchScript exporter's floor here: its scaled_dot_product_attention needs opset 14
MAX_OPSET = 23  # the newest opset ONNX Runtime 1.22+ runs
META_PREFIX = "ddpm_fast."
FORMAT_VERSION = 1
INPUTS = {"eps": ("x", "t"), "step": ("x", "step", "z")}
OUTPUTS = {"eps": "eps", "step": "x_prev"}
HISTORY_IN, HISTORY_OUT = "history", "history_out"  # a multistep step graph's extra input and output


def io_names(kind: str, history: int = 0, cond: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of a graph kind; a multistep step graph also carries its x0 history, the
    noise model of a class-conditional model takes the labels y."""
    if kind == "step" and history:
        return (*INPUTS["step"], HISTORY_IN), (OUTPUTS["step"], HISTORY_OUT)
    if kind == "eps" and cond:
        return (*INPUTS["eps"], "y"), (OUTPUTS["eps"],)
    return INPUTS[kind], (OUTPUTS[kind],)


VALIDATE_BATCHES = (1, 3)  # 1 and a batch that differs from the one traced (2)
TRACE_BATCH = 2
NOISE_DOC = (
    "z[n, e] = ddpm_fast.noise.normals(seed, n = start_index + row, slot = t, e) for steps, "
    "slot = 2**32 - 1 for x_T; Philox-4x32-10 + Box-Muller (formula in ddpm_fast/noise.py)"
)


@dataclass
class ExportReport:
    """What an export wrote and how well ONNX Runtime reproduced PyTorch."""

    path: Path
    kind: str  # "eps" or "step"
    opset: int
    exporter: str
    fp16: bool
    export_seconds: float
    file_bytes: int
    # batch -> max |ORT - PyTorch| (same weights dtype), and the tolerance it was held to
    max_abs_diff: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    validate_seconds: float = 0.0

    def summary(self) -> str:
        diffs = ", ".join(
            f"batch {b}: {d:.2e} (tol {self.tolerance[b]:.1e})" for b, d in self.max_abs_diff.items()
        )
        return (
            f"{self.path}: {self.kind} graph, opset {self.opset}, {self.exporter} exporter"
            f"{', fp16 weights' if self.fp16 else ''}, {self.file_bytes / 2**20:.1f} MiB, "
            f"export {self.export_seconds:.1f} s; ORT vs PyTorch max |diff| " + (diffs or "not validated")
        )


# ---------------------------------------------------------------------------------------------- exporter


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def default_exporter() -> str:
    """'dynamo' on torch >= 2.6 with onnxscript installed, else 'torchscript'."""
    if _torch_version() < (2, 6):
        return "torchscript"
    try:
        import onnxscript  # noqa: F401  (optional dependency: only probed)
    except ImportError:
        return "torchscript"
    return "dynamo"


def _import_onnx():
    try:
        import onnx  # optional dependency (the onnx extra): imported where used
    except ImportError as e:
        raise Unavailable("ONNX export needs the 'onnx' package: pip install 'ddpm-fast[onnx]'") from e
    return onnx


def _trace_inputs(kind: str, image_shape, num_steps: int, history: int = 0, cond: bool = False):
    C, H, W = image_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TRACE_BATCH, C, H, W, generator=g)
    if kind == "eps":
        t = torch.tensor([1, 2], dtype=torch.int64)[:TRACE_BATCH]
        return (x, t, torch.zeros(TRACE_BATCH, dtype=torch.int64)) if cond else (x, t)
    step = (x, torch.tensor(min(1, num_steps - 1), dtype=torch.int64), torch.randn(x.shape, generator=g))
    return (*step, torch.randn(history, *x.shape, generator=g)) if history else step


def _to_proto(graph: nn.Module, kind: str, example, opset: int, exporter: str, history: int = 0, cond=False):
    """Run torch's exporter; returns an onnx.ModelProto with named inputs/outputs and a dynamic batch axis
    (axis 1 of the history tensors)."""
    onnx = _import_onnx()
    names, out_names = io_names(kind, history, cond)
    batch_args = [n for n in names if n != "step"]

    def batch_axis(name):
        return 1 if name in (HISTORY_IN, HISTORY_OUT) else 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer chatter
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=2**20)
            dyn = {n: ({batch_axis(n): batch} if n in batch_args else None) for n in names}
            quiet = logging.getLogger("torch.onnx")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                prog = torch.onnx.export(
                    graph,
                    example,
                    input_names=list(names),
                    output_names=list(out_names),
                    opset_version=opset,
                    dynamic_shapes=dyn,
                    dynamo=True,
                    verbose=False,
                )
            finally:
                quiet.setLevel(level)
            return prog.model_proto
        buf = io.BytesIO()
        kwargs = {"dynamo": False} if _torch_version() >= (2, 5) else {}
        torch.onnx.export(
            graph,
            example,
            buf,
            input_names=list(names),
            output_names=list(out_names),
            opset_version=opset,
            dynamic_axes={n: {batch_axis(n): "batch"} for n in [*batch_args, *out_names]},
            do_constant_folding=True,
            **kwargs,
        )
        return onnx.load_from_string(buf.getvalue())


def _check_opset(opset, exporter: str) -> int:
    if not is_int(opset):
        raise BadType(f"opset must be an int; got {opset!r}")
    low = OPSET if exporter == "dynamo" else MIN_OPSET
    if not low <= opset <= MAX_OPSET:
        raise BadValue(f"opset must lie in [{low}, {MAX_OPSET}] for the {exporter} exporter; got {opset}")
    return opset


# ---------------------------------------------------------------------------------------------- metadata


def _set_metadata(proto, meta: dict) -> None:
    keep = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = json.dumps(value, sort_keys=True)


def read_metadata(source) -> dict:
    """{key: value} of the ddpm_fast.* metadata in an ONNX file or ModelProto, values decoded from JSON."""
    if isinstance(source, (str, os.PathLike)):
        onnx = _import_onnx()
        source = onnx.load(os.fspath(source), load_external_data=False)
    out = {}
    for p in source.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX) :]] = json.loads(p.value)
            except json.JSONDecodeError as e:
                raise BadValue(f"ONNX metadata {p.key!r} is not valid JSON: {e}") from e
    return out


def _sampling_defaults(model, image_shape) -> dict:
    """The model's record as the file's "sampling" metadata (the image shape the file is exported for)."""
    d = defaults_of(model).sampling_dict()
    d["image_shape"] = list(image_shape)
    return d


# ---------------------------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    path,
    *,
    plan: Plan | None = None,
    fp16: bool = False,
    opset: int = OPSET,
    exporter: str | None = None,
    schedule: Schedule | None = None,
    image_shape=None,
    validate: bool = True,
) -> ExportReport:
    """Export `model` (a ddpm_fast.UNet, or any (x, t) -> eps module) to `path`; returns an ExportReport.

    With `plan` (`ddpm_fast.plan.make_plan`) it exports one whole sampling step of that run (its table,
    method, variance and clipping) instead of the noise model. The schedule, image shape and sampling
    defaults come from the model (`model.defaults`, `model.config`) unless given. Written atomically.
    """
    path, exporter, opset, schedule, image_shape, defaults = _check_export(
        model, path, plan, fp16, opset, exporter, schedule, image_shape
    )
    step = plan is not None
    meta = _metadata(model, plan, fp16, exporter, opset, schedule, image_shape, defaults)
    net = half_unet(model) if fp16 else model
    was_training = model.training
    model.eval()
    try:
        if step:
            table, history = plan.table, plan.table.history
            graph = StepGraph(net, table, plan.clip_range if plan.clip else None).eval()
        else:
            table, history = None, 0
            graph = EpsGraph(net).eval()
        cond = defaults_of(model).num_classes is not None  # a class-conditional model: labels y are an input
        example = _trace_inputs(meta["kind"], image_shape, table.num_steps if step else 1, history, cond)

        t0 = time.perf_counter()
        with torch.no_grad():
            proto = _to_proto(graph, meta["kind"], example, opset, exporter, history, cond)
        _set_metadata(proto, meta)
        onnx = _import_onnx()
        onnx.checker.check_model(proto, full_check=True)  # full: also runs ONNX shape inference
        data = proto.SerializeToString()
        report = ExportReport(
            path=path,
            kind=meta["kind"],
            opset=opset,
            exporter=exporter,
            fp16=fp16,
            export_seconds=0.0,
            file_bytes=len(data),
        )

        def check(tmp: str) -> None:
            # The written temporary is what gets validated: a file that fails never replaces `path`.
            report.export_seconds = time.perf_counter() - t0
            log.info("exported %s in %.1f s (%s exporter)", path, report.export_seconds, exporter)
            if validate:
                oracle = None
                if fp16:
                    m64 = copy.deepcopy(model).double().eval()
                    oracle = StepGraph(m64, table, graph.clip_range) if step else EpsGraph(m64)
                validate_onnx(tmp, graph, oracle=oracle, report=report, name=path)

        atomic_write_bytes(path, data, check=check)
        return report
    finally:
        model.train(was_training)


def _check_export(model, path, plan, fp16, opset, exporter, schedule, image_shape):
    """export_onnx's arguments checked and completed from the model: (path, exporter, opset, schedule,
    image_shape, sampling defaults)."""
    if not isinstance(model, nn.Module):
        raise BadType(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(fp16, bool):
        raise BadType(f"fp16 must be a bool; got fp16={fp16!r}")
    step = plan is not None
    if step and not isinstance(plan, Plan):
        raise BadType(f"plan must be a ddpm_fast.plan.Plan (make_plan); got {type(plan).__name__}")
    if step and defaults_of(model).num_classes is not None:
        raise Unavailable(
            "a step graph of a class-conditional model is not exported: export its noise model (no plan), whose "
            "graph takes the labels y, and sample it with backend='onnx'"
        )
    exporter = default_exporter() if exporter is None else exporter
    if exporter not in ("dynamo", "torchscript"):
        raise BadValue(f"exporter must be 'dynamo' or 'torchscript'; got {exporter!r}")
    opset = _check_opset(opset, exporter)
    path = Path(path)
    if path.suffix != ".onnx":
        raise BadValue(f"path must end in .onnx; got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {str(path.parent)!r} does not exist")
    config = getattr(model, "config", None)
    if schedule is None:
        schedule = defaults_of(model).schedule
    if schedule is not None and not isinstance(schedule, Schedule):
        raise BadType(f"schedule must be a ddpm_fast.Schedule; got {type(schedule).__name__}")
    if image_shape is None:
        if config is None:
            raise BadValue("image_shape must be given (C, H, W): the model has no .config to read it from")
        image_shape = config.image_shape
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise BadValue(f"image_shape must be (C, H, W) positive ints; got {image_shape}")
    defaults = _sampling_defaults(model, image_shape)
    if step and schedule is None:
        raise BadValue(
            "a step graph needs the schedule it was respaced from: pass schedule= (the model carries none)"
        )
    if step and tuple(plan.shape[1:]) != image_shape:
        raise BadValue(f"plan's image shape {tuple(plan.shape[1:])} differs from the model's {image_shape}")
    return path, exporter, opset, schedule, image_shape, defaults


def _metadata(model, plan, fp16, exporter, opset, schedule, image_shape, defaults) -> dict:
    """What the file says about itself (`read_metadata`): graph kind and inputs, model, schedule, sampling
    defaults, noise formula, and for a step graph the run it steps."""
    kind = "eps" if plan is None else "step"
    history = 0 if plan is None else plan.table.history
    config = getattr(model, "config", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "inputs": list(io_names(kind, history, defaults_of(model).num_classes is not None)[0]),
        "output": OUTPUTS[kind],
        "image_shape": list(image_shape),
        "weights_dtype": "float16" if fp16 else "float32",
        "exporter": exporter,
        "opset": opset,
        "torch": torch.__version__,
        "arch": defaults_of(model).arch,
        "model": config.to_dict() if hasattr(config, "to_dict") else None,
        # the exported Module's weights digest: a tuned table learned for it runs on this file too
        "source_digest": model_digest(model) if isinstance(model, torch.nn.Module) else None,
        "schedule": schedule.spec if schedule is not None else None,
        "sampling": defaults,
        "noise": NOISE_DOC,
    }
    if plan is not None:
        table = plan.table
        meta["step"] = {
            "method": plan.method,
            "eta": plan.eta,
            "variance": plan.variance,
            "clip": plan.clip,
            "clip_range": plan.clip_range,
            "num_steps": table.num_steps,
            "history": table.history,  # earlier x0 the graph carries in and out (multistep solvers)
            "timesteps": table.timesteps.tolist(),  # model timestep (and noise slot) of step 0, 1, ...
            "xT_slot": noise.XT_SLOT,
        }
    return meta


# ---------------------------------------------------------------------------------------------- validation


def _tolerance(scale: float) -> float:
    """Max |ORT - PyTorch| allowed for float32 weights, for outputs of magnitude `scale`.

    Both sides sum the same products in different orders (ORT's convolutions vs oneDNN's); measured
    differences are about 1e-6 of the output scale on these U-Nets, so 1e-4 leaves room for deeper models
    and still catches a wrong op (those differ by O(scale)).
    """
    return 1e-4 * max(1.0, scale)


def _flat(outputs) -> torch.Tensor:
    """A graph's outputs (one tensor, or x_prev and history_out) as one flat float tensor to compare."""
    if isinstance(outputs, (list, tuple)):
        return torch.cat([_flat(o) for o in outputs])
    t = torch.from_numpy(outputs) if not isinstance(outputs, torch.Tensor) else outputs
    return t.reshape(-1)


def validate_onnx(
    path,
    graph: nn.Module,
    *,
    oracle: nn.Module | None = None,
    report: ExportReport | None = None,
    name=None,
):
    """Run the exported file with ORT's CPU provider at batches 1 and 3 against `graph` (PyTorch) on random inputs.

    float32 weights: max |ORT - PyTorch| <= `_tolerance`. float16 weights (STYLE 6): `oracle` is the same
    graph in float64, and ORT may err at most twice as much as the float16 graph run under `Float16Storage`
    (float16 storage, float32 arithmetic, the same on every CPU), both measured against it (plus the float32
    tolerance). Raises ValueError naming the batch, the difference and the bound. name: the file the messages
    name when `path` is a temporary (whose cached model and sessions are dropped afterwards).
    """
    if name is None:
        return _validate(path, graph, oracle, report, path)
    try:
        return _validate(path, graph, oracle, report, name)
    finally:
        forget(path)


def _validate(path, graph, oracle, report, name):
    m = OnnxModel.load(path)
    sess = m.session("cpu")
    C, H, W = m.image_shape
    T = m.schedule.num_timesteps if m.schedule is not None else 1000
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1234)
    for B in VALIDATE_BATCHES:
        x = torch.randn(B, C, H, W, generator=g)
        if m.kind == "eps":
            feeds = (x, torch.randint(0, T, (B,), generator=g))
            if m.cond:
                feeds = (*feeds, torch.randint(0, m.defaults.num_classes, (B,), generator=g))
        else:
            S = m.metadata["step"]["num_steps"]
            feeds = (x, torch.tensor(S // 2, dtype=torch.int64), torch.randn(B, C, H, W, generator=g))
            if m.history:
                feeds = (*feeds, torch.randn(m.history, B, C, H, W, generator=g))
        names = io_names(m.kind, m.history, m.cond)[0]
        got = _flat(sess.run(None, {n: v.numpy() for n, v in zip(names, feeds)}))
        with torch.no_grad(), Float16Storage() if oracle is not None else contextlib.nullcontext():
            want = _flat(graph(*feeds)).float()
        if got.shape != want.shape:
            raise BadValue(
                f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(want.shape)} at batch {B}"
            )
        diff = (got - want).abs().max().item()
        tol = _tolerance(want.abs().max().item())
        err, what = diff, "max |ORT - PyTorch|"
        if oracle is not None:
            with torch.no_grad():
                exact = _flat(oracle(*feeds)).double()
            err = (got.double() - exact).abs().max().item()
            tol += 2 * (want.double() - exact).abs().max().item()
            what = "max |ORT - float64| (bound: 2 x the float16 reference's error + float32 tolerance)"
        if report is not None:
            report.max_abs_diff[B] = diff
            report.tolerance[B] = tol
        if not err <= tol:
            raise BadValue(
                f"ONNX export of {name} does not reproduce PyTorch at batch {B}: {what} {err:.3e} > {tol:.1e} "
                f"({m.kind} graph)"
            )
    if report is not None:
        report.validate_seconds = time.perf_counter() - t0
    return report

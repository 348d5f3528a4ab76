"""The OpenVINO sampler: `df.sample(..., backend="openvino")` and `ddpm-fast sample --backend openvino`.

    x0 = df.sample("model.onnx", shape=(16, 3, 32, 32), steps=50, backend="openvino")
    x0 = df.sample(df.load_model("ckpt"), shape=(16, 3, 32, 32), backend="openvino")     # exported once, cached
    x0 = df.sample(m, shape=(16, 3, 32, 32), backend="openvino", dtype=torch.bfloat16)  # bf16 inference

OpenVINO (`pip install 'ddpm-fast[openvino]'`, imported here only) runs an exported graph on the CPU; the
rest is the onnx backend's (`ddpm_fast.export.runtime.sample_session`): the same graph checks, the same
counter-based x_T and noise, the torch-side update for an eps graph (every sampler family, tuned tables and
eps-history solvers included) or the exported step graph run whole.

A torch Module is exported with the project's exporter (`export_onnx`, validated by ONNX Runtime where it is
installed) to `eps-<weights digest>-<C>x<H>x<W>.onnx` in `<checkpoint>.onnx-cache/` beside the checkpoint it
was loaded from, or in $XDG_CACHE_HOME/ddpm-fast/onnx (~/.cache by default) when that is not writable or
the Module came from no checkpoint; written atomically, reused while the weights are the same.

Precision follows `dtype`, set explicitly as OpenVINO's inference precision hint: float32 -> "f32" (left
unset, the CPU plugin runs bf16 wherever the CPU has it: max |eps diff| 5e-2 instead of 3e-6 on the tiny
U-Net here), bfloat16 -> "bf16" (refused on a CPU without bf16 instructions). The graph's inputs and outputs
stay float32 either way, so the update runs in float32. Threads: `threads=` (the option), else torch's
thread count (`--threads`). One compiled model per (file, precision, threads), reused.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ddpm_fast.errors import BadType, BadValue, Unavailable
from ddpm_fast.export import runtime
from ddpm_fast.export.onnx_export import export_onnx
from ddpm_fast.export.runtime import OnnxModel
from ddpm_fast.weights import model_digest

__all__ = [
    "run",
    "import_openvino",
    "bf16_supported",
    "exported_model",
    "export_dir",
    "clear_cache",
    "PRECISIONS",
]

log = logging.getLogger("ddpm_fast")

PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}  # dtype -> INFERENCE_PRECISION_HINT
EXPORTER = None  # the exporter of an on-the-fly export: None = export_onnx's default
_COMPILED: dict = {}  # (file key, precision, threads) -> _Session


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise Unavailable("backend='openvino' needs OpenVINO: pip install 'ddpm-fast[openvino]'") from e
    return openvino


@functools.cache
def _core():
    return import_openvino().Core()


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels on this CPU (AVX512_BF16 or AMX)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def clear_cache() -> None:
    """Drop every compiled model (frees their memory)."""
    _COMPILED.clear()


# An eps graph's batch of B >= 2 rows runs as two halves on two streams of half the threads each: cifar10
# U-Net, bf16, 2-core EPYC, batch 8: 249.6 / 249.2 ms per forward against 271.7 / 259.9 on one request with
# both threads (0.98 of the bf16 GEMM peak measured in the same process against 0.90 / 0.94); batch 32:
# 1048.1 / 1017.1 against 1098.0 (0.94-0.96 against 0.89). The cores then work apart, with no barrier
# between them at every layer of a U-Net whose deepest maps are 4x4.
STREAMS = 2


class _Session:
    """A compiled model behind the one method of an onnxruntime session that `runtime.sample_session`'s CPU
    loops call: run(output names, {input name: numpy array}) -> [numpy arrays]. With `compile_split` (an eps
    graph, whose every input and output is batch-first), a batch of STREAMS or more rows runs in STREAMS parts
    at once on the streams of the model it compiles on first use; fewer rows run on `compiled`, every thread on
    one request."""

    def __init__(self, compiled, compile_split=None):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = {name: o for o in compiled.outputs for name in o.get_names()}  # every tensor name
        self.compile_split = compile_split
        self.split = []  # STREAMS requests, made with the first batch that is cut
        self.split_outputs = None

    def _split_requests(self) -> list:
        if not self.split:
            split = self.compile_split()
            self.split = [split.create_infer_request() for _ in range(STREAMS)]
            self.split_outputs = {n: o for o in split.outputs for n in o.get_names()}
        return self.split

    def run(self, names, feeds):
        names = names or [o.get_any_name() for o in self.compiled.outputs]
        rows = len(next(iter(feeds.values())))
        if self.compile_split is None or rows < STREAMS:
            # share_inputs: the request reads the numpy views in place (infer is synchronous); outputs are copies
            res = self.request.infer(feeds, share_inputs=True)
            return [res[self.outputs[n]] for n in names]
        bounds = [rows * k // STREAMS for k in range(STREAMS + 1)]
        for k, request in enumerate(self._split_requests()):
            part = {name: a[bounds[k] : bounds[k + 1]] for name, a in feeds.items()}
            request.start_async(part, share_inputs=True)
        for request in self.split:
            request.wait()
        outs = [self.split_outputs[n] for n in names]
        return [np.concatenate([r.get_tensor(o).data for r in self.split]) for o in outs]


def session(m: OnnxModel, precision: str, threads: int) -> _Session:
    """The compiled model of graph file `m` for `precision` ("f32" | "bf16") and `threads`, cached."""
    if m.path is None:
        raise BadType(
            "backend='openvino' needs the .onnx file (an onnxruntime.InferenceSession cannot be read by OpenVINO)"
        )
    key = (runtime._file_key(Path(m.path)), precision, threads)
    sess = _COMPILED.get(key)
    if sess is None:
        core = _core()
        try:
            graph = core.read_model(os.fspath(m.path))
        except Exception as e:  # OpenVINO raises its own RuntimeError subclasses for an unreadable graph
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadValue(f"OpenVINO cannot read {m.path}: {first}") from e
        config = {
            "INFERENCE_PRECISION_HINT": precision,  # explicit: unset, a bf16 CPU computes f32 graphs in bf16
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, every thread on it
        }
        split = None
        cut = m.inputs["x"][1][:1] == [None]  # a dynamic batch: its rows can run in parts
        if m.kind == "eps" and threads >= STREAMS and cut:
            streams = {**config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": STREAMS}
            split = functools.partial(core.compile_model, graph, "CPU", streams)
        sess = _Session(core.compile_model(graph, "CPU", config), split)
        _COMPILED[key] = sess
    return sess


# ---------------------------------------------------------------------------------------------- export cache


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm-fast" / "onnx"


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK | os.X_OK)


def export_dir(model) -> Path:
    """Where `model`'s export is cached: beside its checkpoint (`<checkpoint>.onnx-cache`) when writable,
    else $XDG_CACHE_HOME/ddpm-fast/onnx."""
    src = getattr(model, "checkpoint_path", None)
    if src is not None:
        beside = Path(f"{Path(src).resolve()}.onnx-cache")
        if _writable(beside):
            return beside
    home = _cache_home()
    if not _writable(home):
        raise OSError(
            f"cannot write the ONNX export of the model: neither beside its checkpoint nor in {home}"
        )
    return home


def exported_model(model: torch.nn.Module, image_shape) -> OnnxModel:
    """The eps graph of `model` for images `image_shape` (C, H, W): the cached export of these weights, or a
    new one (module docstring)."""
    net = model
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        net = copy.deepcopy(model).float().cpu()  # the graph holds float32 weights; precision is the hint's
    digest = model_digest(net, remember=True)
    C, H, W = (int(d) for d in image_shape)
    path = export_dir(model) / f"eps-{digest[:16]}-{C}x{H}x{W}.onnx"
    if path.is_file():
        try:
            m = OnnxModel.load(path)
            if m.metadata.get("source_digest") == digest and m.kind == "eps":
                return m
        except BadValue:
            pass  # an unreadable file: export it again over it
        runtime.forget(path)
    log.info("openvino: exporting the model's noise graph to %s (once for these weights)", path)
    validate = _has_onnxruntime()  # the exporter checks the file against PyTorch with ONNX Runtime
    export_onnx(net, path, exporter=EXPORTER, image_shape=(C, H, W), validate=validate)
    return OnnxModel.load(path)


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


# ---------------------------------------------------------------------------------------------- sampler


def _precision(dtype: torch.dtype) -> str:
    if dtype not in PRECISIONS:
        raise BadValue(f"backend='openvino' computes in float32 or bfloat16; got dtype={dtype}")
    if PRECISIONS[dtype] == "bf16" and not bf16_supported():
        raise Unavailable(
            "dtype=torch.bfloat16 with backend='openvino' needs a CPU with bf16 instructions (AVX512_BF16 or "
            "AMX); this one has none: use dtype=torch.float32"
        )
    return PRECISIONS[dtype]


def noise_model(model, image_shape) -> OnnxModel:
    """The graph `model` stands for: an .onnx path or OnnxModel as is, a torch Module through its export."""
    if isinstance(model, torch.nn.Module):
        return exported_model(model, image_shape)
    if isinstance(model, (OnnxModel, str, os.PathLike)):
        return runtime.as_onnx_model(model)
    raise BadType(
        f"backend='openvino' needs an .onnx path, an OnnxModel or a torch.nn.Module to export; got {type(model).__name__}"
    )


def run(model, plan) -> torch.Tensor:
    """The backend table's entry (`ddpm_fast.sampling.BACKENDS`): sample `plan` with OpenVINO on the CPU."""
    import_openvino()
    if plan.device.type != "cpu":
        raise BadValue(f"backend='openvino' runs on the CPU; got device={plan.device}")
    precision = _precision(plan.dtype)
    runtime.check_options(plan, "openvino")
    m = noise_model(model, plan.shape[1:])
    runtime.check_graph(m, plan)
    threads = plan.options.get("threads") or torch.get_num_threads()
    return runtime.sample_session(m, session(m, precision, threads), plan, "openvino")

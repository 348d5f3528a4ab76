"""The ONNX Runtime sampler: `df.sample(..., backend="onnx")` and `ddpm-fast sample --backend onnx`.

    m = OnnxModel.load("model.onnx")         # metadata: config, schedule, sampling defaults, graph kind
    x0 = df.sample(m, shape=(16, 3, 32, 32), steps=50, seed=0)          # auto picks onnx for an OnnxModel
    x0 = df.sample("model.onnx", shape=(16, 3, 32, 32), backend="onnx", device="cuda")

Two graph kinds (see `ddpm_fast.export.onnx_export`):
- eps graph (x, t) -> eps: ORT runs the U-Net, the posterior step runs in torch (`ddpm_fast.kernels`: the
  torch twin on CPU, the fused Triton kernel on CUDA), noise drawn in-step from the counter-based Philox.
- step graph (x, step, z) -> x_prev: ORT runs the whole step; z = `ddpm_fast.noise.sample_noise` for the
  step's timestep, zeros where the table's sigma is 0.

Either way x_T and every z are the counter-based normals the reference backend uses, so `onnx` gives the
reference's images up to float32 rounding of the convolutions (tests hold it to 1e-4 over short runs).

Device: CPU -> CPUExecutionProvider, inputs passed as numpy views (no copies). CUDA -> CUDAExecutionProvider
on torch's current stream, with IO binding: x, t/step, z and the output are preallocated torch CUDA tensors
bound by pointer once, so nothing crosses to the host per step. If ORT cannot create the CUDA provider the
call raises `Unavailable` instead of silently running on the CPU. Sessions are created once per
(file, device, threads) and reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ddpm_fast import noise
from ddpm_fast.defaults import ModelDefaults
from ddpm_fast.errors import BadType, BadValue, Unavailable
from ddpm_fast.kernels import posterior_step, step_args
from ddpm_fast.schedule import Schedule
from ddpm_fast.steps import C_EPS, C_X0, COLUMNS, SIGMA, SRM1

__all__ = [
    "OnnxModel",
    "as_onnx_model",
    "sample_onnx",
    "sample_session",
    "check_graph",
    "check_options",
    "run",
    "create_session",
    "clear_session_cache",
    "import_onnxruntime",
]

log = logging.getLogger("ddpm_fast")

META_PREFIX = "ddpm_fast."
KINDS = {
    ("x", "t"): "eps",
    ("x", "t", "y"): "eps",  # a class-conditional model's noise model: labels y
    ("x", "step", "z"): "step",
    ("x", "step", "z", "history"): "step",
}
OPTIONS = ("threads",)
_SESSIONS: dict = {}  # (file key, device, threads, stream, tf32) -> InferenceSession
_MODELS: dict = {}  # (realpath, mtime_ns, size) -> OnnxModel


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Unavailable(
            "backend='onnx' needs onnxruntime: pip install 'ddpm-fast[onnx]' (onnxruntime-gpu for CUDA)"
        ) from e
    return ort


def clear_session_cache() -> None:
    """Drop every cached session and loaded model (frees their memory)."""
    _SESSIONS.clear()
    _MODELS.clear()


def forget(path) -> None:
    """Drop the cached model and sessions of one file (a temporary validated before its rename)."""
    real = str(Path(path).resolve())
    for k in [k for k in _MODELS if k[0] == real]:
        del _MODELS[k]
    for k in [k for k in _SESSIONS if k[0][0] == real]:
        del _SESSIONS[k]


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _dims(shape) -> list:
    """ORT/ONNX shape -> list of ints, None for symbolic dims."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


# ---------------------------------------------------------------------------------------------- sessions


def create_session(model_path, device, *, threads: int | None = None):
    """An InferenceSession for `device` (cpu or cuda[:i]); CUDA raises Unavailable unless ORT really uses it."""
    ort = import_onnxruntime()
    device = torch.device(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's constant-folding notes are not the user's business
    if threads is not None:
        so.intra_op_num_threads = threads
    if device.type == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device.type == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise Unavailable(
                f"ONNX Runtime {ort.__version__} here has no CUDAExecutionProvider (providers: {available}); "
                "install onnxruntime-gpu built for this CUDA, or sample with --device cpu"
            )
        options = {"device_id": device.index or 0}
        if torch.cuda.is_available():  # else ORT's own CUDA check below reports the failure
            index = device.index if device.index is not None else torch.cuda.current_device()
            # ORT enqueues on torch's stream, so torch's update after run_with_iobinding is ordered after it
            # (a handle of 0, torch's default stream, makes ORT use a stream of its own: see run_bound).
            # TF32 only where torch itself allows it for both convolutions and matmuls (torch's default: no),
            # so float32 means float32 on both sides of a comparison.
            tf32 = torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
            options = {
                "device_id": index,
                "user_compute_stream": str(torch.cuda.current_stream(index).cuda_stream),
                "use_tf32": "1" if tf32 else "0",
            }
        providers = [("CUDAExecutionProvider", options)]
        providers.append("CPUExecutionProvider")  # shape ops ORT places on the host
    else:
        raise BadValue(f"device must be cpu or cuda for backend='onnx'; got {device}")

    def make():
        try:
            return ort.InferenceSession(os.fspath(model_path), sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidGraph / NotImplemented types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "NOT_IMPLEMENTED" in msg or "NotImplemented" in type(e).__name__:
                raise Unavailable(
                    f"ONNX Runtime's {providers[0] if isinstance(providers[0], str) else 'CUDA'} provider cannot "
                    f"run {model_path}: {msg} (float16 graphs may need the CUDA provider)"
                ) from e
            raise BadValue(f"ONNX Runtime cannot load {model_path}: {msg}") from e

    sess = make()
    stream = providers[0][1].get("user_compute_stream") if isinstance(providers[0], tuple) else None
    if device.type == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        if hasattr(ort, "preload_dlls"):  # ORT >= 1.21: load CUDA/cuDNN from the nvidia-* wheels, then retry
            try:
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - the retry's provider check reports the failure
                log.info("onnxruntime.preload_dlls failed: %s", e)
            sess = make()
        if sess.get_providers()[0] != "CUDAExecutionProvider":
            raise Unavailable(
                f"ONNX Runtime {ort.__version__} could not create the CUDA provider for {device} (the session fell "
                f"back to {sess.get_providers()}); check that onnxruntime-gpu matches the installed CUDA and cuDNN"
            )
    sess._ddpm_fast_stream = stream  # the torch stream ORT enqueues on (see run_bound)
    return sess


def run_bound(sess, binding, device: torch.device) -> None:
    """sess.run_with_iobinding, ordered after torch's pending work on `device`.

    A session created on torch's current non-default stream runs on that stream: nothing to wait for. On any
    other stream (torch's default stream, handle 0, gives ORT a stream of its own) torch's writes to the
    bound inputs are waited for first. ORT synchronises its own stream before returning, so the outputs are
    ready for torch either way.
    """
    stream = torch.cuda.current_stream(device)
    bound = getattr(sess, "_ddpm_fast_stream", None)  # None: a session the user made
    if bound in (None, "0") or bound != str(stream.cuda_stream):
        stream.synchronize()
    sess.run_with_iobinding(binding)


# ---------------------------------------------------------------------------------------------- model


class OnnxModel:
    """An exported DDPM graph: its signature, the ddpm_fast metadata, and one cached session per device.

    Callable as model(x, t) -> eps for eps graphs, so the reference sampler can run it too.
    """

    def __init__(self, source: str, inputs: dict, outputs: dict, metadata: dict, session=None, path=None):
        self.source = source  # the file, or "<session>"
        self.path = path
        self.inputs = inputs  # name -> (element type, dims)
        self.outputs = outputs
        self.metadata = metadata
        self._session = session  # a user's InferenceSession (from_session)
        kind = {frozenset(k): v for k, v in KINDS.items()}.get(frozenset(inputs))
        if kind is None:
            raise BadValue(
                f"{source}: ONNX model inputs must be named ('x', 't') (noise model) or ('x', 'step', 'z') (step "
                f"graph); got {list(inputs)}"
            )
        # a multistep step graph carries its x0 history in ("history") and out ("history_out")
        self.history = int((metadata.get("step") or {}).get("history", 0)) if "history" in inputs else 0
        if len(outputs) != (2 if self.history else 1):
            raise BadValue(
                f"{source}: the ONNX model must have one output (two with a history); got {list(outputs)}"
            )
        want = {"x": "float", "t": "int64", "step": "int64", "z": "float", "history": "float", "y": "int64"}
        self.cond = "y" in inputs
        for name, (etype, _) in inputs.items():
            if etype != want[name]:
                raise BadValue(f"{source}: input {name!r} must be {want[name]}; got {etype}")
        self.kind = kind
        x_dims = inputs["x"][1]
        if len(x_dims) != 4:
            raise BadValue(f"{source}: input 'x' must be 4-D [B, C, H, W]; got {len(x_dims)} dims")
        meta_shape = metadata.get("image_shape")
        self.image_shape = tuple(
            d if d is not None else (meta_shape[i] if meta_shape else None) for i, d in enumerate(x_dims[1:])
        )
        self.batch = x_dims[0]  # None: dynamic
        self.output_name = next(iter(outputs))
        out_dims = next(iter(outputs.values()))[1]
        self.out_channels = out_dims[1] if len(out_dims) == 4 else None
        cfg = metadata.get("model")
        self.config = None
        if isinstance(cfg, dict):
            from ddpm_fast.checkpoint import architecture

            arch = metadata.get("arch", "ddpm-unet")  # files written before "arch" hold the DDPM U-Net
            self.config = architecture(arch, f"{source}: metadata 'arch'")[1].from_dict(cfg)
        spec = metadata.get("schedule")
        self.schedule = Schedule.from_spec(spec) if spec else None
        sampling = metadata.get("sampling") or {}
        known = {f.name for f in dataclasses.fields(ModelDefaults)} - {"schedule", "arch"}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items() if k in known}
        arch = metadata.get("arch", "ddpm-unet")
        self.defaults = ModelDefaults(schedule=self.schedule, **{**fields, "arch": arch})
        step = metadata.get("step")
        # The run a step graph was exported for: its number of steps is the only one it can sample.
        self.steps = int(step["num_steps"]) if kind == "step" and isinstance(step, dict) else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path) -> OnnxModel:
        """Read an .onnx file's signature and metadata (sessions come later, per device). Cached per file."""
        if isinstance(path, OnnxModel):
            return path
        if not isinstance(path, (str, os.PathLike)):
            raise BadType(f"model must be an .onnx path or an OnnxModel; got {type(path).__name__}")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"ONNX model {str(p)!r} does not exist")
        key = _file_key(p)
        if key in _MODELS:
            return _MODELS[key]
        try:
            import onnx
        except ImportError:
            onnx = None
        if onnx is None:  # onnxruntime alone: read the signature from a CPU session
            return cls.from_session(create_session(p, "cpu"), source=str(p), path=p)
        try:
            proto = onnx.load(os.fspath(p), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and onnx's own errors
            raise BadValue(f"{str(p)!r} is not an ONNX model: {type(e).__name__}: {e}") from e
        if not proto.graph.node:
            raise BadValue(f"{str(p)!r} is not an ONNX model: it has no graph")
        init = {i.name for i in proto.graph.initializer}
        names = {"float": 1, "int64": 7, "float16": 10, "int32": 6, "double": 11}
        rev = {v: k for k, v in names.items()}

        def sig(values):
            out = {}
            for v in values:
                if v.name in init:
                    continue
                tt = v.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                out[v.name] = (rev.get(tt.elem_type, f"type {tt.elem_type}"), dims)
            return out

        meta = _decode_metadata({p_.key: p_.value for p_ in proto.metadata_props}, str(p))
        model = cls(str(p), sig(proto.graph.input), sig(proto.graph.output), meta, path=p)
        _MODELS[key] = model
        return model

    @classmethod
    def from_session(cls, sess, *, source: str = "<session>", path=None) -> OnnxModel:
        """Wrap an existing onnxruntime.InferenceSession (used as is, for every call)."""
        ort_types = {"tensor(float)": "float", "tensor(int64)": "int64", "tensor(float16)": "float16"}

        def sig(values):
            return {v.name: (ort_types.get(v.type, v.type), _dims(v.shape)) for v in values}

        meta = _decode_metadata(dict(sess.get_modelmeta().custom_metadata_map), source)
        return cls(source, sig(sess.get_inputs()), sig(sess.get_outputs()), meta, session=sess, path=path)

    # ------------------------------------------------------------------ sessions
    def session(self, device="cpu", *, threads: int | None = None):
        """The cached InferenceSession for `device`."""
        device = torch.device(device)
        if self._session is not None:
            first = self._session.get_providers()[0]
            if (device.type == "cuda") != (first == "CUDAExecutionProvider"):
                raise BadValue(
                    f"the given InferenceSession runs on {first}; it cannot serve device {device} "
                    "(pass the .onnx path to let ddpm_fast create the session)"
                )
            return self._session
        cuda = device.type == "cuda" and torch.cuda.is_available()
        stream = torch.cuda.current_stream(device).cuda_stream if cuda else None
        tf32 = torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        key = (_file_key(self.path), str(device), threads, stream, tf32 if cuda else None)
        sess = _SESSIONS.get(key)
        if sess is None:
            sess = create_session(self.path, device, threads=threads)
            _SESSIONS[key] = sess
        return sess

    # ------------------------------------------------------------------ checks
    def check_shape(self, shape) -> None:
        """ValueError unless the graph takes images of `shape` (B, C, H, W)."""
        B, C, H, W = shape
        want = self.image_shape
        if any(w is not None and w != g for w, g in zip(want, (C, H, W))):
            raise BadValue(
                f"shape {tuple(shape)} does not fit {self.source}: the graph takes images "
                f"{tuple('?' if w is None else w for w in want)} (C, H, W)"
            )
        if self.batch is not None and self.batch != B:
            raise BadValue(
                f"batch size {B} does not fit {self.source}: its batch axis is fixed at {self.batch}"
            )

    def __repr__(self) -> str:
        return f"OnnxModel({self.source!r}, kind={self.kind!r}, image_shape={self.image_shape})"

    # ------------------------------------------------------------------ model(x, t)
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps = model(x, t [, y]) through ONNX Runtime on x's device (host round trip on CPU only)."""
        if self.kind != "eps":
            raise BadType(
                f"{self.source} is a step graph (x, step, z) -> x_prev; it cannot be called as model(x, t)"
            )
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise BadType(f"x must be a 4-D torch.Tensor; got {type(x).__name__}")
        self.check_shape(tuple(x.shape))
        t = torch.as_tensor(t, device=x.device).to(torch.int64).reshape(-1).expand(x.shape[0]).contiguous()
        if self.cond != (y is not None):
            raise BadType(
                f"{self.source} {'needs' if self.cond else 'takes no'} labels y (its graph's inputs)"
            )
        feeds = {"x": x.detach().float().contiguous(), "t": t}
        if y is not None:
            feeds["y"] = torch.as_tensor(y, device=x.device).to(torch.int64).reshape(-1).contiguous()
        sess = self.session(x.device)
        if x.device.type == "cpu":
            (eps,) = sess.run([self.output_name], {k: v.numpy() for k, v in feeds.items()})
            return torch.from_numpy(eps)
        out = torch.empty((x.shape[0], self.out_channels or x.shape[1], *x.shape[2:]), device=x.device)
        binding = sess.io_binding()
        for name, v in feeds.items():
            _bind(binding, name, v, input=True)
        _bind(binding, self.output_name, out, input=False)
        run_bound(sess, binding, x.device)
        return out


def load_onnx(path) -> OnnxModel:
    """`OnnxModel.load(path)`: an exported file with its metadata; sessions are created per device on use."""
    return OnnxModel.load(path)


def _decode_metadata(props: dict, source: str) -> dict:
    out = {}
    for k, v in props.items():
        if k.startswith(META_PREFIX):
            try:
                out[k[len(META_PREFIX) :]] = json.loads(v)
            except json.JSONDecodeError as e:
                raise BadValue(f"{source}: ONNX metadata {k!r} is not valid JSON: {e}") from e
    return out


_NP = {torch.float32: np.float32, torch.int64: np.int64}


def _bind(binding, name: str, tensor: torch.Tensor, *, input: bool) -> None:
    """Bind a contiguous CUDA torch tensor to an IO binding by pointer (no copy)."""
    args = (name, "cuda", tensor.device.index or 0, _NP[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
    (binding.bind_input if input else binding.bind_output)(*args)


# ---------------------------------------------------------------------------------------------- sampler


def as_onnx_model(model) -> OnnxModel:
    """An OnnxModel from an .onnx path, an onnxruntime.InferenceSession or an OnnxModel."""
    if isinstance(model, OnnxModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return OnnxModel.load(model)
    ort = sys.modules.get("onnxruntime")
    if ort is not None and isinstance(model, ort.InferenceSession):
        return OnnxModel.from_session(model)
    raise BadType(
        f"backend='onnx' needs an .onnx path, an OnnxModel or an onnxruntime.InferenceSession; got {type(model).__name__}"
    )


def _check_plan(m: OnnxModel, plan) -> None:
    if plan.dtype != torch.float32:
        raise BadValue(
            f"backend='onnx' computes in float32 (the graph's inputs and outputs); got dtype={plan.dtype}. "
            "Export with --fp16 for float16 weights"
        )
    if plan.device.type not in ("cpu", "cuda"):
        raise BadValue(f"device must be cpu or cuda for backend='onnx'; got {plan.device}")
    check_options(plan, "onnx")
    check_graph(m, plan)


def check_options(plan, backend: str) -> None:
    """The options an ONNX-graph backend takes (`OPTIONS`: threads), checked for `backend`'s message."""
    unknown = sorted(set(plan.options) - set(OPTIONS))
    if unknown:
        raise BadType(f"backend={backend!r} takes options {list(OPTIONS)}; got {unknown}")
    threads = plan.options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BadValue(f"threads must be a positive int; got {threads!r}")


def check_graph(m: OnnxModel, plan) -> None:
    """ValueError unless the graph `m` can run `plan`: its image shape and batch, its output channels for the
    plan's variance, and (a step graph) the run it was exported for."""
    m.check_shape(plan.shape)
    if m.kind == "eps":
        if m.out_channels is not None and m.out_channels != plan.out_channels:
            raise BadValue(
                f"{m.source} returns {m.out_channels} channels; variance={plan.variance!r} with "
                f"{plan.shape[1]}-channel images needs {plan.out_channels}"
            )
        return
    exported = m.metadata.get("step")
    if not isinstance(exported, dict):
        raise BadValue(
            f"{m.source} is a step graph without ddpm_fast.step metadata: it cannot be checked against the request"
        )
    asked = {
        "method": plan.method,
        "eta": plan.eta,
        "variance": plan.variance,
        "clip": plan.clip,
        "num_steps": plan.table.num_steps,
        "timesteps": plan.table.timesteps.tolist(),
    }
    if plan.clip:
        asked["clip_range"] = plan.clip_range
    diff = [k for k in asked if exported.get(k) != asked[k]]
    if not diff and m.metadata.get("schedule") not in (None, plan.schedule.spec):
        diff = ["schedule"]
    if diff:
        have = ", ".join(f"{k}={exported.get(k)!r}" for k in diff if k != "timesteps")
        want = ", ".join(f"{k}={asked[k]!r}" for k in diff if k != "timesteps" and k in asked)
        raise BadValue(
            f"{m.source} is a step graph exported for a different run ({have or 'other timesteps/schedule'}); "
            f"the request asks {want or 'other timesteps/schedule'}. Pass steps={exported.get('num_steps')} "
            f"(--steps {exported.get('num_steps')}) and the exported settings, or sample with the noise-model graph"
        )


def reference_tolerance(plan, per_call: float = 1e-5) -> float:
    """Bound on max |onnx - reference| for a float32 run of `plan`: per_call * (1 + sum_i SRM1_i (|C_X0_i| +
    sum_k |H_k,i|) + |C_EPS_i|), the H_k being a multistep table's history weights (per_call * (1 + sum_i SRM1_i
    |C_X0_i| + sum_k |H_k,i| + |C_EPS_i|) where the history keeps eps_hat, which carries an eps difference as is).

    A per-call eps difference (ORT's convolutions vs PyTorch's: <= 1e-5, measured ~2e-6) enters x_{t-1}
    multiplied by that step's eps gain SRM1 * C_X0 + C_EPS (up to ~15 at t = 999 of a 4-step DDIM run) and
    is then carried with gain ~1 (SRA * C_X0 + C_XT); clipping only shrinks it. The noise is the same
    counter-based tensors on both sides, so it adds nothing.
    """
    c = plan.table.coefs
    # a multistep table carries each x0 on in its history columns: their weights add to the eps gain
    hist = c[:, len(COLUMNS) :].abs().sum(dim=1)
    if plan.table.history_of == "eps":
        gain = c[:, SRM1] * c[:, C_X0].abs() + hist + c[:, C_EPS].abs()
    else:
        gain = c[:, SRM1] * (c[:, C_X0].abs() + hist) + c[:, C_EPS].abs()
    return per_call * (1.0 + gain.sum().item())


def _progress(plan, n: int, backend: str):
    if not plan.progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=f"sampling ({backend})", unit="step")


def run(model, plan) -> torch.Tensor:
    """The backend table's entry (`ddpm_fast.sampling.BACKENDS`): `sample_onnx`."""
    return sample_onnx(model, plan)


def sample_onnx(model, plan) -> torch.Tensor:
    """Sample `plan` with ONNX Runtime; `model` is an .onnx path, an OnnxModel or an InferenceSession."""
    m = as_onnx_model(model)
    _check_plan(m, plan)
    return sample_session(m, m.session(plan.device, threads=plan.options.get("threads")), plan, "onnx")


def sample_session(m: OnnxModel, sess, plan, backend: str) -> torch.Tensor:
    """Sample a checked `plan` with graph `m` run by `sess`: an InferenceSession, or on CPU any object with
    its `run(output names, {input name: numpy array}) -> [numpy arrays]` (the openvino backend's). x_T, the
    noise and the torch-side update are the same whatever runs the graph; `backend` names the progress bar."""
    coefs, timesteps = plan.table.to(plan.device)
    x = noise.sample_noise(plan.seed, plan.start_index, plan.shape, noise.XT_SLOT, plan.device).contiguous()
    run = _eps_loop if m.kind == "eps" else _step_loop
    with torch.no_grad():
        return run(m, sess, plan, x, coefs, timesteps, backend)


def _eps_loop(m: OnnxModel, sess, plan, x, coefs, timesteps, backend) -> torch.Tensor:
    """The runtime computes eps; the posterior step (kernels.posterior_step: the fused Triton kernel on CUDA or
    under TRITON_INTERPRET=1, else the torch twin) updates x in place."""
    B = plan.shape[0]
    ts = plan.table.timesteps.tolist()
    eps = torch.empty((B, plan.out_channels, *plan.shape[2:]), device=x.device)
    t_buf = torch.empty(B, dtype=torch.int64, device=x.device)
    K = plan.table.history  # a multistep solver's earlier x0 predictions, shifted by each update
    args = step_args(
        x,
        coefs,
        timesteps,
        seed=plan.seed,
        start_index=plan.start_index,
        clip_range=plan.clip_range if plan.clip else None,
        learned=plan.table.learned,
        history=torch.zeros((K, *x.shape), dtype=torch.float32, device=x.device) if K else None,
        eps_history=plan.table.history_of == "eps",
    )
    y = None if not m.cond else plan.labels.to(device=x.device, dtype=torch.int64).contiguous()
    if x.device.type == "cuda":
        binding = sess.io_binding()
        _bind(binding, "x", x, input=True)
        _bind(binding, "t", t_buf, input=True)
        if y is not None:
            _bind(binding, "y", y, input=True)
        _bind(binding, m.output_name, eps, input=False)
    for i in _progress(plan, len(ts), backend):
        t_buf.fill_(ts[i])
        if x.device.type == "cuda":
            run_bound(sess, binding, x.device)
            out = eps
        else:
            feeds = {"x": x.numpy(), "t": t_buf.numpy(), **({"y": y.numpy()} if y is not None else {})}
            out = torch.from_numpy(sess.run([m.output_name], feeds)[0])
        posterior_step(x, out, args, i, out=x)
        if plan.callback is not None:
            plan.callback(i, ts[i], x)
    return x


def _step_loop(m: OnnxModel, sess, plan, x, coefs, timesteps, backend) -> torch.Tensor:
    """ORT runs the whole step; z for step i is the counter-based noise of its timestep (zeros when sigma = 0).
    A multistep graph also takes and returns the x0 history (zeros before the first step)."""
    ts = plan.table.timesteps.tolist()
    sigma = plan.table.coefs[:, SIGMA].tolist()
    step_dims = m.inputs["step"][1]
    step_buf = torch.zeros([1] if step_dims else [], dtype=torch.int64, device=x.device)
    zeros = torch.zeros_like(x)
    K = m.history
    hist = torch.zeros((K, *x.shape), dtype=torch.float32, device=x.device) if K else None
    hist_out = "history_out"
    cuda = x.device.type == "cuda"
    if cuda:
        bufs = (x, torch.empty_like(x))
        hbufs = (hist, torch.empty_like(hist)) if K else None
        z_buf = torch.empty_like(x)
        bindings = []
        for a, b in ((0, 1), (1, 0)):  # ping-pong: the step reads one buffer and writes the other
            bnd = sess.io_binding()
            _bind(bnd, "x", bufs[a], input=True)
            _bind(bnd, "step", step_buf, input=True)
            _bind(bnd, "z", z_buf, input=True)
            _bind(bnd, m.output_name, bufs[b], input=False)
            if K:
                _bind(bnd, "history", hbufs[a], input=True)
                _bind(bnd, hist_out, hbufs[b], input=False)
            bindings.append(bnd)
    for i in _progress(plan, len(ts), backend):
        step_buf.fill_(i)
        if sigma[i] != 0.0:
            z = noise.sample_noise(plan.seed, plan.start_index, plan.shape, ts[i], x.device)
        else:
            z = zeros
        if cuda:
            z_buf.copy_(z)
            run_bound(sess, bindings[i % 2], x.device)
            x = bufs[(i + 1) % 2]
        else:
            feeds = {"x": x.numpy(), "step": step_buf.numpy(), "z": z.numpy()}
            if K:
                feeds["history"] = hist.numpy()
                x_np, h_np = sess.run([m.output_name, hist_out], feeds)
                x, hist = torch.from_numpy(x_np), torch.from_numpy(h_np)
            else:
                x = torch.from_numpy(sess.run([m.output_name], feeds)[0])
        if plan.callback is not None:
            plan.callback(i, ts[i], x)
    return x.clone() if cuda else x

"""The `fast` backend: one sampling step as a function of static buffers, compiled, captured, replayed.

A `StepRunner` owns, for one batch size (its bucket), the buffers a step reads and writes: x (float32,
NCHW), the step table (coefs float32 [S, 8], timesteps int64 [S]) and the device step counter. Its `step()`

    t   = timesteps[counter]                                   (gathered on the device, no host sync)
    out = U-Net(x, t)                                          (torch.compile; autocast bf16/fp16; channels_last)
    x   = posterior_step(x, out, args, counter)                (fused Triton update + Philox noise; counter += 1)

(args: the run's `kernels.StepArgs` over these buffers, made once per run by `load`) is an ordinary function:
on CPU it is called S times; on CUDA it is captured once into a CUDA graph and the graph is replayed S times.
The update and the state x stay float32 whatever the U-Net's dtype; the result is float32. Row i of a batch is global sample start_index + i whatever the batch size: a batch is padded to
its bucket with rows of their own global indices, which never touch the real rows' noise.

Options (keyword arguments of `df.sample(..., backend="fast")`; environment variables switch them off):

    compile=True         torch.compile the U-Net (and the torch twin of the update)   DDPM_FAST_NO_COMPILE=1
    compile_mode=None    CUDA: "default"; CPU: "default"                              (see DEFAULT_COMPILE_MODE)
    cuda_graph=True      capture the step in a CUDA graph (CUDA only)                 DDPM_FAST_NO_CUDA_GRAPH=1
    triton=True          fused Triton update (CUDA, or CPU under TRITON_INTERPRET=1)  DDPM_FAST_NO_TRITON=1
    channels_last=True   U-Net input and weights in channels_last (CUDA; on CPU only when given; on a
                         private copy of the weights: the caller's model keeps its memory format)
    freeze=False         CPU: compile with inductor's freezing (weights folded into the graph as constants and
                         prepacked for oneDNN; implies compile). A change of the caller's weights is found at
                         the next run (their sha256, in full) and thaws the forward to the ordinary compiled
                         one (`_Frozen`). Off by default: it sped up the forward alone, not a whole step
                         (the numbers are in `_Frozen`)
    buckets=None         batch sizes to capture; a batch runs in the smallest bucket that holds it, larger
                         batches are split at the largest. None: when compiling or capturing (where a
                         new size costs a compile or a capture) a batch reuses an already prepared size
                         holding it with at most 2x padding, else its own size is prepared; eager CPU runs
                         never pad.

Warm-up, compile and capture happen once per (model, bucket, image shape, dtype, options) and are reused by
later calls: the cache is keyed weakly on the model (a module's entry holds a shallow copy sharing its
submodules and parameters, never the module itself). `counters` counts what was built ("runners",
"compiles", "captures"). The update (fused kernel or twin) reads seed and start_index from a device tensor
the runner refills per batch, so one graph per bucket serves every seed, shard and chunk of a run; only a
new clip range, a longer step table or new weights re-capture (one eager warm step plus the capture, about
two steps' time), reusing the compiled U-Net.

Compile left out (`compile_pays`, a pure function, also what backend "auto" asks on CPU): CUDA compiles; a
model already compiled in this process for the plan's device and dtype compiles (the cache is reused); on
CPU otherwise only when parameters x pixels x steps x batch > CPU_COMPILE_PAYS (an eager run above about
3 minutes, where compiling's ~30 s pays for itself).
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import weakref
from dataclasses import dataclass

import torch

from ddpm_fast import kernels, noise
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.plan import Plan, check_model_output
from ddpm_fast.progress import progress_bar
from ddpm_fast.weights import tensors_digest

__all__ = [
    "run",
    "sample_fast",
    "compiled_for",
    "compile_pays",
    "CPU_COMPILE_PAYS",
    "resolve_options",
    "EngineOptions",
    "StepRunner",
    "get_runner",
    "counters",
    "clear_cache",
    "DEFAULT_COMPILE_MODE",
]

log = logging.getLogger("ddpm_fast")

# torch.compile mode per device type. "default" on CUDA: we capture the whole step in our own graph, so the
# cudagraph modes would only nest graphs, and max-autotune's conv/matmul templates rarely beat cuDNN/cuBLAS
# on this U-Net while adding minutes of autotuning; benchmarks/gpu_check.py measures the alternatives.
DEFAULT_COMPILE_MODE = {"cuda": "default", "cpu": "default"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

RECOMPILE_LIMIT = 64  # compiled U-Net variants per call site (see _Compiled)

# CPU: compiling costs 14-25 s per new batch size (tiny U-Net + twin, 2-core EPYC, cold inductor cache; plan
# on 30 s) and makes a step 1.64x / 1.52x / 1.37x faster at batch 1 / 4 / 16 quiet, 1.19x under load (plan on
# 1.2), so it pays for an eager run above 30 / (1 - 1/1.2) = 180 s. The eager tiny U-Net (0.70M parameters,
# 3x16x16) ran 1000 steps at batch 16 in 15.1 s: parameters x pixels x steps x batch = 2.9e12 per 15.1 s,
# so 180 s is about 3.4e13 of that measure.
CPU_COMPILE_PAYS = 3.4e13

ENV_SWITCHES = {
    "compile": "DDPM_FAST_NO_COMPILE",
    "cuda_graph": "DDPM_FAST_NO_CUDA_GRAPH",
    "triton": "DDPM_FAST_NO_TRITON",
}
OPTION_NAMES = ("compile", "compile_mode", "cuda_graph", "triton", "channels_last", "freeze", "buckets")
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Eager steps before the first capture: inductor and cuDNN choose kernels on first calls; three is the
# count the CUDA-graph docs use for warm-up on a side stream.
WARMUP_STEPS = 3

counters: collections.Counter = collections.Counter()
_logged: set = set()


def _log_once(key: str, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(msg, *args)


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class EngineOptions:
    """Resolved switches for one call (after arguments, environment and availability)."""

    compile: bool
    compile_mode: str
    cuda_graph: bool
    triton: bool
    channels_last: bool
    buckets: tuple[int, ...] | None
    freeze: bool = False


def _env_off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _bool_option(opts: dict, name: str, default: bool = True) -> bool:
    v = opts.get(name, default)
    if not isinstance(v, bool):
        raise BadType(f"{name} must be a bool; got {v!r}")
    return v


def resolve_options(plan: Plan, model=None) -> EngineOptions:
    """Validate `plan.options` (errors name the option) and apply environment switches and availability.

    `compile` left out: `compile_pays(model, plan)` (True without a model)."""
    opts = plan.options
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise BadType(f"backend='fast' got unknown option(s) {unknown}; known: {list(OPTION_NAMES)}")
    dev = plan.device.type
    on = {name: _bool_option(opts, name) for name in ("compile", "cuda_graph", "triton", "channels_last")}
    on["freeze"] = _freeze_asked(opts, on, model)
    if "compile" not in opts and model is not None and not on["freeze"]:
        on["compile"] = compile_pays(model, plan)
    mode = opts.get("compile_mode")
    if mode is None:
        mode = DEFAULT_COMPILE_MODE.get(dev, "default")
    if mode not in COMPILE_MODES:
        raise BadValue(f"compile_mode must be one of {COMPILE_MODES}; got {mode!r}")
    if on["freeze"] and dev == "cpu" and mode != "default":
        raise BadValue(f"freeze=True compiles with compile_mode='default'; got {mode!r}")
    buckets = opts.get("buckets")
    if buckets is not None:
        try:
            buckets = tuple(sorted({int(b) for b in buckets}))
        except (TypeError, ValueError) as e:
            raise BadType(f"buckets must be a sequence of positive ints; got {buckets!r}") from e
        if not buckets or any(isinstance(b, bool) or b < 1 for b in opts["buckets"]):
            raise BadValue(f"buckets must be a non-empty sequence of positive ints; got {opts['buckets']!r}")

    for name, env in ENV_SWITCHES.items():
        if on[name] and _env_off(env):
            _log_once(f"env:{name}", "ddpm_fast fast backend: %s off (%s is set)", name, env)
            on[name] = False
    if dev != "cuda":
        if on["cuda_graph"] and "cuda_graph" in opts:
            _log_once(
                "graph:device", "ddpm_fast fast backend: cuda_graph applies to CUDA only; running eagerly"
            )
        on["cuda_graph"] = False
        # CPU: only when asked for. cifar10 U-Net, batch 8, bf16, 2-core EPYC (avx512_bf16), ms per step and
        # fraction of the bf16 GEMM peak measured in the same run (`ddpm-fast bench --device cpu --model
        # cifar10 --batch-sizes 8 --steps 3`): autocast over float32 weights 330.7 (0.73), bf16 weights cast
        # once (the private copy, what runs) 304.6 (0.78), + channels_last 323.7 (0.74), compiled 317.2
        # (0.73), compiled + channels_last 320.4 (0.75); openvino-bf16 294.1 (0.81).
        on["channels_last"] = on["channels_last"] and "channels_last" in opts
    elif on["freeze"]:
        _log_once("freeze:device", "ddpm_fast fast backend: freeze applies to CPU only; compiling without it")
        on["freeze"] = False
    on["freeze"] = on["freeze"] and on["compile"]  # DDPM_FAST_NO_COMPILE turns both off
    if on["cuda_graph"] and plan.guidance is not None:
        # Classifier guidance runs autograd through the classifier at every step; a captured graph would have
        # to replay the backward pass too, which we have not shown to equal the eager one.
        _log_once("graph:guidance", "ddpm_fast fast backend: classifier guidance runs without the CUDA graph")
        on["cuda_graph"] = False
    if on["compile"] and not hasattr(torch, "compile"):
        _log_once("compile:missing", "ddpm_fast fast backend: torch.compile is unavailable; running eagerly")
        on["compile"] = False
    if on["cuda_graph"] and mode in ("reduce-overhead", "max-autotune") and on["compile"]:
        raise BadValue(
            f"compile_mode={mode!r} captures its own CUDA graphs; use it with cuda_graph=False, "
            "or use 'default' / 'max-autotune-no-cudagraphs'"
        )
    if on["triton"]:
        probe = torch.empty(0, device=plan.device)
        if not kernels.use_triton(probe):  # logs its own reason when Triton is missing
            on["triton"] = False
    return EngineOptions(
        compile=on["compile"],
        compile_mode=mode,
        cuda_graph=on["cuda_graph"],
        triton=on["triton"],
        channels_last=on["channels_last"],
        buckets=buckets,
        freeze=on["freeze"],
    )


def _freeze_asked(opts: dict, on: dict, model) -> bool:
    """The `freeze` option, checked; asking for it turns on the compile it is a setting of (`on`)."""
    freeze = _bool_option(opts, "freeze", default=False)
    if freeze and "compile" not in opts:
        on["compile"] = True
    elif freeze and not on["compile"]:
        raise BadValue("freeze=True compiles the U-Net; got compile=False")
    if freeze and model is not None and not isinstance(model, torch.nn.Module):
        raise BadValue(
            "freeze=True needs a torch.nn.Module (its weights are hashed to see them change); "
            f"got {type(model).__name__}"
        )
    return freeze


# ---------------------------------------------------------------------------------------------- cache


def _model_handle(model):
    """What the cache may hold: a module's shallow copy shares submodules, parameters and buffers, not the module."""
    if isinstance(model, torch.nn.Module):
        return copy.copy(model)
    return model


# Modules whose weights a half-precision run keeps pre-cast: autocast runs them in the half dtype anyway, so
# casting once gives the same values and spares every replay a cast of each weight (cifar10 U-Net: 35.7M
# float32 weights read and 71 MB written per step). GroupNorm and everything else keep their float32 weights.
_HALF_WEIGHT_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


def _state_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _private_weights(model, amp_dtype: torch.dtype | None, channels_last: bool):
    """The module the step runs: `model` itself, or a private copy when the run changes its weights
    (channels_last memory format; conv and linear weights in `amp_dtype`), so the caller's model keeps its
    memory format, dtype and storage. None when `model` is used as it is."""
    if not isinstance(model, torch.nn.Module) or (amp_dtype is None and not channels_last):
        return None
    try:
        private = copy.deepcopy(model)
    except Exception as e:  # a module holding something deepcopy refuses: run the shared weights, slower
        _log_once(
            "private:copy",
            "ddpm_fast fast backend: cannot copy the model (%s: %s); running its own weights under autocast",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        return None
    for p in private.parameters():
        p.requires_grad_(False)
        p.grad = None
    if amp_dtype is not None:
        for m in private.modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                break  # its fused path reads in_proj_weight beside out_proj: leave the whole model alone
        else:
            for m in private.modules():
                if isinstance(m, _HALF_WEIGHT_MODULES):
                    m.to(amp_dtype)
    if channels_last:
        # cuDNN's NHWC convolutions then need no per-step transpose of the weights.
        private.to(memory_format=torch.channels_last)
    return private


def _layout(model) -> list:
    """What a private copy was made from: each state tensor's name, shape and device."""
    return [(n, t.shape, t.device) for n, t in _state_tensors(model)]


class _UNetCall(torch.nn.Module):
    """model(x, t) as the step calls it: channels_last input, autocast, a contiguous NCHW output.

    It runs a private copy of the caller's module when it changes the weights (`_private_weights`); `refresh()`
    copies the caller's current values into it before each run, so a model trained between calls is
    sampled with its new weights and a captured graph keeps its pointers."""

    def __init__(self, model, amp_dtype: torch.dtype | None, channels_last: bool, device_type: str):
        super().__init__()
        self.__dict__["source"] = model  # the caller's module (or handle): kept out of this module's children
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.device_type = device_type
        self._use_private()

    def _use_private(self) -> None:
        private = _private_weights(self.source, self.amp_dtype, self.channels_last)
        self.model = self.source if private is None else private
        # what refresh() copies into, and the caller's layout it was made from (None: no private copy)
        self.private_tensors = None if private is None else [t for _, t in _state_tensors(private)]
        self.layout = None if private is None else _layout(self.source)
        self.module_pairs = [] if private is None else list(zip(self.source.modules(), private.modules()))

    def refresh(self) -> None:
        """Caller's parameters, buffers and train/eval flags -> the private copy (nothing without one): one
        _foreach_copy_ per run (cifar10 U-Net: 143 MB read, about 0.1 ms on an H200; walking its 328 tensors
        costs about 1 ms of host time on a 2-core EPYC). Always copied: in-place writes through `.data` (as
        some EMA code does) leave no version count to test."""
        if self.layout is None:
            return
        src = _state_tensors(self.source)
        if _layout(self.source) != self.layout:  # the caller's model changed shape or device: copy it anew
            self._use_private()
            return
        with torch.no_grad():
            torch._foreach_copy_(self.private_tensors, [t for _, t in src])
        for a, b in self.module_pairs:
            b.training = a.training

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: autocast's weight-cast cache must not live across CUDA graph capture.
        with torch.autocast(
            self.device_type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
            cache_enabled=False,
        ):
            out = self.model(x, t) if y is None else self.model(x, t, y=y)
        out = getattr(out, "sample", out)  # diffusers' UNet2DOutput
        return out.contiguous()


class _Engine:
    """Per-model state: the model handle, its (compiled) forwards and the step runners built for it."""

    def __init__(self, model):
        self.handle = _model_handle(model)
        self.forwards: dict = {}
        self.calls: dict = {}  # id(forward) -> its _UNetCall, whose private weights refresh() updates
        self.runners: dict = {}
        self.pool = None  # one CUDA graph memory pool shared by this model's graphs (replayed one at a time)

    def forward(self, amp_dtype, opts: EngineOptions, device: torch.device):
        # keyed by the device with its index: a private weight copy lives on one GPU, and a model moved to
        # another gets its own forward there (refresh() also remakes a copy whose source changed device)
        key = (amp_dtype, opts.channels_last, opts.compile, opts.compile_mode, str(device), opts.freeze)
        fn = self.forwards.get(key)
        if fn is None:
            call = fn = _UNetCall(self.handle, amp_dtype, opts.channels_last, device.type)
            if opts.freeze:
                fn = _Frozen(call, opts.compile_mode)
            elif opts.compile:
                # dynamic=False: one graph per bucket, as the CUDA graph needs; buckets bound the count.
                fn = _Compiled(fn, opts.compile_mode, "U-Net", dynamic=False)
            self.forwards[key] = fn
            self.calls[id(fn)] = call
        return fn

    def refresh(self, forward) -> None:
        """Bring `forward`'s private weights (if any) up to the caller's model, and a frozen forward's graph
        up to its weights: before every run."""
        call = self.calls.get(id(forward))
        if call is not None:
            call.refresh()
        if isinstance(forward, _Frozen):
            forward.check()


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNCACHEABLE: dict = {}  # id -> engine for callables that take no weak reference (kept for the process)


def _engine_for(model) -> _Engine:
    try:
        eng = _ENGINES.get(model)
    except TypeError:  # not weakly referenceable
        eng = _UNCACHEABLE.get(id(model))
        if eng is None:
            eng = _UNCACHEABLE[id(model)] = _Engine(model)
        return eng
    if eng is None:
        eng = _ENGINES[model] = _Engine(model)
    if isinstance(model, torch.nn.Module):
        eng.handle.training = model.training  # the shallow copy's own flag; children are shared
    return eng


def clear_cache() -> None:
    """Drop every compiled forward and update, runner and captured graph."""
    _ENGINES.clear()
    _UNCACHEABLE.clear()
    _TWINS.clear()


def _recompile_limit():
    """dynamo's per-code-object compile limit raised to RECOMPILE_LIMIT for one call, not for the process."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT)})


class _Compiled:
    """torch.compile(fn) whose compile failure falls back to fn with one logged line (a bug in fn still raises)."""

    def __init__(self, fn, mode: str, what: str, **kwargs):
        self.eager = fn
        self.fn = torch.compile(fn, mode=mode, **kwargs)
        self.what = what
        self.failed = False
        counters["compiles"] += 1

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            # Every compiled U-Net shares one code object (_UNetCall.forward), so each (bucket, dtype, mode) is a
            # recompile of it; past dynamo's default limit (8) it would silently run eagerly.
            with _recompile_limit():
                return self.fn(*args, **kwargs)
        except Exception as e:  # compile errors come in many types (dynamo, inductor, a missing C++ compiler)
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # an eager retry inside a broken CUDA graph capture would only add a confusing error
            out = self.eager(*args, **kwargs)  # raises here if fn itself is at fault
            self.failed = True
            _log_once(
                f"compile:{self.what}",
                "ddpm_fast fast backend: compiling the %s failed (%s: %s); running it eagerly",
                self.what,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            return out


class _Frozen:
    """The U-Net compiled with inductor's freezing (CPU): its weights become constants of the graph, prepacked
    for oneDNN once instead of at every call. cifar10 U-Net, bf16, 2-core EPYC (avx512_bf16): the forward
    alone, ms and fraction of the bf16 GEMM peak measured in the same process, batch 8 eager (weights cast
    once) 302.9 (0.77), frozen 270.9 (0.86), frozen + channels_last 319.2 (0.73); batch 32 eager 1182.5
    (0.80), frozen 1043.6 (0.91). Whole sampling steps (`ddpm-fast bench`, and three alternating rounds of 8
    steps): batch 8 312.3 eager vs 338.5 frozen, rounds 306 vs 322; batch 32 1210.4 vs 1209.6. Hence an
    option, off by default.

    The constants are the weights of the first run. `check()`, before every run, hashes the caller's weights in
    full (`weights.tensors_digest`: sha256, about 0.1 s for the cifar10 U-Net's 143 MB, under one batch-8 step)
    and, once they differ, thaws: from then on the ordinary compiled forward runs, which reads the weights
    `_UNetCall.refresh()` copies in. Not a new frozen compile: inductor keeps every compiled module, and so a
    copy of the weights, for the process's life, and a model that changed once is likely to change again (a
    training loop). The frozen graph is traced from a code object of its own (`_own_code`): dynamo keeps its
    compiled entries on the code object, and one holding frozen constants must never pass another compile's
    guards (the tensors' shapes and dtypes are the same) and run old weights."""

    def __init__(self, call: _UNetCall, mode: str):
        self.call = call
        self.mode = mode
        # mode is "default" (resolve_options), which torch.compile refuses beside options: None is the same
        self.fn = _Compiled(_own_code(call), None, "frozen U-Net", dynamic=False, options={"freezing": True})
        self.digest = None
        self.thawed = False

    def check(self) -> None:
        if self.thawed:
            return
        # every parameter and buffer, persistent or not: what refresh() copies and the freeze folds in (the
        # source is a Module: resolve_options refuses freeze for any other callable)
        digest = tensors_digest(_state_tensors(self.call.source))
        if self.digest is None:
            self.digest = digest
        elif digest != self.digest:
            _log_once(
                "freeze:thaw", "ddpm_fast fast backend: the model's weights changed; compiling it unfrozen"
            )
            self.fn = _Compiled(self.call, self.mode, "U-Net", dynamic=False)
            self.thawed = True

    def __call__(self, *args):
        return self.fn(*args)


def _own_code(call):
    """`call` behind a function whose code object no other function shares (see `_Frozen`)."""

    def frozen(*args):
        return call(*args)

    frozen.__code__ = frozen.__code__.replace(co_name=f"frozen_{id(call):x}")
    return frozen


_TWINS: dict = {}


def _compiled_twin(mode: str):
    """The torch twin of the update, compiled once per mode (it knows no model)."""
    if mode not in _TWINS:
        _TWINS[mode] = _Compiled(kernels.step_torch, mode, "update", fullgraph=True)
    return _TWINS[mode]


# ---------------------------------------------------------------------------------------------- the step


class StepRunner:
    """Static buffers and the step for one batch size; `step()` is what a CUDA graph captures."""

    def __init__(self, engine: _Engine, plan: Plan, opts: EngineOptions, batch: int):
        C, H, W = plan.shape[1:]
        dev = plan.device
        self.batch = batch
        self.device = dev
        self.opts = opts
        self.amp_dtype = plan.dtype if plan.dtype in HALF_DTYPES else None
        self.out_shape = (batch, plan.out_channels, H, W)
        self.learned = plan.table.learned
        self.eps_history = plan.table.history_of == "eps"  # what the history keeps (ddpm_fast.steps)
        self.x = torch.zeros((batch, C, H, W), dtype=torch.float32, device=dev)
        self.counter = kernels.make_step_counter(0, dev)
        # a multistep table's x0 of earlier steps (zeroed by load; the step shifts them in place)
        K = plan.table.history
        self.history = torch.zeros((K, batch, C, H, W), dtype=torch.float32, device=dev) if K else None
        self.coefs = torch.zeros((0, plan.table.coefs.shape[1]), dtype=torch.float32, device=dev)
        # class labels (of a conditional model, or of the guidance classifier): a static buffer, refilled by
        # load (no re-capture per batch)
        self.labels = torch.zeros(batch, dtype=torch.int64, device=dev) if plan.labels is not None else None
        self.label_model = plan.label_model  # the model takes y (else the labels serve the guidance only)
        self.guide = None  # classifier guidance of the loaded run (ddpm_fast.guidance.Guide); set by load
        self.gcoefs = None
        self.guide_coefs = None
        self.guide_checked = False
        self.timesteps = torch.zeros(0, dtype=torch.int64, device=dev)
        self.clip_range = None
        # [seed, start_index], read on the device by the update (kernel or twin): one compiled update and one
        # captured graph serve every seed, shard and chunk; load() refills it.
        self.keys = torch.zeros(2, dtype=torch.int64, device=dev)
        self.args = None  # the update's kernels.StepArgs over these buffers, made by load once per run
        self.forward = engine.forward(self.amp_dtype, opts, dev)
        if opts.triton:
            self.update = kernels.posterior_step
        elif opts.compile:
            self.update = _compiled_twin(opts.compile_mode)
        else:
            self.update = kernels.step_torch
        self.engine = engine
        self.graph = None
        self.graph_key = None
        self.checked = False
        counters["runners"] += 1

    # ---- state
    def load(self, plan: Plan, coefs: torch.Tensor, timesteps: torch.Tensor, start_index: int) -> None:
        """x <- x_T of rows start_index .. start_index + batch - 1; counter <- 0; the run's table and scalars."""
        S = coefs.shape[0]
        if self.coefs.shape[0] < S:  # grow the table buffers (a captured graph holds the old pointers)
            self.coefs = torch.zeros((S, coefs.shape[1]), dtype=torch.float32, device=self.device)
            self.timesteps = torch.zeros(S, dtype=torch.int64, device=self.device)
            self.graph = None
        self.timesteps[:S].copy_(timesteps)
        self.keys.copy_(torch.tensor([plan.seed, start_index], dtype=torch.int64))
        self.clip_range = plan.clip_range if plan.clip else None
        self.guide = plan.guidance
        if self.guide is not None:
            # output() reads the run's table; the update reads x0' itself where the table reads no eps
            self.guide_coefs = coefs.to(device=self.device, dtype=torch.float32)
            coefs = self.guide.update_coefs(coefs)
            self.gcoefs = self.guide.columns.to(device=self.device, dtype=torch.float32)
            self.guide_checked = False
            self.clip_range = None  # the guided output clips x0 itself, before its shift
        self.coefs[:S].copy_(coefs)
        self.args = kernels.step_args(
            self.x,
            self.coefs,
            self.timesteps,
            seed=self.keys[0:1],
            start_index=self.keys[1:2],
            clip_range=self.clip_range,
            learned=self.learned,
            history=self.history,
            eps_history=self.eps_history,
        )
        self.x.copy_(noise.sample_noise(plan.seed, start_index, self.x.shape, noise.XT_SLOT, self.device))
        if self.labels is not None:
            self.labels.zero_()  # padded rows: any valid class (they never touch the real rows)
            self.labels[: plan.shape[0]].copy_(plan.labels)
        if self.history is not None:
            self.history.zero_()  # read with weight 0 until filled; zeros, not stale NaNs, keep 0 * h = 0
        self.counter.zero_()

    def step(self) -> None:
        """One reverse step in place: x <- posterior_step(x, U-Net(x, timesteps[counter])); counter += 1."""
        t = self.timesteps.index_select(0, self.counter).expand(self.batch)
        if self.labels is None or not self.label_model:
            out = self.forward(self.x, t)
        else:
            out = self.forward(self.x, t, self.labels)
        if not self.checked:  # first call only (a host sync): shape and finiteness, errors name the step
            i = int(self.counter.item())
            check_model_output(out, self.out_shape, i, int(self.timesteps[i].item()))
            self.checked = True
        if self.guide is not None:  # classifier guidance: autograd through the classifier, never captured
            amp = self.amp_dtype
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = self.guide.output(
                    self.x,
                    t,
                    out,
                    self.labels,
                    self.guide_coefs,
                    self.gcoefs,
                    self.counter,
                    not self.guide_checked,
                )
            self.guide_checked = True
        self.update(self.x, out, self.args, self.counter, out=self.x, advance=True)

    # ---- CUDA graph
    def _graph_key(self):
        params = ()
        handle = self.engine.handle
        if isinstance(handle, torch.nn.Module):
            params = tuple(p.data_ptr() for p in handle.parameters())
        # What a capture freezes: launch arguments and pointers. The keys, step and x are device buffers.
        return (self.clip_range, self.coefs.data_ptr(), params)

    def ensure_graph(self) -> None:
        """Capture `step()` unless the graph for these buffers, scalars and weights exists; leaves x, counter as loaded."""
        key = self._graph_key()
        if self.graph is not None and self.graph_key == key:
            return
        self.graph = None
        saved_x, saved_counter = self.x.clone(), self.counter.clone()
        saved_history = None if self.history is None else self.history.clone()
        warm = WARMUP_STEPS if self.graph_key is None else 1  # later captures: already compiled and warm
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warm):
                self.counter.copy_(saved_counter)  # every warm step at the loaded step: S may be < warm
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.counter.copy_(saved_counter)
        if self.engine.pool is None:
            self.engine.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.engine.pool):
            self.step()
        # Capture records without running; warm-up ran for real: restore the loaded state.
        self.x.copy_(saved_x)
        self.counter.copy_(saved_counter)
        if saved_history is not None:
            self.history.copy_(saved_history)
        self.graph, self.graph_key = graph, key
        counters["captures"] += 1

    def run(self, steps: int, on_step=None) -> None:
        """`steps` steps from the loaded state: graph replays on CUDA (when enabled), else eager calls."""
        self.engine.refresh(self.forward)
        if self.opts.cuda_graph:
            self.ensure_graph()
            do = self.graph.replay
        else:
            do = self.step
        self.loop(do, steps, on_step)

    def loop(self, do, steps: int, on_step=None) -> None:
        """The per-step loop alone, set-up done (benchmarks/gpu_check.py times it apart from the whole call)."""
        for i in range(steps):
            do()
            if on_step is not None:
                on_step(i)


def _runner_kind(plan: Plan, opts: EngineOptions) -> tuple:
    """What a runner's buffers and compiled step depend on besides the batch size."""
    t = plan.table
    return (
        plan.shape[1:],
        plan.out_channels,
        plan.device,
        plan.dtype,
        opts,
        t.learned,
        t.history,
        t.history_of,
        plan.labels is not None,
        plan.label_model,
    )


def get_runner(model, plan: Plan, batch: int, opts: EngineOptions | None = None) -> StepRunner:
    """The cached runner for (model, batch, image shape, dtype, options, variance kind), built on first use."""
    opts = resolve_options(plan, model) if opts is None else opts
    eng = _engine_for(model)
    key = (batch, *_runner_kind(plan, opts))
    runner = eng.runners.get(key)
    if runner is None:
        runner = eng.runners[key] = StepRunner(eng, plan, opts, batch)
    return runner


def _chunks(B: int, opts: EngineOptions, prepared: list[int]) -> list[tuple[int, int, int]]:
    """(offset, rows, bucket) per chunk of a batch of B rows."""
    if opts.buckets is not None:
        top = opts.buckets[-1]
        out = []
        for off in range(0, B, top):
            rows = min(top, B - off)
            out.append((off, rows, next(b for b in opts.buckets if b >= rows)))
        return out
    if opts.compile or opts.cuda_graph:  # padding saves a compile or a capture; reuse at most 2x
        fits = [b for b in prepared if B <= b <= 2 * B]
        if fits:
            return [(0, B, min(fits))]
    return [(0, B, B)]


# ---------------------------------------------------------------------------------------------- entry points


def _check(model, plan: Plan) -> None:
    if plan.dtype == torch.float64:
        raise BadValue(
            "dtype must be float32, bfloat16 or float16 for backend='fast' (its update runs in float32); "
            "got torch.float64: use backend='reference'"
        )
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.device != plan.device:
                raise BadValue(f"model is on {p.device} but device={plan.device}; move the model first")
            break


def sample_fast(model, plan: Plan) -> torch.Tensor:
    """backend='fast': float32 [B, C, H, W], row i = global sample plan.start_index + i (module docstring)."""
    _check(model, plan)
    opts = resolve_options(plan, model)
    eng = _engine_for(model)
    coefs, timesteps = plan.table.to(plan.device)
    S = plan.table.num_steps
    ts_host = plan.table.timesteps.tolist()
    B = plan.shape[0]
    prepared = sorted(k[0] for k, r in eng.runners.items() if k[1:] == _runner_kind(plan, opts))
    out = torch.empty(plan.shape, dtype=torch.float32, device=plan.device)
    bar = progress_bar(S * B, "sampling", "img-step", enabled=plan.progress)
    with torch.no_grad():
        for off, rows, bucket in _chunks(B, opts, prepared):
            runner = get_runner(model, plan, bucket, opts)
            runner.load(plan.rows(rows, plan.start_index + off), coefs, timesteps, plan.start_index + off)

            def on_step(i, runner=runner, rows=rows):
                if bar is not None:
                    bar.update(rows)
                if plan.callback is not None:
                    plan.callback(i, ts_host[i], runner.x[:rows])

            runner.run(S, on_step if (bar is not None or plan.callback is not None) else None)
            out[off : off + rows].copy_(runner.x[:rows])
    if bar is not None:
        bar.close()
    return out  # sampling.run checks it is finite, for every backend


def compile_pays(model, plan: Plan) -> bool:
    """Whether to compile when the caller did not say: a pure function of the model's size, the plan and
    what this process already compiled (module docstring, "compile left out")."""
    if plan.device.type == "cuda" or compiled_for(model, plan):
        return True
    if not isinstance(model, torch.nn.Module):
        return False
    params = sum(p.numel() for p in model.parameters())
    B, _, H, W = plan.shape
    return params * H * W * plan.table.num_steps * B > CPU_COMPILE_PAYS


def compiled_for(model, plan: Plan) -> bool:
    """Whether this process holds a compiled forward of `model` for the plan's device and dtype."""
    eng = _ENGINES.get(model) if _weakrefable(model) else _UNCACHEABLE.get(id(model))
    if eng is None:
        return False
    amp = plan.dtype if plan.dtype in HALF_DTYPES else None
    return any(k[0] == amp and k[2] and k[4] == plan.device.type for k in eng.forwards)


run = sample_fast  # the backend table's entry: run(model, plan) -> Tensor


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True

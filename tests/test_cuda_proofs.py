"""CPU proofs of what the CUDA path relies on (DESIGN.md, "Verification without a GPU").

- The step after its first call makes no host sync: a TorchDispatchMode records every aten op of
  `StepRunner.step()`; `.item()` (aten._local_scalar_dense), `nonzero`, boolean-mask indexing and the other
  ops whose result the host must wait for are refused, and so is host data entering the step (a CUDA graph
  would bake a host copy in, or refuse to capture it).
- A test model's tables move with `.to(device)`: on the meta device (a stand-in for CUDA that holds no
  data), every tensor a call touches is on that device.
- The fast backend leaves the caller's model as it was: channels_last and half-precision conv/linear
  weights live in a private copy, refreshed from the caller's weights before every run; pre-cast weights
  give the same bits as autocast casting them on every step, without the casts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from _rounding import propagated_budget
from analytic_model import GaussianEps
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_fast as df
from ddpm_fast import engine
from ddpm_fast.plan import make_plan

CPU = torch.device("cpu")

# Ops whose result the host must wait for (a sync inside a step, an error inside a capture), by aten name.
SYNC_OPS = {
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t), .tolist()
    "is_nonzero",  # `if tensor:`
    "nonzero",  # data-dependent shape
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "equal",  # torch.equal returns a Python bool
    "allclose",
    "repeat_interleave",  # without output_size its length is read on the host
    "bincount",
    "histc",
    "item",
}


class OpProbe(TorchDispatchMode):
    """Records (op name, tensor arguments) of every aten call made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [*args, *kwargs.values()]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        tensors += [t for a in flat if isinstance(a, list | tuple) for t in a if isinstance(t, torch.Tensor)]
        self.calls.append((func, tensors, kwargs))
        return func(*args, **kwargs)


def host_syncs(calls, device: torch.device) -> list[str]:
    """The recorded calls that would make the host wait, or move host data onto `device`."""
    bad = []
    for func, tensors, kwargs in calls:
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            bad.append(f"{func}: waits for the device")
        elif name in ("index", "index_put", "index_put_") and any(t.dtype == torch.bool for t in tensors[1:]):
            bad.append(f"{func}: boolean-mask index (a nonzero inside)")
        elif name == "lift_fresh" and tensors and tensors[0].dim() > 0:
            bad.append(f"{func}: a host tensor {tuple(tensors[0].shape)} created inside the step")
        elif (
            name in ("_to_copy", "copy_") and torch.device(kwargs.get("device") or device).type != device.type
        ):
            bad.append(f"{func}: copies to {kwargs.get('device')}")
        else:
            # a tensor on another device is allowed only as a 0-d host scalar (passed by value to a kernel)
            other = [
                t for t in tensors if t.device.type != device.type and not (t.device == CPU and t.dim() == 0)
            ]
            if other:
                bad.append(f"{func}: reads a {other[0].device} tensor {tuple(other[0].shape)}")
    return bad


def unet(cfg=None, seed=0):
    torch.manual_seed(seed)
    m = df.UNet(cfg or df.UNetConfig.tiny()).eval()
    with torch.no_grad():  # default init leaves GroupNorm at (1, 0): perturb so every weight matters
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


@pytest.fixture(autouse=True)
def _fresh_engine(monkeypatch):
    for env in engine.ENV_SWITCHES.values():
        monkeypatch.delenv(env, raising=False)
    engine.clear_cache()
    yield
    engine.clear_cache()


def _loaded_runner(model, shape, dtype=torch.float32, steps=4, device=CPU, **options):
    options = {"compile": False, "triton": False, **options}
    plan = make_plan(
        model,
        df.Schedule.linear(100),
        shape,
        steps=steps,
        seed=3,
        dtype=dtype,
        device=device,
        options=options,
    )
    runner = engine.get_runner(model, plan, shape[0])
    coefs, ts = plan.table.to(plan.device)
    runner.load(plan, coefs, ts, plan.start_index)
    return runner


# ---------------------------------------------------------------------------------------------- no host sync


_GAUSSIAN = functools.partial(GaussianEps, df.Schedule.linear(100), 0.3, 0.04)
_ON_CUDA = dict(marks=pytest.mark.cuda)


@pytest.mark.parametrize(
    "make_model, dtype, device, triton",
    [
        (unet, torch.float32, "cpu", False),
        (unet, torch.bfloat16, "cpu", False),
        (_GAUSSIAN, torch.float32, "cpu", False),
        # on CUDA a tensor of another device is a copy the graph would bake in: the probe checks that too
        pytest.param(unet, torch.bfloat16, "cuda", False, **_ON_CUDA),
        pytest.param(unet, torch.bfloat16, "cuda", True, **_ON_CUDA),
        pytest.param(_GAUSSIAN, torch.float32, "cuda", True, **_ON_CUDA),
    ],
    ids=[
        "unet-fp32",
        "unet-bf16",
        "gaussian",
        "cuda-unet-bf16-twin",
        "cuda-unet-bf16-triton",
        "cuda-gaussian",
    ],
)
def test_step_after_the_first_makes_no_host_sync(make_model, dtype, device, triton):
    model = make_model().to(device)
    runner = _loaded_runner(model, (2, 3, 8, 8), dtype, device=torch.device(device), triton=triton)
    with torch.no_grad():
        runner.step()  # the first call checks the model's output once (a sync by design)
        with OpProbe() as probe:
            runner.step()
    assert len(probe.calls) > (5 if triton else 20)  # the probe saw the U-Net (and the twin's update)
    assert host_syncs(probe.calls, runner.device) == []
    assert runner.counter.tolist() == [2]


def test_the_sync_probe_sees_an_item_and_a_mask():
    """The probe can fail: a model that reads a value on the host or masks by value is caught."""

    def item_model(x, t):
        return x * float(t.float().mean())

    def mask_model(x, t):
        return x - x[x > 0].mean()  # the mask's length is read on the host

    for model, what in ((item_model, "_local_scalar_dense"), (mask_model, "boolean-mask")):
        runner = _loaded_runner(model, (2, 1, 4, 4))
        with torch.no_grad():
            runner.step()
            with OpProbe() as probe:
                runner.step()
        found = host_syncs(probe.calls, runner.device)
        assert any(what in f for f in found), (what, found)


# ---------------------------------------------------------------------------------------------- tables move


def test_analytic_model_table_moves_with_the_module():
    """On the meta device a host table would show as a cpu tensor read (the old GaussianEps indexed a
    CPU float64 table with the device timestep and copied the result over, inside the step)."""
    model = GaussianEps(df.Schedule.linear(100), 0.3, 0.04).to("meta")
    assert {b.device.type for b in model.buffers()} == {"meta"}
    x = torch.empty(2, 3, 4, 4, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    with OpProbe() as probe:
        out = model(x, t)
    assert out.device.type == "meta" and out.shape == x.shape
    assert host_syncs(probe.calls, torch.device("meta")) == []


def test_the_device_probe_sees_a_host_table():
    table = torch.linspace(0.1, 0.9, 100, dtype=torch.float64)

    def host_table_model(x, t):
        return x * table[t.cpu()].to(x.device).reshape(-1, 1, 1, 1)

    x = torch.empty(2, 3, 4, 4, device="meta")
    with OpProbe() as probe:
        try:
            host_table_model(x, torch.zeros(2, dtype=torch.int64, device="meta"))
        except (NotImplementedError, RuntimeError):
            pass  # meta tensors hold no data to copy; the probe has recorded the attempt
    assert host_syncs(probe.calls, torch.device("meta")) != []


# ---------------------------------------------------------------------------------------------- caller's model


def _caller_state(model):
    return [
        (p.data_ptr(), p.dtype, p.is_contiguous(), p.is_contiguous(memory_format=torch.channels_last))
        for p in model.parameters()
    ]


def test_channels_last_runs_a_private_copy_and_leaves_the_callers_model():
    """channels_last applies on CUDA only (resolve_options), so the option is forced here."""
    model = unet()
    before = _caller_state(model)
    weight = model.conv_in.weight.detach().clone()
    shape = (2, 3, 16, 16)
    s = df.Schedule.linear(100)
    plan = make_plan(model, s, shape, steps=4, seed=3, options={"compile": False, "triton": False})
    opts = dataclasses.replace(engine.resolve_options(plan, model), channels_last=True)
    runner = engine.get_runner(model, plan, shape[0], opts)
    coefs, ts = plan.table.to(CPU)
    with torch.no_grad():
        runner.load(plan, coefs, ts, 0)
        runner.run(plan.table.num_steps)
    assert _caller_state(model) == before  # same storage, dtype and NCHW layout
    assert model.conv_in.weight.is_contiguous() and torch.equal(model.conv_in.weight, weight)
    call = runner.engine.calls[id(runner.forward)]
    assert call.model is not model and call.model.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    model64 = copy.deepcopy(model).double()
    truth = df.sample(model64, s, shape, steps=4, seed=3, backend="reference", dtype=torch.float64)
    ref = df.sample(model, s, shape, steps=4, seed=3, backend="reference")

    def channels_last_minus_nchw(x, t):  # what the runner's private forward changes at the chain's state
        tt = torch.full((x.shape[0],), t)
        with torch.no_grad():
            return call.forward(x, tt).float() - model(x, tt)

    # STYLE 6: channels_last convolutions sum in another order; the float32 reference's chain moved by
    # that difference at each of its states, plus the update's rounding budget (tests/_rounding.py)
    budget = propagated_budget(model64, s, shape, truth, channels_last_minus_nchw, steps=4, seed=3)
    assert budget < 0.1 * truth.abs().max().item(), budget
    assert (runner.x.double() - ref.double()).abs().max().item() <= budget


def _weight_casts_per_step(model, shape) -> int:
    """aten._to_copy calls a bf16 step makes on the caller's conv/linear weights (autocast's casts)."""
    engine.clear_cache()
    runner = _loaded_runner(model, shape, torch.bfloat16)
    weights = {p.data_ptr() for p in model.parameters() if p.dim() > 1}
    with torch.no_grad():
        runner.step()
        with OpProbe() as probe:
            runner.step()
    return sum(
        1
        for func, tensors, _ in probe.calls
        if func.__name__.startswith("_to_copy") and tensors and tensors[0].data_ptr() in weights
    )


def test_half_weights_are_cast_once_and_give_autocasts_bits(monkeypatch):
    """bf16: conv and linear weights pre-cast in a private copy, GroupNorm float32; the output equals autocast
    casting the caller's float32 weights on every step, bit for bit, and a step casts no weight."""
    model = unet()
    before = _caller_state(model)
    shape = (2, 3, 16, 16)
    s = df.Schedule.linear(100)
    kw = dict(steps=4, seed=5, backend="fast", compile=False, triton=False, dtype=torch.bfloat16)
    out = df.sample(model, s, shape, **kw)
    assert _caller_state(model) == before
    (eng,) = engine._ENGINES.values()
    (call,) = eng.calls.values()
    assert call.model.conv_in.weight.dtype == torch.bfloat16
    assert call.model.time_mlp[0].weight.dtype == torch.bfloat16
    assert call.model.norm_out.weight.dtype == torch.float32
    private_casts = _weight_casts_per_step(model, shape)

    monkeypatch.setattr(engine, "_private_weights", lambda *a: None)  # autocast over the caller's weights
    engine.clear_cache()
    assert torch.equal(out, df.sample(model, s, shape, **kw))
    shared_casts = _weight_casts_per_step(model, shape)
    assert private_casts == 0 and shared_casts >= 20, (private_casts, shared_casts)


def test_private_weights_follow_the_callers_updates():
    model = unet()
    shape = (1, 3, 16, 16)
    s = df.Schedule.linear(100)
    kw = dict(steps=3, seed=1, backend="fast", compile=False, triton=False, dtype=torch.bfloat16)
    a = df.sample(model, s, shape, **kw)
    with torch.no_grad():
        model.conv_out.bias.add_(0.5)  # e.g. an optimizer step between two sampling calls
    b = df.sample(model, s, shape, **kw)
    engine.clear_cache()
    fresh = df.sample(model, s, shape, **kw)
    assert not torch.equal(a, b)
    assert torch.equal(b, fresh)
    model.train()
    df.sample(model, s, shape, **kw)
    (call,) = next(iter(engine._ENGINES.values())).calls.values()
    assert all(m.training for m in call.model.modules())


def test_the_private_copy_keeps_the_cache_weak_on_the_model():
    import gc

    model = unet()
    df.sample(model, df.Schedule.linear(100), (1, 3, 16, 16), steps=2, backend="fast", compile=False,
              triton=False, dtype=torch.bfloat16)  # fmt: skip
    assert len(engine._ENGINES) == 1
    del model
    gc.collect()
    assert len(engine._ENGINES) == 0


@pytest.mark.parametrize("world, local_rank, current, want", [(2, 1, 0, 1), (1, 0, 3, 3)])
def test_bare_cuda_under_torchrun_is_cuda_local_rank(monkeypatch, world, local_rank, current, want):
    """generate()/make_plan from Python under torchrun: device="cuda" is cuda:LOCAL_RANK, as the CLI reads it.

    CUDA is faked (is_available, current_device); the plan is built, never run, so nothing touches a GPU.
    Outside torchrun (WORLD_SIZE 1) a bare "cuda" stays the current device.
    """
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    s = df.Schedule.linear(100)
    model = GaussianEps(s, 0.3, 0.04)
    plan = make_plan(model, s, (1, 1, 2, 2), steps=4, seed=3, device="cuda")
    assert plan.device == torch.device("cuda", want)


def test_a_private_weight_copy_follows_its_model_to_another_device():
    """A forward (and its private weight copy) is per device with its index, and refresh() remakes a copy
    whose source's tensors moved: a model moved to cuda:1 never runs with weights left on cuda:0."""
    model = df.UNet(df.UNetConfig.tiny()).eval()
    eng = engine._engine_for(model)
    opts = engine.EngineOptions(
        compile=False,
        compile_mode="default",
        cuda_graph=False,
        triton=False,
        channels_last=True,
        buckets=None,
    )
    here = eng.forward(None, opts, torch.device("cpu"))
    assert eng.forward(None, opts, torch.device("cpu")) is here
    assert eng.forward(None, opts, torch.device("cuda", 1)) is not eng.forward(
        None, opts, torch.device("cuda", 0)
    )
    call = eng.calls[id(here)]
    copy_before = call.model
    assert copy_before is not model  # channels_last: a private copy
    call.refresh()
    assert call.model is copy_before  # same device and shapes: refreshed in place
    name, shape, _ = call.layout[0]
    call.layout[0] = (
        name,
        shape,
        torch.device("meta"),
    )  # as if the copy were made while the model was elsewhere
    call.refresh()
    assert call.model is not copy_before and call.layout[0][2] == torch.device("cpu")
    engine.clear_cache()


# Tensor factories that, called in a traced graph with no device argument, make a host tensor at run time
_HOST_FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.full, torch.zeros, torch.ones}


@pytest.mark.parametrize("history", [0, 2], ids=["ddpm", "history"])
def test_the_compiled_twin_holds_no_host_constant(history):
    """The graph torch.compile(step_torch, fullgraph=True) captures (as the engine's compiled twin runs it,
    triton=False on CUDA), read off dynamo's FX graph on CPU: no tensor attribute (a constant the graph would
    carry on the device it was traced on) and no factory call without a device (a CPU tensor made at run time,
    a host-to-device copy under CUDA-graph capture). The noise's float32 scale and 2 pi are Python floats."""
    from ddpm_fast.kernels import make_step_counter, step_args, step_torch
    from ddpm_fast.steps import COLUMNS

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(step_torch, backend=backend, fullgraph=True)
    shape = (3, 1, 5, 7)
    x, m = torch.randn(shape), torch.randn(shape)
    coefs = torch.rand(4, len(COLUMNS) + history) + 0.1
    ts = torch.tensor([7, 5, 3, 0])
    counter, keys = make_step_counter(1), torch.tensor([3, 2], dtype=torch.int64)
    kw = dict(seed=keys[0:1], start_index=keys[1:2], clip_range=1.0)
    if history:
        kw["history"] = torch.zeros((history, *shape))
    got = compiled(x, m, step_args(x, coefs, ts, **kw), counter, advance=True)
    counter.fill_(1)
    if history:
        kw["history"] = torch.zeros((history, *shape))
    assert torch.equal(
        got, step_torch(x, m, step_args(x, coefs, ts, **kw), counter, advance=True)
    )  # the twin
    (gm,) = graphs
    consts = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert not consts, f"tensor constants in the compiled step: {consts}"
    host = [
        n.format_node()
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _HOST_FACTORIES and n.kwargs.get("device") is None
    ]
    assert not host, f"factory calls without a device (host tensors at run time): {host}"
    torch._dynamo.reset()

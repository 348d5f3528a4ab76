"""The fast backend against the reference sampler, with the same counter-based noise.

Tolerances (STYLE.md 6). Both backends evaluate the same float32 formulas; they may differ by rounding only
(the update's op order, FMA contraction in the fused kernel, batch-dependent conv blocking, autocast), and
the reverse chain amplifies a rounding difference as it amplifies any other. So a fast run is held to the
float32 reference by the chain's own budget (tests/_rounding.py `propagated_budget`: each step's largest
rounding difference, or the two forwards' measured difference, carried to the output by the float64 chain
itself), which holds whatever order either side's vector kernels sum in; by the triangle inequality the
fast run is then no further from float64 than the reference plus that budget. The reference in float32 is
itself about 1e-6..1e-4 from float64 on these chains; the budgets are 1e-5..5e-4.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace

import pytest
import torch
from _rounding import max_diff, propagated_budget
from analytic_model import GaussianEps

import ddpm_fast as df
from ddpm_fast import engine, sampling
from ddpm_fast.plan import make_plan
from ddpm_fast.reference import run as sample_reference
from ddpm_fast.sampling import auto_rule, choose_backend

CPU = torch.device("cpu")


def reference(model, schedule, shape, dtype=torch.float32, **kw):
    """The oracle: df.sample(backend="reference") with the model cast to `dtype` (float64 for the truth)."""
    if isinstance(model, torch.nn.Module) and dtype != torch.float32:
        model = _cast(model, dtype)
    return df.sample(model, schedule, shape, backend="reference", dtype=dtype, **kw).double()


def _cast(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def fast(model, schedule, shape, **kw):
    kw.setdefault("compile", False)
    return df.sample(model, schedule, shape, backend="fast", **kw)


def unet(cfg, seed=0):
    torch.manual_seed(seed)
    m = df.UNet(cfg).eval()
    with torch.no_grad():  # default init leaves GroupNorm at (1, 0): perturb so every weight matters
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def assert_twin(out, ref32, model, schedule, shape, truth, forward_diff=None, share=0.1, **kw):
    """out and ref32, two float32 runs of one chain, differ by at most its rounding budget (module docstring).
    The budget must stay below `share` of the images' range, or the check would say nothing about them (a
    cosine schedule's SRA of 2e4 at t = 999 makes x0 uncertain to 5e-3 in float32 where it is not clipped)."""
    budget = propagated_budget(_cast(model, torch.float64), schedule, shape, truth, forward_diff, **kw)
    assert budget < share * truth.abs().max().item(), budget
    assert max_diff(out, ref32) <= budget, (max_diff(out, ref32), budget)
    return budget


def engine_minus_eager(model):
    """forward_diff for assert_twin: the fast backend's own forward for `model` (compiled, autocast,
    channels_last, private weights: whatever its run used) against the model's eager float32 forward."""
    (fwd,) = engine._engine_for(model).forwards.values()

    def diff(x, t):
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        with torch.no_grad():
            return fwd(x, tt).float() - model(x, tt)

    return diff


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _fresh_engine(monkeypatch):
    monkeypatch.delenv("DDPM_FAST_NO_COMPILE", raising=False)
    monkeypatch.delenv("DDPM_FAST_NO_CUDA_GRAPH", raising=False)
    monkeypatch.delenv("DDPM_FAST_NO_TRITON", raising=False)
    engine.clear_cache()
    engine._logged.clear()
    yield
    engine.clear_cache()


# ---------------------------------------------------------------------------------------------- fp32 == reference


@pytest.mark.slow
def test_fp32_equals_reference_1000_steps_tiny():
    """1000 U-Net steps each for fast, reference float32 and float64 (the issue's full-length check): the tiny
    preset on 8x8 images (any multiple of 2 runs), a quarter of the 16x16 cost: about 40 s of CPU time."""
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(1000)
    shape = (1, 3, 8, 8)
    kw = dict(seed=3, start_index=5)
    truth = reference(model, s, shape, torch.float64, **kw)
    ref32 = reference(model, s, shape, **kw)
    out = fast(model, s, shape, triton=False, **kw)
    assert out.dtype == torch.float32 and out.shape == shape
    assert 0 < max_err(ref32, truth) < 1e-2
    assert_twin(out, ref32, model, s, shape, truth, **kw)


def test_fp32_equals_reference_respaced_cifar10_architecture_triton_interpreter():
    """The cifar10 architecture narrowed to 16 channels (same blocks, attention at 16x16), 10 respaced steps,
    fused update through the Triton interpreter when TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
    cfg = df.UNetConfig.cifar10(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, dropout=0.0)
    model = unet(cfg)
    s = df.Schedule.linear(1000)
    shape = (1, 3, 32, 32)
    kw = dict(steps=10, seed=1, start_index=7)
    truth = reference(model, s, shape, torch.float64, **kw)
    ref32 = reference(model, s, shape, **kw)
    out = fast(model, s, shape, **kw)
    assert_twin(out, ref32, model, s, shape, truth, **kw)


@pytest.mark.parametrize(
    "method, variance, eta, out_channels",
    [("ddpm", "fixed_large", 0.0, 3), ("ddpm", "learned_range", 0.0, 6), ("ddim", "fixed_small", 0.5, 3)],
)
def test_methods_and_variances_match_reference(method, variance, eta, out_channels):
    model = unet(df.UNetConfig.tiny(out_channels=out_channels))
    # linear: the cosine schedule's SRA of 2e4 at t = 999 leaves float32's x0 uncertain to 5e-3 in either
    # order, and the budget that carries it (0.1 of the images) would say little; linear's 157 keeps it 1e-4
    s = df.Schedule.linear(1000)
    shape = (2, 3, 16, 16)
    kw = dict(steps=4, seed=9, method=method, variance=variance, eta=eta)
    truth = reference(model, s, shape, torch.float64, **kw)
    assert_twin(
        fast(model, s, shape, triton=False, **kw),
        reference(model, s, shape, **kw),
        model,
        s,
        shape,
        truth,
        **kw,
    )


def test_runner_step_is_an_ordinary_function_of_static_buffers():
    """What a CUDA graph captures: runner.step() called S times eagerly is the reference run."""
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(1000)
    plan = make_plan(model, s, (2, 3, 16, 16), steps=6, seed=4, start_index=3, options={"compile": False})
    runner = engine.get_runner(model, plan, 2)
    coefs, ts = plan.table.to(CPU)
    runner.load(plan, coefs, ts, plan.start_index)
    for _ in range(plan.table.num_steps):
        runner.step()
    assert runner.counter.item() == plan.table.num_steps
    with torch.no_grad():
        ref = sample_reference(model, replace(plan, options={}))
    kw = dict(steps=6, seed=4, start_index=3)
    assert_twin(
        runner.x, ref, model, s, plan.shape, reference(model, s, plan.shape, torch.float64, **kw), **kw
    )


# ---------------------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize(
    "dtype, opts", [(torch.bfloat16, {}), (torch.float16, {}), (torch.bfloat16, {"channels_last": True})]
)
def test_half_is_the_float32_chain_moved_by_the_autocast_forward(dtype, opts):
    """U-Net under autocast, update and state in float32: the float32 reference's chain, moved by what the
    autocast forward changes at each of its states (the budget's forward part: bf16 and fp16 keep 8 and 11
    mantissa bits, so that difference is 1e-3..1e-2 and dwarfs the update's rounding). The conv and linear
    weights run from a private copy cast once; channels_last, asked for, also on CPU."""
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(1000)
    shape = (1, 3, 16, 16)
    kw = dict(steps=8, seed=2)
    truth = reference(model, s, shape, torch.float64, **kw)
    ref32 = reference(model, s, shape, **kw)
    out = fast(model, s, shape, dtype=dtype, triton=False, **opts, **kw)
    assert out.dtype == torch.float32
    (call,) = engine._engine_for(model).calls.values()
    conv = next(m for m in call.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == dtype and next(model.parameters()).dtype == torch.float32
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == bool(opts.get("channels_last"))
    assert_twin(out, ref32, model, s, shape, truth, engine_minus_eager(model), share=0.3, **kw)
    assert max_err(out, truth) > 10 * max_err(ref32, truth)  # autocast really ran in `dtype`


# ---------------------------------------------------------------------------------------------- batch independence


def test_sample_n_is_the_same_in_batches_of_1_7_16():
    s = df.Schedule.linear(200)
    model = GaussianEps(s, 0.3, 0.04)
    shape = (16, 3, 5, 7)  # odd image: N = 105 is no multiple of 4
    kw = dict(steps=8, seed=21, start_index=100)
    full = fast(model, s, shape, triton=False, **kw)
    for B in (1, 7):
        for off in (0, 9):
            part = fast(model, s, (B, 3, 5, 7), triton=False, steps=8, seed=21, start_index=100 + off)
            assert torch.equal(part, full[off : off + B]), (B, off)
    assert torch.equal(full, fast(model, s, shape, triton=False, **kw))  # deterministic
    assert not torch.equal(full, fast(model, s, shape, triton=False, steps=8, seed=22, start_index=100))


def test_padding_to_a_bucket_leaves_real_rows_alone():
    s = df.Schedule.linear(200)
    model = GaussianEps(s, 0.3, 0.04)
    kw = dict(steps=6, seed=5, start_index=2, triton=False)
    plain = fast(model, s, (5, 1, 4, 4), **kw)
    padded = fast(model, s, (5, 1, 4, 4), buckets=(8,), **kw)  # 3 padded rows
    split = fast(model, s, (5, 1, 4, 4), buckets=(1, 2), **kw)  # chunks of 2, 2, 1
    assert torch.equal(plain, padded)
    assert torch.equal(plain, split)
    sizes = sorted(k[0] for e in engine._ENGINES.values() for k in e.runners)
    assert sizes == [1, 2, 5, 8]


def test_unet_rows_agree_across_batch_sizes():
    """A real U-Net: rows agree to conv rounding (its algorithm depends on the batch size), not bit for bit."""
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(1000)
    kw = dict(steps=3, seed=8)
    full = fast(model, s, (7, 3, 16, 16), triton=False, **kw)
    one = fast(model, s, (1, 3, 16, 16), start_index=6, triton=False, **kw)

    def batch7_minus_batch1(x, t):  # one row's forward inside a 7-row batch against alone (rows never mix)
        with torch.no_grad():
            return model(x.expand(7, -1, -1, -1), torch.full((7,), t))[6:] - model(x, torch.full((1,), t))

    one_kw = dict(kw, start_index=6)
    truth = reference(model, s, (1, 3, 16, 16), torch.float64, **one_kw)
    assert_twin(one, reference(model, s, (1, 3, 16, 16), **one_kw), model, s, (1, 3, 16, 16), truth, **one_kw)
    assert_twin(full[6:], one, model, s, (1, 3, 16, 16), truth, batch7_minus_batch1, **one_kw)


# ---------------------------------------------------------------------------------------------- reuse and cache


def test_second_call_reuses_the_runner_and_a_smaller_batch_pads():
    s = df.Schedule.linear(100)
    model = GaussianEps(s, 0.0, 1.0)
    before = engine.counters.copy()
    fast(model, s, (4, 1, 4, 4), steps=3, cuda_graph=True)
    fast(model, s, (4, 1, 4, 4), steps=5, seed=3)  # other steps and seed: same runner
    fast(model, s, (3, 1, 4, 4), steps=5, compile=False)  # 3 rows: no compile or graph, runs its own size
    grown = engine.counters - before
    assert grown["runners"] == 2 and grown["compiles"] == 0 and grown["captures"] == 0


def test_a_sharded_run_keeps_one_runner_and_one_graph_key(monkeypatch):
    """Ten shards (a new start_index each), one batch of 20 in ten chunks, ten seeds, all in one bucket: the
    keys live in a device tensor the runner refills, so one runner and one graph key (on CUDA: one capture)
    serve them all, and every row is still its own global sample."""
    s = df.Schedule.linear(100)
    model = GaussianEps(s, 0.2, 0.1)
    graph_keys = set()
    load = engine.StepRunner.load

    def load_and_key(self, *args):
        load(self, *args)
        graph_keys.add(self._graph_key())

    monkeypatch.setattr(engine.StepRunner, "load", load_and_key)
    shape, kw = (2, 1, 3, 5), dict(steps=3, buckets=(2,))
    before = engine.counters.copy()
    shards = torch.cat([fast(model, s, shape, seed=5, start_index=2 * k, **kw) for k in range(10)])
    whole = fast(model, s, (20, *shape[1:]), seed=5, **kw)
    seeds = [fast(model, s, shape, seed=k, start_index=7, **kw) for k in range(10)]
    grown = engine.counters - before
    assert grown["runners"] == 1 and len(graph_keys) == 1 and grown["captures"] == 0
    assert torch.equal(shards, whole)
    for got, seed, start in [(shards, 5, 0), *((seeds[k], k, 7) for k in range(10))]:
        kw_ref = dict(steps=3, seed=seed, start_index=start)
        truth = reference(model, s, got.shape, torch.float64, **kw_ref)
        assert_twin(got, reference(model, s, got.shape, **kw_ref), model, s, got.shape, truth, **kw_ref)


def test_cache_is_weak_on_the_model():
    model = unet(df.UNetConfig.tiny())
    fast(model, df.Schedule.linear(100), (1, 3, 16, 16), steps=2, triton=False)
    assert len(engine._ENGINES) == 1
    del model
    gc.collect()
    assert len(engine._ENGINES) == 0


def test_weight_updates_are_seen_by_the_cached_step():
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(100)
    kw = dict(steps=3, seed=1, triton=False)
    a = fast(model, s, (1, 3, 16, 16), **kw)
    with torch.no_grad():
        model.conv_out.bias.add_(0.5)
    b = fast(model, s, (1, 3, 16, 16), **kw)
    truth = reference(model, s, (1, 3, 16, 16), steps=3, seed=1)
    assert not torch.allclose(a, b)
    assert max_err(b, truth) < 1e-5


@pytest.mark.slow
def test_compiled_step_matches_and_is_compiled_once():
    """~40 s cold (inductor on 2 cores; the FX graph cache makes reruns faster)."""
    torch._dynamo.reset()
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(1000)
    shape = (2, 3, 16, 16)
    kw = dict(steps=6, seed=6)
    before = engine.counters.copy()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = df.sample(model, s, shape, backend="fast", compile=True, triton=False, **kw)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    assert compiled >= 2  # the U-Net and the update
    again = df.sample(model, s, shape, backend="fast", compile=True, triton=False, start_index=1, **kw)
    third = df.sample(model, s, shape, backend="fast", compile=True, triton=False, **dict(kw, seed=7))
    # seed and start_index reach the compiled update as tensors: no recompile, and no silent eager fallback
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == compiled
    assert not any(twin.failed for twin in engine._TWINS.values())
    grown = engine.counters - before
    assert grown["compiles"] == 2 and grown["runners"] == 1
    # torch.compile reorders reductions (GroupNorm, softmax) and fuses conv epilogues: each run is the
    # float32 reference's chain moved by what the compiled forward changes at its states (assert_twin; the
    # test's own calls of that forward come after the count, as they may add a graph for their inputs)
    for got, run_kw in ((out, kw), (again, dict(kw, start_index=1)), (third, dict(kw, seed=7))):
        truth = reference(model, s, shape, torch.float64, **run_kw)
        ref32 = reference(model, s, shape, **run_kw)
        assert_twin(got, ref32, model, s, shape, truth, engine_minus_eager(model), **run_kw)


@pytest.mark.slow
def test_frozen_forward_thaws_when_weights_change(caplog):
    """freeze=True folds the weights into the compiled graph as constants: an unchanged model compiles once, and
    a run after the caller's weights changed samples the new weights through the ordinary compiled forward,
    with one logged line. ~70 s (a frozen and a plain compile of the tiny U-Net, the compiled update, 2 cores)."""
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(1000)
    shape = (2, 3, 16, 16)
    kw = dict(steps=4, seed=3)
    before = engine.counters.copy()
    a = df.sample(model, s, shape, backend="fast", freeze=True, triton=False, **kw)
    again = df.sample(model, s, shape, backend="fast", freeze=True, triton=False, **kw)
    assert torch.equal(a, again)
    assert (engine.counters - before)["compiles"] == 2  # the frozen U-Net and the update, once
    (fwd,) = engine._engine_for(model).forwards.values()
    assert isinstance(fwd, engine._Frozen) and not fwd.thawed
    truth = reference(model, s, shape, torch.float64, **kw)
    assert_twin(a, reference(model, s, shape, **kw), model, s, shape, truth, engine_minus_eager(model), **kw)
    with torch.no_grad():
        model.conv_out.bias.add_(0.5)
    with caplog.at_level(logging.WARNING, logger="ddpm_fast"):
        b = df.sample(model, s, shape, backend="fast", freeze=True, triton=False, **kw)
        df.sample(model, s, shape, backend="fast", freeze=True, triton=False, **kw)
    assert fwd.thawed and (engine.counters - before)["compiles"] == 3
    assert sum("compiling it unfrozen" in r.getMessage() for r in caplog.records) == 1
    assert max_err(a, b) > 0.1  # the new bias moved the images: the old constants did not run
    truth = reference(model, s, shape, torch.float64, **kw)
    assert_twin(b, reference(model, s, shape, **kw), model, s, shape, truth, engine_minus_eager(model), **kw)


def test_a_frozen_forward_sees_every_buffer_change():
    """The weights a frozen graph folds in are every parameter and buffer, persistent or not (what refresh()
    copies): a change of any of them thaws the forward. No compile runs: check() only hashes and decides."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)
            self.register_buffer("scale", torch.ones(1), persistent=False)

        def forward(self, x, t):
            return self.conv(x) * self.scale

    model = Scaled()
    fwd = engine._Frozen(engine._UNetCall(model, None, False, "cpu"), "default")
    fwd.check()
    fwd.check()
    assert not fwd.thawed
    with torch.no_grad():
        model.scale.fill_(2.0)
    fwd.check()
    assert fwd.thawed


def test_freeze_option_is_a_compile_setting():
    plan = make_plan(
        lambda x, t: x, df.Schedule.linear(10), (1, 1, 2, 2), device="cpu", options={"freeze": True}
    )
    opts = engine.resolve_options(plan)
    assert opts.freeze and opts.compile  # asking for freezing asks for the compile
    for dtype in (torch.float32, torch.bfloat16):  # left out: off, compiled or not
        plan = make_plan(lambda x, t: x, df.Schedule.linear(10), (1, 1, 2, 2), dtype=dtype)
        assert not engine.resolve_options(replace(plan, options={"compile": True})).freeze
    for bad, exc, match in [
        (dict(freeze=True, compile=False), ValueError, "^freeze=True compiles the U-Net; got compile=False$"),
        (
            dict(freeze=True, compile_mode="max-autotune"),
            ValueError,
            "^freeze=True compiles with compile_mode=",
        ),
        (dict(freeze="yes"), TypeError, "^freeze must be a bool; got 'yes'$"),
    ]:
        plan = make_plan(lambda x, t: x, df.Schedule.linear(10), (1, 1, 2, 2), device="cpu", options=bad)
        with pytest.raises(exc, match=match):
            engine.resolve_options(plan)
    plan = make_plan(lambda x, t: x, df.Schedule.linear(10), (1, 1, 2, 2), options={"freeze": True})
    with pytest.raises(ValueError, match="^freeze=True needs a torch.nn.Module .*; got function$"):
        engine.resolve_options(plan, model=lambda x, t: x)


# ---------------------------------------------------------------------------------------------- switches


def test_triton_interpreter_path_equals_twin():
    s = df.Schedule.linear(100)
    model = GaussianEps(s, 0.2, 0.1)
    shape = (2, 3, 5, 3)  # N = 45: a partial counter lane
    kw = dict(steps=4, seed=13, start_index=1)
    plan = make_plan(model, s, shape, **kw)
    if not engine.resolve_options(plan).triton:
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1 with triton installed")
    tri = fast(model, s, shape, **kw)
    twin = fast(model, s, shape, triton=False, **kw)
    assert max_err(tri, twin) < 1e-5  # float32 log/sqrt/cos/sin rounding of the same Philox integers


@pytest.mark.parametrize("name", ["compile", "cuda_graph", "triton"])
def test_env_switch_turns_option_off_and_logs_once(monkeypatch, caplog, name):
    monkeypatch.setenv(engine.ENV_SWITCHES[name], "1")
    plan = make_plan(lambda x, t: x, df.Schedule.linear(10), (1, 1, 2, 2), device="cpu")
    with caplog.at_level(logging.WARNING, logger="ddpm_fast"):
        for _ in range(3):
            opts = engine.resolve_options(plan)
    assert getattr(opts, name) is False
    hits = [r for r in caplog.records if engine.ENV_SWITCHES[name] in r.getMessage()]
    assert len(hits) == 1


def test_cuda_graph_on_cpu_is_logged_once(caplog):
    s = df.Schedule.linear(10)
    model = GaussianEps(s, 0.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="ddpm_fast"):
        fast(model, s, (1, 1, 2, 2), cuda_graph=True, triton=False)
        fast(model, s, (1, 1, 2, 2), cuda_graph=True, triton=False)
    assert sum("CUDA only" in r.getMessage() for r in caplog.records) == 1


def test_compile_failure_falls_back_with_one_log(monkeypatch, caplog):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("simulated inductor failure\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    s = df.Schedule.linear(50)
    model = GaussianEps(s, 0.0, 1.0)
    kw = dict(steps=4, seed=2, triton=False)
    with caplog.at_level(logging.WARNING, logger="ddpm_fast"):
        out = df.sample(model, s, (2, 1, 3, 3), backend="fast", compile=True, **kw)
        df.sample(model, s, (2, 1, 3, 3), backend="fast", compile=True, **kw)
    assert torch.equal(out, fast(model, s, (2, 1, 3, 3), **kw))
    msgs = [r.getMessage() for r in caplog.records if "simulated inductor failure" in r.getMessage()]
    assert len(msgs) == 2  # once for the U-Net, once for the update
    assert all("second line" not in m for m in msgs)


def test_model_errors_are_not_swallowed_by_the_compile_fallback():
    def bad(x, t):
        return x[:, :1]

    with pytest.raises(ValueError, match="model output must have shape"):
        df.sample(bad, df.Schedule.linear(10), (1, 3, 2, 2), backend="fast", compile=False)


# ---------------------------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(compiel=True), TypeError, "compiel"),
        (dict(compile="yes"), TypeError, "compile must be a bool"),
        (dict(compile_mode="fastest"), ValueError, "compile_mode"),
        (dict(buckets=[0, 4]), ValueError, "buckets"),
        (dict(buckets="big"), TypeError, "buckets"),
        (dict(dtype=torch.float64), ValueError, "float64"),
    ],
)
def test_bad_options_name_themselves(kw, exc, match):
    s = df.Schedule.linear(10)
    with pytest.raises(exc, match=match):
        df.sample(GaussianEps(s, 0.0, 1.0), s, (1, 1, 2, 2), backend="fast", **kw)


def test_nan_model_is_reported():
    with pytest.raises(ValueError, match="NaN"):
        fast(lambda x, t: x * float("nan"), df.Schedule.linear(10), (1, 1, 2, 2))


def test_callback_sees_every_step_in_order():
    s = df.Schedule.linear(100)
    model = GaussianEps(s, 0.0, 1.0)
    seen = []
    out = fast(
        model,
        s,
        (3, 1, 4, 4),
        steps=5,
        triton=False,
        buckets=(4,),
        callback=lambda i, t, x: seen.append((i, t, x.shape[0], x.clone())),
    )
    plan = make_plan(model, s, (3, 1, 4, 4), steps=5)
    assert [(i, t) for i, t, _, _ in seen] == list(enumerate(plan.table.timesteps.tolist()))
    assert all(b == 3 for _, _, b, _ in seen)  # padded rows are not shown
    assert torch.equal(seen[-1][3], out)


# ---------------------------------------------------------------------------------------------- auto


def test_auto_rule(monkeypatch):
    s = df.Schedule.linear(20)
    model = GaussianEps(s, 0.0, 1.0)
    net = unet(df.UNetConfig.tiny())

    def plan(m=model, **kw):
        return make_plan(m, s, (2, 1, 4, 4), device="cpu", **kw)

    assert choose_backend(model, plan(dtype=torch.float64)) == "reference"
    assert choose_backend(model, plan(generator=torch.Generator())) == "reference"
    assert choose_backend(model, plan()) == "reference"  # not a module: nothing to compile
    assert choose_backend(net, plan(net)) == "reference"  # microseconds of work: never compile
    p = plan(net, dtype=torch.bfloat16)
    assert choose_backend(net, p) == "fast" and p.options == {}  # decided, nothing written into the plan
    assert engine.resolve_options(p, net).compile is False  # ... and the fast backend does not compile it
    assert choose_backend(net, plan(net, options={"compile": False})) == "fast"  # fast options: fast
    assert choose_backend("model.onnx", plan()) == "onnx"
    monkeypatch.setattr(engine, "CPU_COMPILE_PAYS", 0.0)  # any run pays: compile
    assert choose_backend(net, plan(net)) == "fast" and engine.resolve_options(plan(net), net).compile
    # pure: the same answer every time for the same inputs (every torchrun rank agrees without a broadcast)
    assert len({choose_backend(net, plan(net)) for _ in range(5)}) == 1


def test_auto_rule_openvino(monkeypatch):
    """CPU bfloat16 on our U-Net goes to openvino when the extra is installed with bf16 kernels and the run pays
    for the export; the machine's two facts are arguments, so every case runs on any machine."""
    s = df.Schedule.linear(20)
    net = unet(df.UNetConfig.tiny())

    def plan(m=net, **kw):
        return make_plan(m, s, (2, 3, 16, 16), device="cpu", **dict(dict(dtype=torch.bfloat16), **kw))

    both = dict(openvino=True, openvino_bf16=True)
    assert auto_rule(net, plan(), **both) == (
        "fast",
        None,
    )  # 20 steps of a tiny U-Net: the export would not pay
    monkeypatch.setattr(sampling, "OPENVINO_PAYS", 0.0)  # any run pays
    assert auto_rule(net, plan(), **both) == ("openvino", None)
    assert auto_rule(net, plan(), openvino=False, openvino_bf16=False) == (
        "fast",
        None,
    )  # no extra: as before
    backend, note = auto_rule(net, plan(), openvino=True, openvino_bf16=False)
    assert backend == "fast" and "no bf16 instructions" in note  # a fallback to log
    assert auto_rule(net, plan(dtype=torch.float32), **both) == ("reference", None)  # float32: unchanged
    assert auto_rule(net, plan(dtype=torch.float16), **both) == ("fast", None)
    assert auto_rule(net, plan(options={"compile": False}), **both) == ("fast", None)  # fast options: fast
    assert auto_rule(GaussianEps(s, 0.0, 1.0), plan(GaussianEps(s, 0.0, 1.0)), **both) == ("fast", None)
    assert auto_rule(net, plan(generator=torch.Generator(), dtype=torch.float32), **both)[0] == "reference"
    assert auto_rule("model.onnx", plan(), **both) == ("openvino", None)  # bf16: onnx runs float32 only
    assert auto_rule("model.onnx", plan(), openvino=True, openvino_bf16=False) == ("onnx", None)
    assert auto_rule("model.onnx", plan(dtype=torch.float32), **both) == ("onnx", None)


def test_auto_bf16_without_cpu_bf16_is_a_logged_fallback(monkeypatch, caplog):
    s = df.Schedule.linear(20)
    net = unet(df.UNetConfig.tiny())
    monkeypatch.setattr(sampling, "OPENVINO_PAYS", 0.0)
    monkeypatch.setattr(sampling, "_openvino_installed", lambda: True)  # the extra, without bf16 kernels
    monkeypatch.setattr(sampling, "openvino_bf16_here", lambda: False)
    monkeypatch.setattr(sampling, "_logged", set())
    kw = dict(shape=(2, 3, 16, 16), steps=2, seed=1, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="ddpm_fast"):
        out = df.sample(net, s, **kw)  # backend="auto"
        df.sample(net, s, **kw)
    assert sum("no bf16 instructions" in r.getMessage() for r in caplog.records) == 1  # once per process
    assert torch.equal(out, df.sample(net, s, backend="fast", **kw))


def test_auto_end_to_end_short_cpu_job_is_the_reference():
    s = df.Schedule.linear(20)
    model = GaussianEps(s, 0.1, 0.5)
    before = engine.counters.copy()
    out = df.sample(model, s, (2, 1, 4, 4), seed=3)  # backend="auto"
    assert torch.equal(out, df.sample(model, s, (2, 1, 4, 4), seed=3, backend="reference"))
    assert engine.counters == before  # nothing built, nothing compiled


def test_auto_with_bfloat16_times_the_model_as_fast_runs_it():
    """auto times one forward before choosing; the model stays float32 under autocast, as fast runs it."""
    model = unet(df.UNetConfig.tiny())
    s = df.Schedule.linear(100)
    out = df.sample(model, s, (2, 3, 16, 16), steps=2, seed=1, dtype=torch.bfloat16)  # backend="auto"
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert next(model.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- CUDA


def _cuda_model(cfg=None):
    return unet(cfg or df.UNetConfig.tiny()).cuda()


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager_steps():
    model = _cuda_model()
    s = df.Schedule.linear(1000)
    kw = dict(steps=25, seed=3, start_index=2, compile=False)
    before = engine.counters["captures"]
    graph = df.sample(model, s, (5, 3, 16, 16), backend="fast", **kw)
    eager = df.sample(model, s, (5, 3, 16, 16), backend="fast", cuda_graph=False, **kw)
    assert torch.equal(graph, eager)
    assert engine.counters["captures"] == before + 1
    again = df.sample(model, s, (5, 3, 16, 16), backend="fast", **kw)
    assert torch.equal(graph, again) and engine.counters["captures"] == before + 1
    # a new start_index or seed only refills the keys tensor the captured update reads: no re-capture
    shifted = df.sample(model, s, (5, 3, 16, 16), backend="fast", **{**kw, "start_index": 3})
    reseeded = df.sample(model, s, (5, 3, 16, 16), backend="fast", **{**kw, "seed": 4})
    assert engine.counters["captures"] == before + 1
    # rows 3..6 in both runs; a row's position in the batch may change GEMM tiling, so rounding only
    assert torch.allclose(shifted[:4], graph[1:], atol=1e-3)
    eager = df.sample(model, s, (5, 3, 16, 16), backend="fast", cuda_graph=False, **{**kw, "seed": 4})
    assert torch.equal(reseeded, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("steps", [1, 2])
def test_cuda_graph_runs_shorter_than_the_warm_up(steps):
    """The first capture warms up for several steps; a 1- or 2-step run must not index past its table.
    device="cuda" (no index) must match the model's cuda:N parameters."""
    model = _cuda_model()
    s = df.Schedule.linear(1000)
    kw = dict(steps=steps, seed=8, compile=False)
    graph = df.sample(model, s, (3, 3, 16, 16), backend="fast", device="cuda", **kw)
    eager = df.sample(model, s, (3, 3, 16, 16), backend="fast", device="cuda", cuda_graph=False, **kw)
    assert torch.equal(graph, eager)
    ref = reference(model, s, (3, 3, 16, 16), steps=steps, seed=8)
    assert max_err(graph, ref) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_fp32_matches_reference(compile_):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = df.UNetConfig.cifar10(block_out_channels=(64, 128, 128, 128), norm_num_groups=16, dropout=0.0)
    model = _cuda_model(cfg)
    s = df.Schedule.linear(1000)
    shape = (9, 3, 32, 32)
    kw = dict(steps=50, seed=1, start_index=5)
    truth = reference(model, s, shape, torch.float64, **kw)
    ref = reference(model, s, shape, **kw)
    out = df.sample(model, s, shape, backend="fast", compile=compile_, **kw)
    assert_twin(out, ref, model, s, shape, truth, engine_minus_eager(model), **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_is_the_float32_chain_moved_by_its_forward(dtype):
    model = _cuda_model()
    s = df.Schedule.linear(1000)
    shape = (8, 3, 16, 16)
    kw = dict(steps=100, seed=4)
    truth = reference(model, s, shape, torch.float64, **kw)
    out = df.sample(model, s, shape, backend="fast", dtype=dtype, **kw)
    ref32 = reference(model, s, shape, **kw)
    assert_twin(out, ref32, model, s, shape, truth, engine_minus_eager(model), share=0.3, **kw)


@pytest.mark.cuda
def test_cuda_rows_independent_of_bucket():
    s = df.Schedule.linear(200)
    model = GaussianEps(s, 0.3, 0.04).cuda()  # its table on the device: nothing copied inside a capture
    kw = dict(steps=10, seed=21, start_index=100, compile=False)
    full = df.sample(model, s, (16, 3, 8, 8), backend="fast", device="cuda", **kw)
    for B, off in ((1, 0), (7, 9)):
        part = df.sample(
            model, s, (B, 3, 8, 8), backend="fast", device="cuda", **{**kw, "start_index": 100 + off}
        )
        assert torch.equal(part, full[off : off + B])
    padded = df.sample(model, s, (5, 3, 8, 8), backend="fast", device="cuda", buckets=(8,), **kw)
    assert torch.equal(padded, full[:5])


@pytest.mark.cuda
def test_cuda_replay_has_no_host_sync():
    model = _cuda_model()
    s = df.Schedule.linear(1000)
    plan = make_plan(model, s, (2, 3, 16, 16), steps=5, options={"compile": False})
    runner = engine.get_runner(model, plan, 2)
    coefs, ts = plan.table.to(plan.device)
    with torch.no_grad():
        runner.load(plan, coefs, ts, 0)
        runner.ensure_graph()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runner.run(plan.table.num_steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert runner.counter.item() == plan.table.num_steps


def test_a_nan_model_is_refused_naming_the_first_step():
    """The fast backend checks its first model call (one host sync) and names that step and timestep."""
    model = unet(df.UNetConfig.tiny())
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"NaN or Inf at step 0 \(t=999\)"):
        fast(model, df.Schedule.linear(1000), (1, 3, 16, 16), steps=4, triton=False)

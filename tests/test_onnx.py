"""ONNX export and the onnx backend: ORT == PyTorch, onnx sampling == reference, metadata, bad input.

Tolerances (float32 everywhere unless said):
- ORT vs PyTorch on one U-Net call: 1e-4 of max(1, |output|). Both sum the same products in different
  orders (ORT's convolutions vs oneDNN's); measured 1e-6 on these models, a wrong op differs by O(1).
- onnx vs reference over a short run: `sample_tol(plan)` = 1e-5 * (1 + sum over steps of the eps gain
  SRM1 * C_X0 + C_EPS). A per-call eps difference (<= 1e-5, measured ~2e-6) enters x_{t-1} multiplied by
  that gain (up to ~15 at t = 999 of a 4-step DDIM run: SRM1 = 156, C_X0 = 0.1) and is then carried with
  gain ~1 (SRA * C_X0 + C_XT); clipping only shrinks it. The counter-based noise is the same tensors on
  both sides, so it adds nothing. A wrong op differs by O(0.1).
- float16 weights: ORT may err at most twice as much as PyTorch's float16 graph against float64 (export
  validation, STYLE 6); a 4-step onnx run with them is the float32 reference's chain moved by the float16
  graph's eps difference at each state (tests/_rounding.py `propagated_budget`).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.errors import Unavailable
from ddpm_fast.plan import make_plan
from ddpm_fast.reference import run as sample_reference
from ddpm_fast.unet import UNet, UNetConfig
from tests._rounding import propagated_budget

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ddpm_fast.export import runtime  # noqa: E402
from ddpm_fast.export.graphs import EpsGraph, Float16Storage  # noqa: E402
from ddpm_fast.export.onnx_export import export_onnx, read_metadata  # noqa: E402
from ddpm_fast.export.runtime import OnnxModel, create_session, reference_tolerance  # noqa: E402


def sample_tol(model, **kw) -> float:
    """The bound on |onnx - reference| for a run (module docstring; `runtime.reference_tolerance`)."""
    return reference_tolerance(make_plan(model, kw.pop("schedule", None), kw.pop("shape"), **kw))


def reference(model, shape, **kw):
    """The oracle: the reference backend with the same counter-based noise."""
    return df.sample(model, shape=shape, backend="reference", **kw)


def ort_eps(path, x, t):
    sess = OnnxModel.load(path).session("cpu")
    return torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": t.numpy()})[0])


# ---------------------------------------------------------------------------------------------- fixtures


def _model(cfg: UNetConfig, schedule, seed: int) -> UNet:
    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():  # random GroupNorm affines and biases so no parameter is a trivial 0 or 1
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.schedule = schedule
    return m


@pytest.fixture(scope="module")
def tiny():
    return _model(UNetConfig.tiny(), df.Schedule.linear(1000), 0)


@pytest.fixture(scope="module")
def cifar_narrow():
    # cifar10's architecture (4 levels, attention at 16x16 and in the middle, dropout 0.1, right-bottom
    # padded downsampling, 32 groups) at 32 channels per level so CI exports and runs it in seconds.
    cfg = UNetConfig.cifar10(block_out_channels=(32, 32, 32, 32))
    return _model(cfg, df.Schedule.linear(1000), 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny, cifar_narrow):
    """Both graphs of both models; each exporter does one graph kind of each model (the torch.export-based
    one, the default, costs ~10 s per export on 2 cores; TorchScript ~2 s)."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}

    def step(model, **kw):  # the run a step graph is exported for
        return make_plan(model, None, (1, *model.config.image_shape), **kw)

    for name, model, kw in [
        ("tiny_eps", tiny, {}),
        ("tiny_step", tiny, {"plan": step(tiny, steps=6), "exporter": "torchscript"}),
        ("c10_eps", cifar_narrow, {"exporter": "torchscript"}),
        ("c10_step", cifar_narrow, {"plan": step(cifar_narrow, steps=4, method="ddim", eta=0.5)}),
    ]:
        out[name] = export_onnx(model, d / f"{name}.onnx", **kw)
    return out


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.slow  # the module's exports: ~30 s on 2 cores
@pytest.mark.parametrize("name", ["tiny_eps", "tiny_step", "c10_eps", "c10_step"])
def test_export_checks_and_validates(files, name):
    rep = files[name]
    proto = onnx.load(str(rep.path))
    onnx.checker.check_model(proto, full_check=True)
    assert rep.opset == 18 and {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert sorted(rep.max_abs_diff) == [1, 3]
    for b, d in rep.max_abs_diff.items():
        assert d <= rep.tolerance[b] <= 1e-4 * 10  # tolerance scales with |output| <= ~10 here
    inputs = {i.name: i for i in proto.graph.input}
    want = ["x", "t"] if rep.kind == "eps" else ["x", "step", "z"]
    assert list(inputs) == want
    for v in [inputs["x"], proto.graph.output[0]]:
        assert v.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert rep.file_bytes == rep.path.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("name, model_fixture", [("tiny_eps", "tiny"), ("c10_eps", "cifar_narrow")])
def test_ort_matches_pytorch_at_another_batch(files, name, model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    C, H, W = model.config.image_shape
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(5, C, H, W, generator=g), torch.tensor([0, 1, 500, 998, 999])
    with torch.no_grad():
        want = model(x, t)
    got = ort_eps(files[name].path, x, t)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, model_fixture, kw",
    [
        ("tiny_eps", "tiny", dict(shape=(1, 3, 16, 16), steps=6)),
        ("tiny_eps", "tiny", dict(shape=(3, 3, 16, 16), steps=5, seed=4, start_index=11)),
        ("tiny_step", "tiny", dict(shape=(2, 3, 16, 16), steps=6, seed=2)),
        ("c10_eps", "cifar_narrow", dict(shape=(2, 3, 32, 32), steps=4, method="ddim", eta=0.5)),
        ("c10_step", "cifar_narrow", dict(shape=(3, 3, 32, 32), steps=4, method="ddim", eta=0.5, seed=9)),
    ],
)
def test_onnx_sampling_matches_reference(files, name, model_fixture, kw, request):
    model = request.getfixturevalue(model_fixture)
    path = files[name].path
    got = df.sample(str(path), backend="onnx", **kw)
    want = reference(model, **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= sample_tol(model, **kw)
    # auto picks onnx for a file and an OnnxModel; the same call twice gives the same bits
    again = df.sample(OnnxModel.load(path), **kw)
    assert torch.equal(got, again)


@pytest.mark.slow
def test_session_is_created_once_and_rows_do_not_depend_on_batch(files, tiny):
    path = files["tiny_eps"].path
    df.sample(path, shape=(3, 3, 16, 16), steps=3, backend="onnx")
    n = len(runtime._SESSIONS)
    sess = OnnxModel.load(path).session("cpu")
    full = df.sample(path, shape=(3, 3, 16, 16), steps=3, backend="onnx")
    part = df.sample(path, shape=(1, 3, 16, 16), steps=3, start_index=2, backend="onnx")
    assert len(runtime._SESSIONS) == n and OnnxModel.load(path).session("cpu") is sess
    assert (full[2:] - part).abs().max().item() <= sample_tol(
        tiny, shape=(1, 3, 16, 16), steps=3
    )  # same noise; ORT may batch convs differently


@pytest.mark.slow
def test_metadata_round_trip(files, tiny):
    meta = read_metadata(files["tiny_step"].path)
    assert meta["model"] == tiny.config.to_dict()
    assert meta["schedule"] == tiny.schedule.spec
    assert meta["sampling"]["variance"] == "fixed_small" and meta["sampling"]["clip"] is True
    plan = make_plan(tiny, None, (1, 3, 16, 16), steps=6)
    assert meta["step"]["timesteps"] == plan.table.timesteps.tolist()
    m = OnnxModel.load(files["tiny_step"].path)
    assert m.config == tiny.config and m.kind == "step" and m.steps == 6
    assert torch.equal(m.schedule.betas, tiny.schedule.betas)
    assert m.image_shape == (3, 16, 16)


def test_learned_range_and_cosine_schedule_round_trip(tmp_path):
    # The TorchScript exporter (the fallback for torch < 2.6) here, so both exporters are exercised.
    s = df.Schedule.cosine(50)
    model = _model(UNetConfig.tiny(out_channels=6, sample_size=8), s, 3)
    path = tmp_path / "learned.onnx"
    rep = export_onnx(model, path, exporter="torchscript")
    assert rep.exporter == "torchscript" and max(rep.max_abs_diff.values()) <= 1e-4
    m = OnnxModel.load(path)
    assert m.defaults.variance == "learned_range" and m.schedule.spec == s.spec
    assert torch.equal(m.schedule.betas, s.betas)
    kw = dict(shape=(2, 3, 8, 8), steps=5, seed=1)
    got = df.sample(str(path), **kw)  # variance and schedule come from the file
    want = reference(model, variance="learned_range", **kw)
    assert (got - want).abs().max().item() <= sample_tol(model, variance="learned_range", **kw)


def test_fp16_weights_keep_norms_and_softmax_in_float32(tmp_path, tiny):
    path = tmp_path / "tiny16.onnx"
    rep = export_onnx(tiny, path, fp16=True, exporter="torchscript")  # validated against float64 (STYLE 6)
    assert rep.fp16 and read_metadata(path)["weights_dtype"] == "float16"
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]  # conv kernels
    assert weights and all(i.data_type == F16 for i in weights)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input]}
    norm_or_softmax = [n for n in proto.graph.node if n.op_type in ("InstanceNormalization", "Softmax")]
    assert norm_or_softmax and all(types.get(n.input[0]) == F32 for n in norm_or_softmax)
    assert proto.graph.input[0].type.tensor_type.elem_type == F32
    assert proto.graph.output[0].type.tensor_type.elem_type == F32
    # STYLE 6: the onnx run is the float32 reference's chain moved by what the float16-weight graph changes
    # in eps at each of the chain's states (ORT's arithmetic included), plus the update's rounding budget
    # (tests/_rounding.py `propagated_budget`), whatever order ORT or torch sums in on this CPU.
    kw = dict(shape=(8, 3, 16, 16), steps=4, seed=5)
    got = df.sample(str(path), backend="onnx", **kw).double()
    tiny64 = copy.deepcopy(tiny).double()
    exact = reference(tiny64, dtype=torch.float64, **kw)
    ref32 = reference(tiny, **kw).double()

    def graph_minus_float32(x, t):
        tt = torch.full((x.shape[0],), t, dtype=torch.int64)
        with torch.no_grad():
            return ort_eps(path, x, tt) - tiny(x, tt)

    shape = kw.pop("shape")
    budget = propagated_budget(tiny64, None, shape, exact, graph_minus_float32, **kw)
    assert budget < 0.3 * exact.abs().max().item(), budget  # float16 weights: 2^-11 of each, through 4 steps
    assert (got - ref32).abs().max().item() <= budget, ((got - ref32).abs().max().item(), budget)


def test_float16_storage_rounds_every_result_and_writes_back_in_place():
    a = torch.tensor([1.0, 2.0], dtype=torch.float16)
    b = torch.tensor([2.0**-12, 2.0**-12], dtype=torch.float16)
    with Float16Storage():
        s = a + b  # float32 sum 1 + 2^-12 rounds to 1 in float16 (spacing 2^-10 near 1)
        v = torch.cat([a[:1], torch.full((2048,), 2.0**-11, dtype=torch.float16)])
        p = torch.sum(v)  # float32 accumulation: exactly 2; a float16 accumulator stays at 1 (1 + 2^-11 -> 1)
        c = a.clone()
        c.add_(torch.tensor([1.0, 1.0], dtype=torch.float16))
    assert s.dtype == torch.float16 and s.tolist() == [1.0, 2.0]
    assert p.dtype == torch.float16 and p.item() == 2.0
    assert c.tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    "method", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "ipndm", "deis", "deis_2"]
)
def test_multistep_solvers_on_both_graphs(tmp_path, tiny, method):
    """backend='onnx' runs every family: from an exported noise model (ORT gives eps, the fused update with its
    x0 history does the rest), and as a step graph that takes and returns the history (validated on export)."""
    eps = export_onnx(tiny, tmp_path / "eps.onnx", exporter="torchscript", validate=False).path
    plan = make_plan(tiny, None, (1, 3, 16, 16), steps=5, method=method)
    step = export_onnx(tiny, tmp_path / "step.onnx", plan=plan, exporter="torchscript")
    assert step.max_abs_diff and read_metadata(step.path)["step"]["history"] == plan.table.history
    names = [i.name for i in onnx.load(str(step.path)).graph.input]
    assert names == ["x", "step", "z", "history"]
    kw = dict(shape=(2, 3, 16, 16), steps=5, seed=3, method=method)
    want = reference(tiny, **kw)
    for path in (eps, step.path):
        got = df.sample(str(path), backend="onnx", **kw)
        assert (got - want).abs().max().item() <= sample_tol(tiny, **kw), path


def test_bench_provider_matches_reference(tiny):
    from ddpm_fast.bench.onnx import onnx_provider

    plan = make_plan(tiny, None, (2, 3, 16, 16), steps=3, seed=6)
    run = onnx_provider(tiny, plan, step_graph=True, exporter="torchscript")
    try:
        assert run.export_seconds > 0 and run.name == "onnx-step"
        got = run()
        want = sample_reference(tiny, plan)
        assert (got - want).abs().max().item() <= sample_tol(tiny, shape=plan.shape, steps=3)
    finally:
        run.close()


# ---------------------------------------------------------------------------------------------- bad input


def test_nan_weights_are_refused_not_sampled(tmp_path, tiny):
    """An exported model with NaN weights (exported unvalidated): sampling is an error, never NaN images."""
    bad = copy.deepcopy(tiny)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    path = export_onnx(bad, tmp_path / "nan.onnx", exporter="torchscript", validate=False).path
    with pytest.raises(ValueError, match="backend='onnx' returned NaN or Inf"):
        df.sample(str(path), shape=(2, *tiny.config.image_shape), steps=3, backend="onnx")


def test_a_file_that_fails_validation_never_replaces_the_output(tmp_path, tiny, capsys):
    """NaN weights fail the export's own ORT check: the earlier good file stays, byte for byte, and no temporary
    is left; the message names the output, not the temporary it was checked under."""
    from ddpm_fast.checkpoint import save_model
    from ddpm_fast.cli import main

    out = tmp_path / "m.onnx"
    export_onnx(tiny, out, exporter="torchscript")
    good = out.read_bytes()
    bad = copy.deepcopy(tiny)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="does not reproduce PyTorch") as e:
        export_onnx(bad, out, exporter="torchscript")
    assert str(out) in str(e.value) and ".tmp-" not in str(e.value)
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    ckpt = save_model(bad, tmp_path / "nan")
    assert main(["export", str(ckpt), str(out), "--exporter", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"ONNX export of {out} does not reproduce PyTorch" in err, err
    assert out.read_bytes() == good and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not runtime._MODELS or all(".tmp-" not in k[0] for k in runtime._MODELS)


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match="not an ONNX model"):
        OnnxModel.load(bad)
    with pytest.raises(ValueError, match="not an ONNX model"):
        df.sample(str(bad), shape=(1, 3, 16, 16), schedule=df.Schedule.linear(10))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxModel.load(tmp_path / "missing.onnx")


class _Other(torch.nn.Module):
    def forward(self, image, timestep):
        return image * timestep.float().reshape(-1, 1, 1, 1)


def test_other_input_names_and_fixed_batch(tmp_path, tiny):
    other = tmp_path / "other.onnx"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    torch.onnx.export(
        _Other(), (x, t), str(other), input_names=["image", "timestep"], output_names=["out"], dynamo=False
    )
    with pytest.raises(ValueError, match=r"inputs must be named \('x', 't'\).*'image', 'timestep'"):
        OnnxModel.load(other)
    fixed = tmp_path / "fixed.onnx"  # exported elsewhere: right names, static batch 2, no metadata
    torch.onnx.export(
        EpsGraph(tiny), (x, t), str(fixed), input_names=["x", "t"], output_names=["eps"], dynamo=False
    )
    m = OnnxModel.load(fixed)
    assert m.batch == 2 and m.schedule is None
    with pytest.raises(ValueError, match="batch size 3 does not fit"):
        df.sample(str(fixed), schedule=tiny.schedule, shape=(3, 3, 16, 16), steps=2)
    with pytest.raises(ValueError, match="schedule must be given"):
        df.sample(str(fixed), shape=(2, 3, 16, 16), steps=2)
    got = df.sample(str(fixed), schedule=tiny.schedule, shape=(2, 3, 16, 16), steps=2)
    want = reference(tiny, schedule=tiny.schedule, shape=(2, 3, 16, 16), steps=2)
    assert (got - want).abs().max().item() <= sample_tol(tiny, shape=(2, 3, 16, 16), steps=2)


@pytest.mark.slow
def test_requests_the_graph_cannot_take(files):
    eps, step = str(files["tiny_eps"].path), str(files["tiny_step"].path)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 32, 32\) does not fit .* \(3, 16, 16\)"):
        df.sample(eps, shape=(1, 3, 32, 32), steps=2)
    with pytest.raises(ValueError, match="returns 3 channels; variance='learned_range'"):
        df.sample(eps, shape=(1, 3, 16, 16), steps=2, variance="learned_range")
    with pytest.raises(ValueError, match="computes in float32"):
        df.sample(eps, shape=(1, 3, 16, 16), steps=2, dtype=torch.float16)
    with pytest.raises(TypeError, match="takes options"):
        df.sample(eps, shape=(1, 3, 16, 16), steps=2, compile=True)
    with pytest.raises(ValueError, match=r"different run .*num_steps=6.*Pass steps=6"):
        df.sample(step, shape=(1, 3, 16, 16), steps=7)
    with pytest.raises(ValueError, match="different run .*method='ddpm'"):
        df.sample(step, shape=(1, 3, 16, 16), steps=6, method="ddim")
    with pytest.raises(TypeError, match="step graph"):
        OnnxModel.load(step)(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.int64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_cuda_provider_failure_is_an_error_not_a_cpu_fallback(tmp_path, tiny):
    # onnxruntime: no CUDAExecutionProvider. onnxruntime-gpu without CUDA libraries: ORT falls back to the
    # CPU provider with a log line; create_session must notice and raise.
    path = export_onnx(tiny, tmp_path / "tiny.onnx", exporter="torchscript", validate=False).path
    with pytest.raises(Unavailable, match="CUDA"):
        create_session(path, "cuda:0")


class _FallbackSession:
    """What onnxruntime-gpu returns when its CUDA provider fails to load: a session on the CPU provider."""

    def __init__(self, *args, **kwargs):
        pass

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_provider_failures_are_named(monkeypatch, files):
    path = files["tiny_eps"].path
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    with pytest.raises(
        Unavailable, match=r"could not create the CUDA provider .*fell back to \['CPUExecutionProvider'\]"
    ):
        create_session(path, "cuda:0")

    def not_implemented(*args, **kwargs):  # ORT's error for an op without a kernel on the provider
        raise RuntimeError(
            "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Conv(11) node '/c'"
        )

    monkeypatch.setattr(ort, "InferenceSession", not_implemented)
    with pytest.raises(
        Unavailable, match="CPUExecutionProvider provider cannot run .*NOT_IMPLEMENTED.*float16"
    ):
        create_session(path, "cpu")


def test_export_argument_errors(tmp_path, tiny):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_onnx("model", tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(tiny, tmp_path / "a.bin")
    with pytest.raises(ValueError, match="opset must lie in"):
        export_onnx(tiny, tmp_path / "a.onnx", opset=11)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tiny, tmp_path / "no" / "a.onnx")
    with pytest.raises(TypeError, match="plan must be a ddpm_fast.plan.Plan"):
        export_onnx(tiny, tmp_path / "a.onnx", plan={"method": "ddim"}, exporter="torchscript")
    with pytest.raises(ValueError, match="image shape"):
        export_onnx(tiny, tmp_path / "a.onnx", plan=make_plan(tiny, None, (1, 1, 8, 8), steps=3))
    assert not list(tmp_path.glob("*.onnx*"))  # nothing half-written


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_export_then_sample(tmp_path, tiny, capsys):
    from ddpm_fast.checkpoint import save_model
    from ddpm_fast.cli import main

    ckpt = save_model(tiny, tmp_path / "ckpt")
    out = tmp_path / "step.onnx"
    args = ["export", str(ckpt), str(out), "--step", "--steps", "3", "--exporter", "torchscript"]
    assert main(args) == 0
    assert "max |diff| batch 1" in capsys.readouterr().err
    assert json.loads(json.dumps(read_metadata(out)["step"]))["num_steps"] == 3
    png = tmp_path / "grid.png"
    argv = ["sample", "--model", str(out), "--num", "2", "--steps", "3", "--out", str(png), "--quiet"]
    assert main(argv) == 0 and png.stat().st_size > 0
    assert main(["export", str(ckpt), str(tmp_path / "x.onnx"), "--steps", "3"]) == 2
    assert "add --step" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nodir"), str(tmp_path / "x.onnx")]) == 2


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_execution_provider_sampling_matches_reference():
    from ddpm_fast.bench.onnx import gpu_check

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    res = gpu_check(full=False)
    assert res["status"] == "ok", res
    assert all(c["providers"][0] == "CUDAExecutionProvider" for c in res["checks"])
    assert np.isfinite([c["onnx_vs_reference_max_abs"] for c in res["checks"]]).all()


def test_class_conditional_noise_model_takes_labels_as_an_input(tmp_path):
    """A class-conditional model (ADM with classes) exports its noise model with labels y as a graph input;
    the onnx backend feeds each batch's labels (random per global sample index) and equals the reference."""
    from ddpm_fast.adm import ADM, ADMConfig

    torch.manual_seed(0)
    model = ADM(ADMConfig.tiny().replace(image_size=8, num_classes=7)).eval()
    model.schedule = df.Schedule.linear(1000)
    rep = export_onnx(model, tmp_path / "cond.onnx", exporter="torchscript")  # validated with random labels
    assert [i.name for i in onnx.load(str(rep.path)).graph.input] == ["x", "t", "y"]
    kw = dict(shape=(3, 3, 8, 8), steps=4, seed=2, labels="random")
    got = df.sample(str(rep.path), backend="onnx", **kw)
    want = df.sample(model, backend="reference", **kw)
    assert (got - want).abs().max().item() <= sample_tol(model, **kw)
    with pytest.raises(ValueError, match="labels must be given"):
        df.sample(str(rep.path), backend="onnx", shape=(3, 3, 8, 8), steps=4)
    with pytest.raises(Unavailable, match="step graph of a class-conditional model"):
        export_onnx(model, tmp_path / "s.onnx", plan=make_plan(model, None, (1, 3, 8, 8), steps=3, labels=0))


def test_the_gpu_checks_onnx_section_runs_its_logic_on_the_cpu_provider():
    """The body of the onnx section of benchmarks/gpu_check.py, on CPU: each of its three exports (eps, float16
    eps, step graph) samples and passes its bound, so a lent GPU's run can fail only on what is CUDA's."""
    from ddpm_fast.bench.onnx import _gpu_check

    r = _gpu_check(False, 60.0, device="cpu")
    assert r["status"] == "ok", r.get("error") or r["checks"]
    assert [(c["graph"], c["fp16"]) for c in r["checks"]] == [("eps", False), ("eps", True), ("step", False)]
    assert all(c["pass"] and c["checked_error"] <= c["bound"] for c in r["checks"])

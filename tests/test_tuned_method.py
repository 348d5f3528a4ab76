"""method="tuned": a learned table runs on every backend as any table does, from a file or from the tables a
checkpoint carries, and is refused in one line on another model, schedule or NFE, or when damaged."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _rounding import max_diff, propagated_budget

import ddpm_fast as df
from ddpm_fast import cli
from ddpm_fast.checkpoint import DEFAULT_MODEL_DIR, load_model
from ddpm_fast.tuned import TUNED_DIR, carried_tables, load_tuned
from ddpm_fast.tuning import tune

NFE = 3
BUNDLED = (3, 4, 5, 6, 8, 10)  # the digits checkpoint's own tables (ddpm_fast/assets/digits/tuned/)


@pytest.fixture(scope="module")
def model():
    return df.default_model()


@pytest.fixture(scope="module")
def table(model, tmp_path_factory):
    """A table tuned a little (a few iterations: what is tested is how it runs, not how good it is)."""
    path = tmp_path_factory.mktemp("tuned") / "t3.safetensors"
    t = tune(
        model, base="unipc", nfe=NFE, train=8, val=8, iters=5, teacher_steps=20, out=path, log=lambda s: 0
    )
    return t, path


def _shape(model, n=4):
    return (n, *model.defaults.image_shape)


def test_reference_loop_is_the_table_formula(model, table):
    """The reference walks the columns with the table's own history; with clip off and no noise it is the
    tuner's own differentiable walk, to float64 rounding of a few multiply-adds per step."""
    from ddpm_fast import noise
    from ddpm_fast.tuning import run_table

    t, path = table
    shape = _shape(model)
    m64 = copy.deepcopy(model).double()
    got = df.sample(m64, shape=shape, method="tuned", tuned=path, clip=False, dtype=torch.float64, seed=3)
    xT = noise.sample_noise(3, 0, shape, noise.XT_SLOT).double()
    with torch.no_grad():
        want = run_table(m64, xT, t.table.coefs, t.table.timesteps, t.table.history)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("triton", [False, True])
def test_fast_backend_runs_the_table(model, table, triton):
    """Two float32 runs of one table: the update's rounding order differs, the U-Net forward is the same:
    at most the chain's propagated budget (tests/_rounding.py)."""
    _, path = table
    shape, kw = _shape(model), dict(method="tuned", tuned=path, seed=5)
    ref = df.sample(model, shape=shape, backend="reference", **kw)
    fast = df.sample(model, shape=shape, backend="fast", compile=False, triton=triton, **kw)
    m64 = copy.deepcopy(model).double()
    truth = df.sample(m64, shape=shape, backend="reference", dtype=torch.float64, **kw)
    budget = propagated_budget(m64, None, shape, truth, **kw)
    assert budget < 0.1
    assert max_diff(fast, ref) <= budget, (max_diff(fast, ref), budget)
    base = df.sample(model, shape=shape, backend="reference", method="unipc", steps=NFE, seed=5)
    assert max_diff(ref, base) > 1e-4  # the learned columns are not the base method's


def test_onnx_backend_runs_the_table(model, table, tmp_path):
    """An eps graph exported from the model records its weights digest, so the table learned for the Module
    runs on the file; ORT's forward differs from torch's by conv summation order (test_onnx's bound)."""
    pytest.importorskip("onnxruntime")
    from ddpm_fast.export import export_onnx
    from ddpm_fast.export.runtime import reference_tolerance
    from ddpm_fast.plan import make_plan

    _, path = table
    onnx_path = tmp_path / "digits.onnx"
    export_onnx(model, onnx_path)
    shape, kw = _shape(model), dict(method="tuned", tuned=path, seed=7)
    got = df.sample(str(onnx_path), shape=shape, backend="onnx", **kw)
    ref = df.sample(model, shape=shape, backend="reference", **kw)
    assert max_diff(got, ref) <= reference_tolerance(make_plan(model, None, shape, **kw))


def test_a_checkpoint_carries_its_tables(model, table, tmp_path):
    t, path = table
    ckpt = tmp_path / "digits"
    shutil.copytree(DEFAULT_MODEL_DIR, ckpt)
    shutil.rmtree(ckpt / TUNED_DIR, ignore_errors=True)  # only the table of this test
    (ckpt / TUNED_DIR).mkdir()
    shutil.copy(path, ckpt / TUNED_DIR / f"nfe-{NFE}.safetensors")
    carrying = load_model(ckpt)
    shape = _shape(model)
    a = df.sample(carrying, shape=shape, method="tuned", steps=NFE, backend="reference", seed=1)
    b = df.sample(model, shape=shape, method="tuned", tuned=path, backend="reference", seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"carries tuned tables for NFE \[3\]; got steps=5"):
        df.sample(carrying, shape=shape, method="tuned", steps=5)


# ---------------------------------------------------------------------------------------------- bad input


def _refusal(model, **kw):
    with pytest.raises((ValueError, TypeError)) as e:
        df.sample(model, shape=_shape(model), **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refusals_name_the_argument(model, table, tmp_path):
    _, path = table
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert "learned for another model" in _refusal(other, method="tuned", tuned=path)
    assert "is a table for 3 NFE; got steps=4" in _refusal(model, method="tuned", tuned=path, steps=4)
    assert "another schedule" in _refusal(
        model, schedule=df.Schedule.cosine(1000), method="tuned", tuned=path
    )
    bare = copy.deepcopy(model)
    bare.tuned_tables = {}
    assert "NFE none" in _refusal(bare, method="tuned", steps=3)
    assert f"NFE {sorted(BUNDLED)}; got steps=7" in _refusal(model, method="tuned", steps=7)
    assert "tuned= applies to method='tuned'" in _refusal(model, method="unipc", steps=3, tuned=path)
    assert "spacing= do not apply" in _refusal(model, method="tuned", tuned=path, spacing="linspace")
    assert "variance must be the tuned table's" in _refusal(
        model, method="tuned", tuned=path, variance="fixed_large"
    )
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-7])
    assert "not a tuned table" in _refusal(model, method="tuned", tuned=cut)
    assert "tuned must be a path" in _refusal(model, method="tuned", tuned=3)


def test_cli_tuned_runs_and_refuses(model, table, tmp_path, capsys):
    _, path = table
    out = tmp_path / "s.npz"
    assert (
        cli.main(
            ["sample", "--method", "tuned", "--tuned", str(path), "--num", "2", "--out", str(out), "--quiet"]
        )
        == 0
    )
    assert out.exists()
    capsys.readouterr()
    assert (
        cli.main(["sample", "--method", "ddim", "--tuned", str(path), "--out", str(tmp_path / "x.npz")]) == 2
    )
    assert "--tuned applies to --method tuned" in capsys.readouterr().err
    assert cli.main(["sample", "--method", "tuned", "--steps", "7", "--out", str(tmp_path / "y.npz")]) == 2
    assert f"carries tuned tables for NFE {sorted(BUNDLED)}" in capsys.readouterr().err


def test_a_sharded_run_records_its_table(model, table, tmp_path, capsys):
    t, path = table
    other = tmp_path / "other.safetensors"
    tune(
        model,
        base="unipc",
        nfe=NFE,
        train=8,
        val=8,
        iters=2,
        seed=5,  # other noise: another table
        teacher_steps=20,
        out=other,
        log=lambda s: 0,
    )
    run = tmp_path / "run"
    args = ["sample", "--method", "tuned", "--num", "4", "--shard-size", "2", "--out", str(run), "--quiet"]
    assert cli.main([*args, "--tuned", str(path)]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--tuned", str(other)]) == 2
    err = (
        capsys.readouterr().err
    )  # the first manifest key that differs: the table's own digest or its timesteps'
    assert "other settings" in err and ("tuned_table_sha256" in err or "timesteps_sha256" in err)


def test_the_bundled_tables_belong_to_the_bundled_model(model):
    """Each bundled table loads for the bundled model, schedule and its NFE, and samples on the reference."""
    tables = carried_tables(model)
    assert sorted(tables) == sorted(BUNDLED)
    for nfe, path in tables.items():
        t = load_tuned(path, model=model, schedule=model.defaults.schedule, nfe=nfe)
        assert t.table.num_steps == nfe and t.info["rmse_after"] < t.info["rmse_before"]
    x = df.sample(model, shape=_shape(model), method="tuned", steps=5, backend="reference")
    assert x.isfinite().all() and x.abs().max() <= 1.5


@pytest.mark.parametrize("cap", ["default", "avx2"])
def test_the_bundled_tables_load_whatever_kernels_built_the_schedule(cap):
    """The schedule a table was learned for is named by its float32-rounded betas: with the scalar kernels
    (ATEN_CPU_CAPABILITY=default) torch.linspace's float64 betas differ here in their last bits from the AVX
    ones, and a digest of the float64 bytes refused every bundled table on such a CPU."""
    script = (
        "import ddpm_fast as df\n"
        "from ddpm_fast.tuned import carried_tables, load_tuned\n"
        "m = df.default_model(); s = m.defaults.schedule\n"
        "for nfe, p in sorted(carried_tables(m).items()): load_tuned(p, model=m, schedule=s, nfe=nfe)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]

"""The reference samplers: an analytic oracle, batch independence, bad input, the base install.

Equality with diffusers' DDPM and DDIM pipelines is in test_reference_diffusers.py (it needs diffusers).
"""

import os
import subprocess
import sys

import pytest
import torch
from analytic_model import MU, S2, GaussianEps, exact_moments

import ddpm_fast as df


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, variance, eta, v_rel_bound",
    [
        # discretisation error of the 1000-step chain itself, from exact_moments: -3.7%, +0.9%, -1.5%, -3.7%
        ("ddpm", "fixed_small", 0.0, 0.05),
        ("ddpm", "fixed_large", 0.0, 0.02),
        ("ddim", "fixed_small", 0.0, 0.03),
        ("ddim", "fixed_small", 1.0, 0.05),
    ],
)
def test_analytic_oracle_recovers_gaussian_data(method, variance, eta, v_rel_bound):
    s = df.Schedule.linear(1000)
    model = GaussianEps(s, MU, S2)
    # torch.Generator noise keeps this cheap; the counter-based normals are checked on their own in test_noise.py
    g = torch.Generator().manual_seed(0)
    x = df.sample(
        model, s, (1024, 1, 8, 8), method=method, eta=eta, variance=variance, clip=False, generator=g
    )
    m, v = exact_moments(s, s, MU, S2, method, variance, eta)
    # the exact chain is close to the data distribution (bound stated per case above) ...
    assert abs(m - MU) < 1e-3
    assert abs(v - S2) / S2 < v_rel_bound
    # ... and the samples match the exact chain to 5 standard errors: n = 65536 independent draws
    n = x.numel()
    xd = x.double().flatten()
    assert abs(xd.mean().item() - m) < 5 * (v / n) ** 0.5
    assert abs(xd.var().item() - v) < 5 * v * (2 / n) ** 0.5


def test_analytic_oracle_respaced_ddim_matches_exact_moments():
    s = df.Schedule.linear(1000)
    model = GaussianEps(s, MU, S2)
    x = df.sample(model, s, (1024, 1, 8, 8), steps=50, method="ddim", clip=False, seed=1, backend="reference")
    m, v = exact_moments(s, s.respace(df.spaced_timesteps(1000, 50)), MU, S2, "ddim")
    n = x.numel()
    assert abs(x.double().mean().item() - m) < 5 * (v / n) ** 0.5
    assert abs(x.double().var().item() - v) < 5 * v * (2 / n) ** 0.5


def test_batch_independence_is_bitwise():
    s = df.Schedule.linear(100)
    model = GaussianEps(s, MU, S2)
    full = df.sample(model, s, (8, 3, 5, 7), steps=20, seed=11, backend="reference")
    part = df.sample(model, s, (4, 3, 5, 7), steps=20, seed=11, start_index=4, backend="reference")
    assert torch.equal(full[4:], part)
    again = df.sample(model, s, (8, 3, 5, 7), steps=20, seed=11, backend="reference")
    assert torch.equal(full, again)
    other = df.sample(model, s, (8, 3, 5, 7), steps=20, seed=12, backend="reference")
    assert not torch.allclose(full, other)


def test_learned_range_uses_the_variance_half():
    s = df.Schedule.linear(50)
    eps_model = GaussianEps(s, MU, S2)

    def model(v):
        return lambda x, t: torch.cat([eps_model(x, t), torch.full_like(x, v)], 1)

    kw = dict(clip=False, seed=3, backend="reference", variance="learned_range")
    # v = -1 selects beta-tilde, v = +1 selects beta: the same draws as the fixed variances
    lo = df.sample(model(-1.0), s, (2, 1, 4, 4), **kw)
    hi = df.sample(model(1.0), s, (2, 1, 4, 4), **kw)
    small = df.sample(
        eps_model, s, (2, 1, 4, 4), clip=False, seed=3, variance="fixed_small", backend="reference"
    )
    large = df.sample(
        eps_model, s, (2, 1, 4, 4), clip=False, seed=3, variance="fixed_large", backend="reference"
    )
    torch.testing.assert_close(lo, small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hi, large, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def _ok_model(x, t):
    return torch.zeros_like(x)


S = df.Schedule.linear(10)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(shape=(3, 8, 8)), ValueError, "shape"),
        (dict(shape="abc"), TypeError, "shape"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(steps=11), ValueError, "steps"),
        (dict(steps=0), ValueError, "steps"),
        (dict(timesteps=[0, 10]), ValueError, "timesteps"),
        (dict(timesteps=[3, 3]), ValueError, "timesteps"),
        (dict(method="euler"), ValueError, "method"),
        (dict(variance="learned"), ValueError, "variance"),
        (dict(backend="tensorrt"), ValueError, "backend"),
        (dict(method="ddim", eta=-0.1), ValueError, "eta"),
        (dict(generator=torch.Generator(), backend="fast"), ValueError, "generator"),
        (dict(generator=123), TypeError, "generator"),
        (dict(seed=-5), ValueError, "seed"),
        (dict(start_index=-1), ValueError, "start_index"),
        (dict(device="nonsense"), ValueError, "device"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    args = dict(shape=(2, 3, 8, 8), backend="reference")
    args.update(kwargs)
    shape = args.pop("shape")
    with pytest.raises(exc, match=match):
        df.sample(_ok_model, S, shape, **args)


def test_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        df.Schedule([0.5, 1.5])


def test_model_with_wrong_shape_or_nan_is_reported_with_its_step():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\).*step 0"):
        df.sample(lambda x, t: x[:, :1], S, (2, 3, 8, 8), backend="reference")

    def nan_late(x, t):
        return torch.full_like(x, float("nan")) if int(t[0]) == 4 else torch.zeros_like(x)

    with pytest.raises(ValueError, match=r"NaN or Inf at step 5 \(t=4\)"):
        df.sample(nan_late, S, (2, 3, 8, 8), backend="reference")
    with pytest.raises(ValueError, match="shape"):
        df.sample(_ok_model, S, (2, 3, 8, 8), variance="learned_range", backend="reference")


def test_import_and_reference_need_no_triton_onnxruntime_or_gpu():
    """The base install: ddpm_fast imports and samples with triton, onnxruntime and onnx unimportable."""
    code = (
        "import sys\n"
        "for name in ('triton', 'onnxruntime', 'onnx', 'diffusers'):\n"
        "    sys.modules[name] = None\n"
        "import torch, ddpm_fast as df\n"
        "model = lambda x, t: 0.1 * x\n"
        "x = df.sample(model, df.Schedule.linear(50), (2, 1, 3, 3), steps=5, seed=1)\n"
        "assert x.shape == (2, 1, 3, 3) and torch.isfinite(x).all()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

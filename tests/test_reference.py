"""The reference samplers: an analytic oracle, equality with diffusers' pipelines, batch independence, bad input."""

import os
import subprocess
import sys

import pytest
import torch
from analytic_model import GaussianEps, exact_moments

import ddpm_fast as df

MU, S2 = 0.3, 0.04


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


# ------------------------------------------------------------------------------------------- diffusers

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    return unet


def _wrap(unet):
    return lambda x, t: unet(x, t).sample


# Tolerance: diffusers keeps betas and alphas_cumprod in float32 while our tables are float64, so the per-step
# coefficients differ by float32 rounding (~6e-8 relative); the cumulative product over 1000 steps drifts up
# to ~1000 * 6e-8 = 6e-5 relative. Outputs live in [-1, 1] (mapped to [0, 1] by the pipeline): 1e-4 absolute.
DIFFUSERS_ATOL = 1e-4


def _pipeline_output(pipe, B, seed, **kw):
    img = pipe(batch_size=B, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    return torch.from_numpy(img).permute(0, 3, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_equals_diffusers_pipeline(tiny_unet, variance, steps):
    """Clipped: the pipeline's own output. (Unclipped, this untrained U-Net drives x to |x| ~ 800, every
    pixel saturates in the pipeline's [0, 1] mapping and the comparison would be empty: see the next test.)"""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=True)
    pipe = diffusers.DDPMPipeline(unet=tiny_unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    want = _pipeline_output(pipe, 2, 5, num_inference_steps=steps)
    sched.set_timesteps(steps)
    ours = df.sample(
        _wrap(tiny_unet),
        df.Schedule.linear(1000),
        (2, 3, 8, 8),
        timesteps=sched.timesteps.tolist(),
        variance=variance,
        clip=True,
        generator=torch.Generator().manual_seed(5),
        backend="reference",
    )
    mapped = (ours / 2 + 0.5).clamp(0, 1)
    assert 0 < ((mapped > 0) & (mapped < 1)).float().mean() < 1  # a real comparison: most pixels unsaturated
    torch.testing.assert_close(mapped, want, atol=DIFFUSERS_ATOL / 2, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_unclipped_equals_diffusers_scheduler(tiny_unet, variance, steps):
    """Unclipped, in model space: DDPMPipeline's loop (x_T, then scheduler.step with the same generator)
    written out, on a model that keeps x bounded: the Gaussian-data optimum plus 0.05 x the U-Net."""
    s = df.Schedule.linear(1000)
    g_eps = GaussianEps(s, MU, S2)

    def model(x, t):
        return g_eps(x, t) + 0.05 * tiny_unet(x, t).sample

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=False)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(5)
    want = torch.randn((2, 3, 8, 8), generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            want = sched.step(model(want, t.reshape(1).expand(2)), t, want, generator=g).prev_sample
    ours = df.sample(
        model,
        s,
        (2, 3, 8, 8),
        timesteps=sched.timesteps.tolist(),
        variance=variance,
        clip=False,
        generator=torch.Generator().manual_seed(5),
        backend="reference",
    )
    torch.testing.assert_close(ours, want, atol=DIFFUSERS_ATOL, rtol=0)


# With clipping and eta = 0 the chain has no fresh noise and every clamped x0 feeds an eps that no longer
# matches it; on this untrained U-Net that amplifies float32 rounding about 10^4-fold over 40 steps (a float64
# run of the same formula sits 1.3e-3 from ours and 2.4e-3 from diffusers). So the clipped eta = 0 case is
# compared over 10 steps, where the chains agree to 1.3e-5; the unclipped 40-step chains agree to 4e-6.
@pytest.mark.parametrize(
    "eta, clip, steps", [(0.0, False, 40), (0.7, False, 40), (0.7, True, 40), (0.0, True, 10)]
)
def test_ddim_equals_diffusers_pipeline(tiny_unet, eta, clip, steps):
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=clip)
    pipe = diffusers.DDIMPipeline(unet=tiny_unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    want = _pipeline_output(pipe, 2, 9, num_inference_steps=steps, eta=eta)
    sched.set_timesteps(steps)
    ours = df.sample(
        _wrap(tiny_unet),
        df.Schedule.linear(1000),
        (2, 3, 8, 8),
        timesteps=sched.timesteps.tolist(),
        method="ddim",
        eta=eta,
        clip=clip,
        generator=torch.Generator().manual_seed(9),
        backend="reference",
    )
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), want, atol=DIFFUSERS_ATOL / 2, rtol=0)


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

"""Schedule tables against hand computations in Python floats (float64), and respacing against improved-diffusion's rule."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ddpm_fast import Schedule, spaced_timesteps


def hand_tables(betas):
    """The DDPM formulas, one Python float at a time."""
    out = {k: [] for k in ("abar", "abar_prev", "pv", "c1", "c2")}
    abar = 1.0
    for b in betas:
        prev = abar
        abar = prev * (1.0 - b)
        out["abar"].append(abar)
        out["abar_prev"].append(prev)
        out["pv"].append(b * (1 - prev) / (1 - abar))
        out["c1"].append(b * math.sqrt(prev) / (1 - abar))
        out["c2"].append((1 - prev) * math.sqrt(1 - b) / (1 - abar))
    return out


@pytest.mark.parametrize("T", [1, 7, 1000])
def test_linear_tables_match_hand_computation(T):
    s = Schedule.linear(T)
    betas = np.linspace(1e-4, 0.02, T).tolist()
    assert s.betas.dtype == torch.float64
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-15, atol=0)
    h = hand_tables(betas)
    # float64 cumulative products over 1000 factors drift by at most ~1000 ulp relative
    tol = dict(rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(h["abar"], dtype=torch.float64), **tol)
    torch.testing.assert_close(
        s.alphas_cumprod_prev, torch.tensor(h["abar_prev"], dtype=torch.float64), **tol
    )
    torch.testing.assert_close(s.posterior_variance, torch.tensor(h["pv"], dtype=torch.float64), **tol)
    torch.testing.assert_close(s.posterior_mean_coef1, torch.tensor(h["c1"], dtype=torch.float64), **tol)
    torch.testing.assert_close(s.posterior_mean_coef2, torch.tensor(h["c2"], dtype=torch.float64), **tol)
    torch.testing.assert_close(
        s.sqrt_recip_alphas_cumprod, 1 / torch.tensor(h["abar"], dtype=torch.float64).sqrt(), **tol
    )
    if T > 1:
        # log variance clipped: index 0 takes the value at index 1 (beta-tilde_0 = 0)
        assert s.posterior_variance[0] == 0
        assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(h["pv"][1]), rel=1e-12)
        assert s.posterior_log_variance_clipped[5] == pytest.approx(math.log(h["pv"][5]), rel=1e-12)


@pytest.mark.parametrize("T", [1, 2, 7, 999, 1000, 1001])
def test_linear_betas_are_the_same_bits_on_every_kernel_set(T):
    """The vector kernels' linspace (fused multiply-adds from both ends), whatever ATen runs here: a tuned
    table records the betas' digest, and ATEN_CPU_CAPABILITY=default's scalar linspace moved 216 of 1000."""
    exact = [1e-4] if T == 1 else []  # one timestep: linspace gives the start
    step = (0.02 - 1e-4) / (T - 1) if T > 1 else 0.0
    for i in range(
        T if T > 1 else 0
    ):  # fma(step, i, start) below the middle, fma(-step, T - 1 - i, end) from it, exactly
        f = (
            Fraction(1e-4) + Fraction(step) * i
            if i < T // 2
            else Fraction(0.02) - Fraction(step) * (T - 1 - i)
        )
        exact.append(float(f))
    assert torch.equal(Schedule.linear(T).betas, torch.tensor(exact, dtype=torch.float64))
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert torch.equal(Schedule.linear(T).betas, torch.linspace(1e-4, 0.02, T, dtype=torch.float64))


def test_bundled_tuned_tables_fit_the_linear_schedule_here():
    from ddpm_fast.checkpoint import DEFAULT_MODEL_DIR
    from ddpm_fast.tuned import load_tuned, schedule_digest

    files = sorted((DEFAULT_MODEL_DIR / "tuned").glob("*.safetensors"))
    assert files
    for f in files:
        assert load_tuned(f).schedule == schedule_digest(Schedule.linear(1000)), f.name


def test_cosine_matches_improved_ddpm_formula_with_cap():
    T, s_ = 1000, 0.008
    s = Schedule.cosine(T)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    want = [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]
    torch.testing.assert_close(s.betas, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    assert s.betas[-1].item() == 0.999  # the cap is what stops beta_T = 1
    assert (s.betas[:-1] < 0.999).all()


@pytest.mark.parametrize(
    "betas, match",
    [
        ([[0.1, 0.2]], "1-D"),
        ([], "non-empty"),
        ([0.1, float("nan")], "finite"),
        ([0.1, 1.0], r"\(0, 1\)"),
        ([0.0, 0.5], r"\(0, 1\)"),
        ([-0.1], r"\(0, 1\)"),
    ],
)
def test_bad_betas_are_rejected_by_name(betas, match):
    with pytest.raises(ValueError, match="betas.*" + match):
        Schedule(betas)


def test_bad_T_and_betas_type():
    with pytest.raises(ValueError, match="num_timesteps"):
        Schedule.linear(0)
    with pytest.raises(TypeError, match="betas"):
        Schedule("abc")


def improved_diffusion_respace(abar, use):
    """improved-diffusion's SpacedDiffusion: walk all timesteps, emit 1 - abar/last_abar at kept ones."""
    last, betas = 1.0, []
    for i, a in enumerate(abar):
        if i in use:
            betas.append(1 - a / last)
            last = a
    return betas


@pytest.mark.parametrize("kept", [[0, 333, 666, 999], [0, 1, 2], [5, 17, 400, 998], [999]])
def test_respacing_matches_improved_diffusion(kept):
    s = Schedule.linear(1000)
    r = s.respace(kept)
    want = improved_diffusion_respace(s.alphas_cumprod.tolist(), set(kept))
    torch.testing.assert_close(r.betas, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert r.timesteps.tolist() == sorted(kept)
    # respacing keeps the marginals q(x_t | x_0) at the kept timesteps; alphas = 1 - betas round at ulp(1) ~ 1e-16
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[sorted(kept)], rtol=1e-12, atol=1e-15)


def test_respace_accepts_any_order_and_rejects_bad_lists():
    s = Schedule.linear(100)
    assert s.respace([50, 0, 99]).timesteps.tolist() == [0, 50, 99]
    with pytest.raises(ValueError, match="repeat"):
        s.respace([0, 5, 5])
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        s.respace([0, 100])
    with pytest.raises(ValueError, match="non-empty"):
        s.respace([])
    with pytest.raises(TypeError, match="integers"):
        s.respace([0.5, 2.0])


@pytest.mark.parametrize("T, steps", [(1000, 50), (1000, 1000), (1000, 2), (10, 3), (1000, 1)])
def test_spaced_timesteps(T, steps):
    ts = spaced_timesteps(T, steps)
    assert len(ts) == steps == len(set(ts))
    assert ts == sorted(ts)
    assert ts[-1] == T - 1
    if steps > 1:
        assert ts[0] == 0
        gaps = np.diff(ts)
        assert gaps.max() - gaps.min() <= 1  # evenly spread up to rounding
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(T, T + 1)
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(T, 0)


def test_spec_round_trip():
    for s in (Schedule.linear(50, 1e-3, 0.05), Schedule.cosine(40), Schedule([0.1, 0.2, 0.3])):
        s2 = Schedule.from_spec(s.spec)
        assert torch.equal(s.betas, s2.betas)
    with pytest.raises(ValueError, match="kind"):
        Schedule.from_spec({"kind": "sigmoid"})

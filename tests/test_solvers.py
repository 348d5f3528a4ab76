"""The multistep solvers (DPM-Solver++ 2M/3M/2M SDE, UniPC) on every path: the reference loop is the oracle.

- The fused update (torch twin, and the Triton kernel under TRITON_INTERPRET=1) driven by the solver's table
  columns reproduces the family's natural-form reference loop: both compute in float32, the table path with
  coefficients combined in float64 first, so they differ by float32 rounding of a few O(1) terms per step
  (measured <= 3e-7 over 8 steps on |x| <= 3); 1e-5 catches a wrong column or history shift (O(1e-2)).
- backend="fast" against the float32 reference: STYLE 6, the two differ by the update's rounding order
  only, at most the chain's propagated budget (tests/_rounding.py), on any CPU's vector kernels.
- Accuracy: with the exact noise model of Gaussian data the probability-flow ODE has a closed-form solution
  x_0 = mu + s (x_T - sqrt(abar_T) mu) / sqrt(abar_T s^2 + 1 - abar_T); at 40 log-SNR-spaced steps the
  second/third-order solvers come within 1/20 of DDIM's error at 40 steps (measured 1/30 to 1/1500).
- iPNDM (no diffusers twin: diffusers' IPNDMScheduler walks another schedule) equals its closed form on that
  model, the DEIS paper's update written out on the affine coefficients of x_T.
"""

import math

import pytest
import torch
from _rounding import max_diff, propagated_budget
from analytic_model import MU, S2, GaussianEps

import ddpm_fast as df
from ddpm_fast import noise
from ddpm_fast.cli import main
from ddpm_fast.kernels import make_step_counter, step_args, step_torch, step_triton
from ddpm_fast.plan import make_plan
from ddpm_fast.samplers import FAMILIES

SOLVERS = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "ipndm", "deis", "deis_2"]
S = df.Schedule.linear(1000)


def tiny_unet(out_channels=3):
    torch.manual_seed(0)
    net = df.UNet(
        df.UNetConfig.tiny(
            sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, out_channels=out_channels
        )
    )
    net.eval().schedule = S
    return net


def fused_chain(update, model, plan):
    """The table path by hand: x_T, then per step the model and one update with the history buffer."""
    coefs, ts = plan.table.to("cpu")
    x = noise.sample_noise(plan.seed, 0, plan.shape, noise.XT_SLOT, "cpu").contiguous()
    history = torch.zeros((plan.table.history, *x.shape))
    counter = make_step_counter(0, "cpu")
    run = step_args(
        x,
        coefs,
        ts,
        seed=plan.seed,
        learned=plan.table.learned,
        history=history,
        clip_range=plan.clip_range if plan.clip else None,
        eps_history=plan.table.history_of == "eps",
    )
    for i in range(plan.table.num_steps):
        out = model(x, ts[i : i + 1].expand(x.shape[0]))
        update(x, out, run, counter, out=x, advance=True)
    return x


@pytest.mark.parametrize("update", [step_torch, step_triton], ids=["twin", "triton"])
@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("shape, clip", [((3, 1, 5, 7), False), ((1, 2, 3, 3), True)])
def test_fused_update_walks_the_reference_loop(method, update, shape, clip):
    model = GaussianEps(S, MU, S2)
    plan = make_plan(model, S, shape, steps=8, method=method, clip=clip, seed=2)
    ref = df.sample(model, S, shape, steps=8, method=method, clip=clip, seed=2, backend="reference")
    got = fused_chain(update, model, plan)
    assert plan.table.history == FAMILIES[method].history > 0
    atol = 1e-5
    if plan.table.history_of == "eps":
        # multistep on eps: the natural form x_{t-1} = alpha_{t-1} (x / alpha_t + sum b_k eps_k) rounds at
        # |x| / alpha_t (~156 |x| at t = 999) where the columns' form cancels, so float32 runs of iPNDM differ by
        # ~2e-5 at 8 steps: bound them by the chain's propagated budget (tests/_rounding.py; 3.7e-3 for iPNDM,
        # 2.5e-5 for DEIS here), while an x0 history in place of eps moves x by 0.3-0.4 and a shifted H column
        # by 4e-3 (DEIS) to 4 (iPNDM)
        kw = dict(steps=8, method=method, clip=clip, seed=2)
        truth = df.sample(model, S, shape, backend="reference", dtype=torch.float64, **kw)
        atol = propagated_budget(model, S, shape, truth, **kw)
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def _err(x, truth):
    return (x.double() - truth).abs().max().item()


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("learned", [False, True])
def test_fast_backend_equals_reference(method, learned):
    net = tiny_unet(6 if learned else 3)
    kw = dict(shape=(3, 3, 8, 8), steps=6, method=method, seed=4, clip=True, schedule=S)
    net64 = tiny_unet(6 if learned else 3).double()
    truth = df.sample(net64, backend="reference", dtype=torch.float64, **kw)
    ref = df.sample(net, backend="reference", **kw)
    # Two float32 runs of one table differ by the update's rounding order only (the U-Net is the same eager
    # forward): at most the chain's propagated budget (tests/_rounding.py), whatever order either's vector
    # kernels sum in; so the fast run is also no further from float64 than the reference plus that budget.
    args = {k: v for k, v in kw.items() if k not in ("shape", "schedule")}
    budget = propagated_budget(net64, S, kw["shape"], truth, **args)
    assert budget < 0.1 * truth.abs().max().item(), budget
    for triton in (False, True):
        fast = df.sample(net, backend="fast", compile=False, triton=triton, **kw)
        assert max_diff(fast, ref) <= budget, (triton, max_diff(fast, ref), budget)


def test_history_is_part_of_the_runner_and_reset_per_run():
    from ddpm_fast import engine

    net = tiny_unet()
    kw = dict(shape=(2, 3, 8, 8), steps=5, seed=1, backend="fast", compile=False, triton=False, schedule=S)
    a = df.sample(net, method="unipc", **kw)
    b = df.sample(net, method="dpmpp_2m", **kw)  # history width 1: its own runner
    again = df.sample(net, method="unipc", **kw)  # the width-2 runner again: history zeroed at load
    assert torch.equal(a, again) and not torch.equal(a, b)
    widths = {
        0 if r.history is None else r.history.shape[0] for r in engine._engine_for(net).runners.values()
    }
    assert {1, 2} <= widths


def test_deterministic_solvers_beat_ddim_on_the_exact_ode():
    model = GaussianEps(S, MU, S2)
    shape = (64, 1, 4, 4)
    x_T = noise.sample_noise(1, 0, shape, noise.XT_SLOT, "cpu").double()
    abar = S.alphas_cumprod[-1].item()
    exact = MU + math.sqrt(S2) * (x_T - math.sqrt(abar) * MU) / math.sqrt(abar * S2 + 1 - abar)
    kw = dict(steps=40, seed=1, clip=False, backend="reference", dtype=torch.float64)
    ddim = _err(df.sample(model, S, shape, method="ddim", **kw), exact)
    for method in ("dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "deis_2"):
        err = _err(df.sample(model, S, shape, method=method, spacing="logsnr", **kw), exact)
        assert err <= ddim / 20, (method, err, ddim)


@pytest.mark.parametrize("steps, spacing", [(4, "linspace"), (10, "linspace"), (7, "karras")])
def test_ipndm_equals_its_closed_form_on_the_exact_model(steps, spacing):
    """On the Gaussian model eps_t(x) = k_t (x - sqrt(abar_t) mu) every state is A x_T + B per element; walk
    (A, B) through the DEIS paper's iPNDM: x_prev = sqrt(abar_prev/abar) x + (sqrt(1 - abar_prev)
    - sqrt(abar_prev/abar) sqrt(1 - abar)) eps_bar, eps_bar the Adams-Bashforth mix 1; (3, -1)/2;
    (23, -16, 5)/12; (55, -59, 37, -9)/24 of the newest eps, abar_prev = 1 at the end. float64: 1e-10."""
    from ddpm_fast.schedule import spacing_timesteps

    ab_mix = [[1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
    ts = list(reversed(spacing_timesteps(S, steps, spacing)))
    abar = [S.alphas_cumprod[t].item() for t in ts] + [1.0]
    A, B, eps = 1.0, 0.0, []
    for i in range(steps):
        a = abar[i]
        k = math.sqrt(1 - a) / (a * S2 + 1 - a)
        eps.insert(0, (k * A, k * (B - math.sqrt(a) * MU)))
        w = ab_mix[min(4, i + 1) - 1]
        e = [sum(c * p[j] for c, p in zip(w, eps)) for j in (0, 1)]
        r = math.sqrt(abar[i + 1] / a)
        d = math.sqrt(1 - abar[i + 1]) - r * math.sqrt(1 - a)
        A, B = r * A + d * e[0], r * B + d * e[1]
    shape = (2, 1, 3, 5)
    x_T = noise.sample_noise(3, 0, shape, noise.XT_SLOT, "cpu").double()
    got = df.sample(GaussianEps(S, MU, S2), S, shape, steps=steps, spacing=spacing, method="ipndm", clip=False,
                    seed=3, backend="reference", dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, A * x_T + B, atol=1e-10, rtol=0)
    assert abs(A) < 0.5  # the chain moved x (A = 1, B = 0 would be the identity)


def test_steps_and_spacings():
    from ddpm_fast.schedule import spacing_timesteps

    for spacing in ("uniform", "linspace", "trailing", "logsnr", "karras"):
        for n in (2, 5, 20, 50):
            ts = spacing_timesteps(S, n, spacing)
            assert len(ts) == n and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] <= 999
    assert spacing_timesteps(S, 5, "linspace") == [200, 400, 599, 799, 999]
    # EDM's rho = 7 crowds the small sigmas: at 100 steps two fall on one timestep of the linear schedule
    with pytest.raises(ValueError, match="steps=100 with spacing='karras' gives 99 distinct timesteps"):
        spacing_timesteps(S, 100, "karras")
    plan = make_plan(GaussianEps(S, MU, S2), S, (1, 1, 2, 2), steps=10, method="dpmpp_2m", spacing="logsnr")
    assert plan.table.timesteps.tolist() == list(reversed(spacing_timesteps(S, 10, "logsnr")))


@pytest.mark.parametrize(
    "kw, err, words",
    [
        (dict(method="dpm_solver"), ValueError, "method must be one of ('ddpm', 'ddim', 'dpmpp_2m'"),
        (dict(method="dpmpp_2m", eta=0.5), ValueError, "eta applies to method='ddim' only"),
        (dict(method="ddpm", spacing="logsnr", steps=10), ValueError, "spacing must be one of ('uniform',)"),
        (dict(method="unipc", spacing="leading", steps=10), ValueError, "spacing must be one of"),
        (dict(method="dpmpp_2m", spacing="logsnr"), ValueError, "spacing='logsnr' needs steps=N"),
        (dict(method="dpmpp_3m", steps=2), ValueError, "steps must be >= 3 for method='dpmpp_3m'"),
        (dict(method="ipndm", steps=3), ValueError, "steps must be >= 4 for method='ipndm'"),
        (dict(method="deis", steps=2), ValueError, "steps must be >= 3 for method='deis'"),
        (dict(method="deis_2", timesteps=[999]), ValueError, "steps must be >= 2 for method='deis_2'"),
        (dict(method="unipc", timesteps=[999, 500, 500]), ValueError, "timesteps must not repeat"),
        (dict(method="unipc", timesteps=[999, 1000]), ValueError, "timesteps must lie in"),
    ],
)
def test_bad_requests_name_the_argument(kw, err, words):
    with pytest.raises(err, match=words.replace("(", r"\(").replace(")", r"\)")):
        df.sample(GaussianEps(S, MU, S2), S, (1, 1, 2, 2), backend="reference", **kw)


def test_cli_methods_and_bad_options(tmp_path, capsys):
    argv = ["sample", "--num", "2", "--quiet", "--threads", "1", "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--method", "unipc", "--steps", "5", "--spacing", "logsnr"]) == 0
    assert main([*argv, "--method", "dpmpp_2m", "--steps", "5", "--spacing", "karras"]) == 0
    for bad, words in (
        (["--method", "dpmpp_2m", "--eta", "0.3"], "eta applies to method='ddim' only"),
        (["--method", "dpmpp_3m", "--steps", "2"], "steps must be >= 3"),
        (["--method", "euler"], "argument --method: invalid choice: 'euler'"),
        (["--spacing", "leading"], "argument --spacing: invalid choice"),
    ):
        capsys.readouterr()
        assert main([*argv, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (bad, err)

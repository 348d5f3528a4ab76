"""The multistep solvers equal diffusers' schedulers step for step (reference backend, generator noise).

diffusers' DPMSolverMultistepScheduler ("dpmsolver++" orders 2 and 3, "sde-dpmsolver++" order 2) and
UniPCMultistepScheduler at their defaults (final sigma zero, lower-order final steps, no thresholding) drive
the same model from the same generator; we walk `timesteps=scheduler.timesteps` with clip=False.

Model: the exact noise prediction for Gaussian data plus 0.05 sqrt(abar_t) x a random UNet2DModel, so x
stays bounded (an untrained U-Net alone predicts x0 ~ 1e2 at t = 999 of the linear schedule, more on the
cosine one, and the chain's scale, not the solver, would set the difference). Tolerance 2e-4 absolute in float32 (measured <= 9e-7 on the linear schedule): diffusers keeps its sigmas in
float32 and solves its UniPC systems in float32 while our coefficients are float64; a step's coefficients
then differ by ~1e-7 relative, and the few-step chains below (each step a contraction of x plus O(1) x0
terms) carry that to ~1e-6 on |x| <= 3, while a wrong order or coefficient moves x by 1e-2 or more. The
cosine schedule's first step adds the float32 conditioning of x0 at alpha_T ~ 5e-5 (see the test body).
DEIS ("deis" order 3, "deis_2") integrates its Lagrange polynomials in float32 where t log t terms of ~800
cancel (measured 5.5e-5 on the linear schedule); in float64, with diffusers' sigmas recomputed in float64,
it equals diffusers to 5e-12 (`test_deis_equals_diffusers_in_float64`).
"""

import pytest
import torch
from analytic_model import MU, S2, GaussianEps

import ddpm_fast as df
from tests._unet_helpers import small_diffusers_unet

diffusers = pytest.importorskip("diffusers")

ATOL = 2e-4

SCHEDULERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
    "deis": ("DEISMultistepScheduler", dict(algorithm_type="deis", solver_order=3)),
    "deis_2": ("DEISMultistepScheduler", dict(algorithm_type="deis", solver_order=2)),
}
SCHEDULES = {"linear": ("linear", df.Schedule.linear), "cosine": ("squaredcos_cap_v2", df.Schedule.cosine)}


@pytest.fixture(scope="module")
def unet():
    return small_diffusers_unet()


def diffusers_run(method, sched, model, shape, seed):
    """diffusers' loop: x_T = randn(generator), then model and scheduler.step(generator) per timestep."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, t.expand(shape[0]))
            kw = {"generator": g} if method == "dpmpp_2m_sde" else {}  # UniPC's step takes no generator
            x = sched.step(eps, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 10, 20, 50])
@pytest.mark.parametrize("method", list(SCHEDULERS))
def test_equals_diffusers_scheduler(unet, method, steps, schedule):
    cls, kw = SCHEDULERS[method]
    beta_schedule, ours_schedule = SCHEDULES[schedule]
    sched = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule=beta_schedule, **kw)
    sched.set_timesteps(steps)
    s = ours_schedule(1000)
    g_eps = GaussianEps(s, MU, S2)

    sqrt_abar = s.alphas_cumprod.sqrt().float()

    def model(x, t):  # the U-Net's share scaled by sqrt(abar): its x0 error is 0.05 sigma_t |U-Net|
        return g_eps(x, t) + 0.05 * sqrt_abar[t].reshape(-1, 1, 1, 1) * unet(x, t).sample

    shape = (2, 3, 8, 8)
    want = diffusers_run(method, sched, model, shape, seed=7)
    got = df.sample(
        model,
        s,
        shape,
        timesteps=sched.timesteps.tolist(),
        method=method,
        clip=False,
        generator=torch.Generator().manual_seed(7),
        backend="reference",
    )
    assert want.abs().max() < 5 and (want - want.mean()).abs().max() > 0.1  # bounded and not constant
    # The first step's x0 = (x - sigma eps) / alpha divides a float32 difference by alpha_T: one float32
    # rounding of eps (|eps| <= ~4) becomes SRM1_T x 4 eps32 in x0 (cosine: SRM1_T = 2.0e4, so ~1e-2), carried
    # into the next state with weight <= alpha of the next timestep (measured 1.9e-4 at 5 cosine steps).
    ts = sched.timesteps.tolist()
    carry = (
        4
        * torch.finfo(torch.float32).eps
        * s.sqrt_recipm1_alphas_cumprod[ts[0]]
        * s.sqrt_alphas_cumprod[ts[1]]
    )
    torch.testing.assert_close(got, want, atol=ATOL + carry.item(), rtol=0)


@pytest.mark.parametrize("method", list(SCHEDULERS))
def test_steps_n_walks_diffusers_timesteps(method):
    """steps=N with the solvers' default spacing keeps the timesteps diffusers' set_timesteps(N) gives."""
    from ddpm_fast.plan import make_plan

    cls, kw = SCHEDULERS[method]
    for steps in (5, 10, 20, 50):
        sched = getattr(diffusers, cls)(num_train_timesteps=1000, **kw)
        sched.set_timesteps(steps)
        plan = make_plan(lambda x, t: x, df.Schedule.linear(1000), (1, 1, 2, 2), steps=steps, method=method)
        assert plan.table.timesteps.tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50])
def test_karras_spacing_walks_diffusers_karras_timesteps(steps):
    """spacing="karras" keeps the timesteps of diffusers' use_karras_sigmas=True (linear schedule, where
    diffusers rounds its interpolated t as we do)."""
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    sched.set_timesteps(steps)
    ours = df.Schedule.linear(1000)
    from ddpm_fast.schedule import spacing_timesteps

    assert spacing_timesteps(ours, steps, "karras") == sorted(sched.timesteps.tolist())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [5, 10, 20, 50])
@pytest.mark.parametrize("method", ["deis", "deis_2"])
def test_deis_equals_diffusers_in_float64(method, steps, schedule):
    """diffusers' DEISMultistepScheduler run in float64 (its sigmas, float32 by construction, recomputed in
    float64 from the same formula, final sigma timestep 0's): 1e-9 absolute (measured 5e-12, the cosine first
    step's x0 conditioning SRM1_T = 2e4 times float64 rounding), while a wrong order moves x by 1e-2."""
    cls, kw = SCHEDULERS[method]
    beta_schedule, ours_schedule = SCHEDULES[schedule]
    sched = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule=beta_schedule, **kw)
    sched.set_timesteps(steps)
    s = ours_schedule(1000)
    sigma = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()
    sched.sigmas = torch.cat([sigma[sched.timesteps], sigma[:1]])
    g_eps, net, sqrt_abar = GaussianEps(s, MU, S2), small_diffusers_unet().double(), s.alphas_cumprod.sqrt()

    def model(x, t):
        return g_eps(x, t) + 0.05 * sqrt_abar[t].reshape(-1, 1, 1, 1) * net(x, t).sample

    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(7)
    want = torch.randn(shape, generator=g).double()  # x_T in float64 from the start: a float32 sample rounds
    with torch.no_grad():  # the first step's output (2e-8)
        for t in sched.timesteps:
            want = sched.step(model(want, t.expand(shape[0])), t, want).prev_sample
    got = df.sample(
        model,
        s,
        shape,
        timesteps=sched.timesteps.tolist(),
        method=method,
        clip=False,
        generator=torch.Generator().manual_seed(7),
        backend="reference",
        dtype=torch.float64,
    )
    assert want.dtype == torch.float64 and (want - want.mean()).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)

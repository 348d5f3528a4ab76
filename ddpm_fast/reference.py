"""The `reference` backend: the sampler family's own loop in eager PyTorch, in the caller's dtype. The oracle.

It draws x_T and one z per step where the table says so, either counter-based (`seed`, `start_index`, as
every backend) or from `plan.generator` in diffusers' pipeline order (x_T first, then one float32
`randn(shape)` per drawing step), and checks every model output (shape, finiteness; errors name the step).
"""

from __future__ import annotations

import torch

from ddpm_fast import noise
from ddpm_fast.errors import BadType
from ddpm_fast.plan import Plan, check_model_output
from ddpm_fast.progress import progress_bar
from ddpm_fast.samplers import family
from ddpm_fast.steps import fixed_sigma, learned_sigma

__all__ = ["run", "noise_source"]


def noise_source(plan: Plan):
    """(x_T, z(i, t)) in float32: diffusers' order from plan.generator, else counter-based; z(i, t) is zero
    (and draws nothing) at steps whose `table.draws[i]` is False."""
    shape, gen, draws = plan.shape, plan.generator, plan.table.draws
    zero = torch.zeros((), dtype=torch.float32, device=plan.device)
    if gen is not None:

        def draw():
            return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(plan.device)

        return draw(), lambda i, t: draw() if draws[i] else zero
    x_T = noise.sample_noise(plan.seed, plan.start_index, shape, noise.XT_SLOT, plan.device)
    return (
        x_T,
        lambda i, t: (
            noise.sample_noise(plan.seed, plan.start_index, shape, t, plan.device) if draws[i] else zero
        ),
    )


def _progress(plan: Plan, callback):
    """The plan's callback, plus a per-step progress bar when asked for."""
    if not plan.progress:
        return callback
    bar = progress_bar(plan.table.num_steps, "sampling", "step")

    def step(i, t, x):
        bar.update(1)
        if i == plan.table.num_steps - 1:
            bar.close()
        if callback is not None:
            callback(i, t, x)

    return step


def run(model, plan: Plan) -> torch.Tensor:
    """backend='reference': [B, C, H, W] in plan.dtype (model space)."""
    if plan.options:
        raise BadType(f"backend='reference' takes no extra options; got {sorted(plan.options)}")
    B, C = plan.shape[:2]
    out_shape = (B, plan.out_channels, *plan.shape[2:])
    step = iter(range(plan.table.num_steps))

    cond = {"y": plan.labels} if plan.labels is not None and plan.label_model else {}

    def eps_v(x, t: int):
        tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
        out = check_model_output(model(x, tt, **cond), out_shape, next(step), t).to(plan.dtype)
        return (out[:, :C], out[:, C:]) if plan.variance == "learned_range" else (out, None)

    r = plan.clip_range
    clip = (lambda x0: x0.clamp(-r, r)) if plan.clip else (lambda x0: x0)
    sigma = learned_sigma if plan.table.learned else fixed_sigma
    model_fn = eps_v
    if plan.guidance is not None:  # classifier guidance: the family reads the guided model, and its clip
        model_fn, clip = plan.guidance.reference(eps_v, plan.labels)  # returns the guided (clipped, moved) x0
    x_T, z = noise_source(plan)
    loop = family(plan.method).loop
    with torch.no_grad():
        return loop(
            model_fn,
            x_T.to(plan.dtype),
            plan.table,
            lambda i, t: z(i, t).to(plan.dtype),
            sigma=sigma,
            clip=clip,
            callback=_progress(plan, plan.callback),
        )

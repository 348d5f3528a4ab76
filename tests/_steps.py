"""One posterior step with its run's arguments made on the spot, for tests that call the step alone.

`one_step(fn)(x, model_out, coefs, timesteps, step, *, out=None, advance=False, **run)` is
`fn(x, model_out, step_args(x, coefs, timesteps, **run), step, out=out, advance=advance)`: a bad run argument
is refused by `step_args`, a bad per-call one by `fn`, each naming the argument.
"""

from __future__ import annotations

import functools

from ddpm_fast.kernels import step_args


def one_step(fn):
    """`fn` (step_torch, step_triton or posterior_step) taking the run's arguments as keywords."""

    @functools.wraps(fn)
    def call(x, model_out, coefs, timesteps, step, *, out=None, advance=False, **run):
        return fn(x, model_out, step_args(x, coefs, timesteps, **run), step, out=out, advance=advance)

    return call

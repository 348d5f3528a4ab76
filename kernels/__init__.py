"""Fused sampling-step kernels (Triton) and their torch twin; installed as `ddpm_fast.kernels`.

Importing this package never imports Triton; the Triton module loads on the first fused launch.

One step of a run, for row `step` of a `ddpm_fast.steps.StepTable` (DDPM fixed_small / fixed_large /
learned_range and DDIM share the formula; see `ddpm_fast.kernels.step`):

    coefs, timesteps = table.to(device)               # float32 [S, 8], int64 [S], built once per run
    args = step_args(x, coefs, timesteps, seed=seed, start_index=start_index, clip_range=1.0,
                     learned=table.learned)           # the run's fixed arguments, checked once
    counter = make_step_counter(0, device)            # int64 [1], read on the device
    for _ in range(S):
        eps = model(x, timesteps.index_select(0, counter).expand(B))   # the engine's business
        posterior_step(x, eps, args, counter, out=x, advance=True)

- `step_args(x, coefs, timesteps, *, seed, start_index, clip_range, learned, history, eps_history)`: the frozen
  `StepArgs` record of what a run fixes, checked once; every step takes it whole.
- `posterior_step(x, model_out, args, step, *, out, advance)`: the public entry. Triton when `use_triton(x)` (x on CUDA, or TRITON_INTERPRET=1),
  else the torch twin; a missing Triton falls back with one logged line.
- `step_torch(...)`: the twin, same signature (it checks only what may change per call); compiles with torch.compile(fullgraph=True) (no `.item()`).
- `step_triton(...)`: the launcher of the fused kernel, forced (RuntimeError without Triton or a CUDA
  tensor); it launches on x's device.
- seed and start_index: ints, or two one-element int64 tensors on x's device (`keys[0:1]`, `keys[1:2]` of one
  int64 [2] buffer) that both paths read on the device, so a compiled twin or a captured CUDA graph serves
  every seed, shard and chunk after `keys.copy_(...)`, without recompiling or re-capturing.
- `make_step_counter(start, device)`: the device counter `advance=True` increments inside the launch, so one
  CUDA graph replays every step. Between launches it holds the step; during an advancing launch its high
  32 bits count the programs that have read it, and the last one writes (step + 1, 0): one launch, no race.
"""

from ddpm_fast.kernels.step import (
    StepArgs,
    make_step_counter,
    posterior_step,
    step_args,
    step_torch,
    step_triton,
    use_triton,
)

__all__ = [
    "StepArgs",
    "step_args",
    "posterior_step",
    "step_torch",
    "step_triton",
    "use_triton",
    "make_step_counter",
]

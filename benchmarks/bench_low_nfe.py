"""Quality against NFE at 3-10 model calls: our methods and spacings, tuned tables, and diffusers' schedulers
driving the same model (the bundled digits U-Net) from the same x_T, side by side in one run.

Columns (clip off, N = 540 samples from one x_T draw that no tuning run uses; model calls in float32 by
default, whose chain rounding, ~1e-5, is four orders below the distances measured; --dtype float64):
- rmse: sqrt(mean (x_0 - x_0*)^2) in model space, x_0* the converged probability-flow ODE solution (UniPC
  at --ode-steps steps, default 300, from the same x_T);
- fd: the Frechet distance of a digit classifier's 10 logits between the samples and 540 held-out real
  digits (benchmarks/bench_quality.py's judge; 540 real training digits score ~0.4 against them).
Tuned tables are the checkpoint's own (tuned/nfe-<N>.safetensors), learned on torch.Generator seeds
1000003/1000004; the evaluation noise is seed 7.

Euler and Heun are sigma-space schedulers (x scaled by init_noise_sigma = sqrt(sigma_max^2 + 1), about 157
here, the model fed scale_model_input(x, t) at the scheduler's own fractional timesteps, Heun called on every
entry of its timesteps, interior ones twice: 2 s - 1 calls for s steps). Their default "linspace" grid ends
on t = 0 (sigma 0.01) before sigma 0: Euler spends a call there, and Heun's trapezoid takes its second slope
there, (x - x0_hat) / 0.01, times half the step (sigma 157 -> 0.01 at s = 2), which is why Heun-linspace is
off by tens to hundreds at 3-6 NFE (an independent sigma-space Heun over the same sigmas gives the same
x_0). The "trailing" rows are the spacing diffusers cites for few steps (arXiv 2305.08891, Table 2).

    python benchmarks/bench_low_nfe.py [--out benchmarks/results/DIR] [--nfe 3 4 5 6 8 10] [--num 540]
        [--methods ddim unipc tuned ...] [--schedulers Euler "Heun trailing" ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import ddpm_fast as df
from ddpm_fast.bench import cpu_model
from ddpm_fast.samplers import FAMILIES, build_step_table, family
from ddpm_fast.schedule import SPACINGS, spacing_timesteps
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.tuned import carried_tables, load_tuned

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import frechet, judge, to_pixels  # noqa: E402

EVAL_SEED = 7
OURS = [m for m in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis") if m in FAMILIES]
OUR_SPACINGS = [s for s in ("linspace", "logsnr", "karras") if s in SPACINGS]
# name -> (scheduler class, config, model calls per step count s)
DIFFUSERS = {
    "DDIM": (
        "DDIMScheduler",
        dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="linspace"),
        None,
    ),
    "DPM++2M": ("DPMSolverMultistepScheduler", dict(solver_order=2), None),
    "DPM++3M": ("DPMSolverMultistepScheduler", dict(solver_order=3), None),
    "DPM++2M karras": ("DPMSolverMultistepScheduler", dict(solver_order=2, use_karras_sigmas=True), None),
    "DPM++3M karras": ("DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True), None),
    "DPM singlestep-2": ("DPMSolverSinglestepScheduler", dict(solver_order=2), None),
    "DPM singlestep-3": ("DPMSolverSinglestepScheduler", dict(solver_order=3), None),
    "UniPC-2": ("UniPCMultistepScheduler", dict(solver_order=2), None),
    "UniPC-3": ("UniPCMultistepScheduler", dict(solver_order=3), None),
    "DEIS-2": ("DEISMultistepScheduler", dict(solver_order=2), None),
    "DEIS-3": ("DEISMultistepScheduler", dict(solver_order=3), None),
    "Euler": ("EulerDiscreteScheduler", dict(timestep_spacing="linspace"), None),
    "Euler trailing": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing"), None),
    "Heun": ("HeunDiscreteScheduler", dict(timestep_spacing="linspace"), "heun"),
    "Heun trailing": ("HeunDiscreteScheduler", dict(timestep_spacing="trailing"), "heun"),
}


def eps_of(model):
    def call(x, t):
        tt = t if isinstance(t, torch.Tensor) else torch.tensor(t)
        return model(x, tt.to(torch.int64).reshape(-1).expand(x.shape[0]))

    return call


def run_ours(model64, table, xT):
    """A deterministic table walked from xT in float64, clip off, through the family's reference loop."""
    loop = family(table.method).loop
    calls = [0]

    def model_fn(x, t):
        calls[0] += 1
        return eps_of(model64)(x, t), None

    with torch.no_grad():
        x = loop(model_fn, xT.clone(), table, lambda i, t: torch.zeros_like(xT), sigma=lambda c, v: 0.0,
                 clip=lambda x0: x0)  # fmt: skip
    return x, calls[0]


def run_diffusers(model64, name, nfe, xT, spec):
    import diffusers

    cls, cfg, kind = DIFFUSERS[name]
    sched = getattr(diffusers, cls)(
        num_train_timesteps=spec["num_timesteps"], beta_start=spec["beta_start"], beta_end=spec["beta_end"],
        beta_schedule="linear", **cfg,
    )  # fmt: skip
    steps = (nfe + 1) // 2 if kind == "heun" else nfe  # Heun: 2 s - 1 calls for s steps
    sched.set_timesteps(steps)
    x = xT.clone() * sched.init_noise_sigma
    calls = 0
    with torch.no_grad():
        # the model at the scheduler's own t (Euler, Heun: fractional), as a diffusers pipeline calls it
        for t in sched.timesteps:
            calls += 1
            eps = model64(sched.scale_model_input(x, t), t.reshape(-1).expand(x.shape[0]))
            x = sched.step(eps, t, x).prev_sample
    return x, calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default=None, help="results folder (default: benchmarks/results/<date>-cpu-low-nfe)"
    )
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8, 10])
    p.add_argument("--num", type=int, default=540)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--methods", nargs="*", choices=[*OURS, "tuned"], default=[*OURS, "tuned"],
                   help="our methods to run (none: only diffusers'); default all")  # fmt: skip
    p.add_argument("--schedulers", nargs="*", choices=list(DIFFUSERS), default=list(DIFFUSERS),
                   metavar="NAME", help=f"diffusers' schedulers to run, of {list(DIFFUSERS)}; default all")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--ode-steps", type=int, default=300)
    args = p.parse_args(argv)
    out = Path(args.out or Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-cpu-low-nfe")
    out.mkdir(parents=True, exist_ok=True)
    model = df.default_model()
    dtype = getattr(torch, args.dtype)
    model64 = copy.deepcopy(model).to(dtype)  # the model every provider calls
    s = model.defaults.schedule
    spec = s.spec
    xT = torch.randn((args.num, *model.defaults.image_shape), generator=torch.Generator().manual_seed(EVAL_SEED),
                     dtype=torch.float64).to(dtype)  # fmt: skip
    clf, real, real_train, _ = judge()
    t0 = time.perf_counter()
    ode = build_step_table(s.respace(torch.tensor(spacing_timesteps(s, args.ode_steps, "linspace"))), method="unipc",
                           variance="fixed_small")  # fmt: skip
    ode_x, _ = run_ours(model64, ode, xT)
    rows = []

    def add(provider, spacing, nfe, x, calls):
        px = to_pixels(x)
        rows.append({"provider": provider, "spacing": spacing, "nfe": nfe, "calls": calls,
                     "rmse": math.sqrt(float(((x - ode_x) ** 2).mean())),
                     "fd": frechet(clf.decision_function(px), real)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    add(f"ODE (UniPC {args.ode_steps})", "linspace", args.ode_steps, ode_x, args.ode_steps)
    tables = carried_tables(model)
    for nfe in args.nfe:
        for method in [m for m in OURS if m in args.methods]:
            for spacing in OUR_SPACINGS if method != "ddim" else ["linspace"]:
                try:
                    kept = spacing_timesteps(s, nfe, spacing)
                    table = build_step_table(
                        s.respace(torch.tensor(kept)), method=method, variance="fixed_small"
                    )
                except ValueError as e:  # an order above the steps, or a spacing with fewer distinct steps
                    print(f"skip {method} {spacing} {nfe}: {e}", flush=True)
                    continue
                add(f"ours {method}", spacing, nfe, *run_ours(model64, table, xT))
        if nfe in tables and "tuned" in args.methods:
            t = load_tuned(tables[nfe], model=model, schedule=s, nfe=nfe)
            add(f"ours tuned ({t.base})", "learned", nfe, *run_ours(model64, t.table, xT))
        if not args.no_diffusers:
            for name in [n for n in DIFFUSERS if n in args.schedulers]:
                try:
                    x, calls = run_diffusers(model64, name, nfe, xT, spec)
                except Exception as e:  # a scheduler that cannot run this count: recorded, the rest go on
                    print(f"skip diffusers {name} {nfe}: {type(e).__name__}: {e}", flush=True)
                    continue
                add(f"diffusers {name}", "default", nfe, x, calls)
    meta = {"machine": _cpu(), "torch": torch.__version__, "dtype": args.dtype,
            "ode_steps": args.ode_steps,
            "seconds": time.perf_counter() - t0, "num": args.num, "eval_seed": EVAL_SEED,
            "fd_real_train": frechet(real_train, real)}  # fmt: skip
    atomic_write_bytes(str(out / "low_nfe.json"), json.dumps({"meta": meta, "rows": rows}, indent=1).encode())
    (out / "low_nfe.md").write_text(markdown(rows, args.nfe, meta))
    plot(rows, out / "low_nfe.png")
    print(out / "low_nfe.md")
    return 0


def _cpu() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def _best(rows, prefix, nfe):
    got = [r for r in rows if r["provider"].startswith(prefix) and r["nfe"] == nfe and r["calls"] <= nfe]
    return min(got, key=lambda r: r["rmse"]) if got else None


def markdown(rows, nfes, meta) -> str:
    lines = [
        "# Quality against NFE, digits model (benchmarks/bench_low_nfe.py)",
        "",
        f"{meta['num']} samples from one x_T (seed {meta['eval_seed']}), {meta['dtype']}, clip off; rmse to the ODE "
        f"solution (UniPC at {meta['ode_steps']} steps), fd of the digit classifier's logits against held-out real digits (real training digits: "
        f"{meta['fd_real_train']:.2f}). {meta['seconds']:.0f} s on {meta['machine']}, torch {meta['torch']}.",
        "",
        "| NFE | best of ours (untuned) | rmse | fd | tuned | rmse | fd | best of diffusers | rmse | fd | tuned / diffusers |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for nfe in nfes:
        ours = _best([r for r in rows if "tuned" not in r["provider"]], "ours", nfe)
        tuned = _best(rows, "ours tuned", nfe)
        theirs = _best(rows, "diffusers", nfe)

        def cell(r):
            return (
                ("-", "-", "-")
                if r is None
                else (f"{r['provider']} {r['spacing']}", f"{r['rmse']:.4f}", f"{r['fd']:.2f}")
            )

        ratio = f"{tuned['rmse'] / theirs['rmse']:.2f}" if tuned and theirs else "-"
        lines.append(f"| {nfe} | " + " | ".join([*cell(ours), *cell(tuned), *cell(theirs), ratio]) + " |")
    lines += [
        "",
        "Every row:",
        "",
        "| provider | spacing | NFE | model calls | rmse | fd |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['provider']} | {r['spacing']} | {r['nfe']} | {r['calls']} | {r['rmse']:.4f} | {r['fd']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider in sorted({r["provider"] for r in rows if r["nfe"] <= 10}):
        pts = {}
        for r in rows:
            if r["provider"] == provider and r["nfe"] <= 10:
                pts[r["nfe"]] = min(pts.get(r["nfe"], math.inf), r["rmse"])
        xs = sorted(pts)
        style = "-o" if "tuned" in provider else ("--" if provider.startswith("diffusers") else ":")
        ax.plot(xs, [pts[x] for x in xs], style, label=provider, lw=2 if "tuned" in provider else 1)
    ax.set_xlabel("NFE (model calls)")
    ax.set_ylabel("RMSE to the ODE solution")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

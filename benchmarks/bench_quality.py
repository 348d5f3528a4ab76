"""Quality against NFE on the bundled digits model, every sampler side by side; speed at equal quality.

    python benchmarks/bench_quality.py --out benchmarks/results/DATE-cpu-quality
    python benchmarks/bench_quality.py --metric fid --model ckpt/ --ref cifar10_train_stats.npz \
        --num 10000 --device cuda --out fid-vs-nfe/          # any model: FID against a reference (ddpm-fast fid)

Two figures per (method, spacing, NFE), from NUM samples drawn with counter-based noise (seed 0):
- confident share: the share of samples a logistic-regression digit classifier (standardised pixels, fit on
  70% of scikit-learn's digits, ~97% held-out accuracy) classifies with probability >= 0.9 (the quality
  test's judge; real held-out digits score about 0.87);
- Frechet distance (FD) to the held-out 30% of real digits in the classifier's feature space: the 10
  decision-function values of that classifier (the logits of its classes), Gaussian fit, float64 matrix
  square root. Its floor is FD(real training digits, held-out digits) at the same sample count.
DDPM at 100 and 1000 steps is the yardstick. "Equal quality" is the first NFE at which a method's FD comes
within 5% of 1000-step DDPM's (or below it); at that NFE the driver then times ddpm-fast's reference and
fast backends and, where diffusers has the scheduler, the diffusers scheduler driving the same U-Net.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ddpm_fast as df
import ddpm_fast.engine  # noqa: F401  (every backend module loaded at start: one consistent version per run)
import ddpm_fast.reference  # noqa: F401
from ddpm_fast.shards import atomic_write_bytes

NUM = 540  # the held-out real set's size, so both sides of every FD have the same count
NFES = (5, 10, 20, 50)
METHODS = ("ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
}


def judge():
    """(classifier, features(x) -> [N, 10], held-out real features, training real features, real share)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.data, d.target, test_size=0.3, random_state=0, stratify=d.target
    )
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_tr, y_tr)
    real_share = float((clf.predict_proba(x_te).max(1) >= 0.9).mean())
    rng = np.random.default_rng(0)
    train_same_count = x_tr[rng.choice(len(x_tr), len(x_te), replace=False)]
    return clf, clf.decision_function(x_te), clf.decision_function(train_same_count), real_share


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), float64, symmetric square roots."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r = sqrt_psd(s_a)
    cross = sqrt_psd(r @ s_b @ r)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))


def to_pixels(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 8).reshape(x.shape[0], 64).cpu().numpy()  # the digits' 0..16


def measure(model, clf, real, method, steps, spacing=None) -> dict:
    t0 = time.perf_counter()
    x = df.sample(model, shape=(NUM, 1, 8, 8), steps=steps, method=method, spacing=spacing, seed=0,
                  backend="reference")  # fmt: skip
    seconds = time.perf_counter() - t0
    px = to_pixels(x)
    share = float((clf.predict_proba(px).max(1) >= 0.9).mean())
    return {"method": method, "spacing": spacing or "default", "nfe": steps, "confident_share": share,
            "fd": frechet(clf.decision_function(px), real), "seconds": seconds}  # fmt: skip


def timed(fn, repeats=3) -> float:
    fn()  # warm-up (compile, first-call set-up)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed_rows(model, method, nfe, batch) -> list[dict]:
    """images/s at `nfe` for ddpm-fast reference / fast and the diffusers scheduler on the same U-Net."""
    kw = dict(shape=(batch, 1, 8, 8), steps=nfe, method=method, seed=0)
    rows = [
        ("reference", lambda: df.sample(model, backend="reference", **kw)),
        # compiled (its cost paid in the warm-up call), with the torch twin of the update on CPU
        ("fast", lambda: df.sample(model, backend="fast", compile=True, triton=False, **kw)),
    ]
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is not None and method in DIFFUSERS:
        cls, skw = DIFFUSERS[method]
        sched = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="linear", **skw)
        if method == "ddim":
            sched.register_to_config(clip_sample=True)

        def run_diffusers():
            sched.set_timesteps(nfe)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(kw["shape"], generator=g)
            with torch.no_grad():
                for t in sched.timesteps:
                    x = sched.step(model(x, t.expand(batch)), t, x).prev_sample
            return x

        rows.append(("diffusers", run_diffusers))
    out = []
    for name, fn in rows:
        s = timed(fn)
        out.append(
            {"method": method, "nfe": nfe, "provider": name, "batch": batch, "images_per_s": batch / s}
        )
    ref = next(r["images_per_s"] for r in out if r["provider"] == "diffusers") if len(out) > 2 else None
    for r in out:
        r["vs_diffusers"] = r["images_per_s"] / ref if ref else None
    return out


def plot(rows, yardstick, floor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for (method, spacing), group in _groups(rows):
        g = sorted(group, key=lambda r: r["nfe"])
        label = method if spacing == "default" else f"{method} ({spacing})"
        style = "--" if spacing != "default" else "-"
        axes[0].plot([r["nfe"] for r in g], [r["fd"] for r in g], style, marker="o", label=label)
        axes[1].plot([r["nfe"] for r in g], [r["confident_share"] for r in g], style, marker="o", label=label)
    for ax, key, name in (
        (axes[0], "fd", "Frechet distance (classifier logits)"),
        (axes[1], "confident_share", "confident share"),
    ):
        ax.axhline(yardstick[key], color="k", lw=1, label="DDPM 1000 steps")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(floor, color="gray", ls=":", lw=1, label="real vs real (floor)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bundled digits model, {NUM} samples per point", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _groups(rows):
    keys = []
    for r in rows:
        k = (r["method"], r["spacing"])
        if k not in keys and r["method"] != "ddpm":
            keys.append(k)
    return [(k, [r for r in rows if (r["method"], r["spacing"]) == k]) for k in keys]


def fid_rows(args) -> list[dict]:
    """--metric fid: FID of --num samples of --model against --ref (`ddpm_fast.metrics.fid`, the Inception
    network the user provides) for DDPM at 1000 steps and every method at each NFE; a table and rows."""
    import tempfile

    from ddpm_fast.checkpoint import load_model
    from ddpm_fast.runs import generate

    model = load_model(args.model, device=args.device)
    rows = []
    points = [("ddpm", 1000)] + [(m, n) for m in METHODS for n in NFES]
    with tempfile.TemporaryDirectory() as tmp:
        for method, nfe in points:
            path = Path(tmp) / f"{method}-{nfe}.npz"
            t0 = time.perf_counter()
            generate(model, path, num=args.num, batch_size=args.batch_size, steps=nfe, method=method, seed=0,
                     device=args.device)  # fmt: skip
            seconds = time.perf_counter() - t0
            r = df.metrics.fid(str(path), args.ref, inception=args.inception, device=args.device, cache=False)
            rows.append(
                {"method": method, "spacing": "default", "nfe": nfe, "fid": r.fid, "seconds": seconds}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for quality.md, quality.json, quality.png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed-batch", type=int, default=64)
    p.add_argument("--metric", choices=("digits", "fid"), default="digits", help="digits: the bundled model's "
                   "classifier figures; fid: FID of --model against --ref")  # fmt: skip
    p.add_argument("--model", help="--metric fid: a checkpoint directory")
    p.add_argument(
        "--ref", help="--metric fid: reference images or statistics (as `ddpm-fast fid` takes them)"
    )
    p.add_argument("--inception", help="--metric fid: inception-2015-12-05.pt (default: its cache location)")
    p.add_argument("--num", type=int, default=10000, help="--metric fid: samples per point")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.metric == "fid":
        if not (args.model and args.ref):
            p.error("--metric fid needs --model and --ref")
        return fid_main(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = df.default_model()
    clf, real, train_real, real_share = judge()
    floor = frechet(train_real, real)
    rows = []
    for n in (100, 1000):
        rows.append(measure(model, clf, real, "ddpm", n))
        print(json.dumps(rows[-1]), flush=True)
    yardstick = rows[-1]
    for method in METHODS:
        for spacing in (None,) if method == "ddim" else (None, "logsnr"):
            for n in NFES:
                rows.append(measure(model, clf, real, method, n, spacing))
                print(json.dumps(rows[-1]), flush=True)
    equal = {}
    for (method, spacing), group in _groups(rows):
        hit = [r for r in sorted(group, key=lambda r: r["nfe"]) if r["fd"] <= 1.05 * yardstick["fd"]]
        equal[f"{method}/{spacing}"] = hit[0]["nfe"] if hit else None
    # the quality rows are kept even if a speed measurement fails
    atomic_write_bytes(
        out / "quality.json", json.dumps({"rows": rows, "equal_quality_nfe": equal}, indent=1).encode()
    )
    speed = []
    for key, nfe in equal.items():
        method, spacing = key.split("/")
        if nfe is not None and spacing == "default":
            speed += speed_rows(model, method, nfe, args.speed_batch)
    meta = {
        "machine": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)",
        "torch": torch.__version__, "python": sys.version.split()[0], "num_samples": NUM,
        "real_share": real_share, "fd_floor": floor, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    report = {"meta": meta, "rows": rows, "equal_quality_nfe": equal, "speed": speed}
    atomic_write_bytes(out / "quality.json", json.dumps(report, indent=1).encode())
    lines = _quality_lines(rows, yardstick, equal, speed, meta, args.speed_batch)
    atomic_write_bytes(out / "quality.md", ("\n".join(lines) + "\n").encode())
    plot(rows, yardstick, floor, out / "quality.png")
    print("\n".join(lines))
    return 0


def fid_main(args) -> int:
    """--metric fid: FID of --model against --ref at each NFE, to fid_vs_nfe.json and .md."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = fid_rows(args)
    atomic_write_bytes(
        out / "fid_vs_nfe.json", json.dumps({"rows": rows, "args": vars(args)}, indent=1).encode()
    )
    table = ["| method | NFE | FID |", "| --- | --- | --- |"] + [
        f"| {r['method']} | {r['nfe']} | {r['fid']:.2f} |" for r in rows
    ]
    atomic_write_bytes(out / "fid_vs_nfe.md", ("\n".join(table) + "\n").encode())
    print("\n".join(table))
    return 0


def _quality_lines(rows, yardstick, equal, speed, meta, speed_batch) -> list[str]:
    """quality.md: the quality table, the first NFE within 5% of 1000-step DDPM, and the speed there."""
    real_share, floor = meta["real_share"], meta["fd_floor"]
    lines = [
        f"# Quality against NFE: bundled digits model ({NUM} samples, seed 0, reference backend)",
        "",
        f"Real held-out digits: confident share {real_share:.3f}; FD floor (real vs real, {NUM} each) {floor:.3f}.",
        "",
        "| method | spacing | NFE | confident share | FD |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['method']} | {r['spacing']} | {r['nfe']} | {r['confident_share']:.3f} | {r['fd']:.3f} |"
        for r in rows
    ]
    lines += ["", f"First NFE within 5% of 1000-step DDPM's FD ({yardstick['fd']:.3f}):", ""]
    lines += [f"- {k}: {v if v is not None else 'not reached by 50'}" for k, v in equal.items()]
    if speed:
        lines += ["", f"Speed at that NFE, batch {speed_batch} (best of 3, {meta['machine']}):", "",
                  "| method | NFE | provider | images/s | vs diffusers |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        lines += [
            f"| {r['method']} | {r['nfe']} | {r['provider']} | {r['images_per_s']:.1f} | "
            f"{_ratio(r['vs_diffusers'])} |"
            for r in speed
        ]
    return lines


if __name__ == "__main__":
    sys.exit(main())

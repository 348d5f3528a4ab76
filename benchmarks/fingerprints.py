"""Fingerprints of sampled images: sha256 of the output tensors' bytes, one per (model, case, backend).

    python benchmarks/fingerprints.py --json before.json      # about 45 s on one thread
    python benchmarks/fingerprints.py --compare before.json   # exit 1 if any entry differs, listing each

A refactor that claims "behaviour identical" must leave every hash as it was. Cases: every method family
(ddpm, ddim, dpmpp_2m, unipc, ipndm, deis, tuned at 5 NFE), karras spacing, for a tiny class-conditional
ADM a labelled run and a classifier-guided one, and a five-step training run. Backends: reference, fast
(the torch twin, and the Triton kernels through the interpreter: a subprocess with TRITON_INTERPRET=1, set
before Triton is imported), onnx and openvino (an eps graph of each model, exported once to a temporary
folder). Small batches, few steps, fixed seeds: each hash is bit for bit, so no tolerance enters. A refusal
is fingerprinted too, as its error's builtin type (ValueError for a BadValue) and first line. The ddpm_fast
imported is this checkout's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ddpm_fast, not an installed copy

BATCH = 3
STEPS = 6
SEED = 11

# name -> sample() keywords (shape and seed added per model)
CASES = {
    "ddpm": dict(method="ddpm", steps=STEPS),
    "ddim": dict(method="ddim", steps=STEPS, eta=0.5),
    "dpmpp_2m": dict(method="dpmpp_2m", steps=STEPS),
    "unipc": dict(method="unipc", steps=STEPS),
    "ipndm": dict(method="ipndm", steps=STEPS),
    "deis": dict(method="deis", steps=STEPS),
    "tuned5": dict(method="tuned", steps=5),
    "karras": dict(method="dpmpp_2m", steps=STEPS, spacing="karras"),
}
COND_CASES = {
    "labels": dict(method="ddim", steps=STEPS, labels=torch.tensor([0, 2, 1])),
    "random_labels": dict(method="unipc", steps=STEPS, labels="random"),
    "guided": dict(method="ddpm", steps=STEPS, labels=torch.tensor([1, 0, 2]), guided=True),
}
BACKENDS = ("reference", "fast", "onnx", "openvino")
TUNED5 = (
    Path(__file__).resolve().parents[1] / "ddpm_fast" / "assets" / "digits" / "tuned" / "nfe-5.safetensors"
)


def digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class LinearClassifier(torch.nn.Module):
    """A seeded linear classifier(x, t) -> logits [B, 3]: cheap, differentiable, deterministic."""

    num_classes = 3

    def __init__(self, numel: int):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = torch.nn.Parameter(torch.randn(numel, 3, generator=g) / numel**0.5)

    def forward(self, x, t):
        return x.flatten(1) @ self.w + 1e-3 * t[:, None].float()


def models():
    """(name, module, cases): the bundled digits model and a tiny class-conditional ADM."""
    import ddpm_fast as df

    digits = df.default_model().eval()
    torch.manual_seed(0)
    cond = df.ADM(df.ADMConfig.tiny(image_size=8, num_classes=3)).eval()
    return [("digits", digits, CASES), ("adm_cond", cond, COND_CASES)]


def run_cases(backends, onnx_dir: Path) -> dict:
    """{model/case/backend: sha256}; a case a backend refuses records its error's type and first line."""
    import ddpm_fast as df

    out = {}
    for name, model, cases in models():
        shape = (BATCH, *model.config.image_shape)
        onnx_path = onnx_dir / f"{name}.onnx"
        for backend in backends:
            if backend in ("onnx", "openvino") and not onnx_path.exists():
                from ddpm_fast.export.onnx_export import export_onnx

                export_onnx(model, onnx_path, validate=False)
            subject = onnx_path if backend in ("onnx", "openvino") else model
            for case, kw in cases.items():
                kw = dict(kw)
                if kw.pop("guided", False):
                    kw["guidance"] = df.ClassifierGuidance(
                        LinearClassifier(int(torch.tensor(shape[1:]).prod())), 2.0
                    )
                if name != "digits":
                    kw["schedule"] = df.Schedule.linear(1000)
                if kw["method"] == "tuned" and subject is onnx_path:  # the exported file carries no tables
                    kw["tuned"] = TUNED5
                key = f"{name}/{case}/{backend}"
                try:
                    with torch.no_grad() if "guidance" not in kw else torch.enable_grad():
                        x = df.sample(subject, shape=shape, seed=SEED, backend=backend, **kw)
                    out[key] = digest(x)
                except Exception as e:  # noqa: BLE001 - a refusal is part of the behaviour being fingerprinted
                    out[key] = f"{_builtin_type(e)}: {str(e).splitlines()[0][:120]}"
    return out


def _builtin_type(e: Exception) -> str:
    """The builtin exception class a refusal is (ValueError for errors.BadValue): the contract callers catch."""
    return next(c for c in type(e).__mro__ if c.__module__ == "builtins").__name__


def train_prints(tmp: Path) -> dict:
    """A short training run of the tiny U-Net on the digits (warm-up, EMA, dropout): its EMA and model
    weights, and the logged losses and learning rates."""
    from ddpm_fast import train as tr

    cfg = tr.TrainConfig(preset="tiny", dropout=0.1, batch_size=8, lr=1e-3, warmup=3, ema_decay=0.9, steps=5)
    ema = tr.train(
        cfg, tmp / "train", device="cpu", sample_steps=0, progress=False, log_every=1, save_every=5
    )
    h = hashlib.sha256()
    for v in ema.state_dict().values():
        h.update(v.contiguous().numpy().tobytes())
    logged = [json.loads(line) for line in (tmp / "train" / tr.LOG_JSONL).read_text().splitlines()]
    for rec in logged:
        rec.pop("time_s")
    return {"train/ema": h.hexdigest(), "train/log": hashlib.sha256(json.dumps(logged).encode()).hexdigest()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the fingerprints here")
    p.add_argument("--compare", help="a JSON written before: exit 1 where any entry differs")
    p.add_argument("--child", choices=("interpret",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.child == "interpret":  # the Triton interpreter: fast backend only
            print(
                json.dumps(
                    {
                        k.replace("/fast", "/fast-interpret"): v
                        for k, v in run_cases(("fast",), Path(tmp)).items()
                    }
                )
            )
            return 0
        env = dict(os.environ, TRITON_INTERPRET="1")
        child = subprocess.run(
            [sys.executable, __file__, "--child", "interpret"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("run without TRITON_INTERPRET: the parent measures the torch twin")
        prints = run_cases(BACKENDS, Path(tmp))
        prints.update(train_prints(Path(tmp)))
        prints.update(json.loads(child.stdout.strip().splitlines()[-1]))
    prints = dict(sorted(prints.items()))
    for k, v in prints.items():
        print(f"{k:40s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(prints, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diff = sorted(k for k in before.keys() | prints.keys() if before.get(k) != prints.get(k))
        print(f"{len(prints) - len(diff)} of {len(before.keys() | prints.keys())} fingerprints equal")
        for k in diff:
            print(f"DIFFERS {k}: before {before.get(k)} now {prints.get(k)}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

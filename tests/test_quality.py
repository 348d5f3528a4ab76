"""Sample quality of the bundled digits model, measured by a classifier trained on real digits.

A logistic-regression classifier (standardised pixels) is fit on 70% of scikit-learn's digits. On the held-out
30% it is confident (max probability >= 0.9) on a share R of real digits. We draw 256 samples from the bundled
model and require:

    share of samples classified with probability >= 0.9  >=  0.9 * R
    every digit class present; no class above 25% of the samples

Samples are mapped from model space [-1, 1] to the classifier's input range 0..16 (the digits' own scale).
Sampling uses 100 respaced DDPM steps (improved-diffusion respacing) to fit the CI budget; the model's
figures at 100 and at all 1000 steps are in the README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ddpm_fast as df

NUM_SAMPLES = 256
SAMPLE_STEPS = 100
CONFIDENT = 0.9  # classifier probability that counts as "recognisable"
RATIO = 0.9  # sample share must reach this fraction of the real share
MAX_CLASS_SHARE = 0.25


@pytest.fixture(scope="module")
def classifier():
    """(fitted classifier, share of held-out real digits it classifies with probability >= CONFIDENT)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.data, d.target, test_size=0.3, random_state=0, stratify=d.target
    )
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_tr, y_tr)
    p = clf.predict_proba(x_te)
    assert (p.argmax(1) == y_te).mean() > 0.95  # the judge itself must be good: ~97% held-out accuracy
    return clf, float((p.max(1) >= CONFIDENT).mean())


@pytest.fixture(scope="module")
def model():
    return df.default_model()


def _options(backend: str) -> dict:
    if backend != "fast" or torch.cuda.is_available():
        return {}
    # CPU: the engine's step function with the torch twin of the fused update. The Triton interpreter
    # (TRITON_INTERPRET=1 in tests) would take minutes at 256 samples, and a cold torch.compile ~40 s;
    # both are checked against the reference by the kernel and engine tests. Quality is what is asked here.
    return {"triton": False, "compile": False}


@pytest.mark.slow  # two 256-sample runs of 100 steps: ~15 s on 2 cores
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_bundled_model_samples_are_recognisable_digits(backend, classifier, model):
    clf, real_share = classifier
    x = df.sample(
        model,
        shape=(NUM_SAMPLES, *model.config.image_shape),
        steps=SAMPLE_STEPS,
        seed=0,
        backend=backend,
        **_options(backend),
    )
    assert x.shape == (NUM_SAMPLES, 1, 8, 8)
    features = ((x.float().clamp(-1, 1) + 1) * 8).reshape(NUM_SAMPLES, 64).cpu().numpy()
    p = clf.predict_proba(features)
    share = float((p.max(1) >= CONFIDENT).mean())
    counts = np.bincount(p.argmax(1), minlength=10)
    print(f"\n{backend}: sample share {share:.3f}, real share {real_share:.3f}, classes {counts.tolist()}")
    assert share >= RATIO * real_share, (
        f"{backend}: {share:.3f} of samples classified with p >= {CONFIDENT}, below {RATIO} x the real "
        f"digits' {real_share:.3f}"
    )
    assert (counts > 0).all(), (
        f"{backend}: digit classes missing from the samples: {np.flatnonzero(counts == 0)}"
    )
    assert counts.max() <= MAX_CLASS_SHARE * NUM_SAMPLES, f"{backend}: one class dominates: {counts.tolist()}"


def _share(clf, x) -> float:
    features = ((x.float().clamp(-1, 1) + 1) * 8).reshape(x.shape[0], 64).cpu().numpy()
    return float((clf.predict_proba(features).max(1) >= CONFIDENT).mean())


@pytest.mark.slow  # 1000 DDPM steps at 256 samples, ~75 s on 2 cores; the solver run is 20 steps
def test_dpmpp_2m_at_20_nfe_keeps_the_1000_step_quality(classifier, model):
    """The issue's bar for fewer-step solvers: DPM-Solver++(2M) with 20 network evaluations reaches at least
    0.95 x the confident share of the full 1000-step ancestral chain, on the same samples' noise seed."""
    clf, _ = classifier
    shape = (NUM_SAMPLES, *model.config.image_shape)
    ddpm = _share(clf, df.sample(model, shape=shape, steps=1000, seed=0, backend="reference"))
    solver = _share(
        clf, df.sample(model, shape=shape, steps=20, method="dpmpp_2m", seed=0, backend="reference")
    )
    print(f"\nconfident share: ddpm 1000 steps {ddpm:.3f}, dpmpp_2m 20 NFE {solver:.3f}")
    assert solver >= 0.95 * ddpm, (solver, ddpm)

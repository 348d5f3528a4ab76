"""k-NN precision/recall (Kynkäänniemi et al. 2019) and the Inception Score on constructed inputs.

The reference for precision/recall is the definition written out in float64 with full distance matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_fast.metrics import iscore, manifold
from ddpm_fast.metrics.manifold import precision_recall


def pr_reference(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    def dist(u, v):
        return np.sqrt(((u[:, None, :] - v[None, :, :]) ** 2).sum(-1))

    def radii(x):
        return np.sort(dist(x, x), axis=1)[:, k]  # column 0 is the point itself

    def covered(points, centres):
        return float((dist(points, centres) <= radii(centres)[None, :]).any(1).mean())

    return covered(samples, ref), covered(ref, samples)


def _on_line(xs, d: int = 5) -> np.ndarray:
    p = np.zeros((len(xs), d))
    p[:, 0] = xs
    return p


def test_points_on_a_line_exact_answer():
    """Reference 0..9 on a line: k=3 radii are 3 at the ends and 2 inside, so the manifold is [-3, 12].
    Samples -4, -3, 5.5, 12, 12.5, 20: -3 and 12 lie exactly on a ball's boundary (inclusive), 5.5
    inside: precision 3/6. The samples' own balls (radii 16, 15, 8.5, 8, 7.5, 14.5) cover 0..9: recall 1."""
    ref = _on_line(np.arange(10.0))
    samples = _on_line([-4.0, -3.0, 5.5, 12.0, 12.5, 20.0])
    assert precision_recall(ref, samples) == (0.5, 1.0)
    assert pr_reference(ref, samples) == (0.5, 1.0)


def test_identical_and_disjoint_sets():
    x = np.random.default_rng(0).standard_normal((50, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_mode_dropping_lowers_recall_not_precision():
    """Reference: clusters A (30 points) and B (20) 1000 apart; samples cover only A: precision 1, recall 30/50."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((20, 8)) + 1000.0
    ref = np.concatenate([a, b])
    samples = a + 0.01 * rng.standard_normal(a.shape)
    assert precision_recall(ref, samples) == (1.0, 0.6)


def test_half_the_samples_off_the_manifold():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((40, 8))
    samples = np.concatenate([ref[:20] + 0.01, rng.standard_normal((20, 8)) + 1000.0])
    precision, _ = precision_recall(ref, samples)
    assert precision == 0.5


@pytest.mark.parametrize(
    ("m", "n", "d", "k"), [(5, 7, 1, 3), (37, 23, 3, 3), (200, 151, 16, 3), (61, 64, 7, 1)]
)
def test_matches_the_definition(m, n, d, k):
    rng = np.random.default_rng(m * n + d)
    ref, samples = rng.standard_normal((m, d)), rng.standard_normal((n, d)) * 1.2 + 0.3
    assert precision_recall(ref, samples, k=k) == pr_reference(ref, samples, k)


def test_blocks_do_not_change_the_answer(monkeypatch):
    rng = np.random.default_rng(3)
    ref, samples = rng.standard_normal((97, 6)), rng.standard_normal((89, 6)) + 0.5
    whole = precision_recall(ref, samples)
    monkeypatch.setattr(manifold, "_BLOCK", 7 * 97)  # 7-row blocks
    assert precision_recall(ref, samples) == whole


def test_bad_arguments_name_themselves():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match=r"^ref: 3 feature vectors; k=3 nearest neighbours need more than 3"):
        precision_recall(x[:3], x)
    with pytest.raises(ValueError, match=r"^samples must be a 2-D array"):
        precision_recall(x, x[0])
    with pytest.raises(ValueError, match="differ in feature dimension: 4 and 3"):
        precision_recall(x, x[:, :3])
    with pytest.raises(ValueError, match="k must be a positive int; got 0"):
        precision_recall(x, x, k=0)


# ---------------------------------------------------------------------------------------------- IS


def test_inception_score_closed_forms():
    k = 8
    one_hot = torch.eye(k).repeat(5, 1)  # 40 confident samples, classes balanced: IS = K
    assert iscore.inception_score(one_hot) == pytest.approx(k, rel=1e-12)
    uniform = torch.full((40, k), 1.0 / k)  # no confidence: IS = 1
    assert iscore.inception_score(uniform) == pytest.approx(1.0, rel=1e-12)


def test_inception_score_splits_in_order():
    """Split 1: 4 samples all of class 0 (IS 1); split 2: one per class of 4 (IS 4); mean 2.5."""
    p = torch.cat([torch.eye(4)[[0, 0, 0, 0]], torch.eye(4)])
    assert iscore.inception_score(p, split_size=4) == pytest.approx(2.5, rel=1e-12)
    assert iscore.inception_score(p, split_size=8) != pytest.approx(2.5)


def test_inception_score_streams():
    p = torch.softmax(torch.randn(70, 11, generator=torch.Generator().manual_seed(4)) * 3, dim=1)
    whole = iscore.split_terms(p)
    parts = iscore.split_terms(p[:13]).add(iscore.split_terms(p[13:50])).add(iscore.split_terms(p[50:]))
    assert parts.n == whole.n
    np.testing.assert_allclose(parts.p_sum, whole.p_sum, rtol=1e-14)
    assert iscore.score([parts]) == pytest.approx(iscore.score([whole]), rel=1e-12)
    # the direct formula, exp(mean KL(p || mean p))
    direct = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean())
    assert iscore.inception_score(p, split_size=70) == pytest.approx(float(direct), rel=1e-5)

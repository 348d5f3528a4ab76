"""The Fréchet distance and the streaming moments against closed forms, in float64.

Closed forms (the references):
    commuting S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T:  d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    any 2 x 2 SPD pair: tr((S1 S2)^{1/2}) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))  (eigenvalues l1, l2 > 0:
        (sqrt(l1) + sqrt(l2))^2 = l1 + l2 + 2 sqrt(l1 l2))
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ddpm_fast.metrics.frechet import MomentAccumulator, Statistics, frechet_distance, resolve_sqrtm


def closed_commuting(mu1, a, mu2, b) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def closed_2x2(mu1, s1, mu2, s2) -> float:
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


METHODS = ("scipy", "eigh")
DIMS = (1, 2, 7, 64)  # 1, a prime, a power of two
# float64 throughout; the root of a D x D product carries about D * 1e-16 relative rounding
RTOL = 1e-9


def _rotation(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _spd(d: int, rng) -> np.ndarray:
    x = rng.standard_normal((3 * d + 5, d))
    return np.cov(x, rowvar=False) + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", DIMS)
def test_identical_statistics_give_zero(method, d):
    rng = np.random.default_rng(d)
    s = Statistics(rng.standard_normal(d), _spd(d, rng))
    assert abs(frechet_distance(s, s, sqrtm=method)) < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", DIMS)
def test_mean_shift_gives_its_squared_norm(method, d):
    rng = np.random.default_rng(10 + d)
    sigma, mu, shift = _spd(d, rng), rng.standard_normal(d), rng.standard_normal(d) * 3
    got = frechet_distance(Statistics(mu, sigma), Statistics(mu + shift, sigma), sqrtm=method)
    # tr(S) + tr(S) - 2 tr(S) cancels to rounding of tr(S): absolute, not relative to |shift|^2
    assert got == pytest.approx(float(shift @ shift), rel=RTOL, abs=1e-9 * np.trace(sigma))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", DIMS)
def test_commuting_gaussians(method, d):
    rng = np.random.default_rng(20 + d)
    q = _rotation(d, rng)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    got = frechet_distance(Statistics(mu1, s1), Statistics(mu2, s2), sqrtm=method)
    assert got == pytest.approx(closed_commuting(mu1, a, mu2, b), rel=RTOL, abs=1e-12 * d)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(5))
def test_non_commuting_2x2(method, seed):
    rng = np.random.default_rng(30 + seed)
    s1, s2 = _spd(2, rng), _spd(2, rng) @ np.diag([1.0, 9.0])
    s2 = (s2 + s2.T) / 2 + np.eye(2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
    got = frechet_distance(Statistics(mu1, s1), Statistics(mu2, s2), sqrtm=method)
    assert got == pytest.approx(closed_2x2(mu1, s1, mu2, s2), rel=RTOL)


def test_methods_agree_on_feature_statistics():
    rng = np.random.default_rng(40)
    x = np.maximum(rng.standard_normal((600, 48)) @ rng.standard_normal((48, 48)) * 0.3 + 0.5, 0)
    y = np.maximum(rng.standard_normal((500, 48)) @ rng.standard_normal((48, 48)) * 0.3 + 0.6, 0)
    a, b = Statistics.from_features(x), Statistics.from_features(y)
    assert frechet_distance(a, b, sqrtm="eigh") == pytest.approx(
        frechet_distance(a, b, sqrtm="scipy"), rel=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
def test_not_a_covariance_is_refused(method):
    """The reference implementations' guard: a root with a large imaginary part is an error, not a number."""
    good = Statistics(np.zeros(2), np.eye(2))
    bad = Statistics(np.zeros(2), np.diag([1.0, -4.0]))  # sqrt(-4) = 2i
    with pytest.raises(ValueError, match="imaginary part of 2"):
        frechet_distance(good, bad, sqrtm=method)


def test_dimension_mismatch():
    with pytest.raises(ValueError, match="differ in dimension: 2 and 3"):
        frechet_distance(Statistics(np.zeros(2), np.eye(2)), Statistics(np.zeros(3), np.eye(3)))


@pytest.mark.parametrize("pieces", [(1,), (1, 1, 5, 13), (64, 37, 199)])
def test_streaming_moments_match_two_pass(pieces):
    rng = np.random.default_rng(50)
    n = sum(pieces) + 40
    x = rng.standard_normal((n, 16)) * rng.uniform(0.1, 3, 16) + 1e4  # |mu| >> spread: centring matters
    acc = MomentAccumulator()
    at = 0
    for p in (*pieces, n - sum(pieces)):
        acc.update(x[at : at + p])
        at += p
    got, want = acc.result("x"), Statistics.from_features(x, "x")
    assert got.num == want.num == n
    np.testing.assert_allclose(got.mu, want.mu, rtol=1e-14)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-9, atol=1e-9 * np.abs(want.sigma).max())
    assert np.array_equal(got.sigma, got.sigma.T)


def test_streaming_moments_are_deterministic():
    x = np.random.default_rng(51).standard_normal((300, 8)).astype(np.float32)
    runs = []
    for _ in range(2):
        acc = MomentAccumulator()
        for i in range(0, 300, 70):
            acc.update(x[i : i + 70])
        runs.append(acc.result())
    assert np.array_equal(runs[0].sigma, runs[1].sigma) and np.array_equal(runs[0].mu, runs[1].mu)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_too_few_vectors_for_a_full_rank_covariance(n):
    x = np.random.default_rng(52).standard_normal((n, 12))
    with pytest.raises(ValueError, match=rf"^samples: {n} images give a covariance of rank at most {n - 1}"):
        Statistics.from_features(x, "samples")
    acc = MomentAccumulator()
    acc.update(x)
    with pytest.raises(ValueError, match="^samples: .* more than 12 images"):
        acc.result("samples")


def test_checked_statistics():
    ok = Statistics.checked(np.zeros(3), np.eye(3), 7, "ref")
    assert ok.dim == 3 and ok.num == 7
    with pytest.raises(ValueError, match=r"^ref: mu must be \[D\] and sigma \[D, D\]"):
        Statistics.checked(np.zeros(3), np.eye(2), name="ref")
    with pytest.raises(ValueError, match="^ref: mu and sigma must be finite"):
        Statistics.checked(np.array([0, np.nan, 0]), np.eye(3), name="ref")
    with pytest.raises(ValueError, match="^ref: sigma is not symmetric"):
        Statistics.checked(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), name="ref")


def test_auto_without_scipy_uses_eigh(monkeypatch, caplog):
    import ddpm_fast.metrics.frechet as frechet

    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    monkeypatch.setattr(frechet, "_warned_no_scipy", False)
    with caplog.at_level("WARNING", logger="ddpm_fast"):
        assert resolve_sqrtm("auto") == "eigh"
    assert "scipy is not installed" in caplog.text
    with pytest.raises(RuntimeError, match=r"needs scipy: pip install 'ddpm-fast\[metrics\]'"):
        resolve_sqrtm("scipy")
    with pytest.raises(ValueError, match="sqrtm must be one of"):
        resolve_sqrtm("newton")

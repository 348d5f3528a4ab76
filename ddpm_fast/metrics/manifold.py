"""Improved precision and recall (Kynkäänniemi et al. 2019), as openai's evaluator computes them (k = 3):

    r_k(y)      = distance from y to its k-th nearest neighbour in its own set, y itself excluded
    manifold(Y) = union over y in Y of the closed balls B(y, r_k(y))
    precision   = fraction of the samples inside manifold(reference)
    recall      = fraction of the reference points inside manifold(samples)

Squared distances |u|^2 - 2 u.v + |v|^2, clamped at 0, in float32 on the chosen device, a block of rows at a
time (openai's evaluator computes them in float16, in float32 only if float16 overflows); `d^2 <= r^2`,
inclusive as there. Memory: one block of about 2^24 distances, whatever the set sizes.
"""

from __future__ import annotations

import torch

from ddpm_fast.checks import check_int
from ddpm_fast.errors import BadValue

__all__ = ["pairwise_sq_distances", "manifold_radii", "coverage", "precision_recall"]

_BLOCK = 1 << 24  # distances per block: 64 MB of float32


def _as_features(x, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise BadValue(f"{name} must be a 2-D array of feature vectors [N, D]; got {t.dtype} {list(t.shape)}")
    return t.to(device, torch.float32)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[m, n] squared Euclidean distances, max(|u|^2 - 2 u.v + |v|^2, 0)."""
    d = (u * u).sum(1, keepdim=True) - 2.0 * (u @ v.T) + (v * v).sum(1)[None, :]
    return d.clamp_(min=0.0)


def _rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, _BLOCK // max(1, n_cols)))


def manifold_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Squared r_k of every row: the (k+1)-th smallest squared distance in its row, the row's own 0 first."""
    n = features.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=features.device)
    step = _rows(n, n)
    for i in range(0, n, step):
        d = pairwise_sq_distances(features[i : i + step], features)
        out[i : i + step] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` inside the union of balls B(centres[j], sqrt(radii[j])) (radii squared)."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    step = _rows(points.shape[0], centres.shape[0])
    for i in range(0, points.shape[0], step):
        d = pairwise_sq_distances(points[i : i + step], centres)
        inside[i : i + step] = (d <= radii[None, :]).any(1)
    return float(inside.double().mean())


def precision_recall(ref, samples, *, k: int = 3, device=None) -> tuple[float, float]:
    """(precision, recall) of `samples` [N, D] against `ref` [M, D] feature vectors (module docstring)."""
    check_int(k, "k")
    device = torch.device(device) if device is not None else torch.device("cpu")
    r = _as_features(ref, "ref", device)
    s = _as_features(samples, "samples", device)
    if r.shape[1] != s.shape[1]:
        raise BadValue(f"ref and samples differ in feature dimension: {r.shape[1]} and {s.shape[1]}")
    for name, t in (("ref", r), ("samples", s)):
        if t.shape[0] <= k:
            raise BadValue(
                f"{name}: {t.shape[0]} feature vectors; k={k} nearest neighbours need more than {k}"
            )
    precision = coverage(s, r, manifold_radii(r, k))
    recall = coverage(r, s, manifold_radii(s, k))
    return precision, recall

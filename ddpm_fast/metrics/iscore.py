"""Inception Score (Salimans et al. 2016), split as openai's evaluator and improved-gan split it:

    IS = mean over splits s of exp( mean_{x in s} KL(p(y|x) || p_s(y)) ),   p_s(y) = mean_{x in s} p(y|x)

where the splits are consecutive runs of `split_size` samples in index order (openai: 5000; the last may be
shorter) and p(y|x) is the softmax of the pool features times the output weight, without its bias.
Per split, mean_x KL = (1/n) sum_x sum_y p log p - sum_y p_s log p_s, so a split is summarised by
(n, sum_x p, sum_x sum_y p log p) and the probabilities need not be kept (0 log 0 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddpm_fast.checks import check_int
from ddpm_fast.errors import BadValue

__all__ = ["SplitTerms", "split_terms", "score", "inception_score"]


@dataclass
class SplitTerms:
    """One split's sufficient statistics: n, sum_x p(y|x) [K] and sum_x sum_y p log p, in float64."""

    n: int
    p_sum: np.ndarray
    plogp: float

    def add(self, other: SplitTerms) -> SplitTerms:
        return SplitTerms(self.n + other.n, self.p_sum + other.p_sum, self.plogp + other.plogp)


def split_terms(probs) -> SplitTerms:
    p = torch.as_tensor(probs).to(torch.float64)
    return SplitTerms(int(p.shape[0]), p.sum(0).cpu().numpy(), float(torch.special.xlogy(p, p).sum()))


def score(splits: list[SplitTerms]) -> float:
    """The mean over splits of exp(mean KL)."""
    values = []
    for t in splits:
        p_mean = t.p_sum / t.n
        marginal = float(np.sum(p_mean * np.log(np.where(p_mean > 0, p_mean, 1.0))))
        values.append(np.exp(t.plogp / t.n - marginal))
    return float(np.mean(values))


def inception_score(probs, split_size: int = 5000) -> float:
    """IS of class probabilities [N, K] (rows sum to 1), splits of `split_size` rows in order."""
    p = torch.as_tensor(probs)
    if p.ndim != 2 or p.shape[0] == 0:
        raise BadValue(f"probs must be [N, K] with N >= 1; got shape {list(p.shape)}")
    check_int(split_size, "split_size")
    return score([split_terms(p[i : i + split_size]) for i in range(0, p.shape[0], split_size)])

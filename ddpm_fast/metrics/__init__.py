"""Sample quality against published references: FID, sFID, precision/recall, Inception Score.

    r = df.metrics.fid("run/", "VIRTUAL_imagenet64_labeled.npz")    # -> FIDResult(fid, sfid, precision, ...)
    df.metrics.save_stats("cifar10_train.npz", "cifar10_train_stats.npz")   # a reference, computed once

Features are those of NVIDIA's TorchScript port of the TensorFlow FID Inception (`inception-2015-12-05.pt`,
a file the user provides: see `inception`), so the numbers compare with papers' and openai's evaluator's.
Modules, lowest first:

    frechet.py    Statistics, streaming moments, the Fréchet distance (scipy sqrtm or eigh, float64)
    manifold.py   k-NN precision and recall (Kynkäänniemi et al. 2019)
    iscore.py     Inception Score from split sums
    sources.py    image sets (run directory, .npz, folder) streamed in order; reference statistics files
    inception.py  loading the TorchScript network; one pass -> pool, spatial and class probabilities
    features.py   extraction in resumable chunks, cached beside the images
    evaluate.py   fid, save_stats, FIDConfig, the report
"""

from __future__ import annotations

from ddpm_fast.metrics.evaluate import FIDConfig, FIDResult, fid, save_stats
from ddpm_fast.metrics.frechet import Statistics, frechet_distance
from ddpm_fast.metrics.inception import INCEPTION_FILE, InceptionNet, default_inception_path
from ddpm_fast.metrics.iscore import inception_score
from ddpm_fast.metrics.manifold import precision_recall

__all__ = [
    "fid",
    "save_stats",
    "FIDConfig",
    "FIDResult",
    "Statistics",
    "frechet_distance",
    "precision_recall",
    "inception_score",
    "InceptionNet",
    "INCEPTION_FILE",
    "default_inception_path",
]

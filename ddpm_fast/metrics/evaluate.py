"""`fid(samples, ref)`: FID, and where the inputs allow sFID, precision, recall and Inception Score, as
openai's evaluator (guided-diffusion/evaluations) computes them; `save_stats(images, out)`: a reference
statistics file for later `fid` calls.

    FID        Fréchet distance of the pool_3 features' Gaussians: the reference's precomputed mu/sigma
               when REF holds them (as openai's evaluator does), else computed from REF's images
    sFID       the same on the spatial features (mixed_6/conv, 2023-d): REF's mu_s/sigma_s, or its images
    precision, recall   k-NN manifolds (k = 3) of the pool features: need REF's images
    IS         Inception Score of the samples, splits of 5000

A metric the inputs cannot give is null in the report, with a note saying why.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ddpm_fast import __version__, shards
from ddpm_fast.checks import check_int
from ddpm_fast.devices import resolve_device
from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.metrics.features import FeatureSet, extract
from ddpm_fast.metrics.frechet import SQRTM_METHODS, Statistics, check_rank, frechet_distance, resolve_sqrtm
from ddpm_fast.metrics.inception import InceptionNet, resolve_inception_path
from ddpm_fast.metrics.manifold import precision_recall
from ddpm_fast.metrics.sources import ImageSource, open_images, open_reference

__all__ = ["FIDConfig", "FIDResult", "fid", "save_stats", "REPORT_FORMAT"]

log = logging.getLogger("ddpm_fast")

REPORT_FORMAT = "ddpm-fast-fid"


@dataclass
class FIDConfig:
    """How features are computed and compared; none of it changes a metric's definition."""

    inception: str | None = None  # None: $DDPM_FAST_INCEPTION, else default_inception_path()
    batch_size: int | None = None  # images per network call; None: 256 on CUDA, 32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    cache: bool = True  # keep features beside the images (see ddpm_fast.metrics.features)
    cache_dir: str | None = None  # None: inside a run directory, else beside the file or folder
    nearest_k: int = 3  # precision/recall neighbourhood (openai's evaluator: 3)
    split_size: int = 5000  # Inception Score split and resumable chunk (openai's evaluator: 5000)
    sqrtm: str = "auto"  # "scipy" | "eigh" | "auto" (see ddpm_fast.metrics.frechet)
    progress: bool = False

    def __post_init__(self):
        self.validate()  # once, where the config is made: fid and save_stats refuse it before any work

    def validate(self) -> None:
        for name in ("batch_size", "nearest_k", "split_size"):
            v = getattr(self, name)
            if v is None and name == "batch_size":
                continue
            check_int(v, name)
        if self.sqrtm not in SQRTM_METHODS:
            raise BadValue(f"sqrtm must be one of {SQRTM_METHODS}; got {self.sqrtm!r}")
        for name in ("inception", "cache_dir", "device"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise BadType(f"{name} must be a path or None; got {type(v).__name__}")


@dataclass
class FIDResult:
    """The metrics (None where the inputs cannot give one) and the full report written to `out`."""

    fid: float
    sfid: float | None
    precision: float | None
    recall: float | None
    inception_score: float | None
    report: dict

    def metrics(self) -> dict:
        d = asdict(self)
        d.pop("report")
        return d


def _check_file_out(path, suffix: str, name: str) -> str | None:
    """Refuse before any work an output file that could not be written."""
    if path is None:
        return None
    path = os.fspath(path)
    if not path.lower().endswith(suffix):
        raise BadValue(f"{name} must end in {suffix}; got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BadValue(f"{name} {path!r}: directory {os.path.dirname(path) or '.'!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadValue(f"{name} {path!r}: {parent!r} is not writable")
    return path


class _Session:
    """The validated configuration, the device and the loaded network, shared by fid and save_stats."""

    def __init__(self, cfg: FIDConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device, name="device")
        self.sqrtm = resolve_sqrtm(cfg.sqrtm)
        self.batch_size = cfg.batch_size or (256 if self.device.type == "cuda" else 32)
        self.net = InceptionNet(resolve_inception_path(cfg.inception), self.device)

    def features(self, source: ImageSource, keep_pool: bool, what: str) -> FeatureSet:
        check_rank(source.num, self.net.dim, f"{source.name} {source.path}")
        return extract(
            source,
            self.net,
            split_size=self.cfg.split_size,
            batch_size=self.batch_size,
            cache_dir=self.cfg.cache_dir,
            cache=self.cfg.cache,
            keep_pool=keep_pool,
            progress=self.cfg.progress,
            desc=f"Inception ({what})",
            device=self.device,
        )

    def describe(self, spatial: bool) -> tuple[dict, dict]:
        net = {
            "path": os.path.abspath(self.net.path),
            "sha256": self.net.sha256,
            "feature_dim": self.net.dim,
            "spatial_features": spatial,
        }
        settings = {
            "nearest_k": self.cfg.nearest_k,
            "split_size": self.cfg.split_size,
            "sqrtm": self.sqrtm,
            "device": str(self.device),
            "batch_size": self.batch_size,
        }
        return net, settings


def _write_stats(path: str, fs: FeatureSet, net: InceptionNet, source: ImageSource) -> None:
    """mu, sigma (and mu_s, sigma_s): the keys of pytorch-fid's and openai's files, so either reads it."""
    arrays = dict(mu=fs.stats.mu, sigma=fs.stats.sigma, num=np.int64(fs.num))
    if fs.spatial is not None:
        arrays.update(mu_s=fs.spatial.mu, sigma_s=fs.spatial.sigma)
    arrays.update(inception_sha256=np.str_(net.sha256), images_sha256=np.str_(source.digest()))
    shards.atomic_write_npz(path, arrays)


def save_stats(images, out, **options) -> Statistics:
    """Compute the statistics of `images` (run directory, .npz or folder) and write them to `out` (.npz:
    mu, sigma, mu_s, sigma_s, num); `options` are FIDConfig's fields. Returns the pool statistics."""
    out = _check_file_out(out, ".npz", "out")
    session = _Session(FIDConfig(**options))
    source = open_images(images, "images")
    fs = session.features(source, keep_pool=False, what="images")
    _write_stats(out, fs, session.net, source)
    return fs.stats


def _frechet(a: Statistics | None, b: Statistics | None, what: str, sqrtm: str, notes: dict) -> float | None:
    if a is None or b is None:
        return None
    if a.dim != b.dim:
        notes[what] = f"the samples' statistics have {a.dim} dimensions, the reference's {b.dim}"
        return None
    return frechet_distance(a, b, sqrtm=sqrtm)


def fid(samples, ref, *, out=None, stats_out=None, **options) -> FIDResult:
    """Metrics of `samples` against `ref` (module docstring); `options` are FIDConfig's fields.

    samples: a sharded run directory, an .npz with arr_0 (uint8 NHWC) or an image folder.
    ref: the same, or a statistics .npz (mu, sigma [, mu_s, sigma_s] [, arr_0]), e.g. openai's
        VIRTUAL_imagenet64_labeled.npz or a file from `save_stats` / pytorch-fid.
    out: write the report (metrics, inputs and their sha256, settings) there, atomically (.json).
    stats_out: also write the samples' statistics there (.npz, as `save_stats`).
    """
    t0 = time.perf_counter()
    out = _check_file_out(out, ".json", "out")
    stats_out = _check_file_out(stats_out, ".npz", "stats_out")
    cfg = FIDConfig(**options)
    source = open_images(samples, "samples")
    reference = open_reference(ref, "ref")
    session = _Session(cfg)
    dim = session.net.dim
    if reference.stats is not None and reference.stats.dim != dim:
        raise BadValue(
            f"ref {reference.path}: statistics of {reference.stats.dim} dimensions, but the Inception "
            f"features have {dim}: they come from another network"
        )
    if reference.stats is None:  # refuse before computing the samples' features
        check_rank(reference.images.num, dim, f"ref {reference.path}")
    has_ref_images = reference.images is not None
    feats = session.features(source, keep_pool=has_ref_images, what="samples")
    if stats_out is not None:
        _write_stats(stats_out, feats, session.net, source)
    ref_feats = session.features(reference.images, keep_pool=True, what="ref") if has_ref_images else None

    notes = dict(feats.notes)
    ref_stats = reference.stats if reference.stats is not None else ref_feats.stats
    ref_spatial = reference.spatial
    if ref_spatial is None and ref_feats is not None:
        ref_spatial = ref_feats.spatial
        if ref_spatial is None:
            notes.setdefault("sfid", ref_feats.notes.get("sfid", "no spatial statistics of ref"))
    elif ref_spatial is None:
        notes.setdefault("sfid", f"ref {reference.path} holds no spatial statistics (mu_s, sigma_s)")
    fid_value = _frechet(feats.stats, ref_stats, "fid", session.sqrtm, notes)
    sfid = _frechet(feats.spatial, ref_spatial, "sfid", session.sqrtm, notes)
    precision = recall = None
    if has_ref_images:
        precision, recall = precision_recall(
            ref_feats.pool(), feats.pool(), k=cfg.nearest_k, device=session.device
        )
    else:
        notes["precision"] = notes["recall"] = f"ref {reference.path} holds no images (arr_0)"

    result = FIDResult(fid_value, sfid, precision, recall, feats.inception_score, {})
    net, settings = session.describe(feats.spatial is not None)
    result.report = {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "library_version": __version__,
        "metrics": result.metrics(),
        "samples": {**source.describe(), "features_from_cache": feats.from_cache},
        "ref": reference.describe(),
        "inception": net,
        "settings": settings,
        "notes": {k: notes[k] for k in sorted(notes)},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        shards.atomic_write_json(out, result.report)
    return result

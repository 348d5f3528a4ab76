"""Features of one image set, computed once: streamed through the network a batch at a time, gathered in
chunks of `split_size` images (the Inception Score's splits) that are saved as each completes, so an
interrupted computation resumes at its last complete chunk, and cached next to the images, keyed by what
decides them:

    key = sha256("ddpm-fast fid features v1", images digest, Inception file's sha256, split_size)
    RUN/fid-cache/<key[:16]>/            for a sharded run directory
    PATH.fid-cache/<key[:16]>/           beside an .npz file or an image folder (or CACHE_DIR/<key[:16]>/)
        chunk_000003.npz    pool [n, D] f32, spatial [n, 2023] f32, IS split terms: while computing
        pool.npz            arr_0 = pool features [N, D] float32 in index order (precision and recall)
        stats.npz           mu, sigma, mu_s, sigma_s (float64), num, inception_score, key; written last,
                            so it marks the cache complete, and the chunks are then deleted

Statistics are accumulated chunk by chunk in index order whether a chunk was computed or read back, so a
resumed computation gives the same bits as an uninterrupted one. Memory: one chunk (5000 x 4071 float32,
81 MB) plus, when precision and recall are wanted, the pool features (N x 2048 float32: 410 MB at 50k).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ddpm_fast import shards
from ddpm_fast.metrics import iscore
from ddpm_fast.metrics.frechet import MomentAccumulator, Statistics
from ddpm_fast.metrics.sources import ImageSource
from ddpm_fast.progress import progress_bar

__all__ = ["FeatureSet", "extract", "feature_key", "cache_root", "CACHE_VERSION"]

log = logging.getLogger("ddpm_fast")

CACHE_VERSION = "ddpm-fast fid features v1"
STATS, POOL = "stats.npz", "pool.npz"


def feature_key(images_digest: str, inception_sha256: str, split_size: int) -> str:
    text = f"{CACHE_VERSION}\n{images_digest}\n{inception_sha256}\n{split_size}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_root(source: ImageSource, cache_dir: str | None = None) -> str:
    """Where `source`'s feature caches live: cache_dir, else inside a run, else beside the file or folder."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if source.kind == "run":
        return os.path.join(source.path, "fid-cache")
    return os.path.abspath(source.path).rstrip(os.sep) + ".fid-cache"


@dataclass
class FeatureSet:
    """What the metrics need of one image set; `pool()` gives the pool features (read from the cache)."""

    key: str
    num: int
    stats: Statistics
    spatial: Statistics | None
    inception_score: float | None
    pool_file: str | None = None
    pool_array: np.ndarray | None = None
    from_cache: bool = False
    notes: dict[str, str] = field(default_factory=dict)  # metric ("sfid", "inception_score") -> why not

    def pool(self) -> np.ndarray:
        if self.pool_array is None:
            if self.pool_file is None:
                raise RuntimeError("the pool features were not kept (extract(..., keep_pool=True))")
            with np.load(self.pool_file, allow_pickle=False) as z:
                self.pool_array = z["arr_0"]
        return self.pool_array


@dataclass
class _Chunk:
    pool: np.ndarray
    spatial: np.ndarray | None
    terms: iscore.SplitTerms | None


def _save_chunk(path: str, c: _Chunk) -> None:
    arrays = {"pool": c.pool}
    if c.spatial is not None:
        arrays["spatial"] = c.spatial
    if c.terms is not None:
        arrays.update(is_n=np.int64(c.terms.n), is_p_sum=c.terms.p_sum, is_plogp=np.float64(c.terms.plogp))
    shards.atomic_write_npz(path, arrays)


def _load_chunk(path: str, count: int, dim: int) -> _Chunk | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            pool = z["pool"]
            spatial = z["spatial"] if "spatial" in z else None
            terms = None
            if "is_n" in z:
                terms = iscore.SplitTerms(int(z["is_n"]), z["is_p_sum"], float(z["is_plogp"]))
    except Exception as e:  # written atomically, so only outside hands damage one: recompute it
        log.warning("feature chunk %s is unreadable (%s): computing it again", path, e)
        return None
    if pool.shape != (count, dim) or (spatial is not None and spatial.shape[0] != count):
        log.warning(
            "feature chunk %s holds %s, not [%d, %d]: computing it again", path, list(pool.shape), count, dim
        )
        return None
    return _Chunk(pool, spatial, terms)


def _compute_chunk(source: ImageSource, net, start: int, count: int, batch_size: int, bar) -> _Chunk:
    pools, spatials, terms = [], [], None
    has_spatial = has_probs = True
    for batch in source.batches(batch_size, start, start + count):
        out = net(batch)
        pools.append(out.pool.numpy())
        has_spatial = has_spatial and out.spatial is not None
        if has_spatial:
            spatials.append(out.spatial.numpy())
        has_probs = has_probs and out.probs is not None
        if has_probs:
            t = iscore.split_terms(out.probs)
            terms = t if terms is None else terms.add(t)
        if bar is not None:
            bar.update(batch.shape[0])
    return _Chunk(
        np.concatenate(pools),
        np.concatenate(spatials) if has_spatial else None,
        terms if has_probs else None,
    )


def _load_complete(d: str, key: str, keep_pool: bool) -> FeatureSet | None:
    try:
        with np.load(os.path.join(d, STATS), allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            num = int(z["num"])
            stats = Statistics(z["mu"], z["sigma"], num)
            spatial = Statistics(z["mu_s"], z["sigma_s"], num) if "mu_s" in z else None
            score = float(z["inception_score"])
            notes = json.loads(str(z["notes"]))
    except Exception:
        return None
    pool_file = os.path.join(d, POOL)
    if keep_pool and not os.path.isfile(pool_file):
        return None
    score = None if np.isnan(score) else score
    return FeatureSet(key, num, stats, spatial, score, pool_file=pool_file, from_cache=True, notes=notes)


def _finish(d: str, fs: FeatureSet, n_chunks: int, dim: int) -> None:
    """pool.npz from the chunks, then stats.npz (the mark of completion), then the chunks go."""
    chunk = lambda c: os.path.join(d, f"chunk_{c:06d}.npz")
    with shards.NpzWriter(os.path.join(d, POOL), (fs.num, dim), np.float32) as w:
        for c in range(n_chunks):
            with np.load(chunk(c), allow_pickle=False) as z:
                w.write(z["pool"])
    arrays = dict(mu=fs.stats.mu, sigma=fs.stats.sigma, num=np.int64(fs.num), key=np.str_(fs.key))
    if fs.spatial is not None:
        arrays.update(mu_s=fs.spatial.mu, sigma_s=fs.spatial.sigma)
    arrays["inception_score"] = np.float64(np.nan if fs.inception_score is None else fs.inception_score)
    arrays["notes"] = np.str_(json.dumps(fs.notes))
    shards.atomic_write_npz(os.path.join(d, STATS), arrays)
    for c in range(n_chunks):
        with contextlib.suppress(OSError):
            os.unlink(chunk(c))
    fs.pool_file = os.path.join(d, POOL)


def _usable_dir(d: str) -> str | None:
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        log.warning("cannot write the feature cache %s (%s): computing without it", d, e)
        return None
    if not os.access(d, os.W_OK):
        log.warning("the feature cache %s is not writable: computing without it", d)
        return None
    return d


def extract(
    source: ImageSource,
    net,
    *,
    split_size: int = 5000,
    batch_size: int = 32,
    cache_dir: str | None = None,
    cache: bool = True,
    keep_pool: bool = False,
    progress: bool = False,
    desc: str = "Inception",
    device=None,
) -> FeatureSet:
    """`source`'s statistics (pool and spatial), Inception Score and, with keep_pool, its pool features;
    read from the cache when complete, else computed, resuming the chunks already saved."""
    key = feature_key(source.digest(), net.sha256, split_size)
    d = os.path.join(cache_root(source, cache_dir), key[:16]) if cache else None
    if d is not None and os.path.isfile(os.path.join(d, STATS)):
        fs = _load_complete(d, key, keep_pool)
        if fs is not None:
            log.info("%s: features read from %s", source.path, d)
            return fs
    if d is not None:
        d = _usable_dir(d)
    ranges = shards.shard_ranges(source.num, split_size)
    acc, acc_s = MomentAccumulator(device), MomentAccumulator(device)
    spatial_ok, terms, pools = True, [], []
    bar = progress_bar(source.num, desc, "img", enabled=progress, dynamic_ncols=True, smoothing=0.1)
    try:
        for c, (start, count) in enumerate(ranges):
            path = os.path.join(d, f"chunk_{c:06d}.npz") if d is not None else None
            chunk = _load_chunk(path, count, net.dim) if path and os.path.isfile(path) else None
            if chunk is None:
                chunk = _compute_chunk(source, net, start, count, batch_size, bar)
                if path is not None:
                    _save_chunk(path, chunk)
            elif bar is not None:
                bar.update(count)
            acc.update(chunk.pool)
            spatial_ok = spatial_ok and chunk.spatial is not None
            if spatial_ok:
                acc_s.update(chunk.spatial)
            terms.append(chunk.terms)
            if keep_pool and d is None:
                pools.append(chunk.pool)
    finally:
        if bar is not None:
            bar.close()
    stats = acc.result(f"{source.name} {source.path}")
    notes, spatial = {}, None
    if not spatial_ok:
        notes["sfid"] = f"{net.path}: no spatial features (its layers do not reproduce its forward)"
    elif acc_s.n <= acc_s.s1.shape[0]:
        notes["sfid"] = f"{source.name}: sFID needs more than {acc_s.s1.shape[0]} images; got {acc_s.n}"
    else:
        spatial = acc_s.result()
    score = iscore.score(terms) if all(t is not None for t in terms) else None
    if score is None:
        notes["inception_score"] = f"{net.path} gives no class probabilities (net(x, no_output_bias=True))"
    fs = FeatureSet(key, source.num, stats, spatial, score, notes=notes)
    if d is not None:
        _finish(d, fs, len(ranges), net.dim)
    elif keep_pool:
        fs.pool_array = np.concatenate(pools)
    return fs

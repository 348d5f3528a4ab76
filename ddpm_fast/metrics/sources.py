"""What `fid` reads: image sets streamed in index order, and reference statistics.

Image sets (SAMPLES, and REF when it holds images), uint8, 1 or 3 channels, one batch in memory at a time:

    run directory   a sharded `ddpm-fast sample` run (manifest.json): its shards in order, each checked
                    against the manifest's sha256; the run must be complete
    FILE.npz        `arr_0` uint8 [N, H, W, C] (improved-diffusion's format), streamed from the zip member
    image folder    *.png, *.jpg, *.jpeg, *.bmp, *.webp under it (recursively), sorted by relative path;
                    8-bit grayscale (L), RGB, or palette (read as RGB); all of one size

Reference statistics (REF): an .npz with `mu` [D] and `sigma` [D, D]: pytorch-fid's and EDM's statistics
files, ours (`--stats-out`), and openai's reference batches, which also hold `mu_s`/`sigma_s` (sFID) and the
images `arr_0` (precision and recall).

Digests (the cache key and the report): sha256 of the .npz file; of the shards' recorded sha256s, in order,
for a run (each shard verified against it); of each relative name and file's bytes, in order, for a folder.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ddpm_fast import shards
from ddpm_fast.errors import BadValue
from ddpm_fast.images import IMAGE_SUFFIXES
from ddpm_fast.metrics.frechet import Statistics
from ddpm_fast.shards import file_sha256

__all__ = [
    "IMAGE_SUFFIXES",
    "open_images",
    "open_reference",
    "Reference",
    "ImageSource",
    "rebatch",
    "file_sha256",
]


def rebatch(pieces, batch_size: int) -> Iterator[np.ndarray]:
    """Arrays of any row counts -> arrays of exactly `batch_size` rows (the last may be shorter)."""
    buf, n = [], 0
    for p in pieces:
        while p.shape[0]:
            take = min(batch_size - n, p.shape[0])
            buf.append(p[:take])
            n += take
            p = p[take:]
            if n == batch_size:
                yield buf[0] if len(buf) == 1 else np.concatenate(buf)
                buf, n = [], 0
    if n:
        yield buf[0] if len(buf) == 1 else np.concatenate(buf)


def _check_images(dtype, shape, what: str) -> None:
    if np.dtype(dtype) != np.uint8:
        raise BadValue(f"{what} must be uint8 images (0..255); got {np.dtype(dtype)}")
    if len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
        raise BadValue(
            f"{what} must be [N, H, W, C] with N >= 1 and C 1 or 3 (NHWC); got shape {list(shape)}"
        )


class ImageSource:
    """A set of images read in index order: `num`, `hwc`, `digest()`, `batches(batch_size, start, stop)`."""

    kind = "?"

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self.num = 0
        self.hwc: tuple[int, int, int] = (0, 0, 0)
        self._digest: str | None = None

    def digest(self) -> str:
        if self._digest is None:
            self._digest = self._compute_digest()
        return self._digest

    def _compute_digest(self) -> str:
        raise NotImplementedError

    def _pieces(self, start: int, stop: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Images start .. stop-1, uint8 [b, H, W, C], in batches of `batch_size` (the last may be shorter)."""
        stop = self.num if stop is None else stop
        return rebatch(self._pieces(start, stop), batch_size)

    def describe(self) -> dict:
        return {
            "path": os.path.abspath(self.path),
            "kind": self.kind,
            "num": self.num,
            "image_hwc": list(self.hwc),
            "sha256": self.digest(),
        }


class RunImages(ImageSource):
    kind = "run"

    def __init__(self, path: str, name: str, manifest: dict):
        super().__init__(path, name)
        self.num = int(manifest["num"])
        self.fmt = manifest["settings"]["format"]
        self.hwc = tuple(int(v) for v in manifest["image_hwc"])
        self.ranges = shards.shard_ranges(self.num, int(manifest["settings"]["shard_size"]))
        self.done = manifest.get("done", {})
        missing = [
            k for k, (_, c) in enumerate(self.ranges) if (self.done.get(str(k)) or {}).get("count") != c
        ]
        if missing:
            raise BadValue(
                f"{name} {path}: {len(missing)} of {len(self.ranges)} shards are not done (first: {missing[0]}); "
                "finish the run with the same `ddpm-fast sample` command"
            )
        _check_images(np.uint8, (self.num, *self.hwc), f"{name} {path}")

    def _shard(self, k: int) -> str:
        return shards.shard_path(self.path, k, self.fmt)

    def _compute_digest(self) -> str:
        h = hashlib.sha256(f"run {self.num} {list(self.hwc)}".encode())
        for k, (start, count) in enumerate(self.ranges):
            sha = self.done[str(k)].get("sha256")
            why = shards.check_shard(self._shard(k), self.fmt, start, count, self.hwc, sha)
            if why is not None:
                raise BadValue(
                    f"{self.name} {self.path}: shard {k} is {why}; run the same sample command again"
                )
            h.update((sha or shards.shard_digest(self._shard(k), self.fmt)).encode())
        return h.hexdigest()

    def _pieces(self, start, stop):
        for k, (s, c) in enumerate(self.ranges):
            if s + c <= start or s >= stop:
                continue
            images, _ = shards.read_shard(self._shard(k), self.fmt)
            yield images[max(start, s) - s : min(stop, s + c) - s]


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise BadValue(f"unsupported .npy format version {version}")


def _npz_members(path: str, name: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BadValue(f"{name} {path} is not a readable .npz file ({e})") from e


class NpzImages(ImageSource):
    kind = "npz"

    def __init__(self, path: str, name: str):
        super().__init__(path, name)
        members = _npz_members(path, name)
        if "arr_0.npy" not in members:
            held = ", ".join(m[:-4] for m in members if m.endswith(".npy")) or "nothing"
            raise BadValue(
                f"{name} {path} holds no images arr_0 (it holds: {held}); expected arr_0 uint8 NHWC"
            )
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            try:
                shape, fortran, dtype = _read_npy_header(f)
            except ValueError as e:
                raise BadValue(f"{name} {path}: arr_0 is not a readable array ({e})") from e
        _check_images(dtype, shape, f"{name} {path}: arr_0")
        if fortran:
            raise BadValue(f"{name} {path}: arr_0 is stored in Fortran order; save it C-contiguous")
        self.num, self.hwc = int(shape[0]), tuple(int(v) for v in shape[1:])

    def _compute_digest(self) -> str:
        return file_sha256(self.path)

    def _pieces(self, start, stop):
        row = int(np.prod(self.hwc))
        step = max(1, (64 << 20) // row)  # 64 MB reads
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            _read_npy_header(f)
            if start:
                f.seek(start * row, os.SEEK_CUR)
            for s in range(start, stop, step):
                n = min(step, stop - s)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise BadValue(f"{self.name} {self.path}: arr_0 is truncated at image {s}")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.hwc)


class FolderImages(ImageSource):
    kind = "folder"

    def __init__(self, path: str, name: str):
        super().__init__(path, name)
        found = []
        for root, _, files in os.walk(path):
            for f in files:
                if f.lower().endswith(IMAGE_SUFFIXES):
                    found.append(os.path.relpath(os.path.join(root, f), path))
        if not found:
            raise BadValue(f"{name} {path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        self.files = sorted(found, key=lambda p: p.replace(os.sep, "/"))
        self.num = len(self.files)
        self.hwc = self._read(self.files[0], None).shape

    def _read(self, rel: str, hwc) -> np.ndarray:
        from PIL import Image

        path = os.path.join(self.path, rel)
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode == "P":
                    im = im.convert("RGB")
                elif mode not in ("L", "RGB"):
                    raise BadValue(
                        f"{self.name} {path}: mode {mode}; images must be 8-bit RGB, grayscale (L) or palette"
                    )
                a = np.asarray(im)
        except OSError as e:
            raise BadValue(f"{self.name} {path} is not a readable image ({e})") from e
        a = a[:, :, None] if a.ndim == 2 else a
        if hwc is not None and a.shape != hwc:
            raise BadValue(f"{self.name} {path}: {list(a.shape)} (HWC), but the first image is {list(hwc)}")
        return a

    def _compute_digest(self) -> str:
        h = hashlib.sha256()
        for rel in self.files:
            h.update(rel.replace(os.sep, "/").encode() + b"\0")
            with open(os.path.join(self.path, rel), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        return h.hexdigest()

    def _pieces(self, start, stop):
        for i in range(start, stop):
            yield self._read(self.files[i], self.hwc)[None]


def open_images(path, name: str = "samples") -> ImageSource:
    """The image set at `path`: a run directory, an .npz with arr_0, or an image folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        manifest = shards.read_manifest(path)
        return RunImages(path, name, manifest) if manifest is not None else FolderImages(path, name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{name} {path} does not exist (expected a run directory, an .npz or a folder)"
        )
    if not path.lower().endswith(".npz"):
        raise BadValue(f"{name} {path}: expected a run directory, an .npz file or an image folder")
    return NpzImages(path, name)


@dataclass
class Reference:
    """REF: precomputed statistics (`stats`, `spatial`: mu/sigma, mu_s/sigma_s) and/or images."""

    path: str
    digest: str
    stats: Statistics | None
    spatial: Statistics | None
    images: ImageSource | None

    def describe(self) -> dict:
        d = {"path": os.path.abspath(self.path), "sha256": self.digest}
        d["statistics"] = "precomputed" if self.stats is not None else "computed from the images"
        if self.images is not None:
            d.update({k: v for k, v in self.images.describe().items() if k not in ("path", "sha256")})
        else:
            d.update({"kind": "statistics", "num": self.stats.num})
        return d


def open_reference(path, name: str = "ref") -> Reference:
    """REF at `path`: an image set, a statistics .npz, or both (openai's reference batches)."""
    path = os.fspath(path)
    if os.path.isdir(path) or not path.lower().endswith(".npz"):
        images = open_images(path, name)
        return Reference(path, images.digest(), None, None, images)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} {path} does not exist")
    members = {m[:-4] for m in _npz_members(path, name) if m.endswith(".npy")}
    stats = spatial = None
    if {"mu", "sigma"} <= members:
        with np.load(path, allow_pickle=False) as z:
            num = int(z["num"]) if "num" in members and z["num"].shape == () else None
            stats = Statistics.checked(z["mu"], z["sigma"], num, f"{name} {path}")
            if {"mu_s", "sigma_s"} <= members:
                spatial = Statistics.checked(z["mu_s"], z["sigma_s"], num, f"{name} {path} (mu_s, sigma_s)")
    elif "arr_0" not in members:
        held = ", ".join(sorted(members)) or "nothing"
        raise BadValue(
            f"{name} {path} holds neither images (arr_0) nor statistics (mu, sigma); it holds: {held}"
        )
    images = NpzImages(path, name) if "arr_0" in members else None
    digest = images.digest() if images is not None else file_sha256(path)
    return Reference(path, digest, stats, spatial, images)

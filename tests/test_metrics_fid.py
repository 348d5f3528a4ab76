"""`df.metrics.fid` and `ddpm-fast fid` without the real weights: a small TorchScript network with the
calling convention of NVIDIA's inception-2015-12-05.pt (`TinyInception`, below) stands in for it.

The reference here is the network called directly as the file is meant to be called, and the metrics'
formulas applied to those outputs (two-pass statistics, the k-NN definition, the IS formula).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ddpm_fast as df
from ddpm_fast import cli
from ddpm_fast.metrics import evaluate, features, inception, sources
from ddpm_fast.metrics.frechet import Statistics, frechet_distance
from ddpm_fast.metrics.inception import INCEPTION_FILE, InceptionNet, tf_resize
from ddpm_fast.metrics.iscore import inception_score
from ddpm_fast.metrics.manifold import precision_recall

# ---------------------------------------------------------------------------------------------- stand-in
# A small TorchScript stand-in for NVIDIA's inception-2015-12-05.pt, with the same calling convention:
#
#     net(img, return_features=True) -> [N, 12] pool features      img: [N, 3, H, W], 0..255, uint8 or float
#     net(img, no_output_bias=True)  -> [N, 10] softmax(features W^T)
#     net(img)                       -> [N, 10] softmax(features W^T + b)
#
# the same in-graph resize (affine_grid + grid_sample to 299 x 299, TF1's corner-aligned bilinear) and
# normalisation ((x - 128) / 128), and the same module names where they matter: `layers` (a Sequential whose
# `mixed_6` child has a `conv`), so sFID's spatial tap is exercised: mixed_6.conv gives 8 x 2 x 2, the first
# 7 channels flattened 28-d.

FEATURES, CLASSES, SPATIAL = 12, 10, 7 * 2 * 2


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return F.relu(self.conv(x))


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _Conv(8, 8)
        self.tower = _Conv(8, 4)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


class TinyInception(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():  # weights from `seed`, the global generator left as it was
            torch.manual_seed(seed)
            self.layers = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(3, 8, 7, stride=8),  # 299 -> 37
                    pool0=nn.AdaptiveAvgPool2d(2),
                    mixed_6=_Mixed(),
                    pool=nn.AdaptiveAvgPool2d(1),
                )
            )
            self.output = nn.Linear(FEATURES, CLASSES)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        n, c, h, w = img.shape
        assert c == 3
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        theta = theta.unsqueeze(0).repeat([n, 1, 1])
        grid = F.affine_grid(theta, [n, c, 299, 299], False)
        x = F.grid_sample(x, grid, "bilinear", "border", False)
        x = (x - 128) / 128
        features = self.layers(x).view(n, -1)
        if return_features:
            return features
        if no_output_bias:
            logits = F.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return torch.softmax(logits, dim=1)


class NoKwargs(nn.Module):
    """A TorchScript network with another calling convention (no return_features)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean((2, 3))


def save_tiny(path, seed: int = 0) -> str:
    torch.jit.script(TinyInception(seed).eval()).save(str(path))
    return str(path)


SPLIT = 40  # images per IS split and per resumable chunk in these tests


def reference_outputs(net_path: str, images: np.ndarray):
    """(pool, probs, spatial) from the network's own forward, and spatial from its layers, by hand."""
    net = torch.jit.load(net_path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
        pool = net(x, return_features=True)
        probs = net(x, no_output_bias=True)
        h = (tf_resize(x.float()) - 128) / 128
        h = net.layers.pool0(net.layers.conv(h))
        s = net.layers.mixed_6.conv(h)[:, :7]
    return pool.double().numpy(), probs.double(), s.permute(0, 2, 3, 1).reshape(len(x), -1).double().numpy()


def _images(seed: int, n: int, hw: int = 16, c: int = 3, hi: int = 256) -> np.ndarray:
    """Smooth random images: per-image colour, a gradient of random direction and noise, values < hi."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    colour = rng.uniform(0, 1, (n, 1, 1, c))
    slope = rng.normal(0, 1, (n, 2, 1, 1, 1))
    ramp = slope[:, 0] * yy[None, :, :, None] + slope[:, 1] * xx[None, :, :, None]
    x = colour + 0.3 * ramp + 0.1 * rng.standard_normal((n, hw, hw, c))
    return (np.clip(x, 0, 1) * (hi - 1)).round().astype(np.uint8)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def net_path(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("net") / INCEPTION_FILE)


@pytest.fixture
def data(tmp_path):
    """samples: 120 random images; ref: 100 darker ones (so the metrics are not trivially 0 or 1)."""
    a, b = _images(0, 120), _images(1, 100, hi=200)
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    return tmp_path, a, b


# ---------------------------------------------------------------------------------------------- network


def test_one_pass_reproduces_the_file(net_path):
    images = _images(2, 9, hw=13)
    net = InceptionNet(net_path, "cpu")
    out = net(images)
    pool, probs, spatial = reference_outputs(net_path, images)
    assert net.one_pass and net.probs_mode == "head" and net.dim == FEATURES
    assert (
        out.pool.shape == (9, FEATURES)
        and out.probs.shape == (9, CLASSES)
        and out.spatial.shape == (9, SPATIAL)
    )
    # same ops in the same order as the file's forward: equal to float32 rounding
    np.testing.assert_allclose(out.pool.double().numpy(), pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.probs.double().numpy(), probs.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.spatial.double().numpy(), spatial, rtol=1e-5, atol=1e-6)
    again = net(images)  # the decided path: deterministic
    assert torch.equal(again.pool, net(images).pool) and torch.equal(again.spatial, net(images).spatial)


def test_spatial_features_are_flattened_in_tf_order():
    """openai's evaluator flattens mixed_6/conv[..., :7] from NHWC: channel fastest."""
    net = InceptionNet.__new__(InceptionNet)
    conv = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).reshape(2, 8, 2, 2)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Identity()

        def forward(self, x):
            return x

    layers = torch.nn.Sequential()
    layers.add_module("mixed_6", Block())
    net.net = torch.nn.Module()
    net.net.layers = layers
    _, spatial = InceptionNet._one_pass(net, conv)  # tf_resize is not the identity: use its output
    s = (tf_resize(conv) - 128) / 128
    want = s[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(spatial, want)
    assert torch.equal(spatial[0, :7], s[0, :7, 0, 0])  # the first 7 values: every channel of pixel (0, 0)


def test_tf_resize_reads_corner_aligned_coordinates():
    """TF1 ResizeBilinear: output column j reads input x = j * W / 299 (clamped); a ramp is reproduced exactly."""
    w = 13
    ramp = torch.arange(w, dtype=torch.float64).expand(1, 1, 5, w).contiguous()
    out = tf_resize(ramp)[0, 0, 0]
    want = torch.clamp(torch.arange(299, dtype=torch.float64) * w / 299, max=w - 1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_grayscale_is_read_as_rgb(net_path):
    gray = _images(3, 5, c=1)
    net = InceptionNet(net_path, "cpu")
    assert torch.equal(net(gray).pool, net(np.repeat(gray, 3, axis=3)).pool)


class _Doubled(torch.nn.Module):
    """Same convention, but the forward does not equal its layers' chain (as a different network's)."""

    def __init__(self):
        super().__init__()
        self.inner = TinyInception()
        self.layers = self.inner.layers
        self.output = self.inner.output

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        features = self.inner(img, True) * 2
        if return_features:
            return features
        return torch.softmax(torch.nn.functional.linear(features, self.output.weight), dim=1)


def test_another_network_falls_back_to_its_forward(tmp_path):
    path = str(tmp_path / "doubled.pt")
    torch.jit.script(_Doubled().eval()).save(path)
    images = _images(4, 6)
    net = InceptionNet(path, "cpu")
    out = net(images)
    assert net.one_pass is False and out.spatial is None
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.pool, torch.jit.load(path)(x, return_features=True))
    torch.testing.assert_close(out.probs, torch.jit.load(path)(x, no_output_bias=True))


def test_missing_weights_say_what_to_get_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_FAST_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = str(tmp_path / "cache" / "ddpm-fast" / INCEPTION_FILE)
    assert inception.default_inception_path() == default
    with pytest.raises(FileNotFoundError) as e:
        inception.resolve_inception_path(None)
    msg = str(e.value)
    assert msg.startswith(f"no inception file at {default}: get {INCEPTION_FILE}") and "\n" not in msg
    assert inception.INCEPTION_URL in msg and "nothing is downloaded" in msg
    with pytest.raises(
        FileNotFoundError, match=f"^inception {tmp_path}/x.pt does not exist: get {INCEPTION_FILE}"
    ):
        inception.resolve_inception_path(tmp_path / "x.pt")
    monkeypatch.setenv("DDPM_FAST_INCEPTION", str(tmp_path / "env.pt"))
    assert inception.default_inception_path() == str(tmp_path / "env.pt")


def test_not_torchscript_is_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip archive at all")
    pickled = tmp_path / "state.pt"
    torch.save(TinyInception().state_dict(), pickled)
    for path in (junk, pickled):
        with pytest.raises(
            ValueError, match=rf"^inception {path} is not a TorchScript file \(.*\); expected"
        ):
            InceptionNet(str(path), "cpu")


def test_another_calling_convention_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.script(NoKwargs()).save(str(path))
    with pytest.raises(ValueError, match=r"^inception .* does not take net\(images, return_features=True\)"):
        InceptionNet(str(path), "cpu")


# ---------------------------------------------------------------------------------------------- end to end


def test_fid_matches_the_formulas_on_the_network_outputs(data, net_path):
    tmp, a, b = data
    r = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", inception=net_path, split_size=SPLIT, cache=False)
    pa, qa, sa = reference_outputs(net_path, a)
    pb, _, sb = reference_outputs(net_path, b)
    want_fid = frechet_distance(Statistics.from_features(pa), Statistics.from_features(pb))
    want_sfid = frechet_distance(Statistics.from_features(sa), Statistics.from_features(sb))
    # features agree to float32 rounding (1e-6 relative), which moves d^2 by about as much
    assert r.fid == pytest.approx(want_fid, rel=1e-4)
    assert r.sfid == pytest.approx(want_sfid, rel=1e-4)
    assert r.inception_score == pytest.approx(inception_score(qa, split_size=SPLIT), rel=1e-5)
    assert (r.precision, r.recall) == precision_recall(pb, pa)
    assert r.fid > 0.01 and 0 < r.recall < 1  # the inputs differ; nothing trivially 0 or 1
    assert r.report["notes"] == {}


def test_identical_sets_give_zero(data, net_path):
    tmp, _, _ = data
    r = df.metrics.fid(tmp / "a.npz", tmp / "a.npz", inception=net_path, split_size=SPLIT)
    assert abs(r.fid) < 1e-6 and abs(r.sfid) < 1e-6
    assert (r.precision, r.recall) == (1.0, 1.0)


def test_run_directory_folder_and_npz_are_the_same_images(tmp_path, net_path, capsys):
    run = tmp_path / "run"
    argv = ["sample", "--num", "48", "--steps", "2", "--shard-size", "16", "--out", f"{run}/", "--quiet"]
    assert cli.main(argv) == 0  # the bundled digits model: 1 x 8 x 8, read as RGB
    capsys.readouterr()
    merged = np.load(run / "samples.npz")["arr_0"]
    folder = tmp_path / "pngs"
    folder.mkdir()
    from PIL import Image

    for i, im in enumerate(merged):
        Image.fromarray(im[:, :, 0]).save(folder / f"{i:05d}.png")
    opts = dict(inception=net_path, split_size=SPLIT, cache=False)
    stats = []
    for src in (run, run / "samples.npz", folder):
        fs = evaluate._Session(evaluate.FIDConfig(**opts)).features(sources.open_images(src), False, "x")
        stats.append(fs)
    for fs in stats[1:]:
        assert np.array_equal(fs.stats.mu, stats[0].stats.mu) and np.array_equal(
            fs.stats.sigma, stats[0].stats.sigma
        )
    r = df.metrics.fid(run, folder, **opts)
    assert abs(r.fid) < 1e-6 and r.report["samples"]["kind"] == "run" and r.report["ref"]["kind"] == "folder"


def test_openai_reference_batch(data, net_path):
    """arr_0 + precomputed mu/sigma/mu_s/sigma_s: FID and sFID from the precomputed ones, P/R from arr_0."""
    tmp, a, b = data
    c = _images(5, 90, hi=180)
    pc, _, sc = reference_outputs(net_path, c)
    st, sp = Statistics.from_features(pc), Statistics.from_features(sc)
    np.savez(tmp / "batch.npz", arr_0=b, mu=st.mu, sigma=st.sigma, mu_s=sp.mu, sigma_s=sp.sigma)
    opts = dict(inception=net_path, split_size=SPLIT)
    r = df.metrics.fid(tmp / "a.npz", tmp / "batch.npz", **opts)
    np.savez(tmp / "c.npz", arr_0=c)
    vs_c = df.metrics.fid(tmp / "a.npz", tmp / "c.npz", **opts)
    vs_b = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", **opts)
    assert r.fid == pytest.approx(vs_c.fid, rel=1e-4) and r.sfid == pytest.approx(vs_c.sfid, rel=1e-4)
    assert (r.precision, r.recall) == (vs_b.precision, vs_b.recall)
    assert r.report["ref"]["statistics"] == "precomputed" and r.report["ref"]["num"] == 100


def test_statistics_file_reference_and_save_stats(data, net_path, tmp_path):
    tmp, _, _ = data
    opts = dict(inception=net_path, split_size=SPLIT)
    stats = df.metrics.save_stats(tmp / "b.npz", tmp / "b_stats.npz", **opts)
    with np.load(tmp / "b_stats.npz") as z:
        assert set(z.files) >= {"mu", "sigma", "mu_s", "sigma_s", "num"} and int(z["num"]) == 100
        assert np.array_equal(z["mu"], stats.mu)
    r = df.metrics.fid(tmp / "a.npz", tmp / "b_stats.npz", **opts)
    direct = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", **opts)
    assert r.fid == direct.fid and r.sfid == direct.sfid  # the same statistics, bit for bit
    assert r.precision is None and "holds no images" in r.report["notes"]["precision"]
    # pytorch-fid's layout: mu and sigma only
    np.savez(tmp / "pf.npz", mu=stats.mu, sigma=stats.sigma)
    r = df.metrics.fid(tmp / "a.npz", tmp / "pf.npz", **opts)
    assert r.fid == direct.fid and r.sfid is None and "no spatial statistics" in r.report["notes"]["sfid"]
    np.savez(tmp / "wrong.npz", mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"^ref .*wrong.npz: statistics of 5 dimensions, but the Inception"):
        df.metrics.fid(tmp / "a.npz", tmp / "wrong.npz", **opts)


def test_report_is_written_with_digests(data, net_path):
    tmp, _, _ = data
    out = tmp / "report.json"
    df.metrics.fid(tmp / "a.npz", tmp / "b.npz", inception=net_path, split_size=SPLIT, out=out)
    rep = json.loads(out.read_text())
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    assert rep["format"] == "ddpm-fast-fid" and rep["metrics"]["fid"] > 0
    assert rep["samples"]["sha256"] == sha(tmp / "a.npz") and rep["ref"]["sha256"] == sha(tmp / "b.npz")
    assert rep["inception"]["sha256"] == sha(net_path) and rep["samples"]["num"] == 120
    assert not [n for n in os.listdir(tmp) if ".tmp-" in n]


# ---------------------------------------------------------------------------------------------- cache


def test_second_call_reads_the_cache(data, net_path, tmp_path, monkeypatch):
    tmp, _, _ = data
    opts = dict(inception=net_path, split_size=SPLIT)
    first = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", **opts)
    cache = tmp / "a.npz.fid-cache"
    (key_dir,) = cache.iterdir()
    assert sorted(os.listdir(key_dir)) == ["pool.npz", "stats.npz"]  # the chunks are gone

    def fail(self, images):
        raise AssertionError("features computed again")

    monkeypatch.setattr(InceptionNet, "__call__", fail)
    second = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", **opts)
    assert second.metrics() == first.metrics() and second.report["samples"]["features_from_cache"]
    other = save_tiny(tmp_path / "other.pt", seed=1)  # another network: another key, computed afresh
    with pytest.raises(AssertionError, match="computed again"):
        df.metrics.fid(tmp / "a.npz", tmp / "b.npz", inception=other, split_size=SPLIT)


def test_interrupted_extraction_resumes(data, net_path, monkeypatch):
    tmp, _, _ = data
    opts = dict(inception=net_path, split_size=SPLIT)
    want = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", cache=False, **opts)
    real, calls = features._compute_chunk, []

    def interrupted(source, net, start, count, batch_size, bar):
        calls.append(start)
        if source.path.endswith("a.npz") and start == 2 * SPLIT and len(calls) == 3:
            raise KeyboardInterrupt
        return real(source, net, start, count, batch_size, bar)

    monkeypatch.setattr(features, "_compute_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        df.metrics.fid(tmp / "a.npz", tmp / "b.npz", **opts)
    (key_dir,) = (tmp / "a.npz.fid-cache").iterdir()
    assert sorted(os.listdir(key_dir)) == ["chunk_000000.npz", "chunk_000001.npz"]
    calls.clear()
    got = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", **opts)
    assert calls[0] == 2 * SPLIT  # chunks 0 and 1 were read back, not computed
    assert got.metrics() == want.metrics()  # bit for bit: the same chunks, accumulated in the same order


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_inputs(tmp: Path) -> dict:
    np.savez(tmp / "stats_only.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp / "float.npz", arr_0=np.zeros((50, 8, 8, 3), np.float32))
    np.savez(tmp / "rgba.npz", arr_0=np.zeros((50, 8, 8, 4), np.uint8))
    np.savez(tmp / "few.npz", arr_0=_images(6, FEATURES))
    return {
        "stats_only.npz": r"^samples .*stats_only.npz holds no images arr_0 \(it holds: mu, sigma\)",
        "float.npz": r"^samples .*float.npz: arr_0 must be uint8 images \(0..255\); got float32",
        "rgba.npz": r"^samples .*rgba.npz: arr_0 must be \[N, H, W, C\] with N >= 1 and C 1 or 3",
        "few.npz": rf"^samples .*few.npz: {FEATURES} images give a covariance of rank at most {FEATURES - 1}",
    }


def test_bad_images_name_the_argument(data, net_path):
    tmp, _, _ = data
    for name, pattern in _bad_inputs(tmp).items():
        with pytest.raises(ValueError, match=pattern):
            df.metrics.fid(tmp / name, tmp / "b.npz", inception=net_path)


def test_bad_folders_and_runs(tmp_path):
    from PIL import Image

    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.new("RGBA", (8, 8)).save(rgba / "0.png")
    with pytest.raises(ValueError, match=r"^samples .*0.png: mode RGBA; images must be 8-bit RGB"):
        sources.open_images(rgba)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "0.png")
    Image.new("RGB", (9, 8)).save(mixed / "1.png")
    src = sources.open_images(mixed)
    with pytest.raises(ValueError, match=r"1.png: \[8, 9, 3\] \(HWC\), but the first image is \[8, 8, 3\]"):
        list(src.batches(4))
    with pytest.raises(ValueError, match=r"^samples .*empty holds no .png/"):
        (tmp_path / "empty").mkdir()
        sources.open_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"^ref .*nope does not exist"):
        sources.open_reference(tmp_path / "nope")


def test_unfinished_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        cli.main(
            ["sample", "--num", "32", "--steps", "2", "--shard-size", "16", "--out", f"{run}/", "--quiet"]
        )
        == 0
    )
    capsys.readouterr()
    m = json.loads((run / "manifest.json").read_text())
    del m["done"]["1"]
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"^samples .*run: 1 of 2 shards are not done \(first: 1\)"):
        sources.open_images(run)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_compares_and_saves_statistics(data, net_path, capsys):
    tmp, _, _ = data
    base = ["--inception", net_path, "--quiet"]
    assert cli.main(["fid", str(tmp / "b.npz"), "--stats-out", str(tmp / "s.npz"), *base]) == 0
    assert capsys.readouterr().out.strip() == str(tmp / "s.npz")
    assert cli.main(["fid", str(tmp / "a.npz"), str(tmp / "s.npz"), "--out", str(tmp / "r.json"), *base]) == 0
    out, err = capsys.readouterr()
    names = [line.split(":")[0] for line in out.strip().splitlines()]
    assert names == ["Inception Score", "FID", "sFID"]
    fid_line = float(out.splitlines()[1].split(": ")[1])
    assert fid_line == pytest.approx(json.loads((tmp / "r.json").read_text())["metrics"]["fid"], rel=1e-5)
    assert "Precision: unavailable" in err


def test_cli_bad_inputs_are_one_line_exit_2(data, net_path, capsys, monkeypatch):
    tmp, _, _ = data
    junk = tmp / "junk.pt"
    junk.write_bytes(b"junk")
    cases = [
        (["fid", "a.npz", "b.npz", "--inception", str(tmp / "missing.pt")], f"get {INCEPTION_FILE}"),
        (["fid", "a.npz", "b.npz", "--inception", str(junk)], "is not a TorchScript file"),
        (["fid", "a.npz"], "give REF"),
        (["fid", "a.npz", "b.npz", "--out", "r.txt", "--inception", net_path], "out must end in .json"),
        (["fid", "a.npz", "b.npz", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ]
    _bad_inputs(tmp)
    cases += [
        (["fid", name, "b.npz", "--inception", net_path], text)
        for name, text in {
            "stats_only.npz": "stats_only.npz holds no images arr_0",
            "float.npz": "float.npz: arr_0 must be uint8 images",
            "rgba.npz": "rgba.npz: arr_0 must be [N, H, W, C]",
            "few.npz": f"few.npz: {FEATURES} images give a covariance of rank at most",
        }.items()
    ]
    monkeypatch.chdir(tmp)
    for argv, text in cases:
        assert cli.main(argv) == 2, argv
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("ddpm-fast fid: error: ") and text in line, (argv, line)


@pytest.mark.cuda
def test_cuda_matches_cpu(data, net_path):
    tmp, _, _ = data
    opts = dict(inception=net_path, split_size=SPLIT, cache=False)
    cpu = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", device="cpu", **opts)
    gpu = df.metrics.fid(tmp / "a.npz", tmp / "b.npz", device="cuda", **opts)
    for k, v in cpu.metrics().items():
        assert gpu.metrics()[k] == pytest.approx(v, rel=1e-3, abs=1e-6), k

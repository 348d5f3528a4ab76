"""Class labels through every path: plan, reference, fast backend, sharded batches, the command line.

The conditional test model is an exact noise model of Gaussian data whose mean depends on the class,
mu_y = 0.1 y: with clip off, the samples of class y then average mu_y, so a wrong or shuffled label moves a
row's mean by >= 0.1 while the mean of 4x4 = 16 elements of one sample has standard error 0.2 / 4 = 0.05 --
the per-class mean over 32 samples (512 elements, standard error 0.009) is what the test checks.
"""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import noise
from ddpm_fast.defaults import ModelDefaults
from ddpm_fast.plan import make_plan

S = df.Schedule.linear(100)
K = 5


class ClassGaussian(torch.nn.Module):
    """eps*(x_t, t | y) for data N(0.1 y, 0.04) per class: a conditional model with a record."""

    def __init__(self):
        super().__init__()
        self.register_buffer("abar", S.alphas_cumprod.float())
        self.defaults = ModelDefaults(schedule=S, clip=False, image_shape=(1, 4, 4), num_classes=K)

    def forward(self, x, t, y):
        ab = self.abar[t].reshape(-1, 1, 1, 1)
        mu = 0.1 * y.to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * 0.04 + 1 - ab)


@pytest.mark.parametrize(
    "backend, options", [("reference", {}), ("fast", {"compile": False, "triton": False})]
)
def test_each_row_follows_its_label(backend, options):
    model = ClassGaussian()
    y = torch.arange(160) % K
    x = df.sample(model, shape=(160, 1, 4, 4), steps=20, labels=y, seed=1, backend=backend, **options)
    for k in range(K):
        assert abs(x[y == k].mean().item() - 0.1 * k) < 0.03, (k, x[y == k].mean().item())


def test_random_labels_follow_the_sample_index_not_the_batch():
    model = ClassGaussian()
    whole = make_plan(model, None, (12, 1, 4, 4), steps=5, labels="random", seed=3)
    assert torch.equal(whole.labels, noise.random_labels(3, 0, 12, K))
    part = whole.rows(4, 6)  # the batch holding samples 6..9 of the run
    assert torch.equal(part.labels, whole.labels[6:10])
    a = df.sample(model, shape=(12, 1, 4, 4), steps=5, labels="random", seed=3, backend="reference")
    b = df.sample(
        model, shape=(4, 1, 4, 4), steps=5, labels="random", seed=3, start_index=6, backend="reference"
    )
    torch.testing.assert_close(a[6:10], b, atol=1e-6, rtol=0)


def test_fast_backend_pads_and_chunks_with_the_right_labels():
    model = ClassGaussian()
    y = torch.tensor([4, 0, 3, 1, 2])
    kw = dict(shape=(5, 1, 4, 4), steps=6, labels=y, seed=2)
    ref = df.sample(model, backend="reference", **kw)
    fast = df.sample(model, backend="fast", compile=False, triton=False, buckets=(2, 4), **kw)  # chunks 4 + 1
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "labels, model, words",
    [
        (None, "cond", "labels must be given for this class-conditional model"),
        (3, "uncond", "labels were given but the model is unconditional"),
        (K, "cond", "labels must lie in [0, 5)"),
        (torch.tensor([0, 1]), "cond", "labels must hold one class per sample (3)"),
        (torch.tensor([0.5, 1.0, 2.0]), "cond", "labels must be a 1-D int tensor"),
        ("uniform", "cond", "labels must be a 1-D int tensor, an int or 'random'"),
    ],
)
def test_bad_labels_name_the_argument(labels, model, words):
    m = ClassGaussian() if model == "cond" else (lambda x, t: x * 0)
    with pytest.raises((ValueError, TypeError)) as e:
        df.sample(m, S, (3, 1, 4, 4), steps=3, labels=labels, backend="reference")
    assert words in str(e.value)


def test_runs_write_the_labels_as_arr_1(tmp_path):
    """A conditional run's .npz holds arr_1 (guided-diffusion's layout), from a single file or merged shards;
    "random" labels are those of each global sample index, whatever the batch and shard cuts."""
    import numpy as np

    from ddpm_fast.runs import generate

    model = ClassGaussian()
    kw = dict(num=7, steps=3, seed=5, labels="random", backend="reference")
    generate(model, tmp_path / "one.npz", batch_size=3, **kw)
    generate(model, tmp_path / "run", batch_size=2, shard_size=3, **kw)
    want = noise.random_labels(5, 0, 7, K).numpy()
    for path in (tmp_path / "one.npz", tmp_path / "run" / "samples.npz"):
        with np.load(path) as z:
            assert z["arr_0"].shape == (7, 4, 4, 1) and np.array_equal(z["arr_1"], want), path
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "run" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_a_refused_rerun_writes_nothing_and_merge_checks_the_labels(tmp_path, capsys):
    """A rerun with other labels is refused before it writes anything (it overwrote the run's labels.npy); merge
    takes labels.npy only if it is the one the manifest records, and says which file is wrong in one line."""
    import numpy as np

    from ddpm_fast.cli import main
    from ddpm_fast.errors import UserError
    from ddpm_fast.runs import generate

    model, run = ClassGaussian(), tmp_path / "run"
    kw = dict(num=4, batch_size=2, shard_size=2, steps=3, seed=5, backend="reference", merge=False)
    generate(model, run, labels="random", **kw)
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    with pytest.raises(UserError, match=r"other settings \(labels_sha256 is "):
        generate(model, run, labels=3, **kw)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"} == files
    want = noise.random_labels(5, 0, 4, K).numpy()
    assert main(["merge", str(run), str(tmp_path / "ok.npz"), "--quiet"]) == 0
    with np.load(tmp_path / "ok.npz") as z:
        assert np.array_equal(z["arr_1"], want)
    capsys.readouterr()

    labels = run / "labels.npy"
    good = labels.read_bytes()
    for damage, words in (
        (lambda: labels.unlink(), "labels.npy is missing (the manifest records a conditional run's labels)"),
        (lambda: np.save(labels, (want + 1) % K), "labels.npy differs from the labels the manifest records"),
        (lambda: labels.write_text("not an array"), "labels.npy is unreadable"),
    ):
        damage()
        assert main(["merge", str(run), str(tmp_path / "bad.npz"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "bad.npz").exists()
        labels.write_bytes(good)
    # The same command again writes the labels back, and the run merges.
    labels.unlink()
    generate(model, run, labels="random", **{**kw, "merge": True})
    with np.load(run / "samples.npz") as z:
        assert np.array_equal(z["arr_1"], want)


def test_labels_that_are_not_the_runs_are_refused_at_merge(tmp_path, capsys):
    import numpy as np

    from ddpm_fast.cli import main
    from ddpm_fast.runs import generate

    run = tmp_path / "run"
    generate(lambda x, t: x * 0, run, num=2, batch_size=2, steps=3, schedule=S, image_shape=(1, 4, 4),
             model_id="zero", backend="reference", merge=False)  # fmt: skip
    np.save(run / "labels.npy", np.zeros(2, np.int64))  # e.g. left by another command
    assert main(["merge", str(run), str(tmp_path / "m.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels.npy does not belong to this run" in err, err

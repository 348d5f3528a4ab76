"""`ddpm-fast sample` / `merge`: output formats, sharded runs, resume, torchrun, failures.

The oracle is `ddpm_fast.sample` itself: shard k of a run must hold exactly the uint8 images of the samples
k*S .. k*S+n-1 drawn directly with the same batch cuts. Everything else (2 processes, a killed and resumed
run, PNG shards, a single .npz) must reproduce those bytes exactly: the noise is counter-based and every
shard is computed in the same batches, so equality is bitwise, not within a tolerance.
Subprocesses run with one thread each (torchrun's default), so their numbers are comparable.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast import checkpoint, shards
from ddpm_fast.cli import main
from ddpm_fast.errors import UserError
from ddpm_fast.images import to_uint8
from ddpm_fast.runs import generate

STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def direct(model, start: int, count: int, batch: int, **kw) -> np.ndarray:
    """Samples start..start+count-1 drawn with df.sample in batches cut from `start`: the reference bytes."""
    out = []
    for off in range(0, count, batch):
        b = min(batch, count - off)
        x = df.sample(model, shape=(b, *model.defaults.image_shape), start_index=start + off, **kw)
        out.append(to_uint8(x))
    return np.concatenate(out)


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: more threads than cores makes tiny convolutions 10-100x slower, not faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-weight U-Net (3x8x8, 45k parameters) saved in the native format with a 100-step schedule."""
    torch.manual_seed(0)
    m = df.UNet(df.UNetConfig.tiny(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4))
    path = tmp_path_factory.mktemp("model") / "tiny"
    checkpoint.save_model(m, path, schedule=df.Schedule.linear(100))
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    return checkpoint.load_model(model_dir)


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddpm_fast.cli", *args],
        env=ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def merged(run_dir) -> np.ndarray:
    with np.load(os.path.join(run_dir, "samples.npz")) as z:
        return z["arr_0"]


def manifest(run_dir) -> dict:
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- in process


def test_shards_hold_exactly_the_directly_drawn_samples(model, tmp_path):
    # 11 samples, shards of 4 (4, 4, 3), batches of 3 inside each shard (3+1, 3+1, 3).
    s = generate(model, str(tmp_path / "run"), num=11, batch_size=3, shard_size=4, steps=STEPS, seed=7)
    assert s["new"] == 11 and s["shards"] == 3
    want = np.concatenate([direct(model, a, n, 3, steps=STEPS, seed=7) for a, n in ((0, 4), (4, 4), (8, 3))])
    got = merged(tmp_path / "run")
    assert got.dtype == np.uint8 and got.shape == (11, 8, 8, 3)
    assert np.array_equal(got, want)
    m = manifest(tmp_path / "run")
    assert m["complete"] and sorted(m["done"]) == ["0", "1", "2"]
    for k, (start, count) in enumerate(shards.shard_ranges(11, 4)):
        path = shards.shard_path(str(tmp_path / "run"), k, "npz")
        assert shards.check_shard(path, "npz", start, count, (8, 8, 3), m["done"][str(k)]["sha256"]) is None
        images, indices = shards.read_shard(path, "npz")
        assert np.array_equal(indices, np.arange(start, start + count))
        assert np.array_equal(images, want[start : start + count])
    # A second run of the same command draws nothing and changes nothing.
    again = generate(model, str(tmp_path / "run"), num=11, batch_size=3, steps=STEPS, seed=7)
    assert again["new"] == 0 and again["skipped"] == 11
    assert np.array_equal(merged(tmp_path / "run"), want)


def test_png_shards_npz_file_and_grid_agree(model, tmp_path):
    kw = dict(num=6, batch_size=2, steps=STEPS, seed=3)
    generate(model, str(tmp_path / "npz_run"), shard_size=4, **kw)
    generate(model, str(tmp_path / "png_run"), shard_size=4, shard_format="png", **kw)
    generate(model, str(tmp_path / "one.npz"), **kw)
    generate(model, str(tmp_path / "grid.png"), **kw)
    ref = merged(tmp_path / "npz_run")
    assert np.array_equal(merged(tmp_path / "png_run"), ref)
    assert sorted(os.listdir(tmp_path / "png_run" / "shards" / "shard_000001")) == [
        "000000004.png",
        "000000005.png",
    ]
    with np.load(tmp_path / "one.npz") as z:
        assert list(z) == ["arr_0"] and np.array_equal(z["arr_0"], ref)
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        grid = np.asarray(im.convert("RGB"))
    # 6 samples -> 3 per row, 2 rows, 2 px padding, 8 px tiles upscaled 4x.
    assert grid.shape == (4 * (2 * 10 + 2), 4 * (3 * 10 + 2), 3)
    assert np.array_equal(grid[4 * 12 : 4 * 12 + 32 : 4, 4 * 2 : 4 * 2 + 32 : 4], ref[3])


def test_fast_backend_run_matches_the_reference_run(model, tmp_path):
    """The fast backend (eager U-Net, fused update) through a sharded run; one bucket for every batch."""
    from ddpm_fast import engine

    engine.clear_cache()
    before = engine.counters["runners"]
    kw = dict(num=7, batch_size=3, shard_size=4, steps=STEPS, seed=4)
    s = generate(model, str(tmp_path / "fast"), backend="fast", compile=False, **kw)
    generate(model, str(tmp_path / "ref"), backend="reference", **kw)
    assert manifest(tmp_path / "fast")["info"]["backend"] == "fast" and s["new"] == 7
    # Batches of 3, 1 (shard 0) and 3 (shard 1) all ran in the one bucket of 3 (left to itself, the
    # engine would build a runner for the 1: more than 2x padding).
    assert engine.counters["runners"] - before == 1
    fast, ref = merged(tmp_path / "fast").astype(int), merged(tmp_path / "ref").astype(int)
    # float32 both ways, differing in op order only: images agree to one uint8 level after rounding.
    assert np.abs(fast - ref).max() <= 1


def test_npz_writer_streams_rows_and_leaves_nothing_when_short(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3, 2), dtype=np.uint8)
    with shards.NpzWriter(str(tmp_path / "a.npz"), a.shape) as w:
        w.write(a[:3])
        w.write(a[3:])
    with np.load(tmp_path / "a.npz") as z:
        assert np.array_equal(z["arr_0"], a)
    with pytest.raises(ValueError, match="3 rows written, 7 expected"):
        with shards.NpzWriter(str(tmp_path / "b.npz"), a.shape) as w:
            w.write(a[:3])
    with pytest.raises(ValueError, match="rows must be uint8"):
        with shards.NpzWriter(str(tmp_path / "c.npz"), a.shape) as w:
            w.write(a[:, :4])
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]


def test_changed_settings_are_refused_and_the_run_left_alone(model, model_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    generate(model, run, num=4, batch_size=2, shard_size=2, steps=STEPS, seed=1)
    before = manifest(run)
    for change, key in (
        (dict(seed=2), "seed"),
        (dict(steps=STEPS + 1), "steps"),
        (dict(method="ddim", eta=0.5), "eta"),
        (dict(shard_size=3), "shard_size"),
        (dict(dtype=torch.float64), "dtype"),
    ):
        kw = dict(num=4, batch_size=2, steps=STEPS, seed=1) | change
        with pytest.raises(UserError, match=f"other settings \\({key} is "):
            generate(model, run, **kw)
    assert manifest(run) == before
    # The command line says it in one line and exits 2.
    rc = main(
        ["sample", "--model", model_dir, "--out", run, "--num", "4", "--steps", str(STEPS), "--seed", "9"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "seed is 9 here but 1 in the manifest" in err
    # More samples with the same settings extend the run: the 2 full shards are kept.
    s = generate(model, run, num=6, batch_size=2, steps=STEPS, seed=1)
    assert (s["new"], s["skipped"]) == (2, 4)


def test_a_smaller_num_or_a_missing_manifest_is_refused_and_no_shard_lost(model, tmp_path):
    """A finished run of 4 is never cut to 3 (its last shard deleted, the merge overwritten), and shards without
    a manifest are never counted as done under whatever settings the rerun has."""
    run = str(tmp_path / "run")
    generate(model, run, num=4, batch_size=2, shard_size=2, steps=STEPS, seed=1)
    files = sorted((tmp_path / "run" / "shards").iterdir())
    data = {f: f.read_bytes() for f in files}
    merged_before = merged(run)
    with pytest.raises(UserError, match="holds a run of 4 images; --num 3 would delete finished shards"):
        generate(model, run, num=3, batch_size=2, shard_size=2, steps=STEPS, seed=1)
    (tmp_path / "run" / "manifest.json").unlink()
    with pytest.raises(UserError, match="holds 2 shard\\(s\\) but no manifest.json"):
        generate(model, run, num=4, batch_size=2, shard_size=2, steps=STEPS + 1, seed=2)
    assert sorted((tmp_path / "run" / "shards").iterdir()) == files
    assert all(f.read_bytes() == b for f, b in data.items())
    np.testing.assert_array_equal(merged(run), merged_before)


def test_full_disk_gives_a_clear_error_and_an_honest_manifest(model_dir, tmp_path, monkeypatch, capsys):
    real = shards.atomic_write_bytes

    def full_after_two(path, data):
        if "shard_000002" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(shards, "atomic_write_bytes", full_after_two)
    run = str(tmp_path / "run")
    argv = ["sample", "--model", model_dir, "--out", run, "--num", "10", "--batch-size", "2"]
    rc = main([*argv, "--shard-size", "2", "--steps", str(STEPS), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "cannot write shard 2" in err and "No space left on device" in err
    m = manifest(run)
    assert not m["complete"] and "2" not in m["done"]
    for k, rec in m["done"].items():  # every shard the manifest claims is on disk and intact
        path = shards.shard_path(run, int(k), "npz")
        assert shards.check_shard(path, "npz", 2 * int(k), 2, (8, 8, 3), rec["sha256"]) is None
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(run, "shards")))
    assert not os.path.exists(os.path.join(run, "samples.npz"))
    # Space again: the same command finishes the run.
    monkeypatch.setattr(shards, "atomic_write_bytes", real)
    assert main([*argv, "--steps", str(STEPS), "--quiet"]) == 0
    assert manifest(run)["complete"]


@pytest.mark.parametrize("fails", ["fsync", "replace", "open"])
def test_a_failed_atomic_write_leaves_no_temporary_and_names_the_real_path(tmp_path, monkeypatch, fails):
    """A full disk (or any OSError) at any point of an atomic write: the earlier file stays, no .tmp- file is
    left, and the message names the file asked for, never its hidden temporary."""
    target = tmp_path / "grid.npz"
    target.write_bytes(b"the good copy")

    def full(first, *args, **kwargs):  # as the OS says it: naming the path it was given (the temporary)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([first] if isinstance(first, str) else []))

    if fails == "open":  # the temporary cannot even be created: builtins.open names it in its error
        real_open = open
        monkeypatch.setattr(
            "builtins.open", lambda f, *a, **k: full(f) if ".tmp-" in str(f) else real_open(f, *a, **k)
        )
    else:
        monkeypatch.setattr(shards.os, fails, full)
    for write in (
        lambda: shards.atomic_write_bytes(str(target), b"new bytes"),
        lambda: generate_npz(target),
    ):
        with pytest.raises(OSError) as e:
            write()
        assert str(target) in str(e.value) and ".tmp-" not in str(e.value), str(e.value)
        assert "No space left on device" in str(e.value)
        assert sorted(os.listdir(tmp_path)) == ["grid.npz"]
        assert target.read_bytes() == b"the good copy"


def generate_npz(target):
    with shards.NpzWriter(str(target), (2, 2, 2, 1)) as w:
        w.write(np.zeros((2, 2, 2, 1), np.uint8))


def test_full_disk_on_the_manifest_stops_the_run_with_a_clear_error(model, tmp_path, monkeypatch):
    real, calls = shards.atomic_write_json, []

    def full_on_third(path, obj):
        calls.append(path)
        if len(calls) >= 3:  # the start, the first shard(s) recorded, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, obj)

    monkeypatch.setattr(shards, "atomic_write_json", full_on_third)
    run = str(tmp_path / "run")
    with pytest.raises(OSError, match="cannot write .*manifest.json: No space left on device"):
        generate(model, run, num=8, batch_size=2, shard_size=2, steps=STEPS)
    m = manifest(run)  # the last one written in full: what it claims is on disk
    assert m["done"] and not m["complete"]
    for k, rec in m["done"].items():
        path = shards.shard_path(run, int(k), "npz")
        assert shards.check_shard(path, "npz", 2 * int(k), 2, (8, 8, 3), rec["sha256"]) is None


def test_unwritable_output_is_one_line_and_no_manifest(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(["sample", "--model", model_dir, "--out", str(blocker / "run"), "--num", "2", "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--out" in err and "is a file" in err
    assert not (tmp_path / "run").exists()


def test_cli_default_grid_npz_and_bad_options(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        checkpoint.default_model()
        args = ["--steps", "10"]  # the bundled model: only the step count is shortened
    except RuntimeError:  # the bundled model is not trained yet
        args = ["--model", model_dir, "--steps", str(STEPS)]
    assert main(["sample", *args]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == "samples.png"
    assert "64 images in" in out.err
    from PIL import Image

    with Image.open(tmp_path / "samples.png") as im:
        assert im.format == "PNG" and im.width == im.height  # 64 samples: an 8 x 8 grid

    argv = [
        "sample",
        "--model",
        model_dir,
        "--steps",
        str(STEPS),
        "--num",
        "5",
        "--batch-size",
        "2",
        "--quiet",
    ]
    assert main([*argv, "--out", "s.npz"]) == 0
    assert capsys.readouterr().out == "s.npz\n"
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, 3)
    for bad, words in (
        (["--method", "dpm"], "argument --method: invalid choice: 'dpm'"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--num", "0"], "argument --num: must be >= 1"),
        (["--eta", "0.5"], "eta applies to method='ddim' only"),
        (["--out", "x.jpg"], "must end in .png"),
        (["--device", "tpu:9"], "--device must name a torch device"),
    ):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (bad, err)
    assert main([*argv, "--bogus"]) == 2  # argparse's own errors: also one line, exit 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --bogus" in err
    assert main(["sample", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in (err := capsys.readouterr().err) and "does not exist" in err


def test_merge_command(model, tmp_path, capsys):
    run = str(tmp_path / "run")
    generate(model, run, num=5, batch_size=2, shard_size=2, steps=STEPS, merge=False)
    assert not os.path.exists(os.path.join(run, "samples.npz"))
    assert main(["merge", run, str(tmp_path / "all.npz"), "--quiet"]) == 0
    with np.load(tmp_path / "all.npz") as z:
        got = z["arr_0"]
    want = np.concatenate([direct(model, a, n, 2, steps=STEPS) for a, n in shards.shard_ranges(5, 2)])
    assert np.array_equal(got, want)
    # A damaged shard is named, and nothing is written.
    with open(shards.shard_path(run, 1, "npz"), "r+b") as f:
        f.truncate(100)
    assert main(["merge", run, str(tmp_path / "bad.npz"), "--quiet"]) == 2
    assert "shard 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad.npz")


def test_merge_into_the_runs_own_shards_is_refused(model, tmp_path, capsys):
    """OUT a shard of the run (it was overwritten by the merge of itself) or anything in its shards folder."""
    run = tmp_path / "run"
    generate(model, str(run), num=4, batch_size=2, shard_size=2, steps=STEPS, merge=False)
    before = {p: p.read_bytes() for p in (run / "shards").iterdir()}
    for out in (run / "shards" / "shard_000000.npz", run / "shards" / "all.npz", run / "." / "shards/x.npz"):
        assert main(["merge", str(run), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "inside the run's shards folder" in err, err
    assert {p: p.read_bytes() for p in (run / "shards").iterdir()} == before
    assert main(["merge", str(run), str(run / "samples.npz"), "--quiet"]) == 0  # beside the shards: fine


# ---------------------------------------------------------------------------------------------- processes

RUN_ARGS = [
    "--num",
    "24",
    "--shard-size",
    "2",
    "--batch-size",
    "2",
    "--steps",
    "30",
    "--seed",
    "5",
    "--quiet",
]


@pytest.fixture(scope="module")
def one_process_run(model_dir, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("one") / "run")
    p = cli("sample", "--model", model_dir, "--out", run, *RUN_ARGS)
    assert p.returncode == 0, p.stderr
    return run


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(model_dir, one_process_run, tmp_path):
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # `--` keeps torchrun from reading --num as an abbreviation of its own --numa-binding.
    cmd += ["-m", "ddpm_fast.cli", "--", "sample", "--model", model_dir, "--out", run, *RUN_ARGS]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = merged(one_process_run), merged(run)
    assert a.shape == (24, 8, 8, 3)
    for i in range(24):
        assert np.array_equal(a[i], b[i]), f"sample {i} differs"
    ma, mb = manifest(one_process_run), manifest(run)
    assert mb["info"]["world_size"] == 2 and mb["complete"]
    assert ma["done"] == mb["done"]  # same bytes, shard by shard


@pytest.mark.slow
def test_nproc_per_node_starts_torchrun_itself(model_dir, one_process_run, tmp_path):
    """`sample --nproc-per-node 2 --num ...`: no `--` and no torchrun command line (torchrun would read --num
    as its --numa-binding), the same bytes as one process."""
    run = str(tmp_path / "run")
    p = cli("sample", "--nproc-per-node", "2", "--model", model_dir, "--out", run, *RUN_ARGS)
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.array_equal(merged(one_process_run), merged(run))
    assert manifest(run)["info"]["world_size"] == 2 and manifest(run)["complete"]


def test_nproc_per_node_needs_a_run_directory(model_dir, tmp_path, capsys):
    assert (
        main(["sample", "--model", model_dir, "--nproc-per-node", "2", "--out", str(tmp_path / "x.png")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nproc-per-node needs --out DIR" in err


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_file(model_dir, one_process_run, tmp_path):
    run = str(tmp_path / "run")
    argv = [sys.executable, "-m", "ddpm_fast.cli", "sample", "--model", model_dir, "--out", run, *RUN_ARGS]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard_dir = os.path.join(run, "shards")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(shard_dir) and sum(n.endswith(".npz") for n in os.listdir(shard_dir)) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = sorted(n for n in os.listdir(shard_dir) if n.startswith("shard_"))
    assert 3 <= len(finished) < 12
    # Whatever the kill interrupted, every shard under its final name is complete.
    for n in finished:
        k = int(n[6:12])
        assert shards.check_shard(os.path.join(shard_dir, n), "npz", 2 * k, 2, (8, 8, 3)) is None, n
    assert not manifest(run)["complete"]
    # Also damage one finished shard, as a torn disk might, and leave a stray temporary behind.
    with open(os.path.join(shard_dir, finished[0]), "r+b") as f:
        f.truncate(50)
    open(os.path.join(shard_dir, ".shard_000011.npz.tmp-1-deadbeef"), "wb").close()

    p = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "drawing it again" in p.stderr
    assert np.array_equal(merged(run), merged(one_process_run))
    assert manifest(run)["done"] == manifest(one_process_run)["done"]
    assert not any(".tmp-" in n for n in os.listdir(shard_dir))

"""Training: the loss formula, data loading, checkpoint files, and exact resume (in-process and after SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_fast import train as tr
from ddpm_fast.cli import train as train_cmd
from ddpm_fast.schedule import Schedule

# A small, fast run: the 'tiny' U-Net on 8x8 one-channel digits, with dropout so the RNG state matters.
TINY = dict(preset="tiny", dropout=0.1, batch_size=8, lr=1e-3, warmup=3, ema_decay=0.9)


@pytest.fixture(autouse=True)
def _one_thread():
    """Batch-8 steps of a tiny U-Net gain nothing from a second thread, and lose 8x on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    return tr.TrainConfig(**{**TINY, **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((run / tr.STATE_JSON).read_text())
    return meta, load_file(str(run / meta["tensors"]))


def _assert_same_state(a: Path, b: Path):
    meta_a, ta = _weights(a)
    meta_b, tb = _weights(b)
    assert meta_a["step"] == meta_b["step"]
    assert sorted(ta) == sorted(tb)
    for k in ta:
        if k.startswith("rng."):
            continue
        assert torch.equal(ta[k], tb[k]), k
    assert meta_a["optimizer"] == meta_b["optimizer"]


# ---------------------------------------------------------------------------------------------- loss


class _Oracle(torch.nn.Module):
    """Knows the (single) training image x0, so eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) exactly."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0 = x0
        self.sa = schedule.sqrt_alphas_cumprod.float()
        self.s1 = schedule.sqrt_one_minus_alphas_cumprod.float()

    def forward(self, x, t):
        return (x - self.sa[t].view(-1, 1, 1, 1) * self.x0) / self.s1[t].view(-1, 1, 1, 1)


def test_loss_is_zero_for_the_true_noise_and_one_for_zero_prediction():
    s = Schedule.linear(1000)
    buffers = {k: getattr(s, k).float() for k in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")}
    x0 = torch.rand(1, 1, 8, 8) * 2 - 1
    x0b = x0.expand(64, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    loss = tr.diffusion_loss(_Oracle(x0, s), x0b, buffers, g)
    assert loss.item() < 1e-6  # float32 rounding of x_t; a wrong abar_t gives O(1)
    # Predicting zero costs E[eps^2] = 1 (64 * 64 draws: 1 +- 0.07 at 4 sigma).
    zero = tr.diffusion_loss(lambda x, t: torch.zeros_like(x), x0b, buffers, g)
    assert abs(zero.item() - 1.0) < 0.07


def test_batch_indices_are_epoch_permutations_and_a_function_of_the_step():
    n, b = 10, 4
    stream = torch.cat([tr.batch_indices(n, s, b, seed=3) for s in range(5)])  # 20 rows = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(n))
    assert sorted(stream[10:].tolist()) == list(range(n))
    assert torch.equal(tr.batch_indices(n, 3, b, seed=3), stream[12:16])
    assert not torch.equal(tr.batch_indices(n, 0, b, seed=4), stream[:4])


def test_ema_update():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ea = [p.detach().clone() for p in a.parameters()]
    tr._ema_update(a, b, 0.9)
    for e, p, m in zip(ea, a.parameters(), b.parameters()):
        torch.testing.assert_close(p, 0.9 * e + 0.1 * m)


# ---------------------------------------------------------------------------------------------- data


def test_digits_in_model_space():
    x = tr.load_dataset("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0


def test_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", u8)
    x = tr.load_dataset(str(tmp_path / "u8.npz"))
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 6, 6)
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(u8))
    torch.testing.assert_close(
        tr.to_model_space(x[:1]), torch.from_numpy(u8[:1]).permute(0, 3, 1, 2) / 127.5 - 1
    )

    f = rng.uniform(-1, 1, size=(4, 6, 6, 1)).astype(np.float32)
    np.savez(tmp_path / "f.npz", arr_0=f)
    xf = tr.load_dataset(str(tmp_path / "f.npz"), channels=3)
    assert xf.shape == (4, 3, 6, 6)
    assert torch.equal(xf[:, 2], torch.from_numpy(f[..., 0]))

    np.savez(tmp_path / "bad.npz", arr_0=f * 3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tr.load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "nokey.npz", images=u8)
    with pytest.raises(ValueError, match="arr_0"):
        tr.load_dataset(str(tmp_path / "nokey.npz"))


def test_image_folder_resize_and_center_crop(tmp_path):
    from PIL import Image

    # 24x12 image, white in columns 6..17 only: scaled by 1/2 to 12x6, the 6x6 center crop is that white part.
    a = np.zeros((12, 24, 3), dtype=np.uint8)
    a[:, 6:18] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    Image.fromarray(np.full((9, 9), 128, dtype=np.uint8)).save(tmp_path / "sub_gray.png")
    x = tr.load_dataset(str(tmp_path), image_size=6)
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.uint8
    gray, wide = x[0], x[1]  # sorted by name: sub_gray.png < wide.png
    assert (gray == 128).all()
    # Bicubic resampling blurs the crop's border columns slightly; a left or right crop would be half black.
    assert (wide[:, :, 1:5] >= 250).all() and wide.float().mean() > 240
    with pytest.raises(ValueError, match="image_size"):
        tr.load_dataset(str(tmp_path))


def test_bad_data():
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        tr.load_dataset("no_such_dir")
    with pytest.raises(ValueError, match="data"):
        tr.load_dataset(__file__)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(preset="huge"), "preset"),
        (dict(variance="learned_range"), "variance"),
        (dict(batch_size=1.5), "batch_size"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw).validate()


# ---------------------------------------------------------------------------------------------- runs


def test_run_writes_checkpoints_grid_and_log(tmp_path):
    from PIL import Image

    from ddpm_fast.checkpoint import load_model

    ema = tr.train(
        _cfg(steps=4, variance="fixed_large"),
        tmp_path,
        save_every=2,
        sample_steps=3,
        progress=False,
        log_every=2,
    )
    model = load_model(tmp_path)
    for k, v in ema.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.defaults.variance == "fixed_large"
    assert model.schedule.spec == Schedule.linear(1000).spec
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    with Image.open(tmp_path / "samples" / "step-00000004.png") as im:
        assert im.mode == "L" and im.size == (4 * (8 * 10 + 2),) * 2  # 8x8 tiles, 2 px gaps, enlarged 4x
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 4]
    assert [p.name for p in tmp_path.glob("state-*")] == ["state-00000004.safetensors"]  # old ones removed


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(save_every=3, sample_steps=0, progress=False)
    tr.train(_cfg(steps=6), tmp_path / "full", **kw)
    tr.train(_cfg(steps=3), tmp_path / "cut", **kw)  # a run of 3 steps ...
    tr.train(_cfg(steps=6), tmp_path / "cut", resume=True, **kw)  # ... extended to 6
    _assert_same_state(tmp_path / "full", tmp_path / "cut")
    # And a run stopped mid-way by stop_after (between checkpoints it resumes from the last one).
    tr.train(_cfg(steps=6), tmp_path / "stop", stop_after=3, **kw)
    assert json.loads((tmp_path / "stop" / tr.STATE_JSON).read_text())["step"] == 3
    tr.train(_cfg(steps=6), tmp_path / "stop", resume=True, **kw)
    _assert_same_state(tmp_path / "full", tmp_path / "stop")


def test_resume_refuses_changed_options(tmp_path):
    tr.train(_cfg(steps=2), tmp_path, save_every=2, sample_steps=0, progress=False)
    with pytest.raises(ValueError, match=r"lr=0\.5 \(saved 0\.001\)"):
        tr.train(_cfg(steps=4, lr=0.5), tmp_path, resume=True, sample_steps=0, progress=False)


def _cli(*args, threads=1):
    return [sys.executable, "-m", "ddpm_fast.cli", "train", *args, "--threads", str(threads), "--no-progress"]


TINY_ARGS = ["--preset", "tiny", "--dropout", "0.1", "--batch-size", "8", "--lr", "1e-3", "--warmup", "3"]
TINY_ARGS += ["--ema-decay", "0.9", "--sample-steps", "0"]


@pytest.mark.slow  # three interpreter start-ups and ~60 training steps: about 15 s on 2 cores
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    steps = 60
    args = [*TINY_ARGS, "--steps", str(steps), "--save-every", "4"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(_cli(*args, "--out", str(tmp_path / "full")), check=True, env=env, capture_output=True)

    victim = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "cut")), env=env, stderr=subprocess.PIPE)
    state = tmp_path / "cut" / tr.STATE_JSON
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 8:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert victim.returncode == -signal.SIGKILL and killed_at < steps, "the run ended before the kill"

    r = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "cut"), "--resume"), env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    _assert_same_state(tmp_path / "full", tmp_path / "cut")


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    from ddpm_fast import cli

    (tmp_path / "text.npz").write_text("not an npz")  # numpy's ValueError, said as ours
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 not a zip")  # zipfile's BadZipFile
    for args, word in [
        (["--steps", "0"], "steps"),
        (["--data", str(tmp_path / "missing")], "missing"),
        (["--data", str(tmp_path / "text.npz")], "text.npz is not a readable .npz file"),
        (["--data", str(tmp_path / "zip.npz")], "zip.npz is not a readable .npz file"),
    ]:
        assert cli.main(["train", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], lines


@pytest.mark.slow  # two ranks start up: ~10 s on 2 cores
def test_torchrun_two_ranks_on_cpu_gloo(tmp_path):
    """The same command under torchrun: DDP over gloo on CPU trains, and rank 0 alone writes the files."""
    from ddpm_fast.checkpoint import load_model

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ddpm_fast.cli", "train", *TINY_ARGS, "--steps", "3", "--save-every", "3"]
    cmd += ["--out", str(tmp_path), "--threads", "1", "--no-progress"]
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("trained to step 3") == 1  # rank 0 reports, rank 1 is silent
    meta = json.loads((tmp_path / tr.STATE_JSON).read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2
    assert load_model(tmp_path).config.image_shape == (1, 8, 8)


# ---------------------------------------------------------------------------------------------- --out


def _log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / tr.LOG_JSONL).read_text().splitlines()]


def _cli_error(capsys, *args) -> str:
    """Run `ddpm-fast train ARGS` in-process; it must fail with exit 2 and one line on stderr, returned."""
    from ddpm_fast import cli

    assert cli.main(["train", *args, "--threads", "1", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "model.safetensors",
        "state.json",
        "state-00000002.safetensors",
        "log.jsonl",
        "train_config.json",
        "samples/step-00000002.png",
    ],
)
def test_a_new_run_refuses_an_out_that_holds_a_run(tmp_path, name, capsys):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("old run\n")
    with pytest.raises(ValueError, match=r"already holds a training run .*--resume.*--force"):
        tr.train(_cfg(steps=1), tmp_path, sample_steps=0, progress=False)
    line = _cli_error(capsys, *TINY_ARGS, "--steps", "1", "--out", str(tmp_path))
    assert "--out" in line and "--resume" in line and "--force" in line and name in line, line
    assert (tmp_path / name).read_text() == "old run\n"


def test_force_starts_over_as_in_an_empty_directory(tmp_path):
    kw = dict(save_every=2, sample_steps=2, progress=False, log_every=1)
    tr.train(_cfg(steps=4, seed=1), tmp_path / "out", **kw)  # the old run: other seed, 4 log lines, 2 grids
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    (tmp_path / "out" / "samples" / "mine.png").write_text("mine\n")
    kw.update(sample_steps=0)
    tr.train(_cfg(steps=2), tmp_path / "out", force=True, **kw)
    tr.train(_cfg(steps=2), tmp_path / "fresh", **kw)
    _assert_same_state(tmp_path / "fresh", tmp_path / "out")
    assert _log_steps(tmp_path / "out") == [1, 2]  # no line of the old run
    assert sorted(p.name for p in (tmp_path / "out").glob("state-*")) == ["state-00000002.safetensors"]
    assert [p.name for p in (tmp_path / "out" / "samples").iterdir()] == ["mine.png"]  # old grids gone
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine\n"  # what is not the run's stays


def test_cli_force_replaces_the_run(tmp_path, capsys):
    from ddpm_fast import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / tr.LOG_JSONL).write_text(json.dumps({"step": 99, "loss": 1.0}) + "\n")
    args = [*TINY_ARGS, "--steps", "2", "--out", str(out), "--force", "--threads", "1", "--no-progress"]
    assert cli.main(["train", *args]) == 0
    assert _log_steps(out) == [2]
    assert json.loads((out / tr.STATE_JSON).read_text())["step"] == 2


def test_resume_refuses_a_directory_without_a_run(tmp_path, capsys):
    missing = tmp_path / "mistyped"
    with pytest.raises(ValueError, match=r"--resume: .*mistyped.* does not exist.*drop --resume"):
        tr.train(_cfg(steps=1), missing, resume=True, progress=False)
    line = _cli_error(capsys, *TINY_ARGS, "--steps", "1", "--out", str(missing), "--resume")
    assert "--resume" in line and "mistyped" in line, line
    assert not missing.exists()  # nothing was started there

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"--resume: .*empty.* holds no training run.*drop --resume"):
        tr.train(_cfg(steps=1), empty, resume=True, progress=False)
    assert list(empty.iterdir()) == []

    # A run stopped before its first checkpoint has a log but nothing to resume: starting over needs --force.
    (empty / tr.LOG_JSONL).write_text("")
    with pytest.raises(ValueError, match=r"--resume: .*holds no checkpoint.*--force"):
        tr.train(_cfg(steps=1), empty, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"--resume.*--force"):
        tr.train(_cfg(steps=1), empty, resume=True, force=True, progress=False)


def test_bf16_refused_on_cpu(tmp_path, capsys):
    with pytest.raises(ValueError, match="--bf16"):
        tr.train(_cfg(steps=1, bf16=True), tmp_path / "o", device="cpu", progress=False)
    line = _cli_error(
        capsys, *TINY_ARGS, "--steps", "1", "--out", str(tmp_path / "o"), "--device", "cpu", "--bf16"
    )
    assert "--bf16" in line, line
    assert not (tmp_path / "o").exists()


def test_threads_belong_to_the_command_line(tmp_path, monkeypatch):
    """cli.py adds --threads to every command and applies it: train must neither define nor apply it."""
    import argparse

    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    p.add_argument("--threads", type=int)  # as cli.py does; a second --threads would be an argparse error
    args = p.parse_args(
        [*TINY_ARGS, "--steps", "1", "--out", str(tmp_path), "--no-progress", "--threads", "3"]
    )
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert train_cmd.run(args) == 0
    assert calls == []

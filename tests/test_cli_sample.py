"""`ddpm-fast sample` before and around the sampling: output checks, threads, progress, the model's step count.

Every check here must happen before any sampling work (a sampler that raises if called proves it), and every
user error is one line on stderr naming the command-line option, exit 2.
"""

import os

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast import checkpoint, devices, runs, sampling
from ddpm_fast.cli import _close_progress_bars, main
from ddpm_fast.cli import sample as sample_cmd
from ddpm_fast.errors import BadValue
from ddpm_fast.plan import make_plan


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = df.UNet(df.UNetConfig.tiny(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4))
    path = tmp_path_factory.mktemp("model") / "tiny"
    checkpoint.save_model(m, path, schedule=df.Schedule.linear(20), sampling={"steps": 4})
    return str(path)


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("sampling started before the arguments were checked")

    monkeypatch.setattr(sampling, "run", refuse)


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpm-fast sample: error:"), err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize(
    "out, words",
    [
        ("nodir/sub/x.png", ("--out", "'nodir/sub' does not exist")),
        ("nodir/x.npz", ("--out", "does not exist")),
        ("file.txt/", ("--out", "is a file")),
        ("file.txt/run/", ("--out", "is a file")),
    ],
)
def test_bad_out_is_refused_before_any_work(
    model_dir, tmp_path, monkeypatch, capsys, no_sampling, out, words
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("a file")
    assert main(["sample", "--model", model_dir, "--num", "2", "--out", out]) == 2
    one_line_error(capsys, *words)


def test_options_in_command_line_terms(model_dir, tmp_path, capsys, no_sampling, monkeypatch):
    out = str(tmp_path / "x.png")
    assert main(["sample", "--model", model_dir, "--backend", "onnx", "--out", out]) == 2
    one_line_error(capsys, "--backend onnx needs --model FILE.onnx")
    assert main(["sample", "--model", "m.onnx", "--backend", "fast", "--out", out]) == 2
    one_line_error(capsys, "--model m.onnx is an ONNX file", "--backend onnx")
    assert main(["sample", "--model", "m.onnx", "--dtype", "fp16", "--out", out]) == 2
    one_line_error(capsys, "--dtype fp16")
    monkeypatch.setattr(sample_cmd, "openvino_bf16_here", lambda: False)  # auto would run it on onnx
    assert main(["sample", "--model", "m.onnx", "--dtype", "bf16", "--out", out]) == 2
    one_line_error(capsys, "--dtype bf16")
    for cmd in ("sample", "merge", "convert", "export", "bench", "info", "train"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--threads" in capsys.readouterr().out, cmd


def test_threads_option_and_default(model_dir, tmp_path, monkeypatch, capsys):
    assert main(["sample", "--model", model_dir, "--num", "1", "--threads", "1", "--quiet",
                 "--out", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    assert main(["sample", "--threads", "0"]) == 2
    one_line_error(capsys, "--threads must be a positive int")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices.default_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert devices.default_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert devices.default_threads() == cores


def test_model_step_count_is_the_cli_default(model_dir, tmp_path, monkeypatch):
    assert checkpoint.default_model().defaults.steps == 100  # the README's measured quality is at 100
    seen = {}

    def fake_generate(model, out, plan, **kw):
        seen["steps"] = plan.table.num_steps
        return {"out": out, "num": kw["num"], "new": kw["num"], "seconds": 1.0}

    monkeypatch.setattr(sample_cmd, "generate", fake_generate)
    assert main(["sample", "--out", str(tmp_path / "a.png")]) == 0
    assert seen["steps"] == 100
    assert main(["sample", "--model", model_dir, "--out", str(tmp_path / "a.png")]) == 0
    assert seen["steps"] == 4
    assert main(["sample", "--model", model_dir, "--steps", "7", "--out", str(tmp_path / "a.png")]) == 0
    assert seen["steps"] == 7


def test_progress_advances_every_step(model_dir):
    model = checkpoint.load_model(model_dir)
    sampler = runs.Sampler(model, make_plan(model, None, (2, 3, 8, 8), steps=4), "reference")
    told = []
    images = sampler(0, 3, told.append)  # batches of 2 and 1 rows, 4 steps each
    assert images.shape == (3, 8, 8, 3)
    assert told == [0.5] * 4 + [0.25] * 4 and sum(told) == 3


def test_an_error_during_sampling_starts_its_own_line(model_dir, tmp_path, monkeypatch, capsys):
    def fail_after_one_step(model, plan, backend):
        plan.callback(0, 3, torch.zeros(plan.shape))
        raise BadValue("model returned NaN or Inf at step 1 (t=2)")

    monkeypatch.setattr(sampling, "run", fail_after_one_step)
    assert main(["sample", "--model", model_dir, "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "\nddpm-fast sample: error: model returned NaN" in err  # after the bar's line, not on it
    from tqdm import tqdm

    bar = tqdm(total=3)
    _close_progress_bars()
    assert bar.disable or bar not in getattr(tqdm, "_instances", set())
    np.testing.assert_equal(len(list(tmp_path.iterdir())), 0)  # nothing half-written

"""Small command-line checks: a user error is one line on stderr and exit 2, a bug a traceback; export takes
the bundled model; the bench plot's title fits its figure."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from ddpm_fast import bench, cli
from ddpm_fast.cli import merge as merge_cmd
from ddpm_fast.errors import BadType, BadValue, Unavailable, UserError


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_cuda_without_cuda_is_one_line(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--device" in line and "CUDA" in line, line


def test_bench_bad_device_is_one_line(capsys):
    assert cli.main(["bench", "--device", "gpu:0"]) == 2
    assert "--device" in _one_line(capsys.readouterr().err)


def test_export_bundled_model_by_name(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")  # validation: ORT against PyTorch
    out = tmp_path / "digits.onnx"
    assert cli.main(["export", "digits", str(out), "--exporter", "torchscript"]) == 0
    assert out.is_file()
    assert capsys.readouterr().out.strip() == str(out)


def test_export_missing_model_is_one_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope"), str(tmp_path / "m.onnx")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "MODEL must be a checkpoint directory or 'digits' (the bundled model)" in line, line
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("error", [BadValue, BadType, Unavailable, UserError, FileNotFoundError])
def test_a_user_error_from_a_command_is_one_line(tmp_path, capsys, monkeypatch, error):
    def run(args):
        raise error("DIR names no run\nsecond line")

    monkeypatch.setattr(merge_cmd, "run", run)
    assert cli.main(["merge", str(tmp_path), str(tmp_path / "m.npz")]) == 2
    assert _one_line(capsys.readouterr().err) == "ddpm-fast merge: error: DIR names no run"


@pytest.mark.parametrize("error", [ValueError, TypeError, RuntimeError])
def test_a_bug_in_a_command_keeps_its_traceback(tmp_path, capsys, monkeypatch, error):
    """A plain ValueError or TypeError (from torch, numpy or our own code) is a bug, not the user's mistake."""

    def run(args):
        raise error("bug")

    monkeypatch.setattr(merge_cmd, "run", run)
    with pytest.raises(error, match="^bug$"):
        cli.main(["merge", str(tmp_path), str(tmp_path / "m.npz")])
    assert "error: bug" not in capsys.readouterr().err


def test_bench_plot_title_fits(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    close, figs = plt.close, []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to measure it
    name = "AMD EPYC 9654 96-Core Processor (192 logical cores, torch threads 96)"
    info = {"device": "cpu", "device_name": name, "versions": {}}
    rows = [
        {"provider": p, "batch": b, "steps": 10, "image": "3x32x32", "images_per_s": k * b, **info}
        for p, k in (("reference", 1.0), ("fast", 1.5))
        for b in (1, 4, 16)
    ]
    assert bench.plot(rows, tmp_path / "bench.png") == tmp_path / "bench.png"
    (fig,) = figs
    try:
        title = fig.axes[0].title
        assert name in " ".join(title.get_text().split()), title.get_text()  # the whole name, maybe wrapped
        box, page = title.get_window_extent(fig.canvas.get_renderer()), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    finally:
        close(fig)
    assert Path(tmp_path / "bench.png").stat().st_size > 0


def _sample(tmp_path, *args):
    out = tmp_path / "s.png"
    return cli.main(["sample", "--num", "1", "--steps", "2", "--quiet", "--out", str(out), *args]), out


def test_sample_float64_on_the_default_backend_runs_the_reference(tmp_path):
    """float64 is the reference's alone: the default (auto) backend takes it instead of crashing in the U-Net."""
    code, out = _sample(tmp_path, "--dtype", "float64")
    assert code == 0 and out.is_file()


def test_sample_takes_the_bundled_model_by_name(tmp_path):
    code, out = _sample(tmp_path, "--model", "digits")
    assert code == 0 and out.is_file()


@pytest.mark.parametrize(
    "args, names",
    [
        (("--device", "meta"), "--device"),  # a device without data: crashed in the first .item()
        (("--threads", "100000"), "--threads"),  # segfaulted inside OpenMP
        (("--threads", "20000"), "--threads"),  # libgomp: thread creation failed
        (("--method", "ddim", "--eta", "2"), "eta"),  # was clamped to no noise, silently
        (("--method", "ddim", "--eta", "inf"), "eta"),  # was blamed on the model after a step
    ],
)
def test_sample_bad_argument_is_one_line_before_any_work(tmp_path, capsys, args, names):
    code, out = _sample(tmp_path, *args)
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert names in line, line
    assert not out.exists()


@pytest.mark.parametrize("out", ["s.png", "s.npz"])
@pytest.mark.parametrize(
    "args, flag",
    [
        (("--shard-size", "2"), "--shard-size"),
        (("--no-merge",), "--no-merge"),
        (("--format", "png"), "--format"),
    ],
)
def test_sharded_run_options_with_a_file_output_are_refused(tmp_path, capsys, out, args, flag):
    """They describe a run directory; with a .png or .npz output they were ignored without a word."""
    target = tmp_path / out
    code = cli.main(["sample", "--num", "1", "--steps", "2", "--quiet", "--out", str(target), *args])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{flag} applies to --out DIR (a sharded run) only" in line, line
    assert not target.exists()


@pytest.mark.parametrize("command", [["train", "--steps", "1"], ["bench", "--device", "cpu"]])
def test_out_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, command):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "below"):
        assert cli.main([*command, "--out", str(out)]) == 2  # was "[Errno 17] File exists" after the work
        line = _one_line(capsys.readouterr().err)
        assert "--out" in line and "is a file" in line and "Errno" not in line, line
    assert blocker.read_text() == "not a directory"


def test_onnx_file_without_ddpm_fast_metadata_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    class Eps(torch.nn.Module):
        def forward(self, x, t):
            return x * t.float().reshape(-1, 1, 1, 1)

    path = tmp_path / "plain.onnx"  # a noise model's signature, exported by torch alone
    example = (torch.randn(1, 3, 8, 8), torch.zeros(1, dtype=torch.int64))
    axes = {"x": {0: "b"}, "t": {0: "b"}, "eps": {0: "b"}}
    with warnings.catch_warnings():  # the TorchScript exporter (no onnxscript needed) warns it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(Eps(), example, path, input_names=["x", "t"], output_names=["eps"], dynamic_axes=axes,
                          dynamo=False)  # fmt: skip
    code, out = _sample(tmp_path, "--model", str(path))
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--model {path} has no ddpm-fast metadata; export it with `ddpm-fast export`" in line, line
    assert not out.exists()


@pytest.mark.parametrize("flags", [(), ("--classifier-flags", "--image_size 64 --classifier_width 32")])
def test_classifier_that_is_not_a_classifier_file_names_the_option(tmp_path, capsys, flags):
    text = tmp_path / "classifier.pt"
    text.write_text("a text file, not weights\n")
    code, out = _sample(tmp_path, "--labels", "1", "--classifier", str(text), *flags)
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--classifier {text}: " in line and "classifier_flags=" not in line, line
    assert not out.exists()


def test_an_openai_pt_file_as_model_points_to_convert(tmp_path, capsys):
    pt = tmp_path / "my_adm.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    code, out = _sample(tmp_path, "--model", str(pt))
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"ddpm-fast convert {pt} DIR --adm-flags" in line and "adm_flags=" not in line, line
    assert cli.main(["convert", str(pt), str(tmp_path / "native")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--adm-flags" in line and "--adm-preset" in line and "adm_flags=" not in line, line
    assert not (tmp_path / "native").exists()

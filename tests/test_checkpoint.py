"""Native checkpoints: round trip, save/load arguments, every bad-input path, and the bundled model.

diffusers UNet / pipeline import and `convert` are in test_checkpoint_diffusers.py (they need diffusers).
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import checkpoint as ck
from ddpm_fast.checkpoint import load_model, save_model
from ddpm_fast.defaults import ModelDefaults
from ddpm_fast.unet import UNet, UNetConfig
from tests._checkpoint_helpers import TINY, eval_out, one_line, tiny_inputs, truncate
from tests._unet_helpers import diffusers_kwargs, perturb_

# ------------------------------------------------------------------------------------------ native


def test_native_round_trip_is_exact(tmp_path):
    m = perturb_(UNet(TINY)).eval()
    s = df.Schedule.cosine(40)
    out = save_model(
        m, tmp_path / "ck", schedule=s, sampling={"variance": "fixed_large", "clip": False, "steps": 25}
    )
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temp files left
    m2 = load_model(out)
    assert not m2.training and m2.config == TINY
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, t = tiny_inputs()
    assert torch.equal(eval_out(m, x, t), eval_out(m2, x, t))
    assert torch.equal(m2.schedule.betas, s.betas) and m2.schedule.spec == s.spec
    assert m2.defaults.replace(schedule=None) == ModelDefaults(
        variance="fixed_large", clip=False, image_shape=(3, 16, 16), steps=25, arch="ddpm-unet"
    )
    # the loaded attributes are saved again by default: a second round trip changes nothing
    save_model(m2, tmp_path / "ck2")
    assert json.loads((tmp_path / "ck2" / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text()
    )


def test_defaults_without_schedule_and_learned_variance(tmp_path):
    m = UNet(TINY.replace(out_channels=6))
    save_model(m, tmp_path / "ck")
    m2 = load_model(tmp_path / "ck")
    assert m2.schedule is None
    assert m2.defaults.variance == "learned_range" and m2.defaults.clip is True


def test_channels_last_model_saves_and_overwrites(tmp_path):
    m = perturb_(UNet(TINY)).eval().to(memory_format=torch.channels_last)
    save_model(UNet(TINY), tmp_path / "ck")
    (tmp_path / "ck" / "notes.txt").write_text("kept")
    save_model(m, tmp_path / "ck")  # overwrites in place, leaves other files alone
    assert (tmp_path / "ck" / "notes.txt").read_text() == "kept"
    x, t = tiny_inputs()
    torch.testing.assert_close(
        eval_out(load_model(tmp_path / "ck"), x, t), eval_out(m, x, t), atol=1e-5, rtol=0
    )


def test_load_to_device_and_dtype(tmp_path):
    save_model(UNet(TINY), tmp_path / "ck")
    m = load_model(tmp_path / "ck", device="cpu", dtype=torch.float64)
    assert m.conv_in.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        load_model(tmp_path / "ck", dtype=torch.int64)


def test_save_model_bad_arguments(tmp_path):
    m = UNet(TINY)
    with pytest.raises(TypeError, match="ddpm_fast.UNet"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(ValueError, match="respaced"):
        save_model(m, tmp_path / "a", schedule=df.Schedule.linear(100).respace([0, 50, 99]))
    with pytest.raises(ValueError, match="unknown sampling key"):
        save_model(m, tmp_path / "a", sampling={"varience": "fixed_small"})
    with pytest.raises(ValueError, match="learned_range.*out_channels == 6"):
        save_model(m, tmp_path / "a", sampling={"variance": "learned_range"})
    with pytest.raises(TypeError, match="clip"):
        save_model(m, tmp_path / "a", sampling={"clip": "yes"})
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_model(m, tmp_path / "f")
    assert not (tmp_path / "a").exists()  # nothing written on a rejected call


# ------------------------------------------------------------------------------------------ bad input


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path / "empty")


def test_missing_native_weights_file(tmp_path):
    save_model(UNet(TINY), tmp_path / "ck")
    os.remove(tmp_path / "ck" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_model(tmp_path / "ck")


def test_truncated_native_weights(tmp_path):
    save_model(UNet(TINY), tmp_path / "ck")
    truncate(tmp_path / "ck" / "model.safetensors", keep=0.99)
    with pytest.raises(ValueError, match="model.safetensors: contents do not match the sha256"):
        load_model(tmp_path / "ck")


def test_pickle_in_bin_is_refused(tmp_path):
    """torch.load(weights_only=True): a .bin carrying arbitrary objects is not executed."""
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **_json_kwargs(TINY)}))
    torch.save({"x": argparse.Namespace(a=1)}, d / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_model(d)


def _json_kwargs(cfg):
    return json.loads(json.dumps(diffusers_kwargs(cfg)))


def test_bad_native_config(tmp_path):
    save_model(UNet(TINY), tmp_path / "ck")
    f = tmp_path / "ck" / "config.json"
    raw = json.loads(f.read_text())
    f.write_text(json.dumps({**raw, "model": {**raw["model"], "norm_num_groups": 7}}))
    with pytest.raises(ValueError, match="key 'model'.*norm_num_groups"):
        load_model(tmp_path / "ck")
    f.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_model(tmp_path / "ck")
    f.write_text(json.dumps({**raw, "schedule": {"kind": "quadratic"}}))
    with pytest.raises(ValueError, match="key 'schedule'"):
        load_model(tmp_path / "ck")
    f.write_text(json.dumps({k: v for k, v in raw.items() if k != "weights"}))
    with pytest.raises(ValueError, match="missing key 'weights'"):
        load_model(tmp_path / "ck")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint directory"):
        load_model(tmp_path / "m.safetensors")


# ------------------------------------------------------------------------------------------ bundled


def test_default_model(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "DEFAULT_MODEL_DIR", tmp_path / "digits")
    with pytest.raises(RuntimeError, match="bundled digits model is missing"):
        ck.default_model()
    m = perturb_(UNet(UNetConfig.digits())).eval()
    save_model(m, tmp_path / "digits", schedule=df.Schedule.linear(100))
    got = df.default_model()
    assert got.config == m.config and got.schedule.num_timesteps == 100


def test_bundled_model_when_present():
    if not (ck.DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("ddpm_fast/assets/digits/ is not trained yet")
    m = df.default_model()
    assert m.config.in_channels == 1 and m.schedule is not None

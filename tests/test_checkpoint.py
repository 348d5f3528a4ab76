"""Checkpoints: native round trip, diffusers UNet / pipeline import, `convert`, and every bad-input path."""

from __future__ import annotations

import argparse
import inspect
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddpm_fast as df
from ddpm_fast import checkpoint as ck
from ddpm_fast.checkpoint import diffusers_schedule, load_model, save_model
from ddpm_fast.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from tests._unet_helpers import diffusers_kwargs, perturb_, random_diffusers_unet  # noqa: E402

TINY = UNetConfig.tiny()
DIFF_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _x_t(cfg=TINY, batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return x, torch.tensor([0, 17, 49])[:batch]


def _out(m, x, t):
    with torch.no_grad():
        return m(x, t)


@pytest.fixture
def diffusers_dir(tmp_path):
    d = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    d.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


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
    x, t = _x_t()
    assert torch.equal(_out(m, x, t), _out(m2, x, t))
    assert torch.equal(m2.schedule.betas, s.betas) and m2.schedule.spec == s.spec
    assert m2.sampling == {
        "variance": "fixed_large",
        "clip": False,
        "clip_range": 1.0,
        "image_shape": [3, 16, 16],
        "data_range": [-1.0, 1.0],
        "steps": 25,
    }
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
    assert m2.sampling["variance"] == "learned_range" and m2.sampling["clip"] is True


def test_channels_last_model_saves_and_overwrites(tmp_path):
    m = perturb_(UNet(TINY)).eval().to(memory_format=torch.channels_last)
    save_model(UNet(TINY), tmp_path / "ck")
    (tmp_path / "ck" / "notes.txt").write_text("kept")
    save_model(m, tmp_path / "ck")  # overwrites in place, leaves other files alone
    assert (tmp_path / "ck" / "notes.txt").read_text() == "kept"
    x, t = _x_t()
    torch.testing.assert_close(_out(load_model(tmp_path / "ck"), x, t), _out(m, x, t), atol=1e-5, rtol=0)


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


# ------------------------------------------------------------------------------------------ diffusers


def test_bin_weights_load_like_safetensors(tmp_path, diffusers_dir):
    d = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    d.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    a, b = load_model(tmp_path / "bin"), load_model(diffusers_dir)
    x, t = _x_t()
    assert torch.equal(_out(a, x, t), _out(b, x, t))
    assert a.schedule is None and a.sampling["variance"] == "fixed_small"


def test_old_attention_key_names(tmp_path, diffusers_dir):
    """Checkpoints saved before diffusers 0.14 name attention weights query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(diffusers_dir / DIFF_WEIGHTS)
    renamed = {}
    for k, v in state.items():
        for new, o in old.items():
            k = k.replace(f".{new}.", f".{o}.")
        renamed[k] = v
    assert renamed.keys() != state.keys()
    (tmp_path / "old").mkdir()
    save_file(renamed, tmp_path / "old" / DIFF_WEIGHTS)
    (tmp_path / "old" / "config.json").write_text((diffusers_dir / "config.json").read_text())
    x, t = _x_t()
    assert torch.equal(_out(load_model(tmp_path / "old"), x, t), _out(load_model(diffusers_dir), x, t))


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_pipeline_defaults_sample_like_ddpm_pipeline(tmp_path, variance):
    """df.sample with the checkpoint's defaults (schedule, variance, clip) reproduces DDPMPipeline."""
    unet = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, variance_type=variance))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    m = load_model(tmp_path / "pipe")
    assert m.sampling["variance"] == variance and m.sampling["clip"] is True
    assert m.schedule.num_timesteps == 50
    with torch.no_grad():
        ref = pipe(
            batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=50, output_type="pt"
        )
    x = df.sample(m, shape=(3, *m.sampling["image_shape"]), generator=torch.Generator().manual_seed(0))
    ours = (x / 2 + 0.5).clamp(0, 1)
    # Both run in float32: each of the 50 steps adds model rounding (~2e-6, test_unet) and diffusers'
    # float32 coefficient tables; 2e-4 in [0, 1] image space is 50 x 4e-6. Seen: ~1e-5.
    torch.testing.assert_close(ours, ref.images, atol=2e-4, rtol=0)
    # and the noise really drives it: another generator gives another image
    other = df.sample(m, shape=(3, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    assert (other - x).abs().max() > 0.1


@pytest.mark.parametrize(
    "kw",
    [
        dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
        dict(trained_betas=[0.01 * (i + 1) for i in range(20)]),
    ],
)
def test_scheduler_betas_match_diffusers(kw):
    T = 20 if "trained_betas" in kw else 200
    sch = DDPMScheduler(num_train_timesteps=T, **kw)
    s, _ = diffusers_schedule(dict(sch.config))
    # diffusers holds float32 betas; ours are float64 (linear/cosine from the formula): equal after rounding
    # to float32 within one float32 ulp, so alphas_cumprod agree to float32 accumulation.
    torch.testing.assert_close(s.betas.float(), sch.betas, atol=0, rtol=2 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(s.alphas_cumprod.float(), sch.alphas_cumprod, atol=0, rtol=T * 1.2e-7)
    assert df.Schedule.from_spec(json.loads(json.dumps(s.spec))).betas.tolist() == s.betas.tolist()


def test_scheduler_fields():
    sch = DDPMScheduler(variance_type="fixed_large_log", clip_sample=False, clip_sample_range=2.0)
    _, sampling = diffusers_schedule(dict(sch.config))
    assert sampling == {"variance": "fixed_large", "clip": False, "clip_range": 2.0}
    _, sampling = diffusers_schedule({"_class_name": "DDPMScheduler"})  # every field at its default
    assert sampling == {"variance": "fixed_small", "clip": True, "clip_range": 1.0}
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*thresholding=True") as e:
        diffusers_schedule({"prediction_type": "v_prediction", "thresholding": True}, "s.json")
    assert _one_line(e).startswith("s.json")
    with pytest.raises(ValueError, match="variance_type='learned'"):
        diffusers_schedule({"variance_type": "learned"})


def test_defaults_table_matches_ddpm_scheduler_signature():
    sig = inspect.signature(DDPMScheduler.__init__).parameters
    for k, v in ck._DDPM_SCHEDULER_DEFAULTS.items():
        assert sig[k].default == v, k


# ------------------------------------------------------------------------------------------ convert


def test_convert_command(tmp_path):
    from ddpm_fast import convert_cmd

    unet = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    pipe = DDPMPipeline(
        unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large")
    )
    pipe.save_pretrained(tmp_path / "pipe")
    p = argparse.ArgumentParser()
    convert_cmd.add_arguments(p)
    assert convert_cmd.run(p.parse_args([str(tmp_path / "pipe"), str(tmp_path / "native")])) == 0
    raw = json.loads((tmp_path / "native" / "config.json").read_text())
    assert raw["format"] == "ddpm-fast" and raw["sampling"]["variance"] == "fixed_large"
    a, b = load_model(tmp_path / "pipe"), load_model(tmp_path / "native")
    x, t = _x_t()
    assert torch.equal(_out(a, x, t), _out(b, x, t))
    assert torch.equal(a.schedule.betas, b.schedule.betas) and a.sampling == b.sampling
    with pytest.raises(ValueError, match="--force"):
        convert_cmd.run(p.parse_args([str(tmp_path / "pipe"), str(tmp_path / "native")]))
    args = p.parse_args([str(tmp_path / "pipe"), str(tmp_path / "native"), "--force", "--no-clip"])
    assert convert_cmd.run(args) == 0 and load_model(tmp_path / "native").sampling["clip"] is False


def test_convert_through_the_cli(tmp_path, diffusers_dir, capsys):
    from ddpm_fast.cli import main

    assert main(["convert", str(diffusers_dir), str(tmp_path / "n")]) == 0
    assert load_model(tmp_path / "n").config == TINY
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err


# ------------------------------------------------------------------------------------------ bad input


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path / "empty")


def test_missing_weights_file(tmp_path, diffusers_dir):
    os.remove(diffusers_dir / DIFF_WEIGHTS)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors or"):
        load_model(diffusers_dir)
    save_model(UNet(TINY), tmp_path / "ck")
    os.remove(tmp_path / "ck" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_model(tmp_path / "ck")


def _truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def test_truncated_weights(tmp_path, diffusers_dir):
    _truncate(diffusers_dir / DIFF_WEIGHTS)
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        load_model(diffusers_dir)
    assert DIFF_WEIGHTS in _one_line(e)

    d = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    d.save_pretrained(tmp_path / "bin", safe_serialization=False)
    _truncate(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin: cannot read weights"):
        load_model(tmp_path / "bin")

    save_model(UNet(TINY), tmp_path / "ck")
    _truncate(tmp_path / "ck" / "model.safetensors", keep=0.99)
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


def _edit_weights(dirpath, fn):
    f = dirpath / DIFF_WEIGHTS
    state = load_file(f)
    fn(state)
    save_file(state, f)


def test_shape_mismatch_names_file_and_key(diffusers_dir):
    key = "down_blocks.1.attentions.0.to_q.weight"
    _edit_weights(diffusers_dir, lambda s: s.__setitem__(key, torch.zeros(3, 64)))
    with pytest.raises(ValueError) as e:
        load_model(diffusers_dir)
    msg = _one_line(e)
    assert DIFF_WEIGHTS in msg and key in msg and "(3, 64)" in msg and "(64, 64)" in msg


def test_unknown_and_missing_keys(diffusers_dir):
    _edit_weights(diffusers_dir, lambda s: s.__setitem__("mid_block.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unknown key 'mid_block\.extra\.weight'") as e:
        load_model(diffusers_dir)
    assert DIFF_WEIGHTS in _one_line(e)
    _edit_weights(diffusers_dir, lambda s: (s.pop("mid_block.extra.weight"), s.pop("conv_out.bias")))
    with pytest.raises(ValueError, match=r"missing key 'conv_out\.bias'"):
        load_model(diffusers_dir)


def test_other_model_family(tmp_path, diffusers_dir):
    cfg = json.loads((diffusers_dir / "config.json").read_text())
    (diffusers_dir / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name is 'AutoencoderKL'") as e:
        load_model(diffusers_dir)
    assert "config.json" in _one_line(e)
    d = tmp_path / "other"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 768, "model_type": "bert"}))
    with pytest.raises(ValueError, match="not a ddpm-fast or diffusers config"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read JSON"):
        load_model(d)


def test_unsupported_configs_list_everything(diffusers_dir):
    cfg = json.loads((diffusers_dir / "config.json").read_text())
    cfg.update(
        class_embed_type="timestep",
        time_embedding_type="fourier",
        cross_attention_dim=768,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    )
    (diffusers_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_model(diffusers_dir)
    msg = _one_line(e)
    for part in (
        "unsupported UNet2DModel config",
        "fourier",
        "class embeddings",
        "cross-attention",
        "CrossAttn",
    ):
        assert part in msg, part


def test_asymmetric_attention_is_unsupported(diffusers_dir):
    cfg = json.loads((diffusers_dir / "config.json").read_text())
    cfg["up_block_types"] = ["UpBlock2D", "UpBlock2D"]
    (diffusers_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not mirrored"):
        load_model(diffusers_dir)


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

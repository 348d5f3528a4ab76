"""diffusers checkpoints: UNet / pipeline import, scheduler configs, `convert`, and bad diffusers directories.

Native checkpoints (round trip, bad native input, the bundled model) are in test_checkpoint.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddpm_fast as df
from ddpm_fast import diffusers_io
from ddpm_fast.checkpoint import load_model
from ddpm_fast.diffusers_io import diffusers_schedule
from tests._checkpoint_helpers import TINY, eval_out, one_line, tiny_inputs, truncate
from tests._unet_helpers import diffusers_kwargs, random_diffusers_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

DIFF_WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def diffusers_dir(tmp_path):
    d = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    d.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


# ------------------------------------------------------------------------------------------ diffusers


def test_bin_weights_load_like_safetensors(tmp_path, diffusers_dir):
    d = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    d.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").exists()
    a, b = load_model(tmp_path / "bin"), load_model(diffusers_dir)
    x, t = tiny_inputs()
    assert torch.equal(eval_out(a, x, t), eval_out(b, x, t))
    assert a.schedule is None and a.defaults.variance == "fixed_small"


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
    x, t = tiny_inputs()
    assert torch.equal(
        eval_out(load_model(tmp_path / "old"), x, t), eval_out(load_model(diffusers_dir), x, t)
    )


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_pipeline_defaults_sample_like_ddpm_pipeline(tmp_path, variance):
    """df.sample with the checkpoint's defaults (schedule, variance, clip) reproduces DDPMPipeline."""
    unet = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, variance_type=variance))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    m = load_model(tmp_path / "pipe")
    assert m.defaults.variance == variance and m.defaults.clip is True
    assert m.schedule.num_timesteps == 50
    with torch.no_grad():
        ref = pipe(
            batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=50, output_type="pt"
        )
    x = df.sample(m, shape=(3, *m.defaults.image_shape), generator=torch.Generator().manual_seed(0))
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
    assert one_line(e).startswith("s.json")
    with pytest.raises(ValueError, match="variance_type='learned'"):
        diffusers_schedule({"variance_type": "learned"})


def test_defaults_table_matches_ddpm_scheduler_signature():
    sig = inspect.signature(DDPMScheduler.__init__).parameters
    for k, v in diffusers_io._DDPM_SCHEDULER_DEFAULTS.items():
        assert sig[k].default == v, k


# ------------------------------------------------------------------------------------------ convert


def test_convert_command(tmp_path):
    from ddpm_fast.cli import convert as convert_cmd

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
    x, t = tiny_inputs()
    assert torch.equal(eval_out(a, x, t), eval_out(b, x, t))
    assert torch.equal(a.schedule.betas, b.schedule.betas) and a.defaults.replace(
        schedule=None
    ) == b.defaults.replace(schedule=None)
    with pytest.raises(ValueError, match="--force"):
        convert_cmd.run(p.parse_args([str(tmp_path / "pipe"), str(tmp_path / "native")]))
    args = p.parse_args([str(tmp_path / "pipe"), str(tmp_path / "native"), "--force", "--no-clip"])
    assert convert_cmd.run(args) == 0 and load_model(tmp_path / "native").defaults.clip is False


def test_convert_through_the_cli(tmp_path, diffusers_dir, capsys):
    from ddpm_fast.cli import main

    assert main(["convert", str(diffusers_dir), str(tmp_path / "n")]) == 0
    assert load_model(tmp_path / "n").config == TINY
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err


# ------------------------------------------------------------------------------------------ bad input


def test_missing_diffusers_weights_file(diffusers_dir):
    os.remove(diffusers_dir / DIFF_WEIGHTS)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors or"):
        load_model(diffusers_dir)


def test_truncated_diffusers_weights(tmp_path, diffusers_dir):
    truncate(diffusers_dir / DIFF_WEIGHTS)
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        load_model(diffusers_dir)
    assert DIFF_WEIGHTS in one_line(e)

    d = random_diffusers_unet(0, **diffusers_kwargs(TINY))
    d.save_pretrained(tmp_path / "bin", safe_serialization=False)
    truncate(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin: cannot read weights"):
        load_model(tmp_path / "bin")


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
    msg = one_line(e)
    assert DIFF_WEIGHTS in msg and key in msg and "(3, 64)" in msg and "(64, 64)" in msg


def test_unknown_and_missing_keys(diffusers_dir):
    _edit_weights(diffusers_dir, lambda s: s.__setitem__("mid_block.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unknown key 'mid_block\.extra\.weight'") as e:
        load_model(diffusers_dir)
    assert DIFF_WEIGHTS in one_line(e)
    _edit_weights(diffusers_dir, lambda s: (s.pop("mid_block.extra.weight"), s.pop("conv_out.bias")))
    with pytest.raises(ValueError, match=r"missing key 'conv_out\.bias'"):
        load_model(diffusers_dir)


def test_other_model_family(tmp_path, diffusers_dir):
    cfg = json.loads((diffusers_dir / "config.json").read_text())
    (diffusers_dir / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name is 'AutoencoderKL'") as e:
        load_model(diffusers_dir)
    assert "config.json" in one_line(e)
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
    msg = one_line(e)
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

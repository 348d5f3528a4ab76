"""The ADM U-Net (ddpm_fast.adm) and openai checkpoints read through their flags (ddpm_fast.adm_io).

No internet and no openai code here: the published key layout is written out below (printed from openai's
guided-diffusion UNetModel for the same config), the published checkpoints are stood in for by random-weight
models saved as openai's scripts save them (torch.save of the state dict), and the presets are built on
the meta device.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ddpm_fast.adm_io as adm_io
from ddpm_fast import cli
from ddpm_fast.adm import ADM, ADMConfig, AttentionBlock
from ddpm_fast.checkpoint import load_model, save_model
from tests._rounding import forward_budget

EPS32 = torch.finfo(torch.float32).eps

# ------------------------------------------------------------------------------------------ reference


def openai_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """openai's QKV attention as their code computes it: q and k each scaled by d^-1/4, einsum logits in the
    input dtype, softmax in float32 and cast back, einsum with v. qkv: [B, 3C, T] -> [B, C, T]."""
    B, width, T = qkv.shape
    d = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(B * heads, d, T) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(B * heads, 3 * d, T).split(d, dim=1)
    s = 1 / math.sqrt(math.sqrt(d))
    w = torch.einsum("bct,bcs->bts", q * s, k * s)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(B, -1, T)


def openai_attention_block(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    h = x.reshape(B, C, H * W)
    a = openai_attention(block.qkv(block.norm(h)), block.heads, block.new_order)
    return (h + block.proj_out(a)).reshape(B, C, H, W)


# openai's UNetModel(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1,
# attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10): every key and shape of its state dict.
OPENAI_LAYOUT = """
time_embed 0.weight[128,32] 0.bias[128] 2.weight[128,128] 2.bias[128]
label_emb weight[10,128]
input_blocks.0.0 weight[32,3,3,3] bias[32]
input_blocks.1.0 in_layers.0.weight[32] in_layers.0.bias[32] in_layers.2.weight[32,32,3,3] in_layers.2.bias[32] emb_layers.1.weight[32,128] emb_layers.1.bias[32] out_layers.0.weight[32] out_layers.0.bias[32] out_layers.3.weight[32,32,3,3] out_layers.3.bias[32]
input_blocks.2.0 op.weight[32,32,3,3] op.bias[32]
input_blocks.3.0 in_layers.0.weight[32] in_layers.0.bias[32] in_layers.2.weight[64,32,3,3] in_layers.2.bias[64] emb_layers.1.weight[64,128] emb_layers.1.bias[64] out_layers.0.weight[64] out_layers.0.bias[64] out_layers.3.weight[64,64,3,3] out_layers.3.bias[64] skip_connection.weight[64,32,1,1] skip_connection.bias[64]
input_blocks.3.1 norm.weight[64] norm.bias[64] qkv.weight[192,64,1] qkv.bias[192] proj_out.weight[64,64,1] proj_out.bias[64]
middle_block.0 in_layers.0.weight[64] in_layers.0.bias[64] in_layers.2.weight[64,64,3,3] in_layers.2.bias[64] emb_layers.1.weight[64,128] emb_layers.1.bias[64] out_layers.0.weight[64] out_layers.0.bias[64] out_layers.3.weight[64,64,3,3] out_layers.3.bias[64]
middle_block.1 norm.weight[64] norm.bias[64] qkv.weight[192,64,1] qkv.bias[192] proj_out.weight[64,64,1] proj_out.bias[64]
middle_block.2 in_layers.0.weight[64] in_layers.0.bias[64] in_layers.2.weight[64,64,3,3] in_layers.2.bias[64] emb_layers.1.weight[64,128] emb_layers.1.bias[64] out_layers.0.weight[64] out_layers.0.bias[64] out_layers.3.weight[64,64,3,3] out_layers.3.bias[64]
output_blocks.0.0 in_layers.0.weight[128] in_layers.0.bias[128] in_layers.2.weight[64,128,3,3] in_layers.2.bias[64] emb_layers.1.weight[64,128] emb_layers.1.bias[64] out_layers.0.weight[64] out_layers.0.bias[64] out_layers.3.weight[64,64,3,3] out_layers.3.bias[64] skip_connection.weight[64,128,1,1] skip_connection.bias[64]
output_blocks.0.1 norm.weight[64] norm.bias[64] qkv.weight[192,64,1] qkv.bias[192] proj_out.weight[64,64,1] proj_out.bias[64]
output_blocks.1.0 in_layers.0.weight[96] in_layers.0.bias[96] in_layers.2.weight[64,96,3,3] in_layers.2.bias[64] emb_layers.1.weight[64,128] emb_layers.1.bias[64] out_layers.0.weight[64] out_layers.0.bias[64] out_layers.3.weight[64,64,3,3] out_layers.3.bias[64] skip_connection.weight[64,96,1,1] skip_connection.bias[64]
output_blocks.1.1 norm.weight[64] norm.bias[64] qkv.weight[192,64,1] qkv.bias[192] proj_out.weight[64,64,1] proj_out.bias[64]
output_blocks.1.2 conv.weight[64,64,3,3] conv.bias[64]
output_blocks.2.0 in_layers.0.weight[96] in_layers.0.bias[96] in_layers.2.weight[32,96,3,3] in_layers.2.bias[32] emb_layers.1.weight[32,128] emb_layers.1.bias[32] out_layers.0.weight[32] out_layers.0.bias[32] out_layers.3.weight[32,32,3,3] out_layers.3.bias[32] skip_connection.weight[32,96,1,1] skip_connection.bias[32]
output_blocks.3.0 in_layers.0.weight[64] in_layers.0.bias[64] in_layers.2.weight[32,64,3,3] in_layers.2.bias[32] emb_layers.1.weight[32,128] emb_layers.1.bias[32] out_layers.0.weight[32] out_layers.0.bias[32] out_layers.3.weight[32,32,3,3] out_layers.3.bias[32] skip_connection.weight[32,64,1,1] skip_connection.bias[32]
out 0.weight[32] 0.bias[32] 2.weight[6,32,3,3] 2.bias[6]
"""
# The same with resblock_updown=True: the two resamplers become ResBlocks without a skip convolution.
OPENAI_UPDOWN = """
input_blocks.2.0 in_layers.0.weight[32] in_layers.0.bias[32] in_layers.2.weight[32,32,3,3] in_layers.2.bias[32] emb_layers.1.weight[32,128] emb_layers.1.bias[32] out_layers.0.weight[32] out_layers.0.bias[32] out_layers.3.weight[32,32,3,3] out_layers.3.bias[32]
output_blocks.1.2 in_layers.0.weight[64] in_layers.0.bias[64] in_layers.2.weight[64,64,3,3] in_layers.2.bias[64] emb_layers.1.weight[64,128] emb_layers.1.bias[64] out_layers.0.weight[64] out_layers.0.bias[64] out_layers.3.weight[64,64,3,3] out_layers.3.bias[64]
"""


def parse_layout(text: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module prefix: {key: shape}} from lines 'prefix key[d0,d1] key[d0] ...'."""
    out = {}
    for line in text.strip().splitlines():
        prefix, *items = line.split()
        out[prefix] = {}
        for item in items:
            key, _, dims = item.partition("[")
            out[prefix][f"{prefix}.{key}"] = tuple(int(d) for d in dims.rstrip("]").split(","))
    return out


# Parameter counts of the presets: built from the README flags by us, and equal to openai's own UNetModel
# built from the same flags (checked outside the suite with their code; see the README's table).
PRESET_PARAMETERS = {
    "improved-cifar10-uncond": 52_546_438,
    "improved-cifar10-uncond-vlb": 52_546_438,
    "improved-imagenet64-uncond": 121_063_942,
    "improved-imagenet64-uncond-vlb": 121_063_942,
    "improved-imagenet64-cond": 273_049_350,
    "improved-lsun-bedroom": 113_676_678,
    "guided-imagenet64-cond": 295_904_454,
    "guided-imagenet128-cond": 421_529_606,
    "guided-imagenet256-cond": 553_838_086,
    "guided-imagenet256-uncond": 552_814_086,
    "guided-imagenet512-cond": 558_997_638,
    "guided-lsun-bedroom": 552_814_086,
    "guided-lsun-cat": 552_814_086,
    "guided-lsun-horse": 552_814_086,
    "guided-lsun-horse-nodropout": 552_814_086,
}

# Small models, one per feature, as the flags of each repository spell them. improved-diffusion knows only
# image sizes 32, 64 and 256 (no --channel_mult), so its cases are 32x32.
SMALL_IMPROVED = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 --num_heads 2"
)
SMALL_GUIDED = "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 --num_heads 2"
CASES = {
    "improved-plain": (
        "improved",
        SMALL_IMPROVED + " --use_scale_shift_norm False --rescale_timesteps False",
    ),
    "improved-defaults": ("improved", SMALL_IMPROVED),  # scale-shift and rescaled timesteps, by default
    "improved-hybrid-cond": (
        "improved",
        SMALL_IMPROVED
        + " --learn_sigma True --class_cond True --diffusion_steps 4000 --noise_schedule cosine",
    ),
    "guided-legacy-order": ("guided", SMALL_GUIDED + " --use_scale_shift_norm False"),
    "guided-new-order-updown": (
        "guided",
        SMALL_GUIDED
        + " --resblock_updown True --use_new_attention_order True --learn_sigma True --class_cond True",
    ),
    "guided-head-channels-rescaled": (
        "guided",
        SMALL_GUIDED
        + " --num_head_channels 16 --rescale_timesteps True --dropout 0.1 --timestep_respacing 25",
    ),
}


def randomized(model: ADM, seed: int = 0) -> ADM:
    """Every parameter random (openai zero-initialises output convs, which would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.05))
    return model.eval()


def inputs(cfg: ADMConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, cfg.num_timesteps, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.num_classes else None
    return x, t, y


def saved_openai(tmp_path, source: str, flags: str, name: str = "model.pt", seed: int = 0):
    """A random-weight model for `flags`, saved as openai's scripts save one; returns (model, file)."""
    cfg, _ = adm_io.from_flags(flags, source)
    model = randomized(ADM(cfg), seed)
    file = tmp_path / name
    torch.save(model.state_dict(), file)
    return model, file


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("updown", [False, True])
def test_state_dict_layout_is_openais(updown):
    cfg = ADMConfig(
        image_size=16,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(8,),
        channel_mult=(1, 2),
        num_classes=10,
        num_heads=2,
        resblock_updown=updown,
    )
    want = parse_layout(OPENAI_LAYOUT)
    if updown:
        want.update(parse_layout(OPENAI_UPDOWN))
    want = {k: shape for group in want.values() for k, shape in group.items()}
    got = {k: tuple(v.shape) for k, v in ADM(cfg).state_dict().items()}
    assert got == want


@pytest.mark.parametrize("name", sorted(PRESET_PARAMETERS))
def test_preset_parameter_counts_on_meta(name):
    cfg, d = adm_io.preset_config(name)
    with torch.device("meta"):
        m = ADM(cfg)
    assert m.num_parameters() == PRESET_PARAMETERS[name]
    assert d.arch == "adm" and d.variance == "learned_range" and d.image_shape == cfg.image_shape
    assert d.num_classes == (1000 if "-cond" in name else None)


def test_preset_sampling_defaults():
    cfg, d = adm_io.preset_config("guided-imagenet64-cond")
    assert (cfg.num_head_channels, cfg.use_new_attention_order, cfg.resblock_updown) == (64, True, True)
    assert (d.schedule.spec["kind"], d.schedule.num_timesteps, d.steps, cfg.rescale_timesteps) == (
        "cosine",
        1000,
        250,
        False,
    )
    cfg, d = adm_io.preset_config("improved-cifar10-uncond")
    assert (cfg.channel_mult, cfg.dropout, cfg.num_heads, cfg.attention_resolutions) == (
        (1, 2, 2, 2),
        0.3,
        4,
        (16, 8),
    )
    assert (d.schedule.spec["kind"], d.schedule.num_timesteps, d.steps, cfg.rescale_timesteps) == (
        "cosine",
        4000,
        None,
        True,
    )
    cfg, d = adm_io.preset_config("guided-imagenet512-cond")
    assert cfg.level_channels == (128, 256, 256, 512, 512, 1024, 1024)
    cfg, d = adm_io.preset_config("improved-lsun-bedroom")
    assert (cfg.use_scale_shift_norm, cfg.num_heads, cfg.attention_resolutions) == (False, 1, (16,))
    assert d.schedule.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    # Linear betas keep their total noise for any T: both repositories scale them by 1000 / T.
    _, d = adm_io.from_flags("--diffusion_steps 4000 --noise_schedule linear", "improved")
    assert d.schedule.betas[0].item() == pytest.approx(2.5e-5, rel=1e-12)
    assert d.schedule.betas[-1].item() == pytest.approx(5e-3, rel=1e-12)
    assert adm_io.from_flags("--learn_sigma False", "guided")[1].variance == "fixed_large"
    assert adm_io.from_flags("--sigma_small True", "improved")[1].variance == "fixed_small"
    assert adm_io.from_flags("--clip_denoised False --batch_size 4 --lr 1e-4", "guided")[1].clip is False


def test_published_file_names_name_their_presets():
    assert adm_io.preset_for_file("64x64_diffusion.pt") == "guided-imagenet64-cond"
    assert adm_io.preset_for_file("/models/256x256_diffusion_uncond.pt") == "guided-imagenet256-uncond"
    assert adm_io.preset_for_file("lsun_uncond_100M_2400K_bs64.pt") == "improved-lsun-bedroom"
    assert adm_io.preset_for_file("ema_0.9999_200000.pt") is None


# ------------------------------------------------------------------------------------------ the model


def test_timestep_embedding_is_the_unets_with_openais_convention():
    from ddpm_fast.adm import timestep_embedding
    from ddpm_fast.unet import timestep_embedding as unet_embedding

    t = torch.tensor([0, 1, 7, 999, 3999])
    for dim in (32, 33, 192):
        assert torch.equal(
            timestep_embedding(t, dim), unet_embedding(t, dim, freq_shift=0, flip_sin_to_cos=True)
        )


def test_rescaled_timesteps_are_t_times_1000_over_T():
    cfg = ADMConfig.tiny(rescale_timesteps=True, num_timesteps=4000)
    rescaled = randomized(ADM(cfg))
    plain = randomized(ADM(cfg.replace(rescale_timesteps=False)))
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(rescaled(x, t), plain(x, t.float() * 0.25))
        assert not torch.equal(rescaled(x, t), plain(x, t))


def test_batch_rows_are_independent():
    """Row i of a batch equals the model on row i alone: labels, t and GroupNorm are all per sample."""
    cfg = ADMConfig.tiny(num_classes=7, use_scale_shift_norm=True, resblock_updown=True)
    m = randomized(ADM(cfg))
    x, t, y = inputs(cfg, batch=5)
    with torch.no_grad():
        full = m(x, t, y=y)
        one = m(x[2:3], t[2:3], y=y[2:3])
        flipped = m(x.flip(0), t.flip(0), y=y.flip(0))
    # oneDNN blocks convolutions differently per batch size: tens of float32 ulps of the output scale.
    tol = 64 * EPS32 * full.abs().max().item()
    torch.testing.assert_close(full[2:3], one, atol=tol, rtol=0)
    torch.testing.assert_close(full.flip(0), flipped, atol=tol, rtol=0)


def test_labels_change_the_output_and_are_checked():
    cfg = ADMConfig.tiny(num_classes=7)
    m = randomized(ADM(cfg))
    x, t, y = inputs(cfg)
    with torch.no_grad():
        assert not torch.equal(m(x, t, y=y), m(x, t, y=(y + 1) % 7))
    with pytest.raises(ValueError, match="y must be an int tensor of 3 class labels"):
        m(x, t)
    with pytest.raises(ValueError, match="y must be an int tensor"):
        m(x, t, y=y.float())
    with pytest.raises(ValueError, match="not class-conditional"):
        randomized(ADM(ADMConfig.tiny()))(x, t, y=y)


def test_deterministic_in_eval_and_dropout_in_train():
    m = randomized(ADM(ADMConfig.tiny(dropout=0.2)))
    x, t, _ = inputs(m.config)
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t))
        shared = m(x, torch.full((3,), 37))
        assert torch.equal(m(x, 37), shared) and torch.equal(m(x, torch.tensor([37])), shared)
        m.train()
        torch.manual_seed(0)
        a = m(x, t)
        torch.manual_seed(1)
        assert not torch.equal(a, m(x, t))


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_under_autocast_errs_no_more_than_openais(new_order, dtype):
    """SDPA under autocast against openai's einsum path with its float32 softmax, both in `dtype` and both
    measured against float64: each within one autocast forward's rounding budget (tests/_rounding.py
    `forward_budget`, every op as if in `dtype`; STYLE 6), whatever order either's kernels sum in."""
    torch.manual_seed(0)
    block = AttentionBlock(64, heads=4, new_order=new_order).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        x = torch.randn(2, 64, 7, 5) * 2  # 35 positions: not a power of two
        block64 = copy.deepcopy(block).double()
        exact = openai_attention_block(block64, x.double())
        budget = forward_budget(lambda: block64(x.double()), u_io=torch.finfo(dtype).eps / 2)
        with torch.autocast("cpu", dtype=dtype):
            ours = block(x)
            theirs = openai_attention_block(block, x)
    assert ours.dtype == torch.float32  # the residual adds the float32 input
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert budget < 0.1 * exact.abs().max().item(), budget
    assert err_ours <= budget and err_theirs <= budget, (err_ours, err_theirs, budget)
    assert ours.isfinite().all()


def test_group_norm_computes_in_float32_for_low_precision():
    """openai's GroupNorm32: a bf16/fp16 model normalises in float32 and rounds once at the end."""
    from ddpm_fast.adm import GroupNorm32

    torch.manual_seed(0)
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm.to(torch.bfloat16)
    x = (torch.randn(2, 64, 5, 3) * 30 + 100).to(torch.bfloat16)  # a large mean: bf16 statistics would fail
    w, b = norm.weight.float(), norm.bias.float()
    want = torch.nn.functional.group_norm(x.float(), 32, w, b, norm.eps).to(torch.bfloat16)
    got = norm(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    m = randomized(ADM(ADMConfig.tiny(num_classes=3))).to(torch.bfloat16)
    x, t, y = inputs(m.config)
    with torch.no_grad():
        out = m(x.to(torch.bfloat16), t, y=y)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_config_validation():
    with pytest.raises(ValueError, match="attention_resolutions must be resolutions of the levels"):
        ADMConfig.tiny(attention_resolutions=(12,))
    with pytest.raises(ValueError, match="num_head_channels \\(24\\) must divide attention channels 64"):
        ADMConfig.tiny(num_head_channels=24)
    with pytest.raises(ValueError, match="num_heads \\(3\\) must divide"):
        ADMConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="must give multiples of 32 channels"):
        ADMConfig.tiny(channel_mult=(0.5, 1))
    with pytest.raises(ValueError, match="no default for image_size 96"):
        ADMConfig(image_size=96)
    with pytest.raises(ValueError, match="no field"):
        ADMConfig.from_dict({"num_channels": 64})
    cfg = ADMConfig.tiny(num_classes=10, channel_mult=[1, 2], attention_resolutions=[8, 16])
    assert ADMConfig.from_dict(cfg.to_dict()) == cfg and cfg.attention_resolutions == (16, 8)
    with pytest.raises(TypeError, match="ADMConfig"):
        ADM(cfg.to_dict())


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("case", sorted(CASES))
def test_openai_file_loads_exactly(tmp_path, case):
    source, flags = CASES[case]
    model, file = saved_openai(tmp_path, source, flags)
    loaded = load_model(file, adm_flags=flags, adm_source=source)
    want = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.config == model.config and not loaded.training
    x, t, y = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y=y), model(x, t, y=y))
    d = loaded.defaults
    assert d.arch == "adm" and d.num_classes == model.config.num_classes
    assert d.variance == ("learned_range" if model.config.out_channels == 6 else "fixed_large")
    assert d.steps == (25 if "--timestep_respacing 25" in flags else None)


def test_source_inferred_from_flags_file_name_and_size(tmp_path):
    # guided-only flags say guided-diffusion.
    _, file = saved_openai(tmp_path, "guided", SMALL_GUIDED + " --resblock_updown True")
    assert (
        load_model(file, adm_flags=SMALL_GUIDED + " --resblock_updown True").config.rescale_timesteps is False
    )
    # improved-diffusion's README flags for ImageNet-64 (num_channels shrunk) tell nothing: its defaults
    # rescale timesteps, guided-diffusion's do not, so the source must be given ...
    flags = "--image_size 64 --num_channels 32 --num_res_blocks 1 --learn_sigma True --diffusion_steps 4000"
    _, file = saved_openai(tmp_path, "improved", flags)
    with pytest.raises(
        ValueError, match="rescale_timesteps True vs False.*adm_source='improved' or 'guided'"
    ):
        load_model(file, adm_flags=flags)
    assert load_model(file, adm_flags=flags, adm_source="improved").config.rescale_timesteps is True
    # ... or told by the published file name.
    published = file.rename(tmp_path / "imagenet64_uncond_100M_1500K.pt")
    assert load_model(published, adm_flags=flags).config.rescale_timesteps is True
    # 32x32 exists only in improved-diffusion.
    _, file = saved_openai(tmp_path, "improved", SMALL_IMPROVED, name="c.pt")
    assert load_model(file, adm_flags=SMALL_IMPROVED).config.rescale_timesteps is True


def test_native_round_trip(tmp_path):
    source, flags = CASES["guided-new-order-updown"]
    model, file = saved_openai(tmp_path, source, flags)
    loaded = load_model(file, adm_flags=flags + " --timestep_respacing 50", adm_source=source)
    save_model(loaded, tmp_path / "native")
    back = load_model(tmp_path / "native")
    assert isinstance(back, ADM) and back.config == loaded.config
    assert back.defaults.sampling_dict() == loaded.defaults.sampling_dict()
    assert back.defaults.arch == "adm" and back.defaults.steps == 50 and back.defaults.num_classes == 1000
    assert torch.equal(back.schedule.betas, loaded.schedule.betas)
    x, t, y = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(back(x, t, y=y), model(x, t, y=y))


def test_preset_fills_in_the_flags(tmp_path):
    """A preset is its README's flags; flags given beside it win."""
    p = adm_io.PRESETS["guided-imagenet64-cond"]
    shrunk = "--num_channels 32 --num_head_channels 32 --num_res_blocks 1"  # not 296M parameters in a test
    model, file = saved_openai(tmp_path, "guided", p.flags + " " + shrunk)
    loaded = load_model(file, adm_preset="guided-imagenet64-cond", adm_flags=shrunk)
    assert loaded.config == model.config and loaded.config.use_new_attention_order
    assert loaded.defaults.steps == 250 and loaded.defaults.schedule.spec["kind"] == "cosine"
    with pytest.raises(ValueError, match="adm_preset must be one of"):
        load_model(file, adm_preset="imagenet64")
    with pytest.raises(ValueError, match="contradicts adm_preset"):
        load_model(file, adm_preset="guided-imagenet64-cond", adm_source="improved")


def one_line_error(file, flags, source):
    with pytest.raises(ValueError) as e:
        load_model(file, adm_flags=flags, adm_source=source)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "wrong, flag",
    [
        (" --learn_sigma False", "--learn_sigma True"),
        (" --class_cond False", "--class_cond True"),
        (" --num_res_blocks 2", "--num_res_blocks 1"),
        (" --num_channels 64", "--num_channels 32"),
        (" --use_scale_shift_norm False", "--use_scale_shift_norm True"),
        (" --resblock_updown False", "--resblock_updown True"),
        (" --channel_mult 1,2,2", "--channel_mult"),
        (" --attention_resolutions 16", "--attention_resolutions 8"),
    ],
)
def test_a_wrong_flag_is_named(tmp_path, wrong, flag):
    source, flags = CASES["guided-new-order-updown"]
    _, file = saved_openai(tmp_path, source, flags)
    msg = one_line_error(file, flags + wrong, source)
    assert "does not fit the flags" in msg and f"likely wrong: {flag}" in msg, msg


def test_flags_read_as_openais_argparse():
    """--a 1 and --a=1, the last of a repeated flag wins, booleans as str2bool reads them, no abbreviations."""
    flags = "--image_size 32 --num_channels=64 --num_channels 96 --learn_sigma yes --num_heads_upsample=-1"
    cfg, _ = adm_io.from_flags(flags, "improved")
    assert (cfg.image_size, cfg.model_channels, cfg.out_channels, cfg.num_heads_upsample) == (32, 96, 6, None)
    for bad, msg in [
        ("--num_chan 32", "adm_flags: unknown flag --num_chan; improved-diffusion's are"),
        ("--image_size 32 64", "adm_flags: expected --flag, got '64'"),
        ("--image_size --num_channels 32", "adm_flags: --image_size needs a value"),
        ("--num_channels=x", "adm_flags: --num_channels must be int \\(improved-diffusion\\); got 'x'"),
        ("--image_size '32", "adm_flags: cannot split"),
    ]:
        with pytest.raises(ValueError, match=msg):
            adm_io.from_flags(bad, "improved")
    with pytest.raises(TypeError, match="adm_flags must be a string"):
        load_model(__file__, adm_flags=["--image_size", "32"])
    with pytest.raises(ValueError, match="classifier_flags: --classifier_depth must be int"):
        adm_io.classifier_from_flags("--image_size 64 --classifier_depth=x")


def test_bad_flags(tmp_path):
    source, flags = CASES["improved-plain"]
    _, file = saved_openai(tmp_path, source, flags)
    assert "unknown flag --num_chanels" in one_line_error(file, flags + " --num_chanels 32", source)
    msg = one_line_error(file, flags + " --resblock_updown True", "improved")
    assert "--resblock_updown is a flag of guided-diffusion" in msg
    assert "--learn_sigma must be a boolean" in one_line_error(file, flags + " --learn_sigma maybe", source)
    assert "--image_size needs a value" in one_line_error(file, "--image_size", source)
    without_size = flags.replace("--image_size 32 ", "")
    assert "likely wrong: --image_size 32 (its default channel_mult 1,2,2,2" in one_line_error(
        file, without_size, source
    )
    assert "--noise_schedule must be linear or cosine" in one_line_error(
        file, flags + " --noise_schedule quad", source
    )
    assert "--predict_xstart" in one_line_error(file, flags + " --predict_xstart True", source)
    assert "--num_channels" in one_line_error(file, flags + " --num_channels 48", source)
    assert "--timestep_respacing must lie in" in one_line_error(
        file, flags + " --timestep_respacing 5000", source
    )
    with pytest.raises(ValueError, match="adm_source must be one of"):
        load_model(file, adm_flags=flags, adm_source="openai")
    with pytest.raises(ValueError, match="checkpoint directory, or an openai .pt file"):
        load_model(file)
    with pytest.raises(ValueError, match="describe an openai .pt file"):
        load_model(tmp_path, adm_flags=flags)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="torch.load\\(weights_only=True\\)"):
        load_model(tmp_path / "junk.pt", adm_flags=flags, adm_source=source)


def test_cli_convert(tmp_path, capsys):
    source, flags = CASES["improved-hybrid-cond"]
    model, file = saved_openai(tmp_path, source, flags)
    out = tmp_path / "native"
    assert cli.main(["convert", str(file), str(out), "--adm-flags", flags, "--adm-source", source]) == 0
    back = load_model(out)
    assert back.config == model.config and back.defaults.schedule.num_timesteps == 4000
    assert "parameters" in capsys.readouterr().out
    assert (
        cli.main(["convert", str(file), str(tmp_path / "b"), "--adm-flags", flags + " --num_res_blocks 2"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num_res_blocks 1" in err, err

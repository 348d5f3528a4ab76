"""UNet vs diffusers' UNet2DModel: the same function, proven on random weights loaded through load_model.

Reference: diffusers' UNet2DModel in float64. Two bounds, both against that reference:
  - float64: our UNet in float64 must agree to 1e-11 of the output scale. The two models run the same ops
    in float64, so only summation order differs (~1e-15 relative); any architectural slip (a wrong eps,
    a missing scale, a swapped sin/cos) shows up at 1e-7 or more.
  - float32 (and bf16 autocast): our error may be at most twice diffusers' own error in that precision,
    plus a few float32 ulps of the output scale for the case where diffusers happens to land closer.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from ddpm_fast.checkpoint import _UNET2D_DEFAULTS, load_model
from ddpm_fast.unet import UNet, UNetConfig, diffusers_key, timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402

from tests._unet_helpers import CIFAR10_DIFFUSERS, diffusers_kwargs, random_diffusers_unet  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
CIFAR10_PARAMS = 35_746_307


def _run64(model, x, t):
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        out = m(x.double(), t)
    return out.sample if hasattr(out, "sample") else out


def _run(model, x, t):
    with torch.no_grad():
        out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def assert_same_function(ours: UNet, theirs, x, t, *, check64: bool = True) -> float:
    """Both bounds of the module docstring; returns max |ours - theirs| in float32."""
    ref = _run64(theirs, x, t)
    scale = max(1.0, ref.abs().max().item())
    if check64:
        err64 = (_run64(ours, x, t) - ref).abs().max().item()
        assert err64 <= 1e-11 * scale, f"float64 difference {err64:.3g} (scale {scale:.3g})"
    o32, d32 = _run(ours, x, t), _run(theirs, x, t)
    assert o32.dtype == torch.float32 and o32.shape == d32.shape
    err_ours = (o32.double() - ref).abs().max().item()
    err_theirs = (d32.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + 4 * EPS32 * scale, (
        f"float32: ours {err_ours:.3g}, diffusers {err_theirs:.3g}"
    )
    return (o32 - d32).abs().max().item()


def _inputs(cfg: UNetConfig, batch=3, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = size or cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t[0] = 0  # both ends of a 1000-step schedule
    if batch > 1:
        t[-1] = 999
    return x, t


def _load_twin(cfg: UNetConfig, tmp_path, seed=0):
    d = random_diffusers_unet(seed, **diffusers_kwargs(cfg))
    d.save_pretrained(tmp_path / "unet")
    return load_model(tmp_path / "unet"), d


VARIANTS = {
    # float64 convolutions take the slow CPU path: the wide variants stay narrow and small.
    "cifar10-narrow": UNetConfig.cifar10(
        sample_size=16, block_out_channels=(16, 32, 32, 32), norm_num_groups=8
    ),
    "celebahq-32px": UNetConfig.celebahq256(
        sample_size=32, block_out_channels=(8, 8, 16, 16, 32, 32), norm_num_groups=4
    ),
    "tiny": UNetConfig.tiny(),
    "digits-8": UNetConfig.digits(),
    "digits-16": UNetConfig.digits(sample_size=16),
    "knobs": UNetConfig.tiny(
        layers_per_block=2,
        attn_levels=(0, 1),
        attention_head_dim=16,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        norm_eps=1e-5,
        mid_scale_factor=1.4142,
        time_embed_dim=96,
        center_input_sample=True,
        out_channels=6,
    ),
    "scale-shift": UNetConfig.tiny(scale_shift_norm=True),
    "scale-shift-mid-norm": UNetConfig.tiny(scale_shift_norm=True, mid_attn_norm_groups=4),
    "no-attention": UNetConfig.tiny(attn_levels=(), mid_attention=False),
    "odd-channels": UNetConfig.tiny(
        block_out_channels=(9, 18), norm_num_groups=3, in_channels=1, out_channels=2
    ),
    "three-levels": UNetConfig.tiny(block_out_channels=(16, 32, 48), attn_levels=(2,), attention_head_dim=8),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers(name, tmp_path):
    cfg = VARIANTS[name]
    ours, theirs = _load_twin(cfg, tmp_path)
    assert ours.config == cfg
    x, t = _inputs(cfg)
    assert_same_function(ours, theirs, x, t)


@pytest.mark.slow
def test_cifar10_full_width(tmp_path):
    """google/ddpm-cifar10-32's published architecture, full width, through a save_pretrained dir (~15 s)."""
    d = random_diffusers_unet(0, **CIFAR10_DIFFUSERS)
    n_diffusers = sum(p.numel() for p in d.parameters())
    assert n_diffusers == CIFAR10_PARAMS
    assert UNet(UNetConfig.cifar10()).num_parameters() == CIFAR10_PARAMS
    d.save_pretrained(tmp_path / "unet")
    ours = load_model(tmp_path / "unet")
    assert ours.config == UNetConfig.cifar10(dropout=0.0)  # the published config has no dropout field
    assert ours.num_parameters() == CIFAR10_PARAMS
    x, t = _inputs(ours.config, batch=1)
    assert_same_function(ours, d, x, t)


def test_preset_sizes():
    assert UNet(UNetConfig.tiny()).num_parameters() < 1_000_000
    assert 500_000 <= UNet(UNetConfig.digits()).num_parameters() <= 2_000_000
    c256 = UNetConfig.celebahq256()
    assert c256 == UNetConfig.church256() and c256.image_shape == (3, 256, 256)
    # the same module count as diffusers' google/ddpm-celebahq-256 layout, without building 114M params twice
    kw = diffusers_kwargs(c256)
    assert kw["down_block_types"][4] == "AttnDownBlock2D" and kw["up_block_types"][1] == "AttnUpBlock2D"


@pytest.mark.parametrize("name", ["tiny", "cifar10-narrow", "celebahq-32px", "knobs", "scale-shift"])
def test_key_map_is_a_bijection_onto_diffusers_names(name):
    from diffusers import UNet2DModel

    cfg = VARIANTS[name]
    ours = UNet(cfg).state_dict()
    theirs = UNet2DModel(**diffusers_kwargs(cfg)).state_dict()
    mapped = {k: diffusers_key(k) for k in ours}
    assert len(set(mapped.values())) == len(mapped)
    assert set(mapped.values()) == set(theirs)
    assert all(ours[k].shape == theirs[v].shape for k, v in mapped.items())


def test_defaults_table_matches_diffusers_signature():
    sig = inspect.signature(UNet2DModel.__init__).parameters
    for k, v in _UNET2D_DEFAULTS.items():
        assert k in sig, k
        want = sig[k].default
        assert (tuple(want) if isinstance(want, (list, tuple)) else want) == v, k


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    for dim, shift, flip in [(128, 1, False), (32, 0, True), (9, 1, False)]:
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.equal(timestep_embedding(t, dim, shift, flip), ref)


def test_t_forms_agree():
    m = UNet(UNetConfig.tiny()).eval()
    x, _ = _inputs(m.config, batch=4)
    with torch.no_grad():
        ref = m(x, torch.full((4,), 37, dtype=torch.int64))
        assert torch.equal(m(x, torch.tensor(37)), ref)
        assert torch.equal(m(x, torch.tensor([37])), ref)
        assert torch.equal(m(x, 37), ref)
        assert isinstance(ref, torch.Tensor) and ref.shape == x.shape


def test_batch_rows_are_independent():
    """Row i of a batch equals the model on row i alone (GroupNorm is per sample; no batch statistics)."""
    m = UNet(UNetConfig.tiny()).eval()
    x, t = _inputs(m.config, batch=5)
    with torch.no_grad():
        full = m(x, t)
        one = m(x[2:3], t[2:3])
    # oneDNN blocks convolutions differently per batch size: tens of float32 ulps of the output scale.
    torch.testing.assert_close(full[2:3], one, atol=64 * EPS32 * full.abs().max().item(), rtol=0)


def test_deterministic_in_eval_and_dropout_in_train():
    m = UNet(UNetConfig.digits()).eval()  # dropout 0.1
    x, t = _inputs(m.config, batch=2)
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t))
        m.train()
        torch.manual_seed(0)
        a = m(x, t)
        torch.manual_seed(1)
        b = m(x, t)
    assert not torch.equal(a, b)


def test_channels_last(tmp_path):
    cfg = VARIANTS["knobs"]
    ours, theirs = _load_twin(cfg, tmp_path)
    x, t = _inputs(cfg)
    ours = ours.to(memory_format=torch.channels_last)
    assert_same_function(ours, theirs, x.to(memory_format=torch.channels_last), t, check64=False)


def test_autocast_bf16_errs_no_more_than_diffusers(tmp_path):
    cfg = UNetConfig.tiny()
    ours, theirs = _load_twin(cfg, tmp_path)
    x, t = _inputs(cfg)
    ref = _run64(theirs, x, t)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o = ours(x, t)
        d = theirs(x, t).sample
    assert o.dtype == torch.bfloat16
    err_o = (o.double() - ref).abs().max().item()
    err_d = (d.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err_o <= 2 * err_d + 4 * torch.finfo(torch.bfloat16).eps * scale, (err_o, err_d)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """fullgraph=True fails on any graph break; ~25 s of Inductor compile on a 2-core CPU."""
    torch._dynamo.reset()
    m = UNet(UNetConfig.tiny()).eval()
    x, t = _inputs(m.config)
    with torch.no_grad():
        eager = m(x, t)
        compiled = torch.compile(m, fullgraph=True)(x, t)
    scale = max(1.0, eager.abs().max().item())
    # Inductor fuses and reorders reductions: a few hundred float32 ulps of the output scale.
    torch.testing.assert_close(compiled, eager, atol=256 * EPS32 * scale, rtol=0)


def test_config_round_trip_and_validation():
    for cfg in [*VARIANTS.values(), UNetConfig.cifar10(), UNetConfig.celebahq256()]:
        d = cfg.to_dict()
        assert UNetConfig.from_dict(d) == cfg
        import json

        assert UNetConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="no field"):
        UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "cross_attention_dim": 8})
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig.tiny(norm_num_groups=7)
    with pytest.raises(ValueError, match="attn_levels"):
        UNetConfig.tiny(attn_levels=(2,))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.tiny(attention_head_dim=48)
    with pytest.raises(ValueError, match="sample_size"):
        UNetConfig.cifar10(sample_size=12)
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig.tiny(dropout=1.5)
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet({"in_channels": 3})


def test_bad_input_shapes():
    m = UNet(UNetConfig.tiny()).eval()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiples of 2"):
        m(torch.randn(2, 3, 15, 16), torch.zeros(2, dtype=torch.int64))


def test_digits_runs_at_8_and_16():
    m = UNet(UNetConfig.digits()).eval()
    for s in (8, 16):
        x = torch.randn(3, 1, s, s)
        with torch.no_grad():
            y = m(x, torch.tensor([1, 500, 999]))
        assert y.shape == x.shape and torch.isfinite(y).all()

"""Our UNet on its own: presets, t forms, batch independence, dropout, compile, config validation, bad input.

That it computes the same function as diffusers' UNet2DModel is proven in test_unet_diffusers.py.
"""

from __future__ import annotations

import pytest
import torch

from ddpm_fast.unet import UNet, UNetConfig
from tests._unet_helpers import EPS32, VARIANTS, diffusers_kwargs, unet_inputs


def test_preset_sizes():
    assert UNet(UNetConfig.tiny()).num_parameters() < 1_000_000
    assert 500_000 <= UNet(UNetConfig.digits()).num_parameters() <= 2_000_000
    c256 = UNetConfig.celebahq256()
    assert c256 == UNetConfig.church256() and c256.image_shape == (3, 256, 256)
    # the same module count as diffusers' google/ddpm-celebahq-256 layout, without building 114M params twice
    kw = diffusers_kwargs(c256)
    assert kw["down_block_types"][4] == "AttnDownBlock2D" and kw["up_block_types"][1] == "AttnUpBlock2D"


def test_t_forms_agree():
    m = UNet(UNetConfig.tiny()).eval()
    x, _ = unet_inputs(m.config, batch=4)
    with torch.no_grad():
        ref = m(x, torch.full((4,), 37, dtype=torch.int64))
        assert torch.equal(m(x, torch.tensor(37)), ref)
        assert torch.equal(m(x, torch.tensor([37])), ref)
        assert torch.equal(m(x, 37), ref)
        assert isinstance(ref, torch.Tensor) and ref.shape == x.shape


def test_batch_rows_are_independent():
    """Row i of a batch equals the model on row i alone (GroupNorm is per sample; no batch statistics)."""
    m = UNet(UNetConfig.tiny()).eval()
    x, t = unet_inputs(m.config, batch=5)
    with torch.no_grad():
        full = m(x, t)
        one = m(x[2:3], t[2:3])
    # oneDNN blocks convolutions differently per batch size: tens of float32 ulps of the output scale.
    torch.testing.assert_close(full[2:3], one, atol=64 * EPS32 * full.abs().max().item(), rtol=0)


def test_deterministic_in_eval_and_dropout_in_train():
    m = UNet(UNetConfig.digits()).eval()  # dropout 0.1
    x, t = unet_inputs(m.config, batch=2)
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t))
        m.train()
        torch.manual_seed(0)
        a = m(x, t)
        torch.manual_seed(1)
        b = m(x, t)
    assert not torch.equal(a, b)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """fullgraph=True fails on any graph break; ~25 s of Inductor compile on a 2-core CPU."""
    torch._dynamo.reset()
    m = UNet(UNetConfig.tiny()).eval()
    x, t = unet_inputs(m.config)
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

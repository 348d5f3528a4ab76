"""UNet vs diffusers' UNet2DModel: the same function, proven on random weights loaded through load_model.

Reference: diffusers' UNet2DModel in float64. Two bounds, both against that reference:
  - float64: our UNet in float64 must agree to 1e-11 of the output scale. The two models run the same ops
    in float64, so only summation order differs (~1e-15 relative); any architectural slip (a wrong eps,
    a missing scale, a swapped sin/cos) shows up at 1e-7 or more.
  - float32 (and bf16 autocast): our error, and diffusers' (which shows the budget is one that another
    implementation of the function meets too), at most one forward's rounding budget (tests/_rounding.py
    `forward_budget`: every op's result moved by its reduction's and its roundings' largest spread, in the
    float64 model), which holds whatever order a CPU's vector kernels sum in.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm_fast.attention import _CPU_FLASH_OK
from ddpm_fast.checkpoint import load_model
from ddpm_fast.diffusers_io import _UNET2D_DEFAULTS
from ddpm_fast.unet import UNet, UNetConfig, diffusers_key, timestep_embedding
from tests._rounding import forward_budget
from tests._unet_helpers import (
    CIFAR10_DIFFUSERS,
    VARIANTS,
    diffusers_kwargs,
    random_diffusers_unet,
    unet_inputs,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402

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
    ours64 = copy.deepcopy(ours).double()
    if check64:
        err64 = (_run(ours64, x.double(), t) - ref).abs().max().item()
        assert err64 <= 1e-11 * scale, f"float64 difference {err64:.3g} (scale {scale:.3g})"
    o32, d32 = _run(ours, x, t), _run(theirs, x, t)
    assert o32.dtype == torch.float32 and o32.shape == d32.shape
    err_ours = (o32.double() - ref).abs().max().item()
    err_theirs = (d32.double() - ref).abs().max().item()
    budget = forward_budget(lambda: _run(ours64, x.double(), t))
    assert budget < 1e-3 * scale, budget  # bf16 (2^-8) slipping into a float32 path would exceed it
    assert err_ours <= budget and err_theirs <= budget, (err_ours, err_theirs, budget)
    return (o32 - d32).abs().max().item()


def _load_twin(cfg: UNetConfig, tmp_path, seed=0):
    d = random_diffusers_unet(seed, **diffusers_kwargs(cfg))
    d.save_pretrained(tmp_path / "unet")
    return load_model(tmp_path / "unet"), d


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers(name, tmp_path):
    cfg = VARIANTS[name]
    ours, theirs = _load_twin(cfg, tmp_path)
    assert ours.config == cfg
    x, t = unet_inputs(cfg)
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
    x, t = unet_inputs(ours.config, batch=1)
    assert_same_function(ours, d, x, t)


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


def test_channels_last(tmp_path):
    cfg = VARIANTS["knobs"]
    ours, theirs = _load_twin(cfg, tmp_path)
    x, t = unet_inputs(cfg)
    ours = ours.to(memory_format=torch.channels_last)
    assert_same_function(ours, theirs, x.to(memory_format=torch.channels_last), t, check64=False)


def test_autocast_bf16_errs_no_more_than_diffusers(tmp_path):
    cfg = UNetConfig.tiny()
    ours, theirs = _load_twin(cfg, tmp_path)
    x, t = unet_inputs(cfg)
    ref = _run64(theirs, x, t)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o = ours(x, t)
        # diffusers calls torch's SDPA directly, whose CPU flash kernel fails for bf16 below AVX-512
        # (see ddpm_fast/attention.py); the math kernel is the one our attention uses there.
        with sdpa_kernel([SDPBackend.MATH]) if not _CPU_FLASH_OK else contextlib.nullcontext():
            d = theirs(x, t).sample
    assert o.dtype == torch.bfloat16
    err_o = (o.double() - ref).abs().max().item()
    err_d = (d.double() - ref).abs().max().item()
    ours64 = copy.deepcopy(ours).double()  # every op as if in bf16 (module docstring)
    budget = forward_budget(lambda: _run(ours64, x.double(), t), u_io=torch.finfo(torch.bfloat16).eps / 2)
    assert budget < 0.1 * ref.abs().max().item(), budget
    assert err_o <= budget and err_d <= budget, (err_o, err_d, budget)

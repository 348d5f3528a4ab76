"""Shared by test_checkpoint.py and test_checkpoint_diffusers.py: the model, inputs and checks both use."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast.unet import UNetConfig

TINY = UNetConfig.tiny()


def tiny_inputs(cfg=TINY, batch=3):
    """(x, t) for cfg: standard normal x; t = 0, 17, 49, both ends of a 50-step schedule and one between."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return x, torch.tensor([0, 17, 49])[:batch]


def eval_out(m, x, t):
    with torch.no_grad():
        return m(x, t)


def one_line(e: pytest.ExceptionInfo) -> str:
    """The error's message, asserted to be one line (a user error reads as one line on the command line)."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def truncate(f, keep=0.5):
    """Cut file f to the first `keep` of its bytes: a torn write."""
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])

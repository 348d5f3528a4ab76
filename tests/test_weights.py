"""`model_digest(m, remember=True)` of a torch Module: remembered while its tensors are unchanged, hashed
anew when any changes (an in-place edit, `load_state_dict`, a whole-tensor write through `.data`), and always
the full hash's value; without `remember`, every call hashes in full."""

from __future__ import annotations

import copy

import pytest
import torch

from ddpm_fast import weights
from ddpm_fast.unet import UNet, UNetConfig
from ddpm_fast.weights import model_digest


@pytest.fixture
def counted(monkeypatch):
    """The number of full hashes `model_digest` has computed."""
    calls = []
    real = weights._hash_state

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(weights, "_hash_state", counting)
    return calls


def model():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


def test_unchanged_module_is_not_hashed_again(counted):
    m = model()
    first = model_digest(m, remember=True)
    assert model_digest(m, remember=True) == first
    assert len(counted) == 1
    # a copy (other storage): hashed again, the same digest
    assert model_digest(copy.deepcopy(m), remember=True) == first
    assert len(counted) == 2


def write_through_data(m):
    """A whole tensor rewritten through `.data`, as some EMA code does: no version counter moves."""
    next(m.parameters()).data.add_(1)


@torch.no_grad()
def edit_one_element(m):
    next(m.parameters()).view(-1)[0].add_(1)


def load_other_weights(m):
    torch.manual_seed(1)
    m.load_state_dict(UNet(UNetConfig.tiny()).state_dict())


@pytest.mark.parametrize("edit", [write_through_data, edit_one_element, load_other_weights])
def test_digest_follows_a_weight_change(counted, edit):
    m = model()
    before = model_digest(m, remember=True)
    edit(m)
    after = model_digest(m, remember=True)
    assert after != before
    assert len(counted) == 2
    # what is remembered is the full hash of the new weights
    assert after == model_digest(copy.deepcopy(m), remember=True)


def test_without_remember_every_call_hashes_in_full(counted):
    m = model()
    assert model_digest(m) == model_digest(m) == model_digest(m, remember=True)
    assert len(counted) == 3


def test_inference_tensors_are_hashed_every_time(counted):
    with torch.inference_mode():
        m = model()
    assert model_digest(m, remember=True) == model_digest(m, remember=True)
    assert len(counted) == 2

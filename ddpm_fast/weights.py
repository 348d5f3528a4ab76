"""Reading weight files and JSON configs, shared by every checkpoint loader. No pickle: safetensors, or
`torch.load(weights_only=True)` for the .bin/.pt files other projects publish."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import torch

from ddpm_fast.errors import BadType, BadValue

__all__ = ["read_json", "safetensors_from_bytes", "read_weights", "load_state", "model_digest"]


def read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadValue(f"{file}: cannot read JSON ({e})") from e
    if not isinstance(d, dict):
        raise BadValue(f"{file}: expected a JSON object; got {type(d).__name__}")
    return d


def safetensors_from_bytes(blob: bytes, file: Path) -> dict:
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as e:  # safetensors raises its own error types for a bad header or a short file
        raise BadValue(f"{file}: not a readable safetensors file ({e})") from e


def read_weights(file: Path) -> dict:
    if file.suffix == ".safetensors":
        return safetensors_from_bytes(file.read_bytes(), file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with globals, ...: all unreadable for us
        raise BadValue(f"{file}: cannot read weights with torch.load(weights_only=True) ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadValue(f"{file}: expected a dict of tensors")
    return state


def load_state(model: torch.nn.Module, state: dict, file: Path, rename) -> None:
    """Check every key and shape first, then copy; `rename(our_key) -> file_key` (None: identity)."""
    ours = model.state_dict()
    wanted = {k: (rename(k) if rename else k) for k in ours}
    theirs = set(state)
    missing = [fk for fk in wanted.values() if fk not in theirs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadValue(f"{file}: missing key {missing[0]!r}{more}")
    unknown = sorted(theirs - set(wanted.values()))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise BadValue(f"{file}: unknown key {unknown[0]!r}{more}")
    for k, fk in wanted.items():
        t = state[fk]
        if tuple(t.shape) != tuple(ours[k].shape):
            raise BadValue(
                f"{file}: key {fk!r} has shape {tuple(t.shape)}; the model expects {tuple(ours[k].shape)}"
            )
        if not t.is_floating_point():
            raise BadValue(f"{file}: key {fk!r} has dtype {t.dtype}; expected a floating tensor")
    model.load_state_dict({k: state[fk] for k, fk in wanted.items()}, strict=True)


def model_digest(model, *, remember: bool = False) -> str:
    """sha256 naming the model's function: an ONNX file's bytes, or a Module's config and state_dict tensors.

    With `remember` (the openvino backend's export cache, asked on every run) a Module's digest is remembered (`_DIGESTS`, weakly keyed by the Module) with the state it was computed
    from: every tensor's name, storage address, dtype, shape, device and version counter (which in-place ops,
    `copy_` and `load_state_dict` bump), plus `_PROBE` elements of each tensor, which also see whole-tensor
    writes through `.data` or a numpy view (an EMA written that way) that leave the counter as it was. While
    that state is unchanged the hash is not recomputed: hashing the cifar10 U-Net's 143 MB costs more than a
    sampling step, on every call that names the model (the openvino backend's export cache asks each run).
    Inference tensors (made under `torch.inference_mode`) keep no version counter: always hashed anew. A
    write through `.data` to some elements only (no counter moves) can miss the probes, so what records a
    run (manifests, tuned tables, an export's metadata) hashes in full: the default."""
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
    if path is not None and not isinstance(model, torch.nn.Module):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if not isinstance(model, torch.nn.Module):
        raise BadType(
            f"model_id must be given for a model that is neither a torch Module nor a file; got {type(model).__name__}"
        )
    cfg = getattr(model, "config", None)
    cfg_text = (
        json.dumps(cfg.to_dict(), sort_keys=True) if cfg is not None and hasattr(cfg, "to_dict") else None
    )
    state = sorted(model.state_dict(keep_vars=True).items())
    key = _state_key(cfg_text, state)
    known = _DIGESTS.get(model) if remember else None
    if key is not None and known is not None and known[0] == key and torch.equal(known[1], _probe(state)):
        return known[2]
    digest = _hash_state(cfg_text, state)
    if key is not None and remember:
        _DIGESTS[model] = (key, _probe(state), digest)
    return digest


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Module -> (state key, probe, digest)
_PROBE = 8  # elements read per tensor, evenly spaced: 328 tensors x 8 for the cifar10 U-Net, ~1 ms


def _state_key(cfg_text, state) -> tuple | None:
    """What a tensor's contents cannot change without: None where a tensor keeps no version counter."""
    try:
        tensors = tuple(
            (name, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device), t._version)
            for name, t in state
        )
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return cfg_text, tensors


def _probe(state) -> torch.Tensor:
    """`_PROBE` evenly spaced elements of every tensor, as float64 on the CPU, in one tensor."""
    picks = []
    with torch.no_grad():
        for _, t in state:
            flat = t.detach().reshape(-1)
            if flat.numel():
                picks.append(flat[:: max(1, flat.numel() // _PROBE)][:_PROBE].to(torch.float64))
    if not picks:
        return torch.zeros(0, dtype=torch.float64)
    dev = picks[0].device
    return torch.cat([p.to(dev) for p in picks]).cpu()  # one transfer from a GPU, not one per tensor


def _hash_state(cfg_text, state) -> str:
    h = hashlib.sha256()
    if cfg_text is not None:
        h.update(cfg_text.encode())
    _hash_tensors(h, state)
    return h.hexdigest()


def _hash_tensors(h, named) -> None:
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(named) -> str:
    """sha256 of (name, tensor) pairs: each name, dtype, shape and bytes, in the order given."""
    h = hashlib.sha256()
    _hash_tensors(h, named)
    return h.hexdigest()

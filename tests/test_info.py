"""`ddpm-fast info`: reports every section, as text and as JSON, whatever is missing on this machine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import torch

from ddpm_fast import cli, info


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_collect_reports_versions_devices_and_backends():
    d = info.collect()
    assert d["versions"]["torch"] == torch.__version__
    for dist in (
        "triton",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxscript",
        "openvino",
        "diffusers",
        "numpy",
    ):
        assert d["versions"][dist] == _version(dist), dist  # the resolved versions, None when absent
    assert d["devices"]["cuda"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert d["devices"]["cuda"]["why"]
    assert d["backends"]["reference"]["available"] is True
    for name in ("fast", "onnx", "openvino", "diffusers"):
        b = d["backends"][name]
        assert b["available"] or b["why"] or b["note"], b  # unavailable always says why
    assert d["backends"]["diffusers"]["available"] == (_version("diffusers") is not None)
    ov = d["backends"]["openvino"]
    assert ov["available"] == (_version("openvino") is not None)
    assert ov.get("note") if ov["available"] else "[openvino]" in ov["why"]
    assert d["bundled_model"]["available"] and d["bundled_model"]["image_shape"] == [1, 8, 8]


def test_probe_installed_says_why_without_importing():
    assert info._probe_installed("ddpm_fast_no_such_module") == (
        False,
        "ddpm_fast_no_such_module is not installed",
    )
    assert info._probe_installed("json") == (True, None)


def test_collect_imports_no_slow_package():
    """diffusers (2.7 s to import: torch._dynamo, sympy) and onnxscript (1.0 s) only need to be found."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys; from ddpm_fast import info; info.collect(); "
        "print(' '.join(m for m in ('diffusers', 'onnxscript', 'triton', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    imported = set(out.stdout.split())
    assert not imported & {"diffusers", "onnxscript", "torch._dynamo"}, imported
    if not torch.cuda.is_available():  # Triton runs on CUDA only (or interpreted): installed is enough
        assert "triton" not in imported


def test_cli_text_and_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"python", "platform", "versions", "devices", "backends", "bundled_model"}
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("versions", "devices", "backends", "reference", "fast", "onnx", "openvino", "bundled model"):
        assert word in text

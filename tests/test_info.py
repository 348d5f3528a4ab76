"""`ddpm-fast info`: reports every section, as text and as JSON, whatever is missing on this machine."""

from __future__ import annotations

import json

import torch

from ddpm_fast import cli, info


def test_collect_reports_versions_devices_and_backends():
    d = info.collect()
    assert d["versions"]["torch"] == torch.__version__
    assert d["devices"]["cuda"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert d["devices"]["cuda"]["why"]
    assert d["backends"]["reference"]["available"] is True
    for name in ("fast", "onnx"):
        b = d["backends"][name]
        assert b["available"] or b["why"], b  # unavailable always says why


def test_cli_text_and_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"python", "platform", "versions", "devices", "backends", "bundled_model"}
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("versions", "devices", "backends", "reference", "fast", "onnx", "bundled model"):
        assert word in text

"""The distribution lists every package of the source tree, and the source tree imports as installed."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _source_packages() -> set[str]:
    """Dotted names of every folder under ddpm_fast/ holding an __init__.py (kernels/ and export/ through
    their links) or data files (the assets)."""
    found = set()
    for dirpath, _, files in os.walk(ROOT / "ddpm_fast", followlinks=True):
        rel = Path(dirpath).relative_to(ROOT)
        if "__pycache__" in rel.parts:
            continue
        if "__init__.py" in files or "assets" in rel.parts:
            found.add(".".join(rel.parts))
    return found


def test_every_source_package_is_in_the_distribution():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert _source_packages() == listed, (
        f"missing from pyproject: {sorted(_source_packages() - listed)}; "
        f"listed but absent: {sorted(listed - _source_packages())}"
    )
    for name, folder in cfg["package-dir"].items():  # the links mirror the mapping
        if name != "ddpm_fast":
            link = ROOT / name.replace(".", "/")
            assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), name


def test_the_source_tree_imports_the_same_kernels_and_export():
    import ddpm_fast.export
    import ddpm_fast.kernels

    for mod, folder in ((ddpm_fast.kernels, "kernels"), (ddpm_fast.export, "export")):
        assert Path(mod.__file__).resolve().parent == (ROOT / folder).resolve()

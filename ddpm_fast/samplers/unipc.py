"""UniPC: Zhao et al. 2023 (arXiv:2302.04867), Algorithms 1-2 (UniP-2 predictor and UniC corrector) with
B(h) = e^h - 1 (bh2) in data prediction; the corrector refines x_i with the model output at x_i."""

from __future__ import annotations

from ddpm_fast.samplers._multistep import UniPC, multistep_family

__all__ = ["sample_unipc", "unipc_table", "HISTORY"]

HISTORY = 2  # earlier x0 predictions a step reads

sample_unipc, unipc_table = multistep_family(
    "unipc", lambda table: UniPC(table, order=2), HISTORY, noise=False, doc=__doc__
)

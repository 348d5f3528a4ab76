"""A tuned table (`ddpm_fast.tuned`): no update of its own, the table's columns are the method.

x0_i = clip(SRA x_i - SRM1 eps), x_{i+1} = C_XT x_i + C_X0 x0_i + C_EPS eps + sum_k H_k x0_{i-1-k} + sigma z:
the formula the fused kernel, its twin and the ONNX step graph evaluate for every table, written out as the
reference loop. The table comes from a file learned for one model (`tuned=` or the checkpoint's own).
"""

from __future__ import annotations

import torch

from ddpm_fast.errors import BadValue
from ddpm_fast.schedule import Schedule
from ddpm_fast.steps import C_EPS, C_X0, C_XT, COLUMNS, SRA, SRM1, StepTable

__all__ = ["sample_tuned", "tuned_table"]


def sample_tuned(model, x, table: StepTable, noise, *, sigma, clip, callback=None) -> torch.Tensor:
    """Walk the table's columns: one model call per step, earlier x0 predictions newest first."""
    c = table.coefs.to(x)
    x0s = []
    for i, t in enumerate(table.timesteps.tolist()):
        eps, v = model(x, t)
        x0s.insert(0, clip(c[i, SRA] * x - c[i, SRM1] * eps))
        nxt = c[i, C_XT] * x + c[i, C_X0] * x0s[0] + c[i, C_EPS] * eps + sigma(c[i], v) * noise(i, t)
        for k, earlier in enumerate(x0s[1 : table.history + 1]):
            nxt = nxt + c[i, len(COLUMNS) + k] * earlier
        del x0s[table.history + 1 :]
        x = nxt
        if callback is not None:
            callback(i, t, x)
    return x


def tuned_table(schedule: Schedule, *, variance: str, eta: float = 0.0) -> StepTable:
    raise BadValue(
        "method='tuned' runs a table learned for the model (`ddpm-fast tune`): pass tuned=PATH, or steps=N "
        "for a table the checkpoint carries"
    )

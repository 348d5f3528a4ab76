"""Float32 rounding budgets of a step chain, derived from its table (tests' STYLE 6: tolerance from the dtype).

Two float32 implementations of one step table (the reference loop and the fused update) evaluate the same
affine step in a different order. Per step j each rounds, with unit roundoff u = 2^-24:
- x0 = SRA x - SRM1 eps (+ a guidance shift): the two products, the float32 copies of SRA and SRM1, the
  difference and the shift, 6 roundings at the magnitude T_j = |SRA| X + X0 + X of x0's terms (X the chain's
  largest |x|, X0 its largest |x0|); the cancellation makes T_j up to ~470 at t = 999 where x0 is O(1);
- x_{t-1} = C_X0 x0 + C_XT x + C_EPS eps + sum_k H_k x0_k + sigma z: one rounding per term and per sum, at
  most the sum R_j of the terms' magnitudes.
The two realisations differ by at most twice that. An x0 difference reaches the output with the weight W_j
it enters the chain with: |C_X0| at its own step (|C_EPS| / |SRM1| through an eps formed from it), |H| at
each later step that reads it as history. A later step carries an earlier difference forward with its
Jacobian; for the exact Gaussian model (tests/analytic_model.py) each step is x -> A x + B with 0 < A <= 1
(the marginal std shrinks from 1 to the data's), so nothing is amplified and the budgets add.
"""

import torch

from ddpm_fast.steps import C_EPS, C_X0, C_XT, COLUMNS, SIGMA, SRA, SRM1

U32 = 2.0**-24  # float32 unit roundoff: half an ulp at 1
Z_MAX = 6.0  # |z| of the chain's normal draws: P(|z| > 6) = 2e-9 per element


def chain_budget(coefs: torch.Tensor, x_max: float, x0_max: float) -> float:
    """Bound on max |a - b| of two float32 runs of the table `coefs` (float64 [S, 8 + K], run order) on the
    exact Gaussian model, from the chain's largest |x| and |x0| (module docstring)."""
    c = coefs.double().abs()
    S, K = c.shape[0], c.shape[1] - len(COLUMNS)
    hist = c[:, len(COLUMNS) :]
    total = 0.0
    for j in range(S):
        t = (c[j, SRA] * x_max + x0_max + x_max).item()
        w = (c[j, C_X0] + c[j, C_EPS] / c[j, SRM1].clamp_min(1e-30)).item()
        w += sum(hist[j + 1 + k, k].item() for k in range(K) if j + 1 + k < S)  # read later as history k
        eps_max = t / max(c[j, SRM1].item(), 1e-30)
        r = (c[j, C_X0] * x0_max + c[j, C_XT] * x_max + c[j, C_EPS] * eps_max + c[j, SIGMA] * Z_MAX).item()
        r += (hist[j] * x0_max).sum().item()
        total += 2 * (6 * U32 * t * w + (5 + K) * U32 * r)
    return total

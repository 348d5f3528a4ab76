"""Float32 rounding budgets of a step chain, derived from its table (tests' STYLE 6: tolerance from the dtype).

Two float32 implementations of one step table (the reference loop and the fused update) evaluate the same
affine step in a different order. Per step j each rounds, with unit roundoff u = 2^-24:
- x0 = SRA x - SRM1 eps (+ a guidance shift): the two products, the float32 copies of SRA and SRM1, the
  difference and the shift, 6 roundings at the magnitude T_j = |SRA| X + X0 + X of x0's terms (X the chain's
  largest |x|, X0 its largest |x0|); the cancellation makes T_j up to ~470 at t = 999 where x0 is O(1);
- x_{t-1} = C_X0 x0 + C_XT x + C_EPS eps + sum_k H_k x0_k + sigma z: one rounding per term and per sum, at
  most the sum R_j of the terms' magnitudes.
The two realisations differ by at most twice that (`step_budget`). An x0 difference reaches the output with
the weight W_j it enters the chain with: |C_X0| at its own step (|C_EPS| / |SRM1| through an eps formed from
it), |H| at each later step that reads it as history. A table whose history keeps eps_hat = (SRA x - x0) /
SRM1 (history_of = "eps") passes x0's difference to later steps with weight |H| / SRM1, rounds eps_hat itself
5 times at (SRA |x| + |x0|) / SRM1, and its natural form alpha_{t-1} (x / alpha_t + sum b_k eps_k) rounds at
|alpha_{t-1}| SRA |x| + |C_X0| SRM1 |eps_hat| + sum |H_k eps_k| (alpha_{t-1} = C_XT / SRA + C_X0), which
the columns' own terms can undercut by a cancellation in C_XT.

How a later step carries an earlier difference forward depends on the model:
- `chain_budget`, the exact Gaussian model (tests/analytic_model.py): each step is x -> A x + B with
  0 < A <= 1 (the marginal std shrinks from 1 to the data's), so nothing is amplified and the budgets add.
  A worst-case bound.
- `propagated_budget`, any model (a U-Net): to first order the output difference is sum_j J_j d_j, J_j the
  chain's Jacobian from step j to the end, d_j step j's difference. The float64 chain is run once more
  with each step's state moved by its budget with an independent random sign per element (two orders'
  rounding differences are independent and at most that large, so their variance is at most this one's),
  and the budget is twice the largest output change: the largest of N elements of a sum of many independent
  terms is set by its variance, and the factor 2 covers one draw's spread. Where the two runs' models also
  differ (another batch size's conv algorithm, autocast, a compiled graph), `forward_diff(x, t)` gives the
  two forwards' difference at the chain's own state, and the state moves by it with eps's weight in the
  step: the float64 chain then follows the other forward, to first order. A multistep table also keeps
  that difference in its history (as x0 or eps_hat), so there the float64 model's own output moves by it,
  and the table's every column carries it on. That holds where the difference is smooth at the scale by
  which the chains part; a bf16 forward is piecewise constant at its inputs' rounding, so there the moved
  chain meets another draw of the same error, which the factor 2 covers while the chain contracts (few
  steps) and not beyond first order (tests/test_openvino.py, 20 bf16 steps).
"""

from __future__ import annotations

import math

import torch

from ddpm_fast.plan import make_plan
from ddpm_fast.steps import C_EPS, C_X0, C_XT, COLUMNS, MAX_LOG, MIN_LOG, SIGMA, SRA, SRM1

U32 = 2.0**-24  # float32 unit roundoff: half an ulp at 1
Z_MAX = 6.0  # |z| of the chain's normal draws: P(|z| > 6) = 2e-9 per element


def step_budget(
    c: torch.Tensor, j: int, x_max: float, x0_max: float, hist_x0: list[float], learned=False
) -> float:
    """Bound on step j's difference between two float32 orders (module docstring), |coefs| `c` [S, 8 + K]."""
    K = c.shape[1] - len(COLUMNS)
    hist = c[:, len(COLUMNS) :]
    srm1 = max(c[j, SRM1].item(), 1e-30)
    t = c[j, SRA].item() * x_max + x0_max + x_max
    w = c[j, C_X0].item() + c[j, C_EPS].item() / srm1
    w += sum(hist[j + 1 + k, k].item() for k in range(K) if j + 1 + k < c.shape[0])  # read later as history k
    sigma = c[j, SIGMA].item()  # learned range: SIGMA exp(log std), log std in [MIN_LOG, MAX_LOG] / 2 <= 0,
    if learned:  # and exp turns log std's absolute error into a relative one: (1 + |log std|)
        sigma *= 1 + max(c[j, MIN_LOG].item(), c[j, MAX_LOG].item()) / 2
    r = c[j, C_X0].item() * x0_max + c[j, C_XT].item() * x_max + c[j, C_EPS].item() * t / srm1 + sigma * Z_MAX
    r += sum(hist[j, k].item() * h for k, h in enumerate(hist_x0[:K]))
    return 2 * (6 * U32 * t * w + (5 + K) * U32 * r)


def chain_budget(coefs: torch.Tensor, x_max: float, x0_max: float) -> float:
    """Bound on max |a - b| of two float32 runs of the table `coefs` (float64 [S, 8 + K], run order) on the
    exact Gaussian model, from the chain's largest |x| and |x0| (module docstring)."""
    c = coefs.double().abs()
    K = c.shape[1] - len(COLUMNS)
    return sum(step_budget(c, j, x_max, x0_max, [x0_max] * K) for j in range(c.shape[0]))


def propagated_budget(model64, schedule, shape, truth: torch.Tensor, forward_diff=None, **kw) -> float:
    """Bound on max |a - b| of two float32 runs of df.sample(model, schedule, shape, **kw) that differ in
    the update's rounding order and, with `forward_diff(x, t)` (the two forwards' eps_a - eps_b at float32
    state x and timestep t), in the model's forward: module docstring.

    model64: the model in float64; truth: its float64 reference output for the same arguments. Each element
    moves by its own step's budget (`step_budget` at that element's magnitudes); where x0 is clipped, x0's
    rounding and eps's difference do not pass. A forward difference is not random from step to step (a
    bf16 weight is rounded once for every step), so it moves the state (a multistep table's eps) along itself,
    not with a random sign."""
    import ddpm_fast as df

    C = shape[1]
    records = []
    shift = {"eps": False}  # set below for a multistep table: the forward difference enters eps itself

    def record(x, t, out):
        out = getattr(out, "sample", out)
        t = int(t.reshape(-1)[0])
        if shift["eps"]:
            diff = forward_diff(x.float(), t).to(out.dtype)
            out = out + torch.nn.functional.pad(diff, (0, 0, 0, 0, 0, out.shape[1] - diff.shape[1]))
        records.append((x.clone(), t, out[:, :C]))
        return out

    if isinstance(model64, torch.nn.Module):  # a hook keeps the module what df.sample inspects
        model = model64

        def on_forward(m, args, out):
            moved = record(args[0], args[1], out)
            return moved if shift["eps"] else None  # None: the module's output unchanged

        hook = model64.register_forward_hook(on_forward)
    else:
        model, hook = lambda x, t, **cond: record(x, t, model64(x, t, **cond)), None
        model.__dict__.update(getattr(model64, "__dict__", {}))  # attributes such as `learned`
    kw = dict(kw, dtype=torch.float64)
    plan = make_plan(model, schedule, shape, **kw)
    signed = plan.table.coefs.double()
    c, K = signed.abs(), signed.shape[1] - len(COLUMNS)
    shift["eps"] = forward_diff is not None and K > 0
    hist = c[:, len(COLUMNS) :]
    signs = torch.Generator().manual_seed(20240617)
    x0_seen: list[torch.Tensor] = []  # what the history keeps: x0, or eps_hat
    eps_hist = plan.table.history_of == "eps"

    def perturb(j, t, x):
        x_in, t_in, eps = records[-1]
        x0 = signed[j, SRA] * x_in - signed[j, SRM1] * eps
        passes = (x0.abs() <= plan.clip_range).double() if plan.clip else torch.ones_like(x0)
        sigma = c[j, SIGMA] * (1 + max(c[j, MIN_LOG], c[j, MAX_LOG]) / 2 if plan.table.learned else 1)
        later = sum(hist[j + 1 + k, k] for k in range(K) if j + 1 + k < c.shape[0])
        srm1 = c[j, SRM1].clamp_min(1e-30)
        w = (c[j, C_X0] + (later / srm1 if eps_hist else later)) * passes + c[j, C_EPS] / srm1
        terms = c[j, SRA] * x_in.abs() + x0.abs() + x_in.abs()  # x0's, elementwise (module docstring)
        r = c[j, C_X0] * x0.abs() + c[j, C_XT] * x_in.abs() + c[j, C_EPS] * eps.abs() + sigma * Z_MAX
        r = r + sum(hist[j, k] * h.abs() for k, h in enumerate(reversed(x0_seen[-K:])) if K)
        entry, extra = x0, 0.0
        if eps_hist:
            x0c = x0.clamp(-plan.clip_range, plan.clip_range) if plan.clip else x0
            entry = (signed[j, SRA] * x_in - x0c) / srm1
            alpha_next = (signed[j, C_XT] / signed[j, SRA] + signed[j, C_X0]).abs()
            r = r + alpha_next * c[j, SRA] * x_in.abs() + c[j, C_X0] * srm1 * entry.abs()
            r = r + sum(hist[j, k] * h.abs() for k, h in enumerate(reversed(x0_seen[-K:])) if K)
            extra = 5 * (c[j, SRA] * x_in.abs() + x0.abs()) / srm1 * later
        x0_seen.append(entry)
        d = 2 * U32 * (6 * terms * w + (5 + K) * r + extra)
        sign = torch.randint(0, 2, x.shape, generator=signs, dtype=torch.float64).to(x.device) * 2 - 1
        x.add_(d * sign)
        if forward_diff is not None and not shift["eps"]:
            diff = forward_diff(x_in.float(), t_in).double()
            x.add_((signed[j, C_EPS] - signed[j, C_X0] * signed[j, SRM1] * passes) * diff)

    try:
        moved = df.sample(model, schedule, shape, backend="reference", callback=perturb, **kw)
    finally:
        if hook is not None:
            hook.remove()
    return 2 * (moved.double() - truth.double()).abs().max().item()


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------------------ one forward
#
# A float32 forward rounds at every op: each result once (u relative), and a reduction of K terms (a conv's
# C_in kh kw, a matmul's inner size, a norm's group) at each of its partial sums, whose rounding errors, at
# most u times the magnitude A of the terms summed (the op on |inputs|), add up over K independent roundings
# to a spread of u sqrt(K / 3) A. `forward_budget` runs the float64 forward once more with every op's result
# moved by delta = u (sqrt(K) A + |y|) with an independent random sign per element (at least the spread of
# any summation order's error, whatever a vector kernel does), and bounds one float32 forward's error
# against float64 by twice the largest change of the output. Autocast (`u_io`, the low precision's unit
# roundoff) lowers the bilinear ops (convolutions, matmuls, attention): their two inputs round at u_io, so
# each product w_i x_i moves by at most 2 u_io |w_i x_i|, independently per term, a spread of 2 u_io L with
# L = sqrt(sum (w_i x_i)^2) (the op on squared inputs), and their result rounds at u_io: delta = u sqrt(K) A
# + 2 u_io L + u_io |y|. Norms and softmax are float32 ops under autocast.

_BILINEAR = {"convolution", "mm", "bmm", "addmm", "baddbmm", "linear"}
_LOWERED = _BILINEAR | {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"}
_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
          "unsqueeze", "squeeze", "clone", "detach", "alias", "as_strided", "contiguous", "copy_", "_to_copy",
          "empty_like", "zeros_like", "ones_like", "split", "split_with_sizes", "unbind", "cat", "stack",
          "index", "index_select", "embedding", "upsample_nearest2d", "arange", "full", "zeros", "lift_fresh",
          "fill_", "zero_", "new_empty", "new_zeros", "empty", "scalar_tensor", "_local_scalar_dense", "lt",
          "gt", "le", "ge", "eq", "ne", "where", "masked_fill", "_softmax_backward_data", "repeat", "flip",
          "max_pool2d_with_indices", "constant_pad_nd", "pad", "roll", "chunk", "narrow", "unfold", "col2im",
          "im2col", "lift_fresh_copy", "_reshape_alias", "view_as_real", "bitwise_not"}  # fmt: skip


def _reduced(name: str, args, out) -> int:
    """K, the number of terms each result element sums."""
    if name == "convolution":
        w = args[1]
        return int(w.shape[1] * math.prod(w.shape[2:]))
    if name in ("mm", "bmm"):
        return int(args[0].shape[-1])
    if name in ("addmm", "baddbmm"):
        return int(args[1].shape[-1])
    if name == "linear":
        return int(args[0].shape[-1])
    if name in ("_softmax", "_log_softmax"):
        return int(args[0].shape[args[1]])
    if name == "native_group_norm":
        return int(args[0].numel() // (args[3] * args[6]))
    if name == "native_layer_norm":
        return int(math.prod(args[1]))
    if isinstance(out, torch.Tensor) and name in (
        "sum",
        "mean",
        "var",
        "var_mean",
        "std",
        "norm",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        return max(1, int(args[0].numel() // max(1, out.numel())))
    return 0


def forward_budget(forward64, u_io: float = U32, seed: int = 20240618) -> float:
    """Bound on max |f32 - f64| of one float32 (or, with u_io, autocast) evaluation of `forward64()`, a
    closure running the float64 model on float64 inputs (section comment above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(seed)

    class Moved(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            first = out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out
            if name in _VIEWS or not isinstance(first, torch.Tensor) or first.dtype != torch.float64:
                return out
            k = _reduced(name, args, first)
            if name in _BILINEAR:
                terms = [a.abs() if isinstance(a, torch.Tensor) else a for a in args]
                delta = U32 * math.sqrt(k) * func(*terms, **kwargs)
            else:
                delta = U32 * math.sqrt(k) * first.abs()
            if name in _BILINEAR and u_io > U32:
                squares = [a * a if isinstance(a, torch.Tensor) else a for a in args]
                delta = delta + 2 * u_io * func(*squares, **kwargs).sqrt() + u_io * first.abs()
            elif name in _LOWERED and u_io > U32:  # fused attention: q, k, v and the result round at u_io
                delta = delta + 4 * u_io * first.abs()
            else:
                delta = delta + U32 * first.abs()
            sign = torch.randint(0, 2, first.shape, generator=gen, dtype=torch.float64).to(first.device)
            first.add_(delta * (2 * sign - 1))
            return out

    with torch.no_grad():
        clean = forward64().double()
        with Moved():
            moved = forward64()
    return 2 * (moved.double() - clean).abs().max().item()

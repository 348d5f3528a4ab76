"""What the last wave added, under CUDA: multistep history tables in the fused step, solver runs and a
class-conditional ADM under CUDA-graph replay. Each kernel test also runs on CPU (the Triton interpreter,
small odd shapes), so the comparison itself is proven here; the capture tests need a GPU. The guided step on
CUDA is tests/test_guidance.py::test_cuda_guided_runs_uncaptured_and_equal_the_reference.

benchmarks/gpu_check.py runs this file right after the kernel and capture proofs (its `tests` section).
"""

from __future__ import annotations

import pytest
import torch
from _rounding import chain_budget, max_diff, propagated_budget, step_budget
from _steps import one_step
from analytic_model import GaussianEps

import ddpm_fast as df
from ddpm_fast import engine
from ddpm_fast.kernels import step_torch, step_triton
from ddpm_fast.plan import make_plan
from ddpm_fast.samplers import build_step_table

CUDA = dict(marks=pytest.mark.cuda)
DEVICES = [pytest.param("cpu", id="cpu-interpreter"), pytest.param("cuda", id="cuda", **CUDA)]
HISTORY_METHODS = ("dpmpp_2m", "unipc", "ipndm", "deis")  # x0 history (1, 2 entries), eps history (3, 2)


@pytest.mark.parametrize("method", HISTORY_METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_history_kernel_matches_twin_step_by_step(device, method):
    """The Triton step against its torch twin with the method's real table and a history tensor: each step
    from the same x, model output and history, its output and the shifted history within step_budget (the
    project's bound on two float32 orders of one step), the chain advanced on the twin's values."""
    s = df.Schedule.linear(1000).respace(list(range(0, 1000, 125)))  # 8 steps: every history column used
    table = build_step_table(s, method=method)
    assert table.history > 0, method
    eps_history = table.history_of == "eps"
    coefs, ts = table.to(device)
    c = table.coefs.double().abs()
    g = torch.Generator().manual_seed(3)
    shape = (3, 1, 5, 7)  # odd: masked tail of the block
    x = torch.randn(shape, generator=g).to(device)
    hist = torch.zeros((table.history, *shape)).to(device)
    tri, twin = one_step(step_triton), one_step(step_torch)  # a record per step: each has its own history
    for j in range(table.num_steps):
        m = torch.randn(shape, generator=g).to(device)
        h_a, h_b = hist.clone(), hist.clone()
        a = tri(x, m, coefs, ts, j, seed=5, clip_range=1.0, history=h_a, eps_history=eps_history)
        b = twin(x, m, coefs, ts, j, seed=5, clip_range=1.0, history=h_b, eps_history=eps_history)
        x_max, h_max = x.abs().max().item(), hist.abs().max().item()
        bound = step_budget(c, j, x_max, 1.0, [h_max] * table.history)
        assert (a - b).abs().max().item() <= bound, (j, (a - b).abs().max().item(), bound)
        # the new entry: x0 (clipped to 1) or eps_hat = (SRA x - x0) / SRM1, its float32 rounding of O(|entry|)
        entry_bound = 8 * 2.0**-24 * max(1.0, h_b[0].abs().max().item())
        assert (h_a - h_b).abs().max().item() <= entry_bound, (j, (h_a - h_b).abs().max().item())
        assert torch.equal(h_a[1:], hist[:-1]) and torch.equal(h_b[1:], hist[:-1])  # the shift moves, no math
        x, hist = b, h_b


def _gaussian(s, device):
    return GaussianEps(s, 0.3, 0.04).to(device)  # exact eps of Gaussian data: its table moves with .to


@pytest.mark.cuda
@pytest.mark.parametrize(
    "method, kw",
    [("dpmpp_2m", {}), ("unipc", {}), ("ipndm", {}), ("deis", {}), ("dpmpp_2m", {"spacing": "karras"})],
    ids=["dpmpp_2m", "unipc", "ipndm", "deis", "dpmpp_2m-karras"],
)
def test_cuda_solver_run_under_replay_equals_the_reference(method, kw):
    """A multistep solver on the fast backend with the CUDA graph on (the history buffer captured) against the
    reference fp32 run from the same noise; the captured run equals the uncaptured one bit for bit."""
    s = df.Schedule.linear(1000)
    model = _gaussian(s, "cuda")
    common = dict(steps=10, seed=4, start_index=3, method=method, device="cuda", **kw)
    before = engine.counters["captures"]
    graph = df.sample(model, s, (5, 3, 8, 8), backend="fast", compile=False, **common)
    assert engine.counters["captures"] > before  # the graph ran
    eager = df.sample(model, s, (5, 3, 8, 8), backend="fast", compile=False, cuda_graph=False, **common)
    assert torch.equal(graph, eager)
    ref = df.sample(model, s, (5, 3, 8, 8), backend="reference", **common)
    ref64 = df.sample(model, s, (5, 3, 8, 8), backend="reference", dtype=torch.float64, **common)
    # the two float32 runs differ by rounding order only: no further from float64 than the reference is,
    # plus the table's chain budget (tests/_rounding.py) with |x| <= 5 and clipped |x0| <= 1

    plan = make_plan(model, s, (5, 3, 8, 8), steps=10, method=method, **kw)
    budget = chain_budget(plan.table.coefs, max(ref64.abs().max().item(), 5.0), 1.0)
    err, ref_err = (graph - ref64).abs().max().item(), (ref - ref64).abs().max().item()
    assert err <= ref_err + budget, (err, ref_err, budget)


def _fast_minus_eager(model, labels=None, chunks=None):
    """forward_diff for propagated_budget: the fast backend's own forward for `model` (on CUDA a channels_last
    private copy; on CPU the module itself) over the batch as its run cut it, `chunks` (offset, rows, bucket)
    with padded rows of zeros (a row's output is its own at a given batch size), against the model's eager
    float32 forward of the whole batch, as the reference runs it."""
    (fwd,) = engine._engine_for(model).forwards.values()

    def diff(x, t):
        B = x.shape[0]
        tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
        parts = []
        with torch.no_grad():
            for off, rows, bucket in chunks or [(0, B, B)]:
                xb = torch.cat([x[off : off + rows], x.new_zeros((bucket - rows, *x.shape[1:]))])
                tb = tt[:1].expand(bucket)
                if labels is None:
                    parts.append(fwd(xb, tb)[:rows])
                else:
                    yb = torch.cat([labels[off : off + rows], labels.new_zeros(bucket - rows)])
                    parts.append(fwd(xb, tb, yb)[:rows])
            whole = model(x, tt) if labels is None else model(x, tt, y=labels)
        return torch.cat(parts).float() - whole

    return diff


@pytest.mark.parametrize("device", DEVICES)
def test_tuned_table_on_the_fast_backend_equals_the_reference(device):
    """method='tuned' (the bundled digits model's 5-NFE table) on the fast backend (on CUDA: captured) against
    the reference: a float32 U-Net forward on both sides, the same noise, the same table."""
    from ddpm_fast.checkpoint import DEFAULT_MODEL_DIR, load_model

    model = load_model(DEFAULT_MODEL_DIR, device=device).eval()
    shape = (4, *model.config.image_shape)
    common = dict(steps=5, seed=2, method="tuned", device=device)
    before = engine.counters["captures"]
    fast = df.sample(model, shape=shape, backend="fast", compile=False, **common)
    assert (engine.counters["captures"] > before) == (device == "cuda")
    ref = df.sample(model, shape=shape, backend="reference", **common)
    model64 = load_model(DEFAULT_MODEL_DIR, device=device, dtype=torch.float64).eval()
    ref64 = df.sample(model64, shape=shape, backend="reference", dtype=torch.float64, **common)
    # two float32 runs of one chain: the update's rounding order differs, and the forward where the fast
    # backend runs its own copy (CUDA: channels_last); the table's propagated budget (tests/_rounding.py)
    budget = propagated_budget(model64, None, shape, ref64, _fast_minus_eager(model), **common)
    assert budget < 0.1 * ref64.abs().max().item(), budget  # a budget the images can break
    assert max_diff(fast, ref) <= budget, (max_diff(fast, ref), budget)


@pytest.mark.parametrize("device", DEVICES)
def test_class_conditional_adm_labels_follow_their_rows_under_replay(device):
    """A tiny class-conditional ADM with labels under replay: buckets (2, 4) cut 5 rows into 4 + 1 (padded to
    2); a row equals the same sample drawn alone, with its own label, in a bucket of its size (a convolution
    sums in another order at another batch size), and the reference within the chain's budget."""
    import copy

    from ddpm_fast.adm import ADM, ADMConfig

    torch.manual_seed(0)
    model = ADM(ADMConfig.tiny().replace(num_classes=10)).to(device).eval()
    s = df.Schedule.linear(1000)
    shape = (5, *model.config.image_shape)
    labels = torch.tensor([3, 1, 4, 1, 5], device=device)
    chunks = [(0, 4, 4), (4, 1, 2)]  # engine._chunks(5) with buckets (2, 4)
    common = dict(steps=6, seed=11, device=device, method="dpmpp_2m")
    before = engine.counters["captures"]
    full = df.sample(model, s, shape, labels=labels, backend="fast", compile=False, buckets=(2, 4), **common)
    assert (engine.counters["captures"] > before) == (device == "cuda")
    for i, buckets in ((0, (4,)), (2, (4,)), (4, (2, 4))):
        one = df.sample(model, s, (1, *shape[1:]), labels=labels[i : i + 1], start_index=i, backend="fast",
                        compile=False, buckets=buckets, **common)  # fmt: skip
        assert torch.equal(one[0], full[i]), i
    ref = df.sample(model, s, shape, labels=labels, backend="reference", **common)
    model64 = copy.deepcopy(model).double()
    ref64 = df.sample(model64, s, shape, labels=labels, backend="reference", dtype=torch.float64, **common)
    # two float32 runs of one chain: the update's rounding order, and the forward at the buckets' batch sizes
    # (and on CUDA channels_last) where the reference runs all 5 rows at once
    diff = _fast_minus_eager(model, labels, chunks)
    budget = propagated_budget(model64, s, shape, ref64, diff, labels=labels, **common)
    assert budget < 0.1 * ref64.abs().max().item(), budget  # a budget the images can break
    assert max_diff(full, ref) <= budget, (max_diff(full, ref), budget)
    swapped = df.sample(model, s, shape, labels=labels.flip(0), backend="fast", compile=False, buckets=(2, 4),
                        **common)  # fmt: skip
    assert not torch.equal(swapped[0], full[0])  # the labels reach the captured forward

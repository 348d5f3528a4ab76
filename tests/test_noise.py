"""Counter-based noise: the torch Philox equals Triton's (run under TRITON_INTERPRET=1 on CPU) and the published vectors."""

import importlib.util

import pytest
import torch

from ddpm_fast import noise

HAS_TRITON = importlib.util.find_spec("triton") is not None


# Random123's known-answer vectors for Philox-4x32-10: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_philox_known_answers(ctr, key, want):
    out = noise.philox4x32(*[torch.tensor([c]) for c in ctr], *key)
    assert [int(o) for o in out] == list(want)


def test_uniform_transform_matches_definition():
    r = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = noise.uint32_to_uniform(r)
    assert u.dtype == torch.float32
    assert ((u >= 0) & (u < 1)).all()
    # 2^31 reinterprets as -2^31, folded by ~x to 2^31 - 1: same value as 2^31 - 1
    assert u[2] == u[3]
    assert u[0] == 0 and u[4] == 0  # 2^32-1 -> -1 -> ~(-1) = 0


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_normals_kernel(out_ptr, seed, n, slot, Q, BLOCK: tl.constexpr):
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = q < Q
        zero = q.to(tl.uint32) * 0
        n64 = n.to(tl.int64)
        r0, r1, r2, r3 = tl.philox(
            seed,
            q.to(tl.uint32),
            zero + n64.to(tl.uint32),
            zero + slot.to(tl.uint32),
            zero + (n64 >> 32).to(tl.uint32),
        )
        z0, z1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
        z2, z3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
        tl.store(out_ptr + q, z0, mask=mask)
        tl.store(out_ptr + Q + q, z1, mask=mask)
        tl.store(out_ptr + 2 * Q + q, z2, mask=mask)
        tl.store(out_ptr + 3 * Q + q, z3, mask=mask)

    @triton.jit
    def _randn4x_kernel(out_ptr, seed, Q, BLOCK: tl.constexpr):
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = q < Q
        z0, z1, z2, z3 = tl.randn4x(seed, q)
        tl.store(out_ptr + q, z0, mask=mask)
        tl.store(out_ptr + Q + q, z1, mask=mask)
        tl.store(out_ptr + 2 * Q + q, z2, mask=mask)
        tl.store(out_ptr + 3 * Q + q, z3, mask=mask)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# Box-Muller in float32: log/sqrt/cos differ by a few ulp between libm and the GPU's; |z| < 6 so 1e-6 absolute.
NORMAL_ATOL = 2e-6


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize(
    "seed, n, slot, numel",
    [
        (0, 0, 0, 13),
        (123456789012345, 5_000_000_123, 999, 105),
        (7, 3, noise.XT_SLOT, 64),
        (2**63 - 1, 1, 1, 1),
    ],
)
def test_torch_philox_equals_triton_philox(seed, n, slot, numel):
    Q = (numel + 3) // 4
    out = torch.empty(4 * Q, device=_device())
    _philox_normals_kernel[(triton.cdiv(Q, 64),)](out, seed, n, slot, Q, BLOCK=64)
    ref = noise.normals(seed, torch.tensor([n]), slot, numel)[0]
    torch.testing.assert_close(out[:numel].cpu(), ref, atol=NORMAL_ATOL, rtol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_zero_counters_are_exactly_tl_randn4x():
    Q = 25
    out = torch.empty(4 * Q, device=_device())
    _randn4x_kernel[(1,)](out, 42, Q, BLOCK=32)
    ref = noise.normals(42, torch.tensor([0]), 0, 4 * Q)[0]
    torch.testing.assert_close(out.cpu(), ref, atol=NORMAL_ATOL, rtol=0)


def test_rows_depend_on_global_index_only():
    a = noise.sample_noise(5, 0, (8, 3, 5, 7), 17)
    b = noise.sample_noise(5, 4, (4, 3, 5, 7), 17)
    assert torch.equal(a[4:], b)
    assert not torch.equal(a[:4], b)


def test_slots_seeds_and_x_T_are_distinct_streams():
    shape = (2, 3, 4, 4)
    z = {(s, slot): noise.sample_noise(s, 0, shape, slot) for s in (0, 1) for slot in (0, 1, noise.XT_SLOT)}
    keys = list(z)
    for i, k1 in enumerate(keys):
        for k2 in keys[i + 1 :]:
            assert not torch.allclose(z[k1], z[k2]), (k1, k2)


def test_normals_are_standard_normal():
    z = noise.sample_noise(0, 0, (64, 3, 32, 32), 500).flatten().double()
    n = z.numel()  # 196608: standard errors are 1/sqrt(n) ~ 2.3e-3 for the mean, ~3.2e-3 for the variance
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    # the four Philox outputs fill four quarters: each quarter is standard normal on its own
    q = z.reshape(64, 4, -1)
    for k in range(4):
        assert abs(q[:, k].mean().item()) < 10 / n**0.5
        assert abs(q[:, k].var().item() - 1) < 10 * (2 / n) ** 0.5


def test_bad_seed():
    with pytest.raises(TypeError, match="seed"):
        noise.check_seed(1.5)
    with pytest.raises(ValueError, match="seed"):
        noise.check_seed(-1)

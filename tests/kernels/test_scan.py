"""The scan entry point and its CPU backends against the float64 reference (and the paper's recurrence)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import medmamba.kernels.backends.torch_scan as torch_scan
from medmamba.kernels import (
    RASTER,
    REVERSED,
    SLICE,
    TEMPORAL,
    BackendUnavailableError,
    ScanInputError,
    ScanOrder,
    cross_scan,
    selective_scan,
    use_backend,
)
from tests.helpers import TOLERANCES, generator

CPU_BACKENDS = ["torch"]

# (spatial shape, orders): 1D, 2D, 3D and 2D+t, odd sizes, L = 1
CASES = {
    "1d-L1": ((1,), (RASTER,)),
    "1d-odd": ((37,), (RASTER, REVERSED)),
    "2d-odd": ((5, 7), (RASTER, REVERSED, *cross_scan(2))),
    "3d-segmamba": ((3, 4, 5), (RASTER, REVERSED, SLICE)),
    "3d-cross": ((3, 2, 5), cross_scan(3)),
    "video-vivim": ((3, 4, 4), (RASTER, REVERSED, TEMPORAL)),
    "3d-single": ((2, 3, 3), (SLICE,)),
}


def make_inputs(spatial, K, *, batch=2, channels=4, N=3, groups=1, dtype=torch.float64, seed=0, extras=True):
    g = generator(seed)
    per_order = (batch, K, channels, *spatial) if K > 1 else (batch, channels, *spatial)
    bc = (batch, K, groups, N, *spatial) if K > 1 else (batch, groups, N, *spatial)
    kc = (K, channels) if K > 1 else (channels,)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    u, delta = rand(*per_order), rand(*per_order, scale=0.5)
    A = (-(torch.rand(*kc, N, generator=g, dtype=torch.float64) + 0.5)).to(dtype).requires_grad_()
    B, C = rand(*bc), rand(*bc)
    if not extras:
        return (u, delta, A, B, C, None, None, None)
    return (u, delta, A, B, C, rand(*kc), rand(batch, channels, *spatial), rand(*kc, scale=0.3))


def run_both(args, orders, backend, **kw):
    ref = selective_scan(*args, orders=orders, backend="reference", **kw)
    out = selective_scan(*args, orders=orders, backend=backend, **kw)
    return ref, out


def grads(result, args, seed=1):
    g = generator(seed)
    loss = (result.out * torch.randn(result.out.shape, generator=g, dtype=result.out.dtype)).sum()
    if result.last_state is not None:
        loss = (
            loss + (result.last_state * torch.randn(result.last_state.shape, generator=g).to(result.last_state)).sum()
        )
    leaves = [a for a in args if a is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("merge", ["sum", "stack"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_backend_matches_float64_reference_forward_and_gradients(backend, merge, case):
    spatial, orders = CASES[case]
    args = make_inputs(spatial, len(orders))
    ref, out = run_both(args, orders, backend, merge=merge, return_last_state=True)
    K = len(orders)
    expected_out = (2, 4, *spatial) if merge == "sum" else (2, K, 4, *spatial)
    assert out.out.shape == expected_out
    assert out.last_state.shape == ((2, 4, 3) if K == 1 else (2, K, 4, 3))
    torch.testing.assert_close(out.out, ref.out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.last_state, ref.last_state, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, args), grads(ref, args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("extras", [True, False], ids=["z-D-bias", "plain"])
def test_gradcheck_float64(backend, extras):
    orders = (RASTER, REVERSED, SLICE)
    args = make_inputs((2, 2, 3), 3, batch=1, channels=2, N=2, groups=2, extras=extras)

    def f(*a):
        result = selective_scan(*a, orders=orders, backend=backend, return_last_state=True)
        return result.out, result.last_state

    assert torch.autograd.gradcheck(f, [a for a in args if a is not None] if not extras else args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_within_tolerance(backend, dtype):
    orders = (RASTER, REVERSED, SLICE)
    args64 = make_inputs((3, 4, 6), 3)
    args = tuple(a.detach().to(dtype).requires_grad_() if a is not None else None for a in args64)
    out = selective_scan(*args, orders=orders, backend=backend)
    assert out.out.dtype == dtype
    # the reference sees the same rounded inputs, in float64
    ref = selective_scan(*(a.detach().double() for a in args), orders=orders, backend="reference")
    rtol, atol = TOLERANCES[dtype]
    scale = ref.out.abs().max()
    torch.testing.assert_close(out.out.double(), ref.out, rtol=rtol, atol=atol * scale)
    for got, arg in zip(grads(out, args), args, strict=True):
        assert got.dtype == arg.dtype and torch.isfinite(got.float()).all()


def paper_recurrence(u, delta, A, B, C, D, z, delta_bias):
    """Direct transcription, scalar by scalar, of Mamba's discretised SSM (Gu & Dao 2023, eq. 2a-2b, 4):

    Ā = exp(ΔA), B̄ = ΔB;  h_t = Ā h_{t-1} + B̄ x_t;  y_t = C h_t (+ D x_t), gated by silu(z).
    """
    u, delta, A, B, C, D, z, delta_bias = (x.detach().double().tolist() for x in (u, delta, A, B, C, D, z, delta_bias))
    out = []
    for b in range(len(u)):
        rows = []
        for c in range(len(u[b])):
            h = [0.0] * len(A[c])
            row = []
            for t in range(len(u[b][c])):
                dt = math.log1p(math.exp(delta[b][c][t] + delta_bias[c]))
                y = 0.0
                for n in range(len(A[c])):
                    h[n] = math.exp(dt * A[c][n]) * h[n] + dt * B[b][n][t] * u[b][c][t]
                    y += C[b][n][t] * h[n]
                y += D[c] * u[b][c][t]
                gate = z[b][c][t] / (1 + math.exp(-z[b][c][t]))
                row.append(y * gate)
            rows.append(row)
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_single_order_agrees_with_the_papers_recurrence(backend):
    u, delta, A, B, C, D, z, delta_bias = make_inputs((9,), 1, batch=2, channels=3, N=2)
    out = selective_scan(u, delta, A, B, C, D, z, delta_bias, backend=backend).out
    expected = paper_recurrence(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias)  # one group
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mamba_ssm_layouts_groups_and_constant_bc(backend):
    g = generator(3)
    batch, channels, N, L = 2, 6, 4, 11
    u, delta = torch.randn(batch, channels, L, generator=g), torch.randn(batch, channels, L, generator=g)
    A = -torch.rand(channels, N, generator=g) - 0.1
    B_grouped = torch.randn(batch, 3, N, L, generator=g)
    # grouped B/C: channel c uses group c // (C / G); equal to repeating the groups per channel
    grouped = selective_scan(u, delta, A, B_grouped, B_grouped, backend=backend).out
    for c in range(channels):
        single = selective_scan(
            u[:, c : c + 1],
            delta[:, c : c + 1],
            A[c : c + 1],
            B_grouped[:, c // 2],
            B_grouped[:, c // 2],
            backend=backend,
        ).out
        torch.testing.assert_close(grouped[:, c : c + 1], single)
    # constant (C, N) B and C equal the input-dependent form broadcast over L, one group per channel
    B_const, C_const = torch.randn(channels, N, generator=g), torch.randn(channels, N, generator=g)
    const = selective_scan(u, delta, A, B_const, C_const, backend=backend).out
    per_channel_groups = [x[None, :, :, None].expand(batch, -1, -1, L) for x in (B_const, C_const)]
    expanded = selective_scan(u, delta, A, *per_channel_groups, backend=backend).out
    torch.testing.assert_close(const, expanded)
    # without softplus delta is used as is; output keeps the input dtype, last state is fp32
    result = selective_scan(u, delta.abs(), A, B_grouped, B_grouped, delta_softplus=False, return_last_state=True)
    ref = selective_scan(u, delta.abs(), A, B_grouped, B_grouped, delta_softplus=False, backend="reference")
    torch.testing.assert_close(result.out, ref.out)
    assert result.last_state.dtype == torch.float32 and result.last_state.shape == (batch, channels, N)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reversed_and_slice_orders_equal_forward_scans_of_permuted_inputs(backend):
    # networks.md §8.2: bwd == flip in/out of a fwd scan; slice == fwd scan on the permuted sequence
    spatial = (3, 2, 4)
    u, delta, A, B, C, D, z, delta_bias = make_inputs(spatial, 1, extras=True)
    for order in (REVERSED, SLICE):
        got = selective_scan(u, delta, A, B, C, D, z, delta_bias, orders=(order,), backend=backend).out
        perm = order.resolve(3)
        seq = [
            x.permute(*range(x.ndim - 3), *(x.ndim - 3 + a for a in perm)).flatten(x.ndim - 3)
            for x in (u, delta, B, C, z)
        ]
        if order.reverse:
            seq = [s.flip(-1) for s in seq]
        fwd = selective_scan(seq[0], seq[1], A, seq[2], seq[3], D, seq[4], delta_bias, backend=backend).out
        if order.reverse:
            fwd = fwd.flip(-1)
        back = fwd.reshape(*fwd.shape[:2], *(spatial[a] for a in perm))
        back = back.permute(0, 1, *(2 + perm.index(a) for a in range(3)))
        torch.testing.assert_close(got, back, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stable_at_extreme_delta(backend):
    # Large Δ·|A| makes cumulative-product/cumsum formulations overflow (exp of +700 and beyond); the chunked scan
    # only multiplies by decays in (0, 1] and must stay finite and exact.
    u, delta, A, B, C, D, z, delta_bias = make_inputs((300,), 1, channels=2, N=4)
    big = (delta.detach() * 0 + torch.linspace(-30, 60, 300, dtype=torch.float64)).requires_grad_()
    A_big = (A.detach() * 40).requires_grad_()
    args = (u, big, A_big, B, C, D, z, delta_bias)
    ref, out = run_both(args, (RASTER,), backend)
    assert torch.isfinite(out.out).all()
    torch.testing.assert_close(out.out, ref.out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(out, args), grads(ref, args), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_torch_backend_processes_chunk_groups_within_a_memory_budget(monkeypatch):
    # Same results when a tiny budget forces one chunk per group (forward and backward).
    spatial, orders = (4, 5, 6), (RASTER, REVERSED, SLICE)
    args = make_inputs(spatial, 3)
    full = selective_scan(*args, orders=orders, backend="torch", return_last_state=True)
    full_grads = grads(full, args)
    monkeypatch.setattr(torch_scan, "MEMORY_BUDGET_BYTES", 1)
    budgeted = selective_scan(*args, orders=orders, backend="torch", return_last_state=True)
    torch.testing.assert_close(budgeted.out, full.out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(budgeted, args), full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_backend_never_materialises_the_full_state():
    # The largest buffer holds one step of every chunk: (B, K, C, N, nc) with nc = ceil(L / T), T ≈ √(L/8).
    L = 4096
    lay = torch_scan._Layout(torch.zeros(1, 1, 8, L), groups=1)
    assert lay.T * lay.nc >= L > (lay.T - 1) * lay.nc
    assert lay.nc <= L / 16


def test_dispatch_overrides_and_errors(monkeypatch):
    args = make_inputs((5,), 1, dtype=torch.float32)
    with use_backend("reference"):
        a = selective_scan(*args).out
    b = selective_scan(*args, backend="torch").out
    torch.testing.assert_close(a, b)
    monkeypatch.setenv("MEDMAMBA_SCAN_BACKEND", "reference")
    torch.testing.assert_close(selective_scan(*args).out, a)
    with pytest.raises(BackendUnavailableError, match="unknown scan backend"):
        selective_scan(*args, backend="cuda-magic")
    with pytest.raises(BackendUnavailableError), use_backend("nope"):
        pass


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: {**a, "delta": a["delta"][..., :-1]}, "delta must have the shape of u"),
        (lambda a: {**a, "A": a["A"][:2]}, "A must be"),
        (lambda a: {**a, "B": a["B"][:1]}, "B must be"),
        (lambda a: {**a, "C": a["C"][..., :-1]}, "C must be"),
        (lambda a: {**a, "D": a["D"][:2]}, "D must be"),
        (lambda a: {**a, "z": a["z"][:, :2]}, "z must be"),
        (lambda a: {**a, "A": a["A"].to(torch.complex64)}, "complex"),
        (lambda a: {**a, "u": a["u"].long(), "delta": a["delta"].long()}, "floating-point"),
    ],
    ids=["delta", "A", "B", "C", "D", "z", "complex", "int"],
)
def test_bad_arguments_name_themselves(mutate, message):
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    args = dict(zip(names, (a.detach() for a in make_inputs((6,), 1, dtype=torch.float32)), strict=True))
    with pytest.raises(ScanInputError, match=message):
        selective_scan(**mutate(args))


def test_orders_must_match_the_input():
    args = make_inputs((4, 4), 2, dtype=torch.float32)
    with pytest.raises(ScanInputError, match="orders on axis 1"):
        selective_scan(*args, orders=(RASTER, REVERSED, REVERSED))
    with pytest.raises(ScanInputError, match="not a permutation"):
        selective_scan(*args, orders=(RASTER, SLICE))
    with pytest.raises(ScanInputError, match="non-empty"):
        selective_scan(*args, orders=())
    with pytest.raises(ScanInputError, match="merge"):
        selective_scan(*args, orders=(RASTER, ScanOrder(None, True)), merge="mean")


def test_softplus_matches_torch():
    # delta_bias is added before softplus, exactly as mamba_ssm does
    args = make_inputs((5,), 1)
    u, delta, A, B, C, D, z, bias = args
    explicit = F.softplus(delta + bias[:, None])
    a = selective_scan(u, delta, A, B, C, D, z, bias, backend="torch").out
    b = selective_scan(u, explicit, A, B, C, D, z, None, delta_softplus=False, backend="torch").out
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("K", [1, 3])
def test_canonical_views_of_a_known_signature_follow_each_calls_tensors(K):
    # the checks run once per signature (shapes, dtypes, devices); the views of a later call are of its own tensors,
    # with their own strides, and a new signature is checked again
    from medmamba.kernels import canonical

    orders = (RASTER,) * K
    g = generator(5)
    u, delta, A, B, C, D, z, bias = (a.detach() for a in make_inputs((4, 5), K, dtype=torch.float32, seed=5))
    constant = torch.randn(*A.shape, generator=g)  # constant B/C: broadcast over batch and space
    cases = [(u, delta, A, B, C, D, z, bias), (u, delta, A, constant, constant, None, None, None)]
    if K == 1:  # B, C without a group axis
        cases.append((u, delta, A, B[:, 0], C[:, 0], D, None, bias))
    for first in cases:
        # the same signature, other strides: the spatial axes transposed in memory
        second = [
            x.transpose(-1, -2).contiguous().transpose(-1, -2) if x is not None and x.ndim > 1 else x for x in first
        ]
        canonical.canonical_views(*first, orders)
        got = canonical.canonical_views(*second, orders)
        canonical._VIEWS.clear()
        want = canonical.canonical_views(*second, orders)
        for x, a, b in zip(second, got, want, strict=True):
            if x is None:
                assert a is None and b is None
                continue
            assert a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == x.data_ptr()
    with pytest.raises(ScanInputError, match="z must be"):
        canonical.canonical_views(u, delta, A, B, C, D, z[:, :2], bias, orders)
    # selective_scan's memo of grad calls takes its views from view_maker: the same views, or None where the
    # arguments already are canonical (several orders with per-order B and C)
    for first in cases:
        make = canonical.view_maker(*first, orders)
        want = canonical.canonical_views(*first, orders)
        if make is None:
            assert all(a is b for a, b in zip(first, want, strict=True)) and K == 3 and first[3] is B
            continue
        for x, a, b in zip(first, make(*first), want, strict=True):
            assert (a is None and b is None) or (a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() ==
                                                 x.data_ptr())  # fmt: skip
    with pytest.raises(ScanInputError, match="z must be"):
        canonical.view_maker(u, delta, A, B, C, D, z[:, :2], bias, orders)

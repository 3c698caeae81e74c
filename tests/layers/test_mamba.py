from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmamba.kernels import RASTER, REVERSED, SLICE, TEMPORAL, order_indices, use_backend
from medmamba.layers import MambaLayer


def param_formula(d_model, K, d_state=16, d_conv=4, expand=2, norm=True):
    """networks.md §2.2: 3·E·d² + k·D_in·(K + 2R + 3N + 3), plus 2·d for the LayerNorm."""
    d_inner, R = expand * d_model, math.ceil(d_model / 16)
    return 3 * expand * d_model**2 + K * d_inner * (d_conv + 2 * R + 3 * d_state + 3) + (2 * d_model if norm else 0)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_the_measured_segmamba_layer():
    layer = MambaLayer(384, orders=(RASTER, REVERSED, SLICE))
    assert n_params(layer) == 1_122_816  # networks.md §2.2, measured on SegMamba's official layer


@pytest.mark.parametrize(("d_model", "K", "norm"), [(32, 1, True), (48, 3, False), (100, 2, True), (17, 6, True)])
def test_parameter_count_matches_the_formula(d_model, K, norm):
    orders = (RASTER, REVERSED, SLICE, TEMPORAL, RASTER, REVERSED)[:K]
    assert n_params(MambaLayer(d_model, orders=orders, norm=norm)) == param_formula(d_model, K, norm=norm)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    layer = MambaLayer(64, orders=(RASTER, REVERSED), d_state=8, dt_min=0.002, dt_max=0.05)
    assert torch.equal(layer.A_log, torch.log(torch.arange(1, 9.0)).expand(2, 128, 8))
    assert torch.equal(layer.D, torch.ones(2, 128))
    assert layer.A_log.dtype == torch.float32 and layer.A_log._no_weight_decay and layer.D._no_weight_decay
    dt = F.softplus(layer.dt_proj_bias)  # the bias is softplus⁻¹ of a log-uniform dt
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # spread over the log range, not constant
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj_weight.abs().max() <= bound and layer.dt_proj_weight.abs().max() > 0.8 * bound


def test_construction_is_deterministic_under_a_seed():
    torch.manual_seed(3)
    a = MambaLayer(16, orders=(RASTER, SLICE)).state_dict()
    torch.manual_seed(3)
    b = MambaLayer(16, orders=(RASTER, SLICE)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def mamba_block_reference(layer, x, k):
    """mamba_ssm's Mamba forward (networks.md §2.3) for order k, written out with plain tensor ops on the
    order's token sequence; float64, sequential scan. Returns the gated y before out_proj, in natural layout."""
    order = layer.orders[k]
    spatial = x.shape[2:]
    idx = order_indices(order, spatial)
    tokens = layer.norm(x.flatten(2).transpose(1, 2))[:, idx]  # (B, L, C) in visiting order
    xz = layer.in_proj(tokens)
    xs, z = xz.chunk(2, dim=-1)  # (B, L, d_inner)
    conv = F.conv1d(
        xs.transpose(1, 2), layer.conv_weight[k].unsqueeze(1), layer.conv_bias[k], padding=layer.d_conv - 1,
        groups=layer.d_inner,
    )[..., : xs.shape[1]]  # fmt: skip
    u = F.silu(conv).transpose(1, 2)  # (B, L, d_inner)
    dt_low, Bm, Cm = (u @ layer.x_proj_weight[k].T).split((layer.dt_rank, layer.d_state, layer.d_state), dim=-1)
    delta = F.softplus(dt_low @ layer.dt_proj_weight[k].T + layer.dt_proj_bias[k])
    A = -torch.exp(layer.A_log[k])
    h = torch.zeros(x.shape[0], layer.d_inner, layer.d_state, dtype=x.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + layer.D[k] * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)  # (B, L, d_inner), visiting order
    natural = torch.empty_like(y)
    natural[:, idx] = y
    return natural


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    ("orders", "spatial", "merge"),
    [
        ((RASTER,), (9,), "sum"),
        ((RASTER, REVERSED, SLICE), (3, 4, 5), "sum"),
        ((RASTER, REVERSED, TEMPORAL), (2, 3, 3), "mean"),
    ],
    ids=["1d-umamba", "3d-segmamba", "video-vivim"],
)
def test_layer_equals_mamba_ssm_block_written_out(backend, orders, spatial, merge):
    torch.manual_seed(0)
    layer = MambaLayer(8, orders=orders, d_state=4, merge=merge, residual=True).double()
    with torch.no_grad():  # non-default values everywhere so that every parameter matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    with use_backend(backend), torch.no_grad():
        got = layer(x)
        y = sum(mamba_block_reference(layer, x, k) for k in range(len(orders)))
        if merge == "mean":
            y = y / len(orders)
        expected = x + layer.out_proj(y).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d_model", [8, 48])  # dt_rank 1 and 3: the padded dt_proj (MambaLayer._dt_proj)
def test_layer_gradients_equal_the_written_out_block(d_model):
    torch.manual_seed(2)
    orders = (RASTER, REVERSED, SLICE)
    layer = MambaLayer(d_model, orders=orders, d_state=4, residual=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, d_model, 2, 3, 3, dtype=torch.float64)
    weights = torch.randn_like(x)
    params = list(layer.parameters())
    with use_backend("torch"):
        got = torch.autograd.grad((layer(x) * weights).sum(), params)
    y = sum(mamba_block_reference(layer, x, k) for k in range(len(orders)))
    expected_out = x + layer.out_proj(y).transpose(1, 2).reshape(x.shape)
    expected = torch.autograd.grad((expected_out * weights).sum(), params)
    for name, g, e in zip([n for n, _ in layer.named_parameters()], got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(("order", "later"), [(RASTER, "after"), (REVERSED, "before"), (SLICE, "slice")])
def test_the_mixer_is_causal_along_its_scan_order(order, later):
    torch.manual_seed(1)
    layer = MambaLayer(8, orders=(order,), d_state=4).double()
    spatial = (3, 3, 4)
    x = torch.randn(1, 8, *spatial, dtype=torch.float64)
    poked = x.clone()
    target = (1, 1, 2)
    poked[(0, slice(None), *target)] += torch.randn(8, dtype=torch.float64)  # not constant: LayerNorm removes that
    with torch.no_grad():
        changed = (layer(poked) - layer(x)).abs().amax(dim=1)[0].flatten() > 1e-12
    visit = order_indices(order, spatial)
    step_of = torch.empty_like(visit)
    step_of[visit] = torch.arange(visit.numel())
    t0 = step_of[torch.tensor(target) @ torch.tensor([12, 4, 1])]
    assert changed[step_of >= t0].all(), "the poked voxel and every later one in the order must change"
    assert not changed[step_of < t0].any(), f"no voxel visited before the poked one may change ({later})"


def test_shapes_dtype_and_gradients_reach_every_parameter():
    layer = MambaLayer(12, orders=(RASTER, REVERSED, SLICE), residual=True)
    for spatial in [(7,), (5, 6), (3, 4, 5)]:
        x = torch.randn(2, 12, *spatial, requires_grad=True)
        orders_ok = len(spatial) == 3 or all(o.axes is None for o in layer.orders)
        if not orders_ok:
            continue
        out = layer(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        out.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_keeps_the_scan_in_fp32_and_trains_without_nans():
    torch.manual_seed(0)
    layer = MambaLayer(16, orders=(RASTER, REVERSED, SLICE), residual=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 16, 4, 4, 4) * 10  # large activations, as upstream's U-Mamba_Enc NaN reports
    target = torch.randn_like(x)
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            loss = F.mse_loss(out.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_bf16_autocast_feeds_the_scan_output_to_out_proj_without_an_fp32_round_trip():
    # LayerNorm's output is fp32 under autocast; casting the bf16 scan output up to it, for the matmul to cast it
    # back down, gave the same values for two full-size copies each way
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layer = MambaLayer(16, orders=(RASTER, REVERSED, SLICE), residual=True, ssm_fp32=False)
    x = torch.randn(2, 16, 4, 4, 6)
    d_inner_map = [2, layer.d_inner, 96]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] ==
             d_inner_map]  # fmt: skip
    assert casts == []
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_channel_linears_copy_no_feature_map_forward_or_backward():
    # in_proj and out_proj on channels-first maps are batched GEMMs against the broadcast weight: torch.matmul
    # folded the batch into one GEMM through transposed copies of the input and the output, each way
    from medmamba.layers.token_linear import channel_linear
    from tests.helpers import OpOutputs

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 48, bias=False).double()
    x = torch.randn(2, 16, 300, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 48, 300, dtype=torch.float64)
    with OpOutputs((torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy)) as copies:
        out = channel_linear(linear, x)
        out.backward(gy)
    # the weight's own copies (48 × 16 per batch) at most
    assert max((math.prod(shape) for shape in copies.shapes), default=0) < x.numel()
    torch.testing.assert_close(out, torch.einsum("oc,bcl->bol", linear.weight, x))
    torch.testing.assert_close(linear.weight.grad, torch.einsum("bol,bcl->oc", gy, x))
    torch.testing.assert_close(x.grad, torch.einsum("oc,bol->bcl", linear.weight, gy))


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="expects"):
        MambaLayer(8)(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="merge"):
        MambaLayer(8, merge="max")
    with pytest.raises(ValueError, match="orders"):
        MambaLayer(8, orders=())


def test_in_proj_halves_gradients_are_joined_as_3d_maps():
    # autograd's backward of chunk joins x's and z's gradients with cat; CUDA's batched cat kernel takes at most 4
    # dimensions and a 5-D join fell back to two strided copies of the map (0.49 against 0.19 ms per SegMamba
    # mixer-pair step on an H200): the layer chunks in_proj's output while it is (B, 2·d_inner, L)
    from tests.helpers import OpOutputs

    torch.manual_seed(0)
    layer = MambaLayer(8, d_state=4, residual=True)
    x = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    with OpOutputs((torch.ops.aten.cat,)) as cats:
        layer(x).square().sum().backward()
    joins = [shape for shape in cats.shapes if math.prod(shape) == 2 * 2 * layer.d_inner * 60]
    assert joins == [(2, 2 * layer.d_inner, 60)]

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmamba import networks
from medmamba.networks.mambamorph import MambaMorph, MambaMorphFeat, RegistrationOutput, sinusoidal_position_3d

TINY = {"embed_dim": 12, "reg_head_channels": 4}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def pair(size, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *size, generator=g), torch.rand(batch, 1, *size, generator=g)


# ---- an independent parameter count, written from networks.md §6.2-6.4 block by block ----------------------------


def conv(cin, cout, k=3, bias=True):
    return cin * cout * k**3 + (cout if bias else 0)


def mamba(d, d_state=16, d_conv=4, expand=2):
    """LayerNorm(d) + one-direction Mamba (networks.md §2.2)."""
    d_inner, R = expand * d, math.ceil(d / 16)
    return 2 * d + 3 * expand * d * d + d_inner * (d_conv + 2 * R + 3 * d_state + 3)


def mambamorph_formula(pair_channels=2, E=96, R=16):
    backbone = conv(pair_channels, E, 4) + 2 * E  # patch embedding + its norm
    backbone += sum(mamba(E * 2**i) + 2 * E * 2**i for i in range(3))  # stages + out norms
    backbone += sum(2 * 8 * E * 2**i + 8 * E * 2**i * 2 * E * 2**i for i in range(2))  # merges: LN(8C) + 8C→2C
    c3 = lambda cin, cout: conv(cin, cout, 3, bias=False)  # noqa: E731 - Conv3dReLU, instance norm without affine
    up = lambda cin, skip, cout: c3(cin + skip, cout) + c3(cout, cout)  # noqa: E731
    decoder = c3(pair_channels, E // 2) + c3(pair_channels, R)
    decoder += up(4 * E, 2 * E, 2 * E) + up(2 * E, E, E) + up(E, E // 2, E // 2) + up(E // 2, R, R)
    return backbone + decoder + conv(R, 3)


def test_mambamorph_param_count_matches_official():
    with torch.device("meta"):
        net = MambaMorph()
    count = n_params(net)
    print(f"MambaMorph: {count:,} parameters")
    assert count == 7_305_459
    assert count == mambamorph_formula()
    assert round(count / 1e6, 2) == 7.31  # networks.md §6.5
    assert round(n_params(net.backbone) / 1e6, 2) == 2.04
    assert round(n_params(net.backbone.stages) / 1e6, 2) == 1.28
    assert round(n_params(net.decoder.up_blocks[0]) / 1e6, 2) == 3.98
    assert round(n_params(net.decoder.up_blocks[1]) / 1e6, 2) == 1.00


def test_mambamorph_feat_param_count_matches_official():
    with torch.device("meta"):
        net = MambaMorphFeat()
    count = n_params(net)
    print(f"MambaMorphFeat: {count:,} parameters")
    assert count == 7_594_646
    unet = conv(1, 16) + conv(16, 16) + conv(16, 16) + conv(32, 16) + conv(32, 16) + conv(16, 16)
    read_out = conv(16, 8) + conv(8, 3)
    assert count == mambamorph_formula(pair_channels=32) + unet + read_out
    assert round(count / 1e6, 2) == 7.59
    assert round(n_params(net.feature_extractor) / 1e6, 3) == 0.049
    assert round(n_params(net.read_out) / 1e6, 3) == 0.004


@pytest.mark.parametrize("cls", [MambaMorph, MambaMorphFeat])
@pytest.mark.parametrize("size", [(16, 16, 16), (20, 24, 28), (17, 33, 15)], ids=str)
def test_mambamorph_outputs_warped_image_and_displacement_at_any_size(cls, size):
    torch.manual_seed(0)
    extra = {"feature_channels": 4} if cls is MambaMorphFeat else {}
    net = cls(3, 1, 3, **TINY, **extra)
    moving, fixed = pair(size, batch=2)
    out = net(moving, fixed)
    assert isinstance(out, RegistrationOutput)
    warped, ddf = out
    assert warped.shape == (2, 1, *size) and ddf.shape == (2, 3, *size)
    assert torch.isfinite(warped).all() and torch.isfinite(ddf).all()


def test_mambamorph_pads_to_the_stride_and_crops_back():
    torch.manual_seed(0)
    net = MambaMorph(3, 1, 3, **TINY).eval()
    moving, fixed = pair((20, 24, 28))
    padded = [F.pad(x, (0, 4, 0, 8, 0, 12)) for x in (moving, fixed)]  # to 32³, at the end of each axis
    with torch.no_grad():
        velocity = net.predict_velocity(moving, fixed)
        reference = net.predict_velocity(*padded)[..., :20, :24, :28]
    torch.testing.assert_close(velocity, reference)


def test_mambamorph_zero_velocity_is_the_identity_warp():
    torch.manual_seed(0)
    net = MambaMorph(3, 1, 3, **TINY)
    torch.nn.init.zeros_(net.head.weight)
    moving, fixed = pair((16, 20, 24))
    warped, ddf = net(moving, fixed)
    assert torch.equal(ddf, torch.zeros_like(ddf))
    torch.testing.assert_close(warped, moving, rtol=0, atol=1e-5)  # grid normalisation rounds in float32


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mambamorph_displacement_channel_i_moves_along_array_axis_i(axis):
    net = MambaMorph(3, 1, 3, **TINY)
    image = torch.rand(1, 1, 8, 10, 12, generator=torch.Generator().manual_seed(0))
    ddf = torch.zeros(1, 3, 8, 10, 12)
    ddf[:, axis] = 1.0  # warped[x] = image[x + e_axis]
    warped = net.warp_image(image, ddf)
    n = image.shape[2 + axis]
    torch.testing.assert_close(warped.narrow(2 + axis, 0, n - 1), image.narrow(2 + axis, 1, n - 1), rtol=0, atol=1e-5)


def test_mambamorph_warps_integer_label_maps_with_nearest_neighbours():
    net = MambaMorph(3, 1, 3, **TINY)
    labels = torch.randint(0, 5, (1, 1, 8, 10, 12), generator=torch.Generator().manual_seed(0))
    ddf = torch.zeros(1, 3, 8, 10, 12)
    ddf[:, 0] = -2.0  # warped[d] = labels[d - 2]
    ddf[:, 2] = 0.4  # rounds to no move along W
    warped = net.warp_image(labels, ddf, mode="nearest")
    assert warped.dtype == labels.dtype
    assert torch.equal(warped[:, :, 2:], labels[:, :, :-2])
    with pytest.raises(ValueError, match="mode"):
        net.warp_image(labels, ddf, mode="bicubic")


def test_mambamorph_integrates_a_constant_velocity_into_the_same_translation():
    net = MambaMorph(3, 1, 3, **TINY)
    velocity = torch.zeros(1, 3, 6, 20, 6)
    velocity[:, 1] = 0.75
    ddf = net.integrate_velocity(velocity)
    # scaling and squaring (2^-7 v, then 7 self-compositions) of a constant field is the same translation; each
    # composition samples one voxel further along +H, so the zero padding reaches 7 voxels in from the far end
    torch.testing.assert_close(ddf[:, :, :, :12], velocity[:, :, :, :12], rtol=0, atol=1e-5)
    assert (ddf[:, 1, :, -1] < 0.75).all()  # ... and only there


def test_mambamorph_sinusoidal_position_code():
    code = sinusoidal_position_3d((2, 3, 4), 96, torch.empty(0))
    assert code.shape == (96, 2, 3, 4)
    c = 32  # 2·ceil(96 / 6) channels per axis: sin then cos of 16 frequencies 10000^(-2k/32)
    freq = 10000 ** (-torch.arange(0, c, 2) / c)
    torch.testing.assert_close(code[:16, 1, 0, 0], torch.sin(freq))
    torch.testing.assert_close(code[16:32, 1, 2, 3], torch.cos(freq))
    torch.testing.assert_close(code[32 + 16 : 64, 0, 2, 0], torch.cos(2 * freq))  # H axis, position 2
    torch.testing.assert_close(code[64:80, 1, 1, 3], torch.sin(3 * freq))  # W axis, position 3
    assert sinusoidal_position_3d((2, 2, 2), 10, torch.empty(0)).shape == (10, 2, 2, 2)  # cut to the channels


def test_mambamorph_feat_embeddings():
    torch.manual_seed(0)
    net = MambaMorphFeat(3, 1, 3, **TINY, feature_channels=4)
    assert net.embed(torch.rand(2, 1, 16, 18, 20)).shape == (2, 3, 8, 9, 10)


def test_mambamorph_rejects_bad_inputs_and_arguments():
    net = MambaMorph(3, 1, 3, **TINY)
    with pytest.raises(ValueError, match="one shape"):
        net(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match=r"moving as \(B, 1, D, H, W\)"):
        net(torch.rand(1, 2, 16, 16, 16), torch.rand(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="out_channels"):
        MambaMorph(3, 1, 2)
    with pytest.raises(ValueError, match="spatial_dims must be 3"):
        MambaMorph(2, 1, 2)
    with pytest.raises(ValueError, match="warp_padding_mode"):
        MambaMorph(warp_padding_mode="wrap")


@pytest.mark.parametrize("cls", [MambaMorph, MambaMorphFeat])
def test_mambamorph_gradients_reach_every_parameter(cls):
    torch.manual_seed(0)
    extra = {"feature_channels": 4} if cls is MambaMorphFeat else {}
    net = cls(3, 1, 3, **TINY, **extra)
    moving, fixed = pair((16, 16, 20), batch=2)
    warped, ddf = net(moving, fixed)
    loss = (warped - fixed).square().mean() + ddf.square().mean()
    if cls is MambaMorphFeat:
        loss = loss + net.embed(moving).square().mean()  # the contrastive branch
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not name.endswith("bias"):
            assert p.grad.abs().max() > 0, name


def test_mambamorph_construction_is_deterministic_under_a_seed():
    def state(seed):
        torch.manual_seed(seed)
        return MambaMorphFeat(3, 1, 3, **TINY, feature_channels=4).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("cls", [MambaMorph, MambaMorphFeat])
def test_mambamorph_learns_to_register_a_shifted_pair(cls):
    torch.manual_seed(0)
    extra = {"feature_channels": 4} if cls is MambaMorphFeat else {}
    net = cls(3, 1, 3, **TINY, **extra)
    blob = F.interpolate(torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), size=(16, 16, 16))
    moving, fixed = blob, torch.roll(blob, shifts=1, dims=4)  # fixed is moving moved by one voxel along W
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = (net(moving, fixed).warped - fixed).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_mambamorph_under_bf16_autocast_is_finite():
    # 24³ is padded to 32³, so no convolution sees a side of 2 (PyTorch 2.14's oneDNN bf16 Conv3d weight gradient
    # reads uninitialised memory there on the CPU; see test_segmamba_under_bf16_autocast_is_finite)
    torch.manual_seed(0)
    net = MambaMorph(3, 1, 3, **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped, ddf = net(*pair((24, 24, 24)))
    (warped.float().square().mean() + ddf.float().square().mean()).backward()
    assert torch.isfinite(warped.float()).all() and torch.isfinite(ddf.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_mambamorph_is_registered():
    assert networks.list(task="registration") == ["mambamorph", "mambamorph_feat"]
    for name, cls in (("mambamorph", MambaMorph), ("mambamorph_feat", MambaMorphFeat)):
        spec = networks.spec(name)
        assert spec.cls is cls and spec.task == "registration" and spec.spatial_dims == (3,)
    assert isinstance(networks.build("mambamorph_feat", feature_channels=4, **TINY), MambaMorphFeat)

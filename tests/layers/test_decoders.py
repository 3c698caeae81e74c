from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmamba.layers.decoders import UNetDecoder, UpsampleConv

NORM = ("instance", {"affine": True, "eps": 1e-5})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def decoder(version, **kw):
    args = {
        "strides": ((1, 1, 1), (1, 2, 2), (2, 2, 2)),
        "kernel_sizes": ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        "blocks_per_stage": (2, 1),
        "conv_bias": True,
        "norm": NORM,
        "act": ACT,
        "version": version,
    }
    args.update(kw)
    return UNetDecoder(3, (4, 8, 16), 3, **args)


def skips():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 8, 4, 4, 4, generator=g),
            torch.randn(2, 16, 2, 2, 2, generator=g)]  # fmt: skip


@pytest.mark.parametrize("version", ["2024.03", "2024.01"])
def test_heads_are_always_built_and_deep_supervision_switches_the_output(version):
    dec = decoder(version)
    assert len(dec.heads) == 2 and dec.deep_supervision is False
    feats = skips()
    single = dec(feats)
    assert single.shape == (2, 3, 4, 8, 8)
    dec.deep_supervision = True
    outs = dec(feats)
    assert [o.shape for o in outs] == [(2, 3, 4, 8, 8), (2, 3, 4, 4, 4)]  # full resolution first
    torch.testing.assert_close(outs[0], single)
    keys = set(decoder(version, deep_supervision=True).state_dict())
    assert keys == set(dec.state_dict()) and not any(k.startswith("encoder") for k in keys)


def test_levels_take_the_skip_channels_and_kernels_of_the_stage_they_return_to():
    dec = decoder("2024.03")
    assert dec.stages[0][0].conv1.in_channels == 16 and dec.stages[0][0].conv1.kernel_size == (3, 3, 3)
    assert dec.stages[1][0].conv1.in_channels == 8 and dec.stages[1][0].conv1.kernel_size == (1, 3, 3)
    no_first = decoder("2024.03", concat_first_skip=False)
    assert no_first.concat == [True, False] and no_first.stages[1][0].conv1.in_channels == 4
    assert no_first(skips()).shape == (2, 3, 4, 8, 8)


def test_upsample_nearest_then_1x1_conv_and_transposed():
    torch.manual_seed(0)
    up = UpsampleConv(3, 4, 2, scale=(1, 2, 2), mode="nearest").double()
    x = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    expected = F.conv3d(x.repeat_interleave(2, 3).repeat_interleave(2, 4), up.conv.weight, up.conv.bias)
    torch.testing.assert_close(up(x), expected)
    tr = UpsampleConv(3, 4, 2, scale=(1, 2, 2), mode="transposed", bias=False)
    assert tr.conv.kernel_size == tr.conv.stride == (1, 2, 2) and tr.conv.bias is None
    assert tr(x.float()).shape == (1, 2, 2, 6, 6)


def test_inconsistent_settings_are_rejected():
    with pytest.raises(ValueError, match="one block count per level"):
        decoder("2024.03", blocks_per_stage=(2,))

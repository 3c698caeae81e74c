from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from torch import nn

from medmamba.layers.residual import BasicResBlock, conv_norm_act, he_init_, residual_stage, zero_init_last_norm_

NORM = ("instance", {"affine": True, "eps": 1e-5})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_basic_res_block_matches_its_definition():
    torch.manual_seed(0)
    block = BasicResBlock(3, 4, 8, kernel_size=(1, 3, 3), stride=(1, 2, 2), norm=NORM, act=ACT).double()
    with torch.no_grad():  # give the affine norms non-trivial values
        for m in (block.norm1, block.norm2):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 3, 6, 8, dtype=torch.float64)

    def inorm(t, m):
        return F.instance_norm(t, weight=m.weight, bias=m.bias, eps=1e-5)

    y = F.conv3d(x, block.conv1.weight, block.conv1.bias, stride=(1, 2, 2), padding=(0, 1, 1))
    y = F.leaky_relu(inorm(y, block.norm1), 0.01)
    y = inorm(F.conv3d(y, block.conv2.weight, block.conv2.bias, padding=(0, 1, 1)), block.norm2)
    skip = F.conv3d(x, block.skip.weight, block.skip.bias, stride=(1, 2, 2))
    expected = F.leaky_relu(y + skip, 0.01)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    assert block(x).shape == (2, 8, 3, 3, 4)
    # every conv has a bias (upstream ignores conv_bias here): 4·8·9+8 + 8·8·9+8 + 4·8+8 + 2 norms · 16
    assert n_params(block) == 4 * 8 * 9 + 8 + 8 * 8 * 9 + 8 + 4 * 8 + 8 + 32


@pytest.mark.parametrize("version", ["2024.03", "2024.01"])
def test_residual_stage_blocks_per_version(version):
    stage = residual_stage(
        2, 4, 8, n_blocks=3, kernel_size=3, stride=2, conv_bias=True, norm=NORM, act=ACT, version=version
    )
    if version == "2024.03":
        assert isinstance(stage, nn.Sequential) and isinstance(stage[0], BasicResBlock)
        assert all(isinstance(b, BasicBlockD) for b in stage[1:]) and len(stage) == 3
    else:
        assert isinstance(stage, StackedResidualBlocks) and len(stage.blocks) == 3
        first = stage.blocks[0]  # ResNet-D skip: avg-pool by the stride, then 1×1 conv (no bias) + norm
        assert isinstance(first.skip[0], nn.AvgPool2d) and first.skip[1].conv.bias is None
    assert stage(torch.randn(1, 4, 8, 12)).shape == (1, 8, 4, 6)


def test_norm_and_act_come_from_monai_names():
    stage = residual_stage(
        3, 4, 8, n_blocks=2, kernel_size=3, stride=1, conv_bias=False,
        norm=("group", {"num_groups": 2}), act="relu", version="2024.03",
    )  # fmt: skip
    assert isinstance(stage[0].norm1, nn.GroupNorm) and stage[0].norm1.num_groups == 2
    assert isinstance(stage[1].conv1.norm, nn.GroupNorm) and isinstance(stage[1].nonlin2, nn.ReLU)
    assert stage[1].conv1.conv.bias is None  # conv_bias=False reaches the BasicBlockD convolutions


def test_paper_era_stem_is_one_conv_norm_act():
    stem = conv_norm_act(3, 1, 8, kernel_size=(1, 3, 3), conv_bias=True, norm=NORM, act=ACT)
    assert n_params(stem) == 1 * 8 * 9 + 8 + 16
    assert stem(torch.randn(1, 1, 2, 5, 5)).shape == (1, 8, 2, 5, 5)


def test_residual_stage_rejects_zero_blocks():
    with pytest.raises(ValueError, match="n_blocks must be >= 1"):
        residual_stage(2, 4, 4, n_blocks=0, kernel_size=3, stride=1, conv_bias=True, norm=NORM, act=ACT,
                       version="2024.03")  # fmt: skip


def test_he_init_is_nnunets():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(16, 32, 3), nn.ConvTranspose2d(8, 4, 2, 2), nn.InstanceNorm3d(4, affine=True))
    with torch.no_grad():
        net[2].weight.fill_(3.0)
    he_init_(net)
    conv = net[0]
    expected = math.sqrt(2 / (1 + 0.01**2) / (16 * 27))  # kaiming_normal_(a=0.01), fan_in
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    assert torch.count_nonzero(conv.bias) == 0 and torch.count_nonzero(net[1].bias) == 0
    assert torch.all(net[2].weight == 3.0)  # norms untouched


def test_zero_init_last_norm_makes_each_basic_block_d_its_skip():
    torch.manual_seed(0)
    stage = residual_stage(2, 4, 4, n_blocks=2, kernel_size=3, stride=1, conv_bias=True, norm=NORM, act="relu",
                           version="2024.01")  # fmt: skip
    zero_init_last_norm_(stage)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(stage(x), torch.relu(torch.relu(x)))  # relu(0 + x), twice

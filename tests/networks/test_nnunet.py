"""nnU-Net's network contract (plans-and-pipeline.md §2.9-2.10), exercised through nnunetv2's own code."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from medmamba.networks import nnunet, segmamba, umamba
from medmamba.networks.nnunet import from_nnunet_kwargs

REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def resenc_arch_kwargs(dims, n_stages=4, **extra):
    """An ``arch_kwargs`` block as nnU-Net's planners write it (JSON types: lists, dotted class names)."""
    strides = [[1] * dims] + [[2] * dims] * (n_stages - 1)
    if dims == 3:
        strides[1] = [1, 2, 2]  # anisotropic first pooling, as nnU-Net plans for thick slices
    return {
        "n_stages": n_stages,
        "features_per_stage": [4, 8, 16, 16, 16][:n_stages],
        "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
        "kernel_sizes": [[3] * dims] * n_stages,
        "strides": strides,
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        **extra,
    }


PATCH = {2: (16, 24), 3: (8, 16, 24)}
CASES = [
    (name, dims, version)
    for name in ("UMambaBot", "UMambaEnc")
    for dims in (2, 3)
    for version in ("2024.03", "2024.01")
]
IDS = [f"{n}-{d}d-{v}" for n, d, v in CASES]


def arch_for(name, dims, version):
    extra = {"version": version}
    if name == "UMambaEnc":
        extra["input_size"] = list(PATCH[dims])  # plans/architectures.py writes the configuration's patch here
    return resenc_arch_kwargs(dims, **extra)


def build_from_plans(name, arch, in_ch=2, out_ch=3, deep_supervision=True):
    return get_network_from_plans(
        f"medmamba.networks.nnunet.{name}", arch, REQ_IMPORT, in_ch, out_ch, allow_init=True,
        deep_supervision=deep_supervision,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "dims", "version"), CASES, ids=IDS)
def test_get_network_from_plans_builds_our_class_with_the_canonical_state_dict(name, dims, version):
    arch = arch_for(name, dims, version)
    torch.manual_seed(0)
    net = build_from_plans(name, arch)
    assert type(net) is getattr(nnunet, name) and isinstance(net, getattr(umamba, name))
    # the same network written in our vocabulary, with deep supervision on (heads built)
    canonical_kwargs = {
        "features_per_stage": (4, 8, 16, 16),
        "strides": arch["strides"],
        "kernel_sizes": 3,
        "blocks_per_stage": 2,
        "blocks_per_stage_decoder": 2,
        "norm": ("instance", {"eps": 1e-5, "affine": True}),
        "act": ("leakyrelu", {"inplace": True}),
        "version": version,
    }
    if name == "UMambaEnc":
        canonical_kwargs["input_size"] = PATCH[dims]
    torch.manual_seed(0)
    canonical = getattr(umamba, name)(dims, 2, 3, deep_supervision=True, **canonical_kwargs)
    ours, theirs = net.state_dict(), canonical.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(("name", "dims", "version"), CASES, ids=IDS)
def test_deep_supervision_outputs_match_nnunet_scales_and_toggle(name, dims, version):
    arch = arch_for(name, dims, version)
    torch.manual_seed(0)
    net = build_from_plans(name, arch, deep_supervision=True)
    x = torch.randn(1, 2, *PATCH[dims])
    with torch.no_grad():
        outs = net(x)
        # nnUNetTrainer._get_deep_supervision_scales: 1 / cumprod(strides), last row dropped; targets are resized
        # to round(size · scale), and the loss zips outputs with targets (a length mismatch would be silent)
        scales = 1 / np.cumprod(np.vstack(arch["strides"]), axis=0)[:-1]
        assert isinstance(outs, list) and len(outs) == len(scales) == len(arch["strides"]) - 1
        for out, scale in zip(outs, scales, strict=True):
            assert out.shape == (1, 3, *(round(s * f) for s, f in zip(PATCH[dims], scale, strict=True)))
        net.decoder.deep_supervision = False  # what the trainer does for its final validation
        single = net(x)
        assert isinstance(single, torch.Tensor)
        torch.testing.assert_close(single, outs[0])
        # inference rebuilds the net with deep supervision off and loads the training state_dict strictly
        plain = build_from_plans(name, arch, deep_supervision=False)
        assert plain.decoder.deep_supervision is False
        plain.load_state_dict(net.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), outs[0])


def test_nnunet_deep_supervision_loss_trains_the_network():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    arch = arch_for("UMambaBot", 3, "2024.03")
    torch.manual_seed(0)
    net = build_from_plans("UMambaBot", arch, in_ch=1, out_ch=2)
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 1, *PATCH[3])
    target[:, :, 2:6, 4:12, 6:18] = 1
    x = target * 2 + torch.randn(target.shape, generator=g)
    scales = 1 / np.cumprod(np.vstack(arch["strides"]), axis=0)[:-1]
    targets = [
        torch.nn.functional.interpolate(target, size=[round(s * f) for s, f in zip(PATCH[3], sc, strict=True)],
                                        mode="nearest-exact")
        for sc in scales
    ]  # fmt: skip
    weights = np.array([1 / 2**i for i in range(len(scales))])
    weights[-1] = 0
    loss_fn = DeepSupervisionWrapper(
        DC_and_CE_loss(
            {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1
        ),
        weights / weights.sum(),
    )  # nnU-Net's default loss, with its deep-supervision weights
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn(net(x), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses  # from ~2.0 (CE + Dice at chance) to below 0 (Dice dominates)


def test_mamba_initialisation_survives_get_network_from_plans():
    net = build_from_plans("UMambaBot", arch_for("UMambaBot", 3, "2024.03"))
    assert not hasattr(net, "initialize")  # nnU-Net would apply it to every submodule
    mamba = net.encoder.mixers[-1]
    torch.testing.assert_close(mamba.A_log, torch.log(torch.arange(1, 17.0)).expand_as(mamba.A_log))
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))


def test_translation_maps_nnunet_vocabulary_to_ours():
    arch = resenc_arch_kwargs(2, n_stages=3, version="2024.01", d_state=8)
    arch["nonlin"], arch["nonlin_kwargs"] = torch.nn.ReLU, None  # a class, as after pydoc.locate
    arch["norm_op"] = torch.nn.BatchNorm2d
    kwargs = from_nnunet_kwargs(arch, target=umamba.UMambaBot)
    assert kwargs == {
        "spatial_dims": 2,
        "norm": ("batch", {"eps": 1e-05, "affine": True}),
        "act": ("relu", {}),
        "features_per_stage": [4, 8, 16],
        "kernel_sizes": [[3, 3]] * 3,
        "strides": [[1, 1], [2, 2], [2, 2]],
        "blocks_per_stage": [2, 2, 2],
        "blocks_per_stage_decoder": [2, 2],
        "conv_bias": True,
        "version": "2024.01",
        "d_state": 8,
    }
    enc = from_nnunet_kwargs({**arch, "patch_size": [16, 16]}, target=umamba.UMambaEnc)
    assert enc["input_size"] == [16, 16]


def test_unknown_keys_and_dropout_are_tolerated_and_logged(caplog):
    arch = arch_for("UMambaBot", 2, "2024.03")
    arch.update(deep_supervision_scales=[1], dropout_op="torch.nn.Dropout2d", dropout_op_kwargs={"p": 0.1})
    with caplog.at_level(logging.WARNING, logger="medmamba.networks.nnunet"):
        net = build_from_plans("UMambaBot", arch)
    assert "ignores unknown arch_kwargs ['deep_supervision_scales']" in caplog.text
    assert "has no dropout" in caplog.text
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in net.modules())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_stages": 5}, "n_stages=5 but features_per_stage has 4 entries"),
        ({"conv_op": "torch.nn.modules.conv.Conv1d"}, "conv_op must be torch.nn.Conv2d or Conv3d"),
        ({"conv_op": "torch.nn.NoSuchConv"}, "cannot import 'torch.nn.NoSuchConv'"),
        ({"norm_op": "torch.nn.LayerNorm"}, "norm_op must be an InstanceNorm or BatchNorm class"),
        ({"nonlin": "torch.nn.Softmax2d"}, "nonlin must be a torch.nn activation MONAI knows"),
    ],
    ids=["n_stages", "conv1d", "missing-class", "layernorm", "softmax2d"],
)
def test_bad_arch_kwargs_raise_value_error(change, message):
    arch = {**arch_for("UMambaBot", 3, "2024.03"), **change}
    with pytest.raises(ValueError, match=message):
        from_nnunet_kwargs(arch, target=umamba.UMambaBot)
    with pytest.raises(ValueError, match="need conv_op"):
        from_nnunet_kwargs({"features_per_stage": [4, 8]}, target=umamba.UMambaBot)


# ---- SegMamba ------------------------------------------------------------------------------------------------------

SEG_ARCH = {  # what plans/architectures.py writes for the "fixed" topology
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "n_stages": 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "features_per_stage": [4, 8, 12, 16],
    "depths": [1, 1, 1, 1],
    "hidden_size": 16,
}


def test_segmamba_from_plans_has_the_canonical_state_dict_and_contract():
    torch.manual_seed(0)
    net = get_network_from_plans("medmamba.networks.nnunet.SegMamba", SEG_ARCH, ["conv_op"], 2, 3,
                                 deep_supervision=True)  # fmt: skip
    assert type(net) is nnunet.SegMamba
    torch.manual_seed(0)
    canonical = segmamba.SegMamba(
        3, 2, 3, features_per_stage=(4, 8, 12, 16), depths=(1, 1, 1, 1), hidden_size=16, deep_supervision=True
    )
    ours, theirs = net.state_dict(), canonical.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    patch = (16, 32, 48)
    x = torch.randn(1, 2, *patch)
    with torch.no_grad():
        outs = net(x)
        scales = 1 / np.cumprod(np.vstack(SEG_ARCH["strides"]), axis=0)[:-1]
        assert len(outs) == len(scales)
        for out, scale in zip(outs, scales, strict=True):
            assert out.shape == (1, 3, *(round(s * f) for s, f in zip(patch, scale, strict=True)))
        plain = get_network_from_plans("medmamba.networks.nnunet.SegMamba", SEG_ARCH, ["conv_op"], 2, 3,
                                       deep_supervision=False)  # fmt: skip
        plain.load_state_dict(net.state_dict(), strict=True)
        torch.testing.assert_close(plain(x), outs[0])


def test_segmamba_rejects_plans_strides_it_does_not_have():
    arch = {**SEG_ARCH, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}
    with pytest.raises(ValueError, match="disagree with SegMamba's fixed"):
        nnunet.SegMamba(1, 2, **arch)

from __future__ import annotations

import math

import pytest
import torch

from medmamba import networks
from medmamba.layers import MambaLayer
from medmamba.layers.tokens import ChannelTokenMamba
from medmamba.networks.umamba import UMambaBot, UMambaEnc

VERSIONS = ("2024.03", "2024.01")

# networks.md §3.5 configurations (1 → 14 classes unless noted)
CFG_3D6 = {
    "features_per_stage": (32, 64, 128, 256, 320, 320),
    "strides": (1, (1, 2, 2), 2, 2, 2, (1, 2, 2)),
    "kernel_sizes": ((1, 3, 3), 3, 3, 3, 3, 3),
}
CFG_2D7 = {"features_per_stage": (32, 64, 128, 256, 512, 512, 512), "strides": (1, 2, 2, 2, 2, 2, 2)}
CFG_2D8 = {"features_per_stage": (32, 64, 128, 256, 512, 512, 512, 512), "strides": (1, 2, 2, 2, 2, 2, 2, 2)}

# (class, version, dims, in, out, config, input_size, exact count, networks.md §3.5 figure in M)
PARAM_CASES = [
    (UMambaBot, "2024.03", 3, 1, 14, CFG_3D6, None, 41_945_158, 41.95),
    (UMambaEnc, "2024.03", 3, 1, 14, CFG_3D6, (48, 192, 192), 42_859_142, 42.86),
    (UMambaBot, "2024.01", 3, 1, 14, CFG_3D6, None, 57_832_166, 57.83),
    (UMambaEnc, "2024.01", 3, 1, 14, CFG_3D6, (48, 192, 192), 59_105_766, 59.11),
    (UMambaBot, "2024.03", 2, 1, 14, CFG_2D7, None, 47_533_012, 47.53),
    (UMambaEnc, "2024.03", 2, 1, 14, CFG_2D7, (320, 320), 47_015_538, 47.02),
    (UMambaBot, "2024.01", 2, 1, 14, CFG_2D7, None, 63_344_180, 63.34),
    (UMambaEnc, "2024.01", 2, 1, 14, CFG_2D7, (320, 320), 67_333_428, 67.33),
    (UMambaBot, "2024.03", 2, 3, 3, CFG_2D8, None, 64_797_301, 64.80),
    (UMambaEnc, "2024.03", 2, 3, 3, CFG_2D8, (512, 512), 64_014_261, 64.01),
    (UMambaBot, "2024.01", 2, 3, 3, CFG_2D8, None, 86_150_037, 86.15),
    (UMambaEnc, "2024.01", 2, 3, 3, CFG_2D8, (512, 512), 91_835_029, 91.84),
]


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def build(cls, dims, cin, cout, cfg, version, input_size=None, **kw):
    extra = {"input_size": input_size} if cls is UMambaEnc else {}
    return cls(dims, cin, cout, version=version, **extra, **cfg, **kw)


# ---- an independent parameter count, written from networks.md §3.2-3.4 block by block ----------------------------


def conv(cin, cout, k, bias):
    return cin * cout * math.prod(k) + (cout if bias else 0)


def mamba(d, d_state=16, d_conv=4, expand=2):
    """LayerNorm(d) + Mamba-1 (networks.md §2.2, one direction)."""
    d_inner, R = expand * d, math.ceil(d / 16)
    return 2 * d + 3 * expand * d * d + d_inner * (d_conv + 2 * R + 3 * d_state + 3)


def res_block(cin, cout, k):  # BasicResBlock: two k-convs with bias, 2 affine norms, 1×1 skip with bias
    return conv(cin, cout, k, True) + conv(cout, cout, k, True) + 4 * cout + conv(cin, cout, (1,), True)


def block_d(cin, cout, k, bias):  # BasicBlockD: two k-convs, 2 norms, skip 1×1 (no bias) + norm if channels change
    return conv(cin, cout, k, bias) + conv(cout, cout, k, bias) + 4 * cout + (cin * cout + 2 * cout) * (cin != cout)


def formula_count(kind, version, dims, cin, cout, cfg, input_size):
    feats, S = cfg["features_per_stage"], len(cfg["features_per_stage"])
    ks = cfg.get("kernel_sizes", 3)
    ks = [(k,) * dims if isinstance(k, int) else k for k in ([ks] * S if isinstance(ks, int) else ks)]
    strides = [(s,) * dims if isinstance(s, int) else s for s in cfg["strides"]]
    enc, dec = [2] * S, [2] * (S - 1)
    if version == "2024.03":
        enc = [2 if s < math.ceil(S / 2) else 1 for s in range(S)]
        dec = [2 if i < math.ceil((S - 1) / 2 + 0.5) else 1 for i in range(S - 1)]
    total = 0
    # stem
    if version == "2024.03":
        total += res_block(cin, feats[0], ks[0]) + (enc[0] - 1) * block_d(feats[0], feats[0], ks[0], True)
    else:
        total += conv(cin, feats[0], ks[0], True) + 2 * feats[0]
    # encoder stages
    prev = feats[0]
    for s in range(S):
        if version == "2024.03":
            total += res_block(prev, feats[s], ks[s]) + (enc[s] - 1) * block_d(feats[s], feats[s], ks[s], True)
        else:
            total += block_d(prev, feats[s], ks[s], True) + (enc[s] - 1) * block_d(feats[s], feats[s], ks[s], True)
        prev = feats[s]
    # Mamba layers
    if kind is UMambaBot:
        total += mamba(feats[-1])
    else:
        size = list(input_size)
        for s in range(S):
            size = [a // b for a, b in zip(size, strides[s], strict=True)]
            has = version == "2024.01" or dims == 3 or (bool(s % 2) ^ bool(S % 2))
            channel_token = version == "2024.03" and math.prod(size) <= feats[s]
            total += has * mamba(math.prod(size) if channel_token else feats[s])
    # decoder levels
    for i in range(S - 1):
        below, skip, k = feats[-(i + 1)], feats[-(i + 2)], ks[-(i + 2)]
        concat = not (version == "2024.03" and dims == 2 and i == S - 2)
        merged = 2 * skip if concat else skip
        if version == "2024.03":
            total += conv(below, skip, (1,), True)  # nearest + 1×1 conv
            total += res_block(merged, skip, k) + (dec[i] - 1) * block_d(skip, skip, k, True)
        else:
            total += conv(below, skip, strides[-(i + 1)], True)  # transposed conv, kernel = stride
            total += block_d(merged, skip, k, True) + (dec[i] - 1) * block_d(skip, skip, k, True)
        total += conv(skip, cout, (1,), True)  # head
    return total


@pytest.mark.parametrize(
    ("cls", "version", "dims", "cin", "cout", "cfg", "input_size", "exact", "spec_m"),
    PARAM_CASES,
    ids=[f"{c[0].__name__}-{c[1]}-{c[2]}d-{len(c[5]['features_per_stage'])}stages" for c in PARAM_CASES],
)
def test_umamba_param_count_matches_official(cls, version, dims, cin, cout, cfg, input_size, exact, spec_m):
    with torch.device("meta"):  # counting needs no memory
        net = build(cls, dims, cin, cout, cfg, version, input_size)
    count = n_params(net)
    print(f"{cls.__name__} {version} {dims}D {len(cfg['features_per_stage'])} stages: {count:,} parameters")
    assert count == exact
    assert count == formula_count(cls, version, dims, cin, cout, cfg, input_size)
    assert abs(count / 1e6 - spec_m) <= 0.005  # the spec's measured figure, to its rounding


def test_enc_3d_mamba_widths_follow_the_spec_example():
    # networks.md §3.3: patch 16×32×32, strides 1,(1,2,2),2,2 → maps 16×32×32 … 4×4×4; widths 32, 64, 128, 64 (channels)
    with torch.device("meta"):
        net = UMambaEnc(
            3, 1, 2, features_per_stage=(32, 64, 128, 256), strides=(1, (1, 2, 2), 2, 2), input_size=(16, 32, 32)
        )
    kinds = [type(m) for m in net.encoder.mixers]
    assert kinds == [MambaLayer, MambaLayer, MambaLayer, ChannelTokenMamba]
    assert [m.d_model for m in net.encoder.mixers[:3]] == [32, 64, 128]
    assert net.encoder.mixers[3].mamba.d_model == 64 and net.encoder.mixers[3].spatial_size == (4, 4, 4)


def test_enc_2d_current_places_mamba_on_alternate_stages_ending_at_the_bottleneck():
    for n_stages in (4, 5):
        feats = (8, 8, 16, 16, 16)[:n_stages]
        with torch.device("meta"):
            net = UMambaEnc(
                2, 1, 2, features_per_stage=feats, strides=(1,) + (2,) * (n_stages - 1), input_size=(64, 64)
            )
        has = [not isinstance(m, torch.nn.Identity) for m in net.encoder.mixers]
        assert has[-1] and all(has[s] != has[s + 1] for s in range(n_stages - 1))


def test_bot_has_one_spatial_mamba_on_the_bottleneck():
    with torch.device("meta"):
        net = UMambaBot(3, 1, 2, features_per_stage=(8, 16, 32), strides=(1, 2, 2))
    assert [type(m).__name__ for m in net.encoder.mixers] == ["Identity", "Identity", "MambaLayer"]
    assert net.encoder.mixers[-1].d_model == 32 and net.encoder.mixers[-1].residual is False


def test_current_code_caps_blocks_like_upstream():
    with torch.device("meta"):
        cur = UMambaBot(2, 1, 2, features_per_stage=(8,) * 6, strides=(1,) + (2,) * 5, version="2024.03")
        old = UMambaBot(2, 1, 2, features_per_stage=(8,) * 6, strides=(1,) + (2,) * 5, version="2024.01")
    assert cur.topology.blocks == (2, 2, 2, 1, 1, 1) and cur.topology.blocks_decoder == (2, 2, 2, 1, 1)
    assert old.topology.blocks == (2,) * 6 and old.topology.blocks_decoder == (2,) * 5
    assert [len(s) for s in cur.decoder.stages] == [2, 2, 2, 1, 1]


@pytest.mark.parametrize("version", VERSIONS)
def test_2d_current_drops_the_stage0_skip_unless_asked(version):
    kw = {"features_per_stage": (4, 8, 16), "strides": (1, 2, 2), "version": version}
    default, concat = UMambaBot(2, 1, 2, **kw), UMambaBot(2, 1, 2, concat_first_skip=True, **kw)
    expected = [True, version == "2024.01"]
    assert default.decoder.concat == expected and concat.decoder.concat == [True, True]
    assert n_params(concat) > n_params(default) or version == "2024.01"
    x = torch.randn(1, 1, 8, 8)
    assert default(x).shape == concat(x).shape == (1, 2, 8, 8)


# ---- forward behaviour on tiny inputs -----------------------------------------------------------------------------

TINY = {
    3: {"features_per_stage": (4, 8, 8, 16), "strides": (1, 2, (1, 2, 2), 2), "kernel_sizes": ((1, 3, 3), 3, 3, 3)},
    2: {"features_per_stage": (4, 8, 16, 16), "strides": (1, 2, 2, 2)},
}
TINY_SIZE = {3: (8, 16, 16), 2: (16, 16)}
VARIANTS = [(cls, v, d) for cls in (UMambaBot, UMambaEnc) for v in VERSIONS for d in (2, 3)]
VARIANT_IDS = [f"{c.__name__}-{v}-{d}d" for c, v, d in VARIANTS]


def tiny(cls, version, dims, cin=2, cout=3, **kw):
    return build(cls, dims, cin, cout, TINY[dims], version, TINY_SIZE[dims], **kw)


@pytest.mark.parametrize(("cls", "version", "dims"), VARIANTS, ids=VARIANT_IDS)
def test_output_shapes_with_and_without_deep_supervision(cls, version, dims):
    torch.manual_seed(0)
    net = tiny(cls, version, dims)
    size = TINY_SIZE[dims]
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        y = net(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 3, *size)
        net.decoder.deep_supervision = True
        ys = net(x)
    assert isinstance(ys, list) and len(ys) == len(TINY[dims]["strides"]) - 1
    stride = torch.ones(dims, dtype=torch.long)
    for j, out in enumerate(ys):  # item j at size / prod(strides[:j+1]), full resolution first
        s = TINY[dims]["strides"][j]
        stride *= torch.tensor((s,) * dims if isinstance(s, int) else s)
        assert out.shape == (2, 3, *(a // b for a, b in zip(size, stride.tolist(), strict=True)))
    torch.testing.assert_close(ys[0], y)  # the full-resolution head is the same head either way


@pytest.mark.parametrize(("cls", "version", "dims"), VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_every_parameter(cls, version, dims):
    torch.manual_seed(0)
    net = tiny(cls, version, dims, deep_supervision=True)
    x = torch.randn(2, 2, *TINY_SIZE[dims])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # paper-era Enc zero-inits each BasicBlockD's last norm (as upstream), which blocks its convs' gradients until
    # that norm has taken one step; so check after one step, for every variant alike
    for _ in range(2):
        opt.zero_grad()
        sum(o.square().mean() for o in net(x)).backward()
        opt.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize(
    ("cls", "dims", "size"),
    [(UMambaBot, 3, (12, 24, 40)), (UMambaBot, 2, (24, 40)), (UMambaEnc, 3, (20, 40, 24)), (UMambaEnc, 2, (40, 24))],
    ids=["bot-3d", "bot-2d", "enc-3d", "enc-2d"],
)
@pytest.mark.parametrize("version", VERSIONS)
def test_odd_but_valid_input_sizes(cls, dims, size, version):
    # total stride (4, 8, 8) in 3D, (8, 8) in 2D: sizes divisible by it, not powers of two, not cubes
    torch.manual_seed(0)
    net = build(cls, dims, 1, 2, TINY[dims], version, size)
    with torch.no_grad():
        assert net(torch.randn(1, 1, *size)).shape == (1, 2, *size)


@pytest.mark.parametrize("cls", [UMambaBot, UMambaEnc])
def test_input_not_divisible_by_the_total_stride_is_rejected(cls):
    net = build(cls, 3, 1, 2, TINY[3], "2024.01", (8, 16, 16))
    with pytest.raises(ValueError, match=r"not divisible by the total stride \(4, 8, 8\) along axes \[2\]"):
        net(torch.randn(1, 1, 8, 16, 12))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, 3 spatial axes\)"):
        net(torch.randn(1, 2, 8, 16, 16))


def test_channel_token_enc_rejects_another_patch_size():
    net = tiny(UMambaEnc, "2024.03", 3)
    assert isinstance(net.encoder.mixers[-1], ChannelTokenMamba)  # bottleneck 2×2×2 = 8 ≤ 16 channels
    with pytest.raises(ValueError, match=r"built for input_size \(8, 16, 16\)"):
        net(torch.randn(1, 2, 16, 16, 16))


def test_spatial_only_enc_is_not_tied_to_its_input_size():
    net = UMambaEnc(3, 1, 2, features_per_stage=(4, 8), strides=(1, 2), input_size=(8, 8, 8))
    assert net.input_size is None  # 4×4×4 = 64 > 8 channels: no channel-token stage
    with torch.no_grad():
        assert net(torch.randn(1, 1, 6, 10, 4)).shape == (1, 2, 6, 10, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"features_per_stage": (8,), "strides": (1,)}, "features_per_stage needs >= 2"),
        ({"strides": (1, 2)}, r"strides needs one entry per stage \(3\)"),
        ({"strides": (1, (2, 2), 2)}, "each entry of strides must be a positive int or 3 positive ints"),
        ({"kernel_sizes": (3, 4, 3)}, "kernel_sizes must be odd"),
        ({"blocks_per_stage": (2, 2)}, "blocks_per_stage needs 3 entries"),
        ({"blocks_per_stage_decoder": 0}, "blocks_per_stage_decoder needs 2 entries >= 1"),
        ({"version": "2025"}, "version must be '2024.03'"),
        ({"in_channels": 0}, "in_channels and out_channels must be >= 1"),
    ],
    ids=["dims", "one-stage", "strides-len", "strides-axes", "even-kernel", "blocks", "blocks-dec", "version", "chans"],
)
def test_bad_arguments_raise_value_error_naming_the_rule(kwargs, message):
    args = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "features_per_stage": (4, 8, 16),
        "strides": (1, 2, 2),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        UMambaBot(**args)


def test_current_enc_needs_input_size():
    with pytest.raises(ValueError, match="needs input_size"):
        UMambaEnc(3, 1, 2, features_per_stage=(4, 8), strides=(1, 2))
    with torch.device("meta"):
        UMambaEnc(3, 1, 2, features_per_stage=(4, 8), strides=(1, 2), version="2024.01")  # paper-era: not needed


@pytest.mark.parametrize(("cls", "version", "dims"), VARIANTS, ids=VARIANT_IDS)
def test_construction_is_deterministic_under_a_seed(cls, version, dims):
    torch.manual_seed(7)
    a = tiny(cls, version, dims).state_dict()
    torch.manual_seed(7)
    b = tiny(cls, version, dims).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(8)
    c = tiny(cls, version, dims).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_convolutions_get_he_init_and_mamba_keeps_its_own():
    torch.manual_seed(0)
    net = UMambaBot(3, 1, 2, features_per_stage=(16, 32, 64), strides=(1, 2, 2))
    conv = net.encoder.stages[1][0].conv1  # 16 → 32, 3×3×3: fan_in 432
    assert torch.count_nonzero(conv.bias) == 0
    expected_std = math.sqrt(2 / (1 + 0.01**2) / (16 * 27))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    mamba = net.encoder.mixers[-1]
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))  # not touched by the conv init
    assert not hasattr(net, "initialize")  # nnU-Net would re-init every submodule through it


# ---- learning and mixed precision ---------------------------------------------------------------------------------


def blob_batch(dims, batch=2, seed=1):
    """Images with one bright ball each (contrast 2 over unit noise) and its mask: a task a U-Net learns fast."""
    g = torch.Generator().manual_seed(seed)
    size = TINY_SIZE[dims]
    grid = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")
    masks = []
    for _ in range(batch):
        centre = [torch.randint(2, s - 2, (1,), generator=g).item() for s in size]
        masks.append(sum(((a - c) / (s / 3)) ** 2 for a, c, s in zip(grid, centre, size, strict=True)) < 1)
    mask = torch.stack(masks)
    return (2 * mask.float() + torch.randn(mask.shape, generator=g)).unsqueeze(1), mask.long()


@pytest.mark.parametrize(("cls", "version", "dims"), VARIANTS, ids=VARIANT_IDS)
def test_a_few_steps_on_one_batch_reduce_the_loss(cls, version, dims):
    torch.manual_seed(0)
    net = tiny(cls, version, dims, cin=1, cout=2)
    x, target = blob_batch(dims)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("cls", [UMambaBot, UMambaEnc])
@pytest.mark.parametrize("version", VERSIONS)
def test_trains_under_bf16_autocast_without_nans(cls, version):
    # Every 3D map keeps >= 3 voxels per axis: torch 2.14's CPU bf16 conv3d weight gradient reads uninitialised
    # memory when an axis is 2 and the kernel 3 (sporadic NaN, reproduced without medmamba). Bottleneck 3×3×3 with 32
    # channels: the current Enc scans it over channels.
    torch.manual_seed(0)
    cfg = {**TINY[3], "features_per_stage": (4, 8, 8, 32)}
    net = build(cls, 3, 1, 2, cfg, version, (12, 24, 24), deep_supervision=True)
    assert cls is UMambaBot or version == "2024.01" or isinstance(net.encoder.mixers[-1], ChannelTokenMamba)
    x = torch.randn(2, 1, 12, 24, 24) * 30  # large, unnormalised intensities
    target = (x[:, 0] > 0).long()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)  # nnU-Net's optimiser
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = net(x)
            loss = torch.nn.functional.cross_entropy(outs[0].float(), target)
        assert outs[0].dtype == torch.bfloat16  # autocast is really on for the convolutions
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ---- registry -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), [("umamba_bot", UMambaBot), ("umamba_enc", UMambaEnc)])
def test_registry_builds_umamba_by_name(name, cls):
    spec = networks.spec(name)
    assert spec.cls is cls and spec.task == "segmentation" and spec.spatial_dims == (2, 3)
    assert name in networks.list(task="segmentation", pattern="umamba_*")
    extra = {"input_size": (16, 16)} if cls is UMambaEnc else {}
    net = networks.build(name, spatial_dims=2, in_channels=1, out_channels=2, **TINY[2], **extra)
    assert type(net) is cls


@pytest.mark.parametrize("cls", [UMambaBot, UMambaEnc], ids=["bot", "enc"])
def test_ssm_fp32_reaches_every_mamba_layer_and_changes_no_parameter(cls):
    kwargs = {"features_per_stage": (4, 8, 16), "strides": (1, 2, 2)}
    if cls is UMambaEnc:  # 2×2×2 at the bottleneck: its layer scans over the channels
        kwargs["input_size"] = (8, 8, 8)
    kept, half = (cls(3, 1, 2, ssm_fp32=flag, **kwargs) for flag in (True, False))
    assert sum(p.numel() for p in kept.parameters()) == sum(p.numel() for p in half.parameters())
    layers = [m for m in half.modules() if isinstance(m, MambaLayer)]
    assert layers and not any(m.ssm_fp32 for m in layers)
    assert all(m.ssm_fp32 for m in kept.modules() if isinstance(m, MambaLayer))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half(torch.randn(1, 1, 8, 8, 8))
    assert torch.isfinite(out.float()).all()

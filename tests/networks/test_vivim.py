from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medmamba import networks
from medmamba.errors import CheckpointError
from medmamba.networks.vivim import Vivim, load_mit_weights

TINY = {
    "features_per_stage": (8, 16, 24, 32),
    "mit_depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 1, 2),
    "depths": (1, 1, 1, 1),
    "decoder_size": 16,
}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def tiny(**kw):
    return Vivim(2, 3, 1, **{**TINY, **kw})


# ---- an independent parameter count, written from networks.md §5.1-5.4 block by block ----------------------------


def linear(cin, cout):
    return cin * cout + cout


def mit_stage(cin, c, depth, sr, k):
    embed = cin * c * k * k + c + 2 * c
    attention = 4 * linear(c, c) + (c * c * sr * sr + c + 2 * c if sr > 1 else 0)
    mix_ffn = linear(c, 4 * c) + 4 * c * 9 + 4 * c + linear(4 * c, c)
    return embed + depth * (2 * c + attention + 2 * c + mix_ffn)


def st_mamba(c, d_state=16, d_conv=4, expand=2):
    d_inner, R = expand * c, math.ceil(c / 16)
    mamba = 2 * c + 3 * expand * c * c + 3 * d_inner * (d_conv + 2 * R + 3 * d_state + 3)
    dsf = linear(c, 4 * c) + 4 * c * 27 + 4 * c + linear(4 * c, c)
    return mamba + 2 * c + dsf


def vivim_formula(
    cin=3, cout=1, feats=(64, 128, 320, 512), mit=(3, 4, 18, 3), srs=(8, 4, 2, 1), depths=(2, 2, 2, 2), stage_norms=True
):
    stages = zip((cin, *feats[:-1]), feats, mit, srs, (7, 3, 3, 3), strict=True)
    encoder = sum(mit_stage(a, c, n, sr, k) for a, c, n, sr, k in stages) + (2 * sum(feats) if stage_norms else 0)
    mamba = sum(d * st_mamba(c) for c, d in zip(feats, depths, strict=True))
    head = sum(linear(c, 768) for c in feats) + 4 * 768 * 768 + 2 * 768 + linear(768, cout)
    return encoder + mamba + head


def test_vivim_param_count_matches_official_less_unused_modules():
    with torch.device("meta"):
        net, upstream_forward = Vivim(2, 3, 1), Vivim(2, 3, 1, stage_norms=False)
    count = n_params(net)
    print(f"Vivim (3 -> 1, MiT-B3): {count:,} parameters")
    # networks.md §5.5: upstream 59.62 M, of which 115,350 are the unused ADE20K classifier (150 classes) -> 59.51 M;
    # 2,048 are SegFormer's stage-final LayerNorms, applied here by default, skipped (and not built) upstream-style
    ade_classifier, final_norms = linear(768, 150), 2 * (64 + 128 + 320 + 512)
    assert count == 59_505_089
    assert n_params(upstream_forward) == 59_503_041 == count - final_norms
    assert n_params(upstream_forward) == vivim_formula(stage_norms=False)
    assert count == vivim_formula()
    assert round((count + ade_classifier) / 1e6, 2) == 59.62
    assert round(count / 1e6, 2) == 59.51


def test_vivim_param_count_breakdown_matches_spec():
    with torch.device("meta"):
        net = Vivim(2, 3, 1)
    assert round(n_params(net.encoder.mit) / 1e6, 2) == 44.07
    assert round(n_params(net.encoder.st_mamba) / 1e6, 2) == 12.28
    assert [round(n_params(s) / 1e6, 2) for s in net.encoder.st_mamba] == [0.18, 0.60, 3.31, 8.20]
    assert round(n_params(net.decoder) / 1e6, 2) == 3.15


def test_vivim_param_count_follows_channels():
    with torch.device("meta"):
        net = Vivim(2, 1, 4)
    assert n_params(net) == vivim_formula(cin=1, cout=4)


@pytest.mark.parametrize(("T", "size"), [(1, (32, 32)), (2, (64, 32)), (3, (32, 96)), (5, (40, 56))], ids=str)
def test_vivim_output_shape_for_any_clip_length_and_size(T, size):
    torch.manual_seed(0)
    net = tiny()
    out = net(torch.randn(2, T, 3, *size))
    assert out.shape == (2 * T, 1, *size)
    assert torch.isfinite(out).all()


def test_vivim_edge_head():
    torch.manual_seed(0)
    logits, edge = tiny(with_edge=True)(torch.randn(1, 2, 3, 32, 64))
    assert logits.shape == edge.shape == (2, 1, 32, 64)


def test_vivim_mixes_frames_of_a_clip_but_not_clips_of_a_batch():
    torch.manual_seed(0)
    net = tiny().eval()
    x = torch.randn(2, 4, 3, 32, 32)
    y = x.clone()
    y[0, 0] += torch.randn(3, 32, 32)  # change the first frame of the first clip
    with torch.no_grad():
        a, b = net(x).unflatten(0, (2, 4)), net(y).unflatten(0, (2, 4))
    assert not torch.allclose(a[0, 3], b[0, 3], atol=1e-4)  # the last frame of that clip sees it
    torch.testing.assert_close(a[1], b[1])  # the other clip does not


def test_vivim_rejects_bad_input_and_arguments():
    net = tiny()
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        net(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="too small: stage 0 would see a 4×4 map"):
        Vivim(2, 3, 1, **{**TINY, "sr_ratios": (8, 4, 2, 1)})(torch.randn(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        Vivim(3, 3, 1)
    with pytest.raises(ValueError, match="one length"):
        Vivim(2, 3, 1, depths=(1, 1, 1))
    with pytest.raises(ValueError, match="mamba_init"):
        tiny(mamba_init="random")


def test_vivim_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = tiny(with_edge=True)
    logits, edge = net(torch.randn(2, 2, 3, 32, 32))
    (logits.square().mean() + edge.square().mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_vivim_construction_is_deterministic_under_a_seed():
    def state(seed):
        torch.manual_seed(seed)
        return tiny().state_dict()

    a, b, c = state(0), state(0), state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_vivim_mamba_init_modes():
    torch.manual_seed(0)
    default = tiny().encoder.st_mamba[0][0].mamba
    dt = F.softplus(default.dt_proj_bias)
    assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6  # mamba_ssm's log-uniform Δ in [dt_min, dt_max]
    upstream = tiny(mamba_init="vivim").encoder.st_mamba[0][0].mamba
    assert torch.equal(upstream.dt_proj_bias, torch.zeros_like(upstream.dt_proj_bias))  # Δ = softplus(0)
    # upstream re-draws the Linears from N(0, 0.02²) (truncated at ±2, i.e. not at all); PyTorch's default for
    # in_features 8 is U(±0.35)
    assert 0.01 < upstream.in_proj.weight.std() < 0.03 < 0.1 < default.in_proj.weight.std()
    assert 0.01 < upstream.x_proj_weight.std() < 0.03 < 0.1 < default.x_proj_weight.std()


def test_vivim_learns_one_batch():
    torch.manual_seed(0)
    net = tiny()
    frames = F.interpolate(torch.randn(6, 3, 8, 8), size=(32, 32), mode="bilinear")  # smooth blobs
    x = frames.unflatten(0, (2, 3))
    target = (frames[:, :1] > 0).float()  # a function of each frame
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_vivim_is_registered():
    spec = networks.spec("vivim")
    assert spec.cls is Vivim and spec.task == "video" and spec.spatial_dims == (2,)
    assert networks.list(task="video") == ["vivim"]
    assert isinstance(networks.build("vivim", **TINY), Vivim)


# ---- pre-trained weights from local files ------------------------------------------------------------------------

# ours -> Hugging Face SegformerForSemanticSegmentation names (written independently of the loader's table)
HF_NAMES = [
    (r"encoder\.mit\.(\d+)\.norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"encoder\.mit\.(\d+)\.patch_embed\.proj\.", r"segformer.encoder.patch_embeddings.\1.proj."),
    (r"encoder\.mit\.(\d+)\.patch_embed\.norm\.", r"segformer.encoder.patch_embeddings.\1.layer_norm."),
    (r"encoder\.mit\.(\d+)\.blocks\.(\d+)\.norm(\d)\.", r"segformer.encoder.block.\1.\2.layer_norm_\3."),
    (
        r"encoder\.mit\.(\d+)\.blocks\.(\d+)\.attn\.sr_norm\.",
        r"segformer.encoder.block.\1.\2.attention.self.layer_norm.",
    ),
    (r"encoder\.mit\.(\d+)\.blocks\.(\d+)\.attn\.proj\.", r"segformer.encoder.block.\1.\2.attention.output.dense."),
    (r"encoder\.mit\.(\d+)\.blocks\.(\d+)\.attn\.(\w+)\.", r"segformer.encoder.block.\1.\2.attention.self.\3."),
    (r"encoder\.mit\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"segformer.encoder.block.\1.\2.mlp.dense\3."),
    (r"encoder\.mit\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.", r"segformer.encoder.block.\1.\2.mlp.dwconv.dwconv."),
    (r"decoder\.linear_c\.(\d+)\.", r"decode_head.linear_c.\1.proj."),
    (r"decoder\.fuse\.", r"decode_head.linear_fuse."),
    (r"decoder\.norm\.", r"decode_head.batch_norm."),
]


def random_weights(net):
    """Fresh random values for every MiT and decode-head tensor of ``net`` (classifier excluded)."""
    g = torch.Generator().manual_seed(1)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in net.state_dict().items()
        if k.startswith(("encoder.mit.", "decoder.")) and not k.startswith("decoder.classifier.")
    }


def to_hf(ours):
    out = {}
    for k, v in ours.items():
        for pattern, repl in HF_NAMES:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
        else:
            raise AssertionError(k)
    out["decode_head.classifier.weight"] = torch.randn(150, 16, 1, 1)
    return out


def to_nvlabs(ours, prefix=""):
    out = {}
    for k, v in ours.items():
        m = re.match(r"encoder\.mit\.(\d+)\.(.*)", k)
        if m is None:
            continue  # NVlabs MiT files hold the backbone only
        stage, rest = int(m.group(1)) + 1, m.group(2)
        rest = re.sub(r"^patch_embed\.", f"patch_embed{stage}.", rest)
        rest = re.sub(r"^blocks\.", f"block{stage}.", rest)
        rest = re.sub(r"^norm\.", f"norm{stage}.", rest)
        rest = rest.replace("attn.query.", "attn.q.").replace("attn.sr_norm.", "attn.norm.")
        rest = rest.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        if ".attn.key." in rest:
            out[prefix + rest.replace(".attn.key.", ".attn.kv.")] = torch.cat([v, ours[k.replace(".key.", ".value.")]])
        elif ".attn.value." not in rest:
            out[prefix + rest] = v
    out[prefix + "head.weight"] = torch.randn(1000, 32)
    return out


def test_load_mit_weights_from_a_hugging_face_safetensors_file(tmp_path):
    torch.manual_seed(0)
    net = tiny()
    weights = random_weights(net)
    path = tmp_path / "model.safetensors"
    save_file(to_hf(weights), str(path))
    loaded = load_mit_weights(net, path)
    assert loaded == sorted(weights)
    state = net.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k], v), k
    assert net(torch.randn(1, 2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_load_mit_weights_into_an_upstream_style_model_skips_the_stage_norms(tmp_path):
    torch.manual_seed(0)
    weights = random_weights(tiny())
    path = tmp_path / "model.safetensors"
    save_file(to_hf(weights), str(path))
    upstream_style = tiny(stage_norms=False)
    loaded = load_mit_weights(upstream_style, path)
    assert loaded == sorted(k for k in weights if not re.fullmatch(r"encoder\.mit\.\d+\.norm\.\w+", k))
    assert not any(k.startswith("encoder.mit.0.norm.") for k in upstream_style.state_dict())


def test_load_mit_weights_from_an_nvlabs_mmseg_checkpoint_splits_kv(tmp_path):
    torch.manual_seed(0)
    net = tiny()
    classifier = net.decoder.classifier.weight.clone()
    fuse = net.decoder.fuse.weight.clone()
    weights = random_weights(net)
    path = tmp_path / "mit_tiny.pth"
    torch.save({"meta": {}, "state_dict": to_nvlabs(weights, prefix="backbone.")}, path)
    loaded = load_mit_weights(net, path)
    assert all(k.startswith("encoder.mit.") for k in loaded)
    state = net.state_dict()
    for k in loaded:
        assert torch.equal(state[k], weights[k]), k
    assert torch.equal(net.decoder.fuse.weight, fuse)  # no decode head in the file: left as initialised
    assert torch.equal(net.decoder.classifier.weight, classifier)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda w: None, "no such file"),
        (lambda w: {"conv.weight": torch.zeros(2)}, "no SegFormer/MiT weights"),
        (lambda w: {k: v for k, v in to_hf(w).items() if "block.3" not in k}, "not in the file"),
        (lambda w: {**to_hf(w), "decode_head.linear_fuse.weight": torch.zeros(16, 48, 1, 1)}, "has shape"),
        (lambda w: {k: v for k, v in to_hf(w).items() if "batch_norm" not in k}, "only part of the SegFormer decode"),
        (lambda w: {"state_dict": {"x": "not a tensor"}}, "cannot be read|not a state_dict"),
    ],
    ids=["missing-file", "not-segformer", "missing-stage", "wrong-shape", "partial-head", "not-tensors"],
)
def test_load_mit_weights_rejects_bad_files(tmp_path, make, fragment):
    torch.manual_seed(0)
    net = tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    content = make(random_weights(net))
    path = tmp_path / "weights.pth"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=fragment) as err:
        load_mit_weights(net, path)
    assert str(path) in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded


def test_load_mit_weights_names_in_channels_as_the_fix(tmp_path):
    torch.manual_seed(0)
    donor, net = tiny(), Vivim(2, 1, 1, **TINY)
    path = tmp_path / "model.safetensors"
    save_file(to_hf(random_weights(donor)), str(path))
    with pytest.raises(CheckpointError, match="in_channels=3"):
        load_mit_weights(net, path)

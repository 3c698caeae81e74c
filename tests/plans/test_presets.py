"""Plan presets: every paper set-up loads by name, builds its network, and bad presets are rejected by name."""

from __future__ import annotations

import json

import pytest
import torch

from medmamba.errors import PlanError
from medmamba.networks import build, spec
from medmamba.plans import Preset, list_presets, load_preset

#: parameter counts the network specs state for these set-ups (networks.md §3.5, §4.5, §5.5, §6.5)
EXPECTED_PARAMETERS = {
    "segmamba_brats": 67_416_196,
    "umamba_bot_3d": 41_945_158,
    "umamba_enc_3d": 42_859_142,
    "umamba_bot_2d": 47_533_012,
    "umamba_enc_2d": 47_015_538,
}


def test_the_papers_set_ups_ship():
    assert set(list_presets()) == {
        "mambamorph",
        "segmamba_brats",
        "umamba_bot_2d",
        "umamba_bot_3d",
        "umamba_enc_2d",
        "umamba_enc_3d",
        "vivim",
    }


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_its_network_for_its_task(name):
    preset = load_preset(name)
    assert preset.name == name
    assert spec(preset.network).task == preset.task
    assert preset.spatial_dims in spec(preset.network).spatial_dims
    with torch.device("meta"):
        net = build(preset.network, **preset.build_kwargs())
    count = sum(p.numel() for p in net.parameters())
    assert count == EXPECTED_PARAMETERS.get(name, count) > 1e6
    assert Preset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_papers_numbers_are_what_the_presets_say():
    segmamba = load_preset("segmamba_brats")
    assert (segmamba.in_channels, segmamba.patch_size, segmamba.batch_size) == (4, (128, 128, 128), 2)
    morph = load_preset("mambamorph")
    assert morph.patch_size == (176, 208, 192) and all(p % 16 == 0 for p in morph.patch_size)
    assert len(morph.input_shapes) == 2  # moving and fixed
    vivim = load_preset("vivim")
    assert vivim.input_shapes == ((8, 5, 3, 256, 256),)
    assert vivim.voxels_per_batch == 8 * 5 * 256 * 256
    enc = load_preset("umamba_enc_3d")
    assert tuple(enc.network_kwargs["input_size"]) == enc.patch_size  # Enc is built for exactly its patch


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(PlanError, match="Did you mean 'segmamba_brats'"):
        load_preset("segmamba_bratz")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"patch_sise": [128, 128, 128]}, "unknown key.*patch_sise.*Valid keys"),
        ({"patch_size": [120, 128, 128]}, "multiple of 16"),
        ({"channel_names": ["T1"]}, "1 channel_names for in_channels=4"),
        ({"batch_size": 0}, "positive"),
        ({"frames": 5}, "frames is required for video presets and only"),
        ({"spacing": [1.0, 1.0]}, "differ in length"),
    ],
    ids=["unknown-key", "patch-not-on-grid", "channels", "batch", "frames", "spacing"],
)
def test_a_bad_preset_is_rejected_naming_the_problem(change, message):
    data = {**load_preset("segmamba_brats").to_dict(), **change}
    if "patch_sise" in change:
        del data["patch_size"]
    with pytest.raises(PlanError, match=message):
        Preset.from_dict(data, source="bad.json")

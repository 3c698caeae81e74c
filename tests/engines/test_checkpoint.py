from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from medmamba.engines.checkpoint import FORMAT, load_checkpoint, load_weights, save_checkpoint, to_plain
from medmamba.errors import CheckpointError


def payload(net: nn.Module, **extra) -> dict:
    return {"network": "umamba_bot", "in_channels": 1, "out_channels": 3, "network_weights": net.state_dict(), **extra}


def test_round_trip_is_exact_and_loads_with_plain_weights_only_torch_load(tmp_path):
    net = nn.Conv3d(1, 3, 3)
    path = save_checkpoint(
        tmp_path / "c.pth",
        payload(net, logging={"loss": [np.float64(0.5), np.float32(0.25)]}, device=torch.device("cpu"), axes=(0, 1)),
    )
    raw = torch.load(path, weights_only=True)  # noqa: TID251 - the point: the file needs nothing but weights_only
    assert raw["format"] == FORMAT
    assert raw["logging"] == {"loss": [0.5, 0.25]} and type(raw["logging"]["loss"][0]) is float
    assert raw["device"] == "cpu" and raw["axes"] == (0, 1)
    loaded = load_checkpoint(path, network="umamba_bot", in_channels=1, out_channels=3)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded["network_weights"][key], value, rtol=0, atol=0)
    other = nn.Conv3d(1, 3, 3)
    load_weights(other, loaded["network_weights"], path)
    torch.testing.assert_close(other.weight, net.weight, rtol=0, atol=0)


def test_save_is_atomic_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pth", payload(nn.Linear(2, 2)))
    before = path.read_bytes()

    def broken(obj, f):
        f = open(f, "wb") if not hasattr(f, "write") else f  # noqa: SIM115
        f.write(b"half a checkpoint")
        f.close()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, payload(nn.Linear(2, 2)))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]  # no temporary left behind


def test_to_plain_refuses_objects_without_a_weights_only_form():
    class Opaque:
        pass

    with pytest.raises(TypeError, match="Opaque"):
        to_plain({"x": Opaque()})


@pytest.mark.parametrize(
    ("build", "expected", "fragment"),
    [
        ("missing", {}, "no such checkpoint"),
        ("truncated", {}, "truncated or not a torch file"),
        ("pickled_numpy", {}, "weights_only=True"),
        ("not_medmamba", {}, "not a medmamba checkpoint"),
        ("ok", {"network": "segmamba"}, "holds a 'umamba_bot' network, not 'segmamba'"),
        ("ok", {"in_channels": 4}, "trained with 1 image channels, but 4"),
        ("ok", {"out_channels": 2}, "trained with 3 output channels"),
    ],
    ids=["missing", "truncated", "nnunet-style-pickle", "foreign-dict", "other-network", "in-channels", "classes"],
)
def test_unusable_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path, build, expected, fragment):
    path = tmp_path / "c.pth"
    if build == "ok":
        save_checkpoint(path, payload(nn.Linear(2, 2)))
    elif build == "truncated":
        save_checkpoint(path, payload(nn.Linear(64, 64)))
        path.write_bytes(path.read_bytes()[:200])
    elif build == "pickled_numpy":  # what nnU-Net's trainer writes: numpy scalars in the logs
        buffer = io.BytesIO()
        torch.save({**payload(nn.Linear(2, 2)), "logging": [np.float64(1.0)]}, buffer)
        path.write_bytes(buffer.getvalue())
    elif build == "not_medmamba":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"c\.pth") as info:
        load_checkpoint(path, **expected)
    assert fragment in str(info.value)


def test_load_weights_names_missing_unexpected_and_reshaped_parameters(tmp_path):
    source = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    target = nn.Sequential(nn.Linear(2, 5), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(CheckpointError, match=r"model.pth: .*2 missing \(3\.bias, 3\.weight\); 3 of another shape"):
        load_weights(target, source.state_dict(), tmp_path / "model.pth")

"""``medmamba train`` dispatch to the registration and video engines, and its user errors (exit code 2)."""

from __future__ import annotations

import json

import pytest

from medmamba.cli import main
from medmamba.io.datasets.demo import build_demo_registration


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return build_demo_registration(
        tmp_path_factory.mktemp("pairs"), num_subjects=3, num_val_pairs=1, spacing=12.0, shape=(16, 16, 16)
    )


TINY = json.dumps({"embed_dim": 8, "reg_head_channels": 4})


def test_train_dispatches_mambamorph_feat_to_the_registration_engine(pairs, tmp_path, capsys):
    code = main(["train", str(pairs), "--network", "mambamorph_feat", "--output", str(tmp_path / "run"), "--epochs",
                 "1", "--similarity", "mi", "--contrastive-weight", "0.01", "--device", "cpu", "--network-kwargs",
                 json.dumps({"embed_dim": 8, "reg_head_channels": 4, "feature_channels": 4})])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run")
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["loss_weights"] == {"dice": 1.0, "smoothness": 0.1, "contrastive": 0.01, "mi": 1.0}
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train_contrastive" in log and "train_mi" in log and "val_dice" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["3d_fullres", "0", "--network", "mambamorph"], "takes the dataset folder only"),
        (["--network", "mambamorph", "--similarity-weight", "2"], "--similarity-weight needs --similarity"),
        (["--network", "mambamorph", "--network-kwargs", "{embed"], "--network-kwargs: not JSON"),
        (["--network", "mambamorph", "--dice-weight", "0"], "no similarity or label term"),
        (["--network", "mambamorph", "--loss", "ce"], "not a registration loss"),
        (["--network", "vivim"], "not a valid video dataset"),
        (["--network", "umamba_bot"], "segmentation training needs DATASET CONFIG FOLD"),
    ],
    ids=["config-fold", "weight-without-similarity", "bad-json", "no-data-term", "wrong-loss", "not-video",
         "segmentation-needs-config"],
)  # fmt: skip
def test_train_task_errors_exit_2_with_one_message(args, message, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(pairs), *args, "--output", str(out), "--epochs", "1", "--device", "cpu",
                 *([] if "--network-kwargs" in args else ["--network-kwargs", TINY])])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert not (out / "checkpoint_final.pth").exists()


def test_train_needs_a_dataset_folder(tmp_path, capsys):
    code = main(["train", str(tmp_path / "nowhere"), "--network", "mambamorph", "--output", str(tmp_path / "r")])
    assert code == 2
    assert "not a dataset folder (no dataset.json)" in capsys.readouterr().err

"""Small registration datasets from the MNI template (real anatomy, synthetic deformations), a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

#: a MambaMorph small enough for the CPU (the paper's is embed_dim 96, reg_head_channels 16)
TINY = {"embed_dim": 12, "reg_head_channels": 8}


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three MNI-derived subjects on one 16×20×16 grid at 10 mm: one training and one validation pair, labelled."""
    from medmamba.io.datasets.demo import build_demo_registration

    return build_demo_registration(
        tmp_path_factory.mktemp("pairs"), num_subjects=3, num_val_pairs=1, spacing=10.0, shape=(16, 20, 16)
    )


@pytest.fixture(scope="session")
def small_model(small_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MambaMorph trained for one epoch on ``small_pairs`` by the engine (its run folder)."""
    from medmamba.engines.registration.train import train

    return train(
        small_pairs,
        tmp_path_factory.mktemp("results"),
        network_kwargs=TINY,
        overrides={"num_epochs": 1, "seed": 0},
        device="cpu",
    )

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention
import torch

from medmamba.cli import main
from medmamba.engines.registration.register import (
    displacement_to_voxels,
    read_displacement_field,
    register_images,
    voxels_to_displacement,
    write_displacement_field,
)
from medmamba.io.datasets.registration import open_registration_dataset
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, read_image, write_image


class FixedDisplacement(torch.nn.Module):
    """A test double for the network: returns a given displacement (on the model grid) and records its inputs."""

    def __init__(self, ddf: torch.Tensor) -> None:
        super().__init__()
        self.ddf = ddf
        self.seen: list[tuple[int, ...]] = []

    def forward(self, moving, fixed):
        self.seen.append(tuple(moving.shape))
        return moving, self.ddf.to(moving.dtype)[None]


def to_sitk(image: Image) -> sitk.Image:
    itk = sitk.GetImageFromArray(np.ascontiguousarray(image.array.astype(np.float64).transpose(2, 1, 0)))
    image.geometry.apply_to_sitk(itk)
    return itk


def sitk_warp(moving: Image, fixed: Image, displacement_file: Path) -> np.ndarray:
    """Warp with SimpleITK reading our displacement file as an ITK displacement field transform."""
    field = sitk.ReadImage(str(displacement_file), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    out = sitk.Resample(to_sitk(moving), to_sitk(fixed), transform, sitk.sitkLinear, -1.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def inside(ddf: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Voxels whose sample point x + u(x) lies inside the grid (no padding rule involved)."""
    shape = ddf.shape[1:]
    x = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")) + ddf
    ok = np.ones(shape, bool)
    for a, n in enumerate(shape):
        ok &= (x[a] >= margin) & (x[a] <= n - 1 - margin)
    return ok


def smooth(shape, amplitude, seed):
    rng = np.random.default_rng(seed)
    x = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    return np.stack(
        [amplitude * np.sin(np.tensordot(rng.uniform(0.1, 0.3, 3), x, axes=1) + rng.uniform(0, 6)) for _ in range(3)]
    ).astype(np.float32)


@pytest.fixture(scope="module")
def pair(small_pairs):
    data = open_registration_dataset(small_pairs)
    p = data.pairs_of("train")[0]
    return read_image(p.fixed.image), read_image(p.moving.image), read_image(p.moving.label)


def test_displacement_file_follows_itk_convention(pair, tmp_path):
    """SimpleITK, reading our displacement file, warps the moving image exactly as we did."""
    fixed, moving, _ = pair
    ddf = smooth(fixed.shape, 1.5, seed=1)
    result = register_images(FixedDisplacement(torch.from_numpy(ddf)), {"grid_shape": fixed.shape}, fixed, moving)
    np.testing.assert_allclose(result.ddf, ddf, atol=1e-6)
    path = write_displacement_field(result.displacement, fixed.geometry, tmp_path / "displacement.nii.gz")
    header = nib.load(path).header
    assert header.get_data_shape() == (*fixed.shape, 1, 3)
    assert header.get_intent()[0] == "vector"
    reference = sitk_warp(moving, fixed, path)
    ok = inside(ddf)
    assert ok.mean() > 0.5
    np.testing.assert_allclose(result.warped.array[ok], reference[ok], rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    field, geometry = read_displacement_field(path)
    assert not geometry.mismatches(fixed.geometry)
    np.testing.assert_allclose(displacement_to_voxels(field, geometry), ddf, atol=1e-5)


def test_displacement_in_mm_follows_the_direction_cosines():
    geometry = Geometry((2.0, 1.0, 3.0), (0.0, 0.0, 0.0), (0, -1, 0, 1, 0, 0, 0, 0, 1))  # axis 0 → +P, axis 1 → −L
    ddf = np.zeros((3, 2, 2, 2), np.float32)
    ddf[0], ddf[1], ddf[2] = 1.0, 2.0, -1.0
    mm = voxels_to_displacement(ddf, geometry)
    np.testing.assert_allclose(mm[0, 0, 0], [-2.0, 2.0, -3.0])  # L = −(2 voxels × 1 mm), P = 1 × 2 mm, S = −3 mm
    np.testing.assert_allclose(displacement_to_voxels(mm, geometry), ddf, atol=1e-6)


def test_register_resamples_to_the_model_grid_and_back(pair, tmp_path):
    """A fixed image of another size: the network sees the model grid; vectors are rescaled to the fixed grid."""
    _, moving, _ = pair
    shape = (23, 29, 19)
    geometry = Geometry((7.0, 6.5, 8.5), moving.geometry.origin, moving.geometry.direction)
    fixed = Image(np.random.default_rng(0).random(shape, dtype=np.float32), geometry)
    big_moving = Image(read_image_like(moving, shape, geometry), geometry)
    grid = (16, 20, 16)
    double = FixedDisplacement(torch.tensor([2.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, *grid).clone())
    result = register_images(double, {"grid_shape": list(grid)}, fixed, big_moving)
    assert double.seen == [(1, 1, *grid)]
    # align_corners: model voxel i ↦ fixed voxel i · (S_F − 1) / (S_M − 1), so a shift scales by that factor
    expected = np.reshape([2.0 * (23 - 1) / (16 - 1), 0.0, 1.0 * (19 - 1) / (16 - 1)], (3, 1, 1, 1))
    np.testing.assert_allclose(result.ddf, np.broadcast_to(expected, (3, *shape)), atol=1e-5)
    assert result.warped.shape == shape and not result.warped.geometry.mismatches(geometry)
    path = write_displacement_field(result.displacement, geometry, tmp_path / "d.nii.gz")
    ok = inside(result.ddf)
    assert ok.sum() > 0.5 * np.prod(shape)
    np.testing.assert_allclose(result.warped.array[ok], sitk_warp(big_moving, fixed, path)[ok], rtol=1e-5, atol=1e-4)


def read_image_like(image: Image, shape, geometry):
    """``image`` sampled on another grid (SimpleITK, linear), to make a moving image of another size."""
    target = sitk.GetImageFromArray(np.zeros(shape[::-1]))
    geometry.apply_to_sitk(target)
    out = sitk.Resample(to_sitk(image), target, sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.float32)


def test_moving_image_on_another_grid_is_resampled_through_world_coordinates():
    """With zero displacement the warped image is the moving one seen on the fixed grid (a smooth world function)."""

    def world_function(image_shape, geometry):
        index = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in image_shape), indexing="ij"), -1)
        world = index @ (geometry.direction_matrix @ np.diag(geometry.spacing)).T + np.asarray(geometry.origin)
        return np.sin(world[..., 0] / 15) + np.cos(world[..., 1] / 20) + world[..., 2] / 50

    fixed_geometry = Geometry((3.0, 3.0, 4.0), (-20.0, -25.0, -15.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    # LPS: the fixed grid spans x ∈ [-53, -20], y ∈ [-64, -25], z ∈ [-15, 21]; the moving grid covers that box
    moving_geometry = Geometry((2.0, 2.5, 2.0), (-60.0, -70.0, -20.0), np.eye(3).ravel())
    fixed_shape, moving_shape = (12, 14, 10), (30, 30, 34)
    fixed = Image(world_function(fixed_shape, fixed_geometry).astype(np.float32), fixed_geometry)
    moving = Image(world_function(moving_shape, moving_geometry).astype(np.float32), moving_geometry)
    double = FixedDisplacement(torch.zeros(3, *fixed_shape))
    result = register_images(double, {"grid_shape": list(fixed_shape)}, fixed, moving)
    np.testing.assert_allclose(result.warped.array, fixed.array, atol=0.02)  # linear interpolation of a smooth field


def test_register_writes_every_output_in_the_fixed_geometry(small_pairs, small_model, tmp_path, capsys):
    data = open_registration_dataset(small_pairs)
    p = data.pairs_of("val")[0]
    code = main(
        ["register", "--fixed", str(p.fixed.image), "--moving", str(p.moving.image), "--moving-labels",
         str(p.moving.label), "--fixed-labels", str(p.fixed.label), "-m", str(small_model), "-o", str(tmp_path / "o"),
         "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    (folder,) = [Path(line) for line in capsys.readouterr().out.split()]
    assert folder.name == "mni_002_0000_to_mni_001_0000"
    fixed = read_image(p.fixed.image)
    warped = read_image(folder / "warped.nii.gz")
    labels = read_image(folder / "warped_labels.nii.gz")
    field, geometry = read_displacement_field(folder / "displacement.nii.gz")
    for image in (warped, labels, Image(field[..., 0], geometry)):
        assert image.shape == fixed.shape
        assert image.geometry.mismatches(fixed.geometry, atol_mm=1e-5, atol_direction=1e-6) == []
    assert labels.array.dtype == np.uint8
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    info = json.loads((folder / "pair.json").read_text())
    assert info["network"] == "mambamorph" and "LPS" in info["displacement"]
    assert Path(info["fixed_labels"]) == p.fixed.label.resolve()
    # and evaluate reads the folder: before/after Dice per label and the field's regularity
    assert main(["evaluate", "--task", "registration", "-pred", str(tmp_path / "o")]) == 0
    table = json.loads((tmp_path / "o" / "metrics.json").read_text())
    case = table["metric_per_case"][0]["metrics"]
    assert set(case) == {"field", "1", "2"}
    assert 0 <= case["1"]["dice"] <= 1 and 0 <= case["1"]["dice_initial"] <= 1
    assert case["field"]["folding_fraction"] == 0.0  # one epoch from a near-identity initialisation


def test_register_folders_of_pairs_by_file_name(small_pairs, small_model, tmp_path, capsys):
    data = open_registration_dataset(small_pairs)
    fixed_dir, moving_dir = tmp_path / "fixed", tmp_path / "moving"
    for folder in (fixed_dir, moving_dir):
        folder.mkdir()
    for i, p in enumerate(data.pairs):
        shutil.copy(p.fixed.image, fixed_dir / f"case{i}.nii.gz")
        shutil.copy(p.moving.image, moving_dir / f"case{i}.nii.gz")
    assert main(["register", "--fixed", str(fixed_dir), "--moving", str(moving_dir), "-m", str(small_model),
                 "-o", str(tmp_path / "o"), "--device", "cpu"]) == 0  # fmt: skip
    written = capsys.readouterr().out.split()
    assert [Path(w).name for w in written] == ["case0_to_case0", "case1_to_case1"]
    assert all((Path(w) / "displacement.nii.gz").is_file() for w in written)


def bad_labels(tmp_path, pairs):
    p = open_registration_dataset(pairs).pairs[0]
    labels = read_image(p.moving.label)
    path = tmp_path / "labels.nii.gz"
    write_image(Image(labels.array[:-1], labels.geometry), path)
    return ["--fixed", str(p.fixed.image), "--moving", str(p.moving.image), "--moving-labels", str(path)]


def file_and_folder(tmp_path, pairs):
    p = open_registration_dataset(pairs).pairs[0]
    return ["--fixed", str(p.fixed.image), "--moving", str(tmp_path)]


def no_pairs(tmp_path, pairs):
    return ["--dataset", str(pairs), "--split", "test"]


@pytest.mark.parametrize(
    ("make_args", "model", "message"),
    [
        (bad_labels, "trained", "does not lie on the grid of its image"),
        (file_and_folder, "trained", "two files or two folders"),
        (no_pairs, "trained", "has no 'test' pairs"),
        (no_pairs, "empty", "no such checkpoint"),
    ],
    ids=["labels-off-grid", "file-and-folder", "split-without-pairs", "no-checkpoint"],
)
def test_register_rejects_bad_input_with_exit_code_2(
    make_args, model, message, small_pairs, small_model, tmp_path, capsys
):
    model_dir = small_model if model == "trained" else tmp_path / "empty"
    args = ["--dataset", str(small_pairs), "--split", "val"] if model == "empty" else make_args(tmp_path, small_pairs)
    out = tmp_path / "out"
    code = main(["register", *args, "-m", str(model_dir), "-o", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) <= 3
    assert not out.exists() or not any(out.iterdir())

"""Register image pairs with a trained MambaMorph: warped image, displacement field and warped labels.

For each pair (``register``):

1. the moving image (and its labels) is resampled onto the fixed image's grid through world coordinates when the
   two grids differ (linear / nearest neighbour; outside the moving image: its minimum / background);
2. both are min-max normalised and, when the fixed grid is not the model's training grid, resampled to that grid's
   shape over the same field of view (trilinear, ``align_corners=True``: the corner voxel centres coincide);
3. the network predicts the displacement on that grid, which is scaled back to the fixed grid (trilinear, the
   vectors rescaled per axis);
4. the moving image is warped at the fixed image's own resolution (MONAI ``Warp``: bilinear, border padding), its
   labels with nearest neighbour (background outside).

Outputs, per pair in ``OUT/<moving>_to_<fixed>/`` (written as one atomic folder), all in **exactly the fixed
image's geometry**:

* ``warped.nii.gz`` — the moving image in the fixed image's space (its own intensities);
* ``displacement.nii.gz`` — the displacement field ``u`` as an ITK/ANTs displacement field: a vector NIfTI
  (``X × Y × Z × 1 × 3``, intent ``vector``) whose components are **millimetres in LPS** (ITK's physical space), with
  ``warped(p) = moving(p + u(p))`` for every fixed-image point ``p``. SimpleITK's
  ``DisplacementFieldTransform`` reads it as the fixed → moving point mapping that ``sitk.Resample`` expects.
  Note that nibabel readers see the raw LPS components (not RAS);
* ``warped_labels.nii.gz`` — the moving labels warped (nearest neighbour), when given;
* ``pair.json`` — the inputs, the model and the convention above (``medmamba evaluate --task registration`` reads
  it).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmamba._progress import progress
from medmamba.engines.checkpoint import load_checkpoint, load_weights
from medmamba.engines.registration.train import minmax
from medmamba.engines.training import resolve_device
from medmamba.errors import CheckpointError, DatasetError, GeometryError, Problem, UsageError
from medmamba.io.atomic import atomic_dir, atomic_write, write_json
from medmamba.io.datasets.registration import open_registration_dataset
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, image_ending, read_image, write_image

__all__ = [
    "DISPLACEMENT_CONVENTION",
    "PairJob",
    "RegisteredPair",
    "displacement_to_voxels",
    "load_registration_model",
    "pairs_from_dataset",
    "pairs_from_paths",
    "read_displacement_field",
    "register",
    "register_images",
    "resample_onto",
    "voxels_to_displacement",
    "write_displacement_field",
]

logger = logging.getLogger(__name__)

DISPLACEMENT_CONVENTION = (
    "ITK displacement field: vector components in millimetres in LPS, on the fixed image's grid; "
    "warped(p) = moving(p + u(p)) for every fixed-image point p (SimpleITK DisplacementFieldTransform)"
)


@dataclass(frozen=True, slots=True)
class PairJob:
    """One pair to register (files), with optional labels."""

    fixed: Path
    moving: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None

    @property
    def pair_id(self) -> str:
        """``<moving case>_to_<fixed case>`` (file names without their endings)."""
        return f"{_case(self.moving)}_to_{_case(self.fixed)}"


@dataclass(frozen=True, slots=True)
class RegisteredPair:
    """What registering one pair gives, in the fixed image's geometry.

    Attributes:
        warped: the warped moving image.
        displacement: ``(X, Y, Z, 3)`` millimetres in LPS (``warped(p) = moving(p + u(p))``).
        ddf: ``(3, X, Y, Z)`` the same field in voxels along the fixed grid's array axes.
        warped_labels: the nearest-neighbour warped labels, or None.
    """

    warped: Image
    displacement: np.ndarray
    ddf: np.ndarray
    warped_labels: Image | None


def load_registration_model(
    model_dir: str | os.PathLike[str], *, checkpoint: str = "checkpoint_final.pth", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network (eval mode, on ``device``) and its description (``model.json``'s content).

    Raises:
        CheckpointError: no such checkpoint, not a registration model, or weights that do not fit.
    """
    from medmamba.networks import build, spec

    folder = Path(model_dir)
    path = folder / checkpoint
    if not path.is_file() and (folder / "checkpoint_best.pth").is_file() and checkpoint == "checkpoint_final.pth":
        path = folder / "checkpoint_best.pth"  # a run still training: its best so far
        logger.warning("%s: no checkpoint_final.pth yet; using checkpoint_best.pth", folder)
    if not path.is_file() and (folder / "plans.json").is_file():
        raise CheckpointError(
            f"{folder}: a segmentation model folder (plans.json, fold_*), not a registration model. Give the run "
            "folder of `medmamba train --network mambamorph` (it holds model.json)"
        )
    state = load_checkpoint(path, map_location="cpu")
    model = state.get("model")
    if (
        not isinstance(model, dict)
        or model.get("task") != "registration"
        or spec(state["network"]).task != "registration"
    ):
        raise CheckpointError(
            f"{path}: not a registration model (network {state['network']!r}). Use a folder written by `medmamba "
            "train --network mambamorph` (it holds model.json)"
        )
    net = build(state["network"], spatial_dims=3, in_channels=1, out_channels=3, **model["network_kwargs"])
    load_weights(net, state["network_weights"], path)
    return net.to(resolve_device(device)).eval(), model


def register(
    jobs: Sequence[PairJob],
    output: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    checkpoint: str = "checkpoint_final.pth",
    device: str | torch.device = "auto",
) -> list[Path]:
    """Register every pair and write its folder ``output/<pair id>/``; returns the folders written.

    Raises:
        CheckpointError: an unusable model folder.
        ImageReadError / GeometryError: an unreadable input, or labels not on their image's grid.
        UsageError: two pairs with the same id.
    """
    ids = [job.pair_id for job in jobs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UsageError(f"pairs {duplicates} occur twice; each output folder is <moving>_to_<fixed>")
    device = resolve_device(device)
    net, model = load_registration_model(model_dir, checkpoint=checkpoint, device=device)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for job in progress(list(jobs), desc="register", total=len(jobs)):
        fixed, moving = read_image(job.fixed), read_image(job.moving)
        labels = read_image(job.moving_labels) if job.moving_labels is not None else None
        if labels is not None and (labels.shape != moving.shape or moving.geometry.mismatches(labels.geometry)):
            raise GeometryError(
                f"{job.moving_labels}: does not lie on the grid of its image {job.moving}. Give the label map of "
                "that image"
            )
        result = register_images(net, model, fixed, moving, labels, device=device)
        with atomic_dir(output / job.pair_id, overwrite=True) as tmp:
            write_image(result.warped, tmp / "warped.nii.gz", dtype=np.float32)
            write_displacement_field(result.displacement, fixed.geometry, tmp / "displacement.nii.gz")
            if result.warped_labels is not None:
                write_image(result.warped_labels, tmp / "warped_labels.nii.gz", dtype=_label_dtype(labels))
            write_json(
                tmp / "pair.json",
                {
                    "fixed": str(job.fixed.resolve()),
                    "moving": str(job.moving.resolve()),
                    "moving_labels": str(job.moving_labels.resolve()) if job.moving_labels else None,
                    "fixed_labels": str(job.fixed_labels.resolve()) if job.fixed_labels else None,
                    "model": str(Path(model_dir).resolve()),
                    "checkpoint": checkpoint,
                    "network": model["network"],
                    "displacement": DISPLACEMENT_CONVENTION,
                },
            )
        written.append(output / job.pair_id)
        logger.info("registered %s", job.pair_id)
    return written


@torch.no_grad()
def register_images(
    network: torch.nn.Module,
    model: dict[str, Any],
    fixed: Image,
    moving: Image,
    moving_labels: Image | None = None,
    *,
    device: str | torch.device = "cpu",
) -> RegisteredPair:
    """Register one pair of images in memory (steps 1-4 of the module docstring).

    Args:
        network: a trained registration network (eval mode).
        model: its description (``model.json``): ``grid_shape`` is the grid it was trained on.
        fixed: 3D image; the outputs lie on its grid.
        moving: 3D image on any grid.
        moving_labels: the moving image's label map, on its grid, or None.
        device: where to run the network.
    """
    from monai.networks.blocks import Warp

    device = torch.device(device)
    if fixed.geometry.ndim != 3 or moving.geometry.ndim != 3 or fixed.num_volumes != 1 or moving.num_volumes != 1:
        raise GeometryError("registration needs two single 3D volumes (no 2D images, no multi-volume files)")
    shape = fixed.shape
    on_fixed = resample_onto(moving, fixed, nearest=False)
    labels_on_fixed = resample_onto(moving_labels, fixed, nearest=True) if moving_labels is not None else None
    grid = tuple(int(s) for s in model.get("grid_shape", shape))
    pair = torch.from_numpy(np.stack([minmax(on_fixed), minmax(fixed.array)])[:, None]).to(device)  # (2, 1, *S_F)
    if tuple(shape) != grid:
        pair = F.interpolate(pair, size=grid, mode="trilinear", align_corners=True)
    _, ddf_model = network(pair[:1], pair[1:])  # (1, 3, *grid) voxels of the model grid
    ddf = ddf_model.float()
    if tuple(shape) != grid:
        ddf = F.interpolate(ddf, size=shape, mode="trilinear", align_corners=True)
        scale = torch.tensor([(s - 1) / max(g - 1, 1) for s, g in zip(shape, grid, strict=True)], device=device)
        ddf = ddf * scale.view(1, 3, 1, 1, 1)
    with warnings.catch_warnings():  # MONAI announces its pure-PyTorch grid_sample path on every construction
        warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample", category=UserWarning)
        warp = Warp(mode="bilinear", padding_mode="border")
        nearest = Warp(mode="nearest", padding_mode="zeros")
    moving_t = torch.from_numpy(np.ascontiguousarray(on_fixed, dtype=np.float32))[None, None].to(device)
    warped = warp(moving_t, ddf)[0, 0].cpu().numpy()
    warped_labels = None
    if labels_on_fixed is not None:
        lab = torch.from_numpy(labels_on_fixed.astype(np.float32))[None, None].to(device)
        warped_labels = Image(
            np.rint(nearest(lab, ddf)[0, 0].cpu().numpy()).astype(labels_on_fixed.dtype), fixed.geometry
        )
    ddf_np = ddf[0].cpu().numpy().astype(np.float32)
    return RegisteredPair(
        warped=Image(warped.astype(np.float32), fixed.geometry),
        displacement=voxels_to_displacement(ddf_np, fixed.geometry),
        ddf=ddf_np,
        warped_labels=warped_labels,
    )


def voxels_to_displacement(ddf: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``(3, X, Y, Z)`` voxels along the array axes → ``(X, Y, Z, 3)`` millimetres in LPS."""
    axes_mm = np.moveaxis(ddf, 0, -1) * np.asarray(geometry.spacing)  # (X, Y, Z, 3) mm along each axis
    return (axes_mm @ geometry.direction_matrix.T).astype(np.float32)  # column a of the direction is axis a in LPS


def displacement_to_voxels(displacement: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``(X, Y, Z, 3)`` millimetres in LPS → ``(3, X, Y, Z)`` voxels along the array axes (inverse of the above)."""
    axes_mm = displacement @ geometry.direction_matrix  # direction is orthonormal: its transpose inverts it
    return np.moveaxis(axes_mm / np.asarray(geometry.spacing), -1, 0).astype(np.float32)


def write_displacement_field(displacement: np.ndarray, geometry: Geometry, path: str | os.PathLike[str]) -> Path:
    """Write ``(X, Y, Z, 3)`` LPS millimetres as an ITK vector image (NIfTI ``X×Y×Z×1×3``, intent vector), atomically.

    Args:
        displacement: the field (:func:`voxels_to_displacement` of a voxel field).
        geometry: the fixed image's geometry.
        path: ``.nii.gz`` (or ``.nrrd``/``.mha``) file.
    """
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    array = np.asarray(displacement, dtype=np.float64)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"a displacement field is (X, Y, Z, 3), got {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0, 3)), isVector=True)
    geometry.apply_to_sitk(image)
    path = Path(path)
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp))
    return path


def read_displacement_field(path: str | os.PathLike[str]) -> tuple[np.ndarray, Geometry]:
    """Read a displacement field written by :func:`write_displacement_field` (or ITK/ANTs): ``(X, Y, Z, 3)`` mm LPS.

    Raises:
        GeometryError: not a 3-component vector image.
    """
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    from medmamba.io.image import quiet_itk

    try:
        with quiet_itk():
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise GeometryError(f"{path}: cannot be read as a displacement field ({str(err).strip()[:120]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
        raise GeometryError(
            f"{path}: not a 3D displacement field (dimension {image.GetDimension()}, "
            f"{image.GetNumberOfComponentsPerPixel()} components). Give the displacement.nii.gz of `medmamba register`"
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0, 3).astype(np.float32)
    return array, Geometry.from_sitk(image)


def pairs_from_paths(
    fixed: str | os.PathLike[str],
    moving: str | os.PathLike[str],
    *,
    moving_labels: str | os.PathLike[str] | None = None,
    fixed_labels: str | os.PathLike[str] | None = None,
) -> list[PairJob]:
    """Pairs from two files, or from two folders whose image files share names (labels: files or folders alike).

    Raises:
        DatasetError: folders whose names do not match, or a label folder lacking a case.
        UsageError: a file paired with a folder.
    """
    fixed, moving = Path(fixed), Path(moving)
    if fixed.is_dir() != moving.is_dir():
        raise UsageError(f"--fixed {fixed} and --moving {moving}: give two files or two folders")
    if not fixed.is_dir():
        return [
            PairJob(
                fixed,
                moving,
                Path(moving_labels) if moving_labels else None,
                Path(fixed_labels) if fixed_labels else None,
            )
        ]
    fixed_files, moving_files = _images(fixed), _images(moving)
    problems = [
        Problem(str(moving / f"{case}.nii.gz"), "missing: the fixed folder has this case", "Add it or remove the other")
        for case in sorted(set(fixed_files) - set(moving_files))
    ] + [
        Problem(str(fixed / f"{case}.nii.gz"), "missing: the moving folder has this case", "Add it or remove the other")
        for case in sorted(set(moving_files) - set(fixed_files))
    ]
    label_sets = {}
    for name, folder in (("moving", moving_labels), ("fixed", fixed_labels)):
        if folder is not None:
            label_sets[name] = _images(Path(folder))
            problems += [
                Problem(str(Path(folder) / f"{case}.nii.gz"), f"missing: {name} label of case {case}", "Add it")
                for case in sorted(set(fixed_files) - set(label_sets[name]))
            ]
    if problems:
        raise DatasetError(problems, header="cannot pair the fixed and moving folders by file name")
    return [
        PairJob(
            fixed_files[case],
            moving_files[case],
            label_sets["moving"][case] if "moving" in label_sets else None,
            label_sets["fixed"][case] if "fixed" in label_sets else None,
        )
        for case in sorted(fixed_files)
    ]


def pairs_from_dataset(dataset: str | os.PathLike[str], split: str = "test") -> list[PairJob]:
    """The pairs of one split (``train``, ``val``, ``test``) of a registration dataset, with their labels.

    Raises:
        DatasetError: an unreadable dataset, or no pair in that split.
    """
    data = open_registration_dataset(dataset)
    pairs = data.pairs_of(split)
    if not pairs:
        have = sorted({p.split for p in data.pairs})
        raise DatasetError(
            [Problem(str(data.root / "dataset.json"), f"has no {split!r} pairs (it has {have})", "Choose --split")]
        )
    return [PairJob(p.fixed.image, p.moving.image, p.moving.label, p.fixed.label) for p in pairs]


def resample_onto(image: Image, reference: Image, *, nearest: bool) -> np.ndarray:
    """``image``'s array on ``reference``'s grid through world coordinates (SimpleITK); as is when the grids agree.

    Linear interpolation with the image's minimum outside it, or nearest neighbour with 0 outside (label maps).
    """
    if image.shape == reference.shape and not image.geometry.mismatches(reference.geometry):
        return np.asarray(image.array)
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    def to_sitk(array: np.ndarray, geometry: Geometry) -> Any:
        itk = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
        geometry.apply_to_sitk(itk)
        return itk

    source = to_sitk(image.array.astype(np.float32), image.geometry)
    target = to_sitk(np.zeros(reference.shape, np.float32), reference.geometry)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    default = 0.0 if nearest else float(np.min(image.array))
    resampled = sitk.Resample(source, target, sitk.Transform(), interpolator, default)
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    return np.rint(array).astype(image.array.dtype) if nearest else array.astype(np.float32)


def _label_dtype(labels: Image | None) -> Any:
    if labels is None or int(np.max(labels.array, initial=0)) < 256:
        return np.uint8
    return np.uint16


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError([Problem(str(folder), "is not a folder", "Give a folder of images")])
    return {_case(p): p for p in sorted(folder.iterdir()) if p.is_file() and image_ending(p)}


def _case(path: Path) -> str:
    ending = image_ending(path) or path.suffix
    return path.name[: -len(ending)] if ending else path.name

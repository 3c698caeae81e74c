"""Demo datasets built from real MRI that ships inside nilearn's wheel: nothing is downloaded.

Source: the MNI ICBM152 2009a nonlinear symmetric T1 template and its grey- and white-matter probability maps
(Fonov et al., NeuroImage 2011, doi:10.1016/j.neuroimage.2010.07.033; © McConnell Brain Imaging Centre,
permissive licence, redistributed by nilearn), 197×233×189 at 1 mm.

Each case is one deterministic random draw (TorchIO's "sample parameters, then apply a deterministic twin"):
a small rigid/scale transform and a smooth random deformation (the anatomy differs from case to case), a
multiplicative bias field, Rician noise, and resampling onto a grid of random, anisotropic spacing (about
3-4.5 mm, so nnU-Net's planner has to choose a target spacing and resample). The label map (0 background,
1 grey matter, 2 white matter) is the arg-max of the tissue probabilities warped with the *same* transform, so
image and label agree voxel for voxel. The anatomy is real, the variation synthetic: say so when reporting
results on it.

``build_demo_segmentation`` writes an nnU-Net raw dataset, ``build_demo_registration`` a Learn2Reg-style
pair dataset on one common grid; both take about a second for the default sizes.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from medmamba.errors import MedmambaError
from medmamba.io.datasets.nnunet_raw import RawDatasetWriter
from medmamba.io.datasets.registration import RegistrationDatasetWriter
from medmamba.io.geometry import LPS_TO_RAS, Geometry
from medmamba.io.image import Image, read_image

__all__ = [
    "DEMO_LABELS",
    "DemoCaseParams",
    "build_demo_registration",
    "build_demo_segmentation",
    "mni_template_files",
    "sample_case_params",
    "synthesize_case",
]

logger = logging.getLogger(__name__)

#: label map values of the demo datasets
DEMO_LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_REFERENCE = (
    "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate atlases "
    "for pediatric studies. NeuroImage 54(1), 2011 (MNI ICBM152 2009a, via nilearn's wheel)"
)
_LICENCE = (
    "MNI ICBM152 2009a: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University; free use with this notice (see nilearn's licence files)"
)


def mni_template_files() -> dict[str, Path]:
    """Paths of the MNI T1, GM and WM files inside the installed nilearn package (nilearn is not imported).

    Raises:
        MedmambaError: nilearn is not installed or lacks the files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MedmambaError("nilearn is not installed: the demo data come from its wheel. Run `pip install nilearn`")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    files = {key: data / name for key, name in _FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise MedmambaError(f"{missing[0]}: missing from the nilearn installation. Reinstall nilearn (>= 0.10)")
    return files


@dataclass(frozen=True, slots=True)
class _Source:
    """The template at 2 mm (block-averaged, so no aliasing when sampled at 3-4.5 mm) and its world box."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    ras_to_index: np.ndarray  # 4×4
    box_min: np.ndarray  # RAS mm of the head's bounding box
    box_max: np.ndarray


@lru_cache(maxsize=1)
def _source() -> _Source:
    files = mni_template_files()
    images = {key: read_image(path) for key, path in files.items()}
    affine = images["t1"].geometry.affine_ras

    def halve(array: np.ndarray) -> np.ndarray:
        x, y, z = (s - s % 2 for s in array.shape)
        a = array[:x, :y, :z].astype(np.float32)
        return a.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))

    t1 = halve(images["t1"].array)
    gm = halve(images["gm"].array) / 255.0
    wm = halve(images["wm"].array) / 255.0
    # the 2 mm grid: voxel centre i ↦ 1 mm index 2i + 0.5
    half = affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
    head = np.argwhere(t1 > 0.05 * t1.max())
    corners = np.array([[*c, 1.0] for c in (head.min(0) - 2, head.max(0) + 2)]) @ half.T
    return _Source(t1, gm, wm, np.linalg.inv(half), corners[:, :3].min(0), corners[:, :3].max(0))


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoCaseParams:
    """The random draw of one case (all deterministic from the seed).

    Attributes:
        spacing: output voxel size (mm) along x, y, z.
        rotation: small rotation angles (rad) about x, y, z.
        scale: isotropic scaling of the anatomy.
        translation: shift (mm).
        deformation: coarse displacement control grid, shape (3, 5, 6, 5), in mm.
        bias: coarse log bias field control grid, shape (3, 3, 3).
        noise: Rician noise σ as a fraction of the 99th intensity percentile.
        seed: seed of the noise.
    """

    spacing: tuple[float, float, float]
    rotation: tuple[float, float, float]
    scale: float
    translation: tuple[float, float, float]
    deformation: np.ndarray
    bias: np.ndarray
    noise: float
    seed: int


def sample_case_params(
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] | None = None,
    deformation_mm: float = 3.0,
    bias_strength: float = 0.15,
    noise: float = 0.03,
) -> DemoCaseParams:
    """Draw one case's parameters; ``spacing=None`` draws in-plane 3.0-3.5 mm and slices 3.5-4.5 mm."""
    if spacing is None:
        inplane = float(rng.choice([3.0, 3.25, 3.5]))
        spacing = (inplane, inplane, float(rng.choice([3.5, 4.0, 4.5])))
    return DemoCaseParams(
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        rotation=tuple(rng.uniform(-0.08, 0.08, 3)),
        scale=float(rng.uniform(0.95, 1.05)),
        translation=tuple(rng.uniform(-4.0, 4.0, 3)),
        deformation=rng.normal(0.0, deformation_mm, (3, 5, 6, 5)),
        bias=rng.normal(0.0, bias_strength, (3, 3, 3)),
        noise=noise,
        seed=int(rng.integers(2**31)),
    )


def synthesize_case(
    params: DemoCaseParams, *, shape: Sequence[int] | None = None, centre: Sequence[float] | None = None
) -> tuple[Image, Image]:
    """Make one (T1 image, label map) pair on a RAS-aligned grid.

    Args:
        params: the case's draw (``sample_case_params``).
        shape: output grid shape; None covers the template's head box at ``params.spacing``.
        centre: RAS mm of the grid centre; None = the head box centre.

    Returns:
        ``(image, label)``: float32 intensities and uint8 labels (0 bg, 1 GM, 2 WM), same geometry.
    """
    from scipy.ndimage import map_coordinates, zoom

    src = _source()
    spacing = np.asarray(params.spacing)
    extent = src.box_max - src.box_min
    if shape is None:
        shape = tuple(int(np.ceil(e / s)) for e, s in zip(extent, spacing, strict=True))
    shape = tuple(int(s) for s in shape)
    centre_ras = (src.box_min + src.box_max) / 2 if centre is None else np.asarray(centre, dtype=float)
    # output grid: RAS-aligned (i → +x, j → +y, k → +z), centred on the head
    origin = centre_ras - spacing * (np.asarray(shape) - 1) / 2
    index = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), axis=0)
    world = index * spacing.reshape(3, 1, 1, 1).astype(np.float32) + origin.reshape(3, 1, 1, 1).astype(np.float32)
    # anatomy transform about the centre: rotation and scale, shift, then the smooth displacement field
    rotation = _rotation(params.rotation) * params.scale
    moved = np.einsum("ij,j...->i...", rotation, world - centre_ras.reshape(3, 1, 1, 1)) + (
        centre_ras + np.asarray(params.translation)
    ).reshape(3, 1, 1, 1)
    moved += np.stack([_upsample(params.deformation[a], shape, zoom) for a in range(3)])
    source_index = np.einsum("ij,j...->i...", src.ras_to_index[:3, :3], moved) + src.ras_to_index[:3, 3].reshape(
        3, 1, 1, 1
    )
    sample = lambda volume: map_coordinates(volume, source_index, order=1, mode="constant", cval=0.0)  # noqa: E731
    t1, gm, wm = sample(src.t1), sample(src.gm), sample(src.wm)
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)
    bias = np.exp(_upsample(params.bias, shape, zoom))
    image = t1 * bias
    sigma = params.noise * float(np.percentile(image, 99))
    rng = np.random.default_rng(params.seed)
    image = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2).astype(np.float32)
    direction = LPS_TO_RAS  # RAS-aligned axes expressed in LPS: x → left-to-right is −L
    lps_origin = LPS_TO_RAS @ origin
    geometry = Geometry(tuple(spacing), tuple(lps_origin), direction.ravel())
    return Image(image, geometry), Image(label, geometry)


def build_demo_segmentation(
    raw_root: str | os.PathLike[str],
    *,
    dataset_id: int = 990,
    name: str = "MNITissue",
    num_cases: int = 10,
    num_test: int = 2,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``DatasetXXX_MNITissue``: T1 → background / grey matter / white matter, nnU-Net raw format.

    Args:
        raw_root: folder that receives the dataset (e.g. ``$MEDMAMBA_RAW``).
        dataset_id: nnU-Net dataset id.
        name: dataset name.
        num_cases: labelled training cases.
        num_test: extra unlabelled cases in imagesTs.
        seed: everything is deterministic from it.
        spacing: fixed output spacing for every case; None draws it per case (anisotropic, 3-4.5 mm).
        overwrite: replace an existing dataset folder.

    Returns:
        The dataset folder.
    """
    rng = np.random.default_rng(seed)
    with RawDatasetWriter(
        raw_root,
        dataset_id,
        name,
        channel_names=["T1"],
        labels=DEMO_LABELS,
        overwrite=overwrite,
        description="MNI ICBM152 2009a T1 with per-case random smooth deformation, bias field, Rician noise and "
        "anisotropic resampling; labels from its grey/white-matter maps (real anatomy, synthetic variation)",
        reference=_REFERENCE,
        license=_LICENCE,
        converted_by=f"medmamba.io.datasets.demo.build_demo_segmentation (seed {seed})",
    ) as writer:
        for i in range(num_cases + num_test):
            image, label = synthesize_case(sample_case_params(rng, spacing=spacing))
            test = i >= num_cases
            writer.add_case(f"mni_{i:03d}", [image], None if test else label, test=test)
    logger.info("demo segmentation dataset written to %s", writer.path)
    return writer.path


def build_demo_registration(
    raw_root: str | os.PathLike[str],
    *,
    dataset_id: int = 991,
    name: str = "MNIPairs",
    num_subjects: int = 6,
    num_val_pairs: int = 1,
    seed: int = 0,
    spacing: float = 3.0,
    shape: Sequence[int] = (48, 64, 48),
    overwrite: bool = False,
) -> Path:
    """Write ``DatasetXXX_MNIPairs``: subjects on one common grid, consecutive fixed/moving pairs, with labels.

    Every subject is a draw of the demo transform (deformation, bias, noise) resampled onto the same isotropic
    grid centred on the head, as Learn2Reg's pre-aligned datasets are; pairs are (subject i, subject i+1).
    The last ``num_val_pairs`` pairs go to ``registration_val``.

    Returns:
        The dataset folder.
    """
    if num_subjects < 2 or not 0 <= num_val_pairs < num_subjects - 1:
        raise ValueError(
            f"need at least 2 subjects and fewer validation pairs than pairs, got {num_subjects}, {num_val_pairs}"
        )
    rng = np.random.default_rng(seed)
    labels = {v: k for k, v in DEMO_LABELS.items()}
    with RegistrationDatasetWriter(
        raw_root,
        dataset_id,
        name,
        modalities=["MR"],
        labels=labels,
        overwrite=overwrite,
        description="MNI ICBM152 2009a T1 subjects made by random smooth deformation, bias field and noise, on one "
        "common grid; labels from its grey/white-matter maps (real anatomy, synthetic variation)",
        reference=_REFERENCE,
        licence=_LICENCE,
    ) as writer:
        paths = []
        for i in range(num_subjects):
            image, label = synthesize_case(sample_case_params(rng, spacing=(spacing,) * 3), shape=shape)
            paths.append(writer.add_image(f"mni_{i:03d}", image, label))
        pairs = list(itertools.pairwise(paths))
        for k, (fixed, moving) in enumerate(pairs):
            writer.add_pair(fixed, moving, split="val" if k >= len(pairs) - num_val_pairs else "train")
    logger.info("demo registration dataset written to %s", writer.path)
    return writer.path


def _rotation(angles: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _upsample(control: np.ndarray, shape: Sequence[int], zoom) -> np.ndarray:
    """Cubic interpolation of a coarse control grid to ``shape`` (smooth by construction)."""
    factors = [n / c for n, c in zip(shape, control.shape, strict=True)]
    out = zoom(control, factors, order=3, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, n) for n in shape)].astype(np.float32)

"""Read and write medical images with their geometry: NIfTI (nibabel), NRRD, MHA and PNG (SimpleITK).

NIfTI goes through nibabel because SimpleITK returns success on a truncated ``.nii``/``.nii.gz`` (the missing
tail reads as zeros), while nibabel raises; NRRD and MHA go through SimpleITK, which does detect truncation.
Both paths end in the same ``Image``: an array indexed ``(x, y, z)`` and a ``Geometry`` in LPS (see
``medmamba.io.geometry``). Header problems that make two trusted readers disagree (qform ≠ sform, zero or
negative pixdim, sheared axes) are errors, not silent choices. Every write is atomic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmamba.errors import GeometryError, ImageReadError
from medmamba.io.atomic import atomic_write
from medmamba.io.geometry import Geometry

__all__ = [
    "NIFTI_ENDINGS",
    "SUPPORTED_ENDINGS",
    "Image",
    "ImageHeader",
    "image_ending",
    "read_header",
    "read_image",
    "write_image",
]

logger = logging.getLogger(__name__)

NIFTI_ENDINGS = (".nii.gz", ".nii")
_SITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd", ".png")
SUPPORTED_ENDINGS = NIFTI_ENDINGS + _SITK_ENDINGS

#: qform and sform may differ by float32 rounding; beyond these they describe different grids
_QS_ATOL_MM = 1e-3
_QS_ATOL_MATRIX = 1e-4


@dataclass(frozen=True, slots=True, eq=False)
class Image:
    """A voxel array with its geometry.

    Args:
        array: ``(X, Y, Z)`` (or ``(X, Y)`` for 2-D) in file index order; a multi-volume file (4-D NIfTI,
            vector NRRD/MHA) has the volumes on a trailing axis, ``(X, Y, Z, T)``.
        geometry: spacing/origin/direction of the spatial axes (LPS).

    Example:
        >>> img = Image(np.zeros((4, 5, 6), np.float32), Geometry((1, 1, 2), (0, 0, 0), np.eye(3).ravel()))
        >>> img.shape, img.num_volumes
        ((4, 5, 6), 1)
    """

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if self.array.ndim not in (self.geometry.ndim, self.geometry.ndim + 1):
            raise ValueError(
                f"array of shape {self.array.shape} does not fit a {self.geometry.ndim}-D geometry "
                f"(expected {self.geometry.ndim} spatial axes, optionally one trailing volume axis)"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(self.array.shape[: self.geometry.ndim])

    @property
    def num_volumes(self) -> int:
        """1 for a plain image, T for a multi-volume one."""
        return 1 if self.array.ndim == self.geometry.ndim else int(self.array.shape[-1])

    def volume(self, index: int) -> Image:
        """One volume of a multi-volume image, as a plain image."""
        if self.num_volumes == 1 and index == 0 and self.array.ndim == self.geometry.ndim:
            return self
        return Image(self.array[..., index], self.geometry)


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What a file's header says, read without the voxel data (cheap: used by checks and planners)."""

    path: Path
    shape: tuple[int, ...]
    num_volumes: int
    dtype: np.dtype
    geometry: Geometry

    @property
    def nbytes(self) -> int:
        """Bytes the voxel data take in memory once read."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.num_volumes * self.dtype.itemsize


def image_ending(path: str | os.PathLike[str]) -> str | None:
    """The supported ending of ``path`` (``".nii.gz"``, ``".nrrd"`` …), or None."""
    name = Path(path).name.lower()
    return next((e for e in SUPPORTED_ENDINGS if name.endswith(e)), None)


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Read shape, dtype and geometry of an image file without its voxels.

    Raises:
        ImageReadError: missing, unsupported or unreadable file.
        GeometryError: invalid geometry (zero/negative spacing, qform ≠ sform, sheared axes).
    """
    path = _existing(path)
    if image_ending(path) in NIFTI_ENDINGS:
        return _nifti_header(path, _load_nifti(path))
    return _sitk_header(path, _sitk_reader(path))


def read_image(path: str | os.PathLike[str], *, multi_volume: bool = False, max_bytes: int | None = None) -> Image:
    """Read an image file into an ``Image`` (array ``(x, y, z)``, LPS geometry).

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd`` or ``.png``.
        multi_volume: accept a 4-D / vector file and return its volumes on a trailing axis; otherwise such a file
            is an error (a trailing axis of length 1 is always squeezed).
        max_bytes: refuse files whose header promises more voxel bytes than this (default: half the machine's
            memory), so a corrupt header claiming 30000³ voxels fails with a message instead of an OOM kill.

    Raises:
        ImageReadError: missing, unsupported, truncated or damaged file; too large; unexpected extra volumes.
        GeometryError: zero/negative/non-finite spacing, qform ≠ sform, sheared axes.
    """
    path = _existing(path)
    if image_ending(path) in NIFTI_ENDINGS:
        nifti = _load_nifti(path)
        header = _nifti_header(path, nifti)
        _check_size(header, multi_volume, max_bytes)
        try:
            array = np.asarray(nifti.dataobj)
        except (EOFError, OSError, zlib.error, ValueError) as err:
            raise ImageReadError(
                f"{path}: the voxel data cannot be read ({_short(err)}); the file is truncated or damaged. "
                "Copy or export it again"
            ) from None
        array = (
            array.reshape(*header.shape, header.num_volumes) if header.num_volumes > 1 else array.reshape(header.shape)
        )
    else:
        reader = _sitk_reader(path)
        header = _sitk_header(path, reader)
        _check_size(header, multi_volume, max_bytes)
        import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

        try:
            with quiet_itk():
                sitk_image = reader.Execute()
        except RuntimeError as err:
            raise ImageReadError(
                f"{path}: the voxel data cannot be read ({_short(err)}); the file is truncated or damaged. "
                "Copy or export it again"
            ) from None
        array = _from_sitk_array(sitk.GetArrayFromImage(sitk_image), sitk_image.GetDimension(), header)
    if not array.dtype.isnative:  # big-endian files (nibabel's anatomical.nii): native order for numpy and ITK
        array = array.astype(array.dtype.newbyteorder("="))
    return Image(array, header.geometry)


def write_image(image: Image, path: str | os.PathLike[str], *, dtype: Any = None) -> Path:
    """Write ``image`` to ``path`` (format from the ending) atomically; returns the path.

    NIfTI gets identical qform and sform (codes 1, scanner) so nibabel, SimpleITK and nnU-Net read the same grid;
    NRRD and MHA are written compressed.

    Args:
        image: what to write.
        path: target file; the folder must exist.
        dtype: cast to this dtype first (e.g. ``np.uint8`` for label maps); bool becomes uint8, int64 int32 when
            the values fit.
    """
    import nibabel as nib
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    path = Path(path)
    ending = image_ending(path)
    if ending is None:
        raise ImageReadError(f"{path}: cannot write this file type. Use one of {', '.join(SUPPORTED_ENDINGS)}")
    array = _writable(image.array, dtype)
    with atomic_write(path) as tmp:
        if ending in NIFTI_ENDINGS:
            affine = image.geometry.affine_ras
            if image.geometry.ndim == 2:
                array = array.reshape(*image.shape, 1, *array.shape[2:])
            nifti = nib.Nifti1Image(array, affine)
            nifti.header.set_data_dtype(array.dtype)
            nifti.set_qform(affine, code=1)
            nifti.set_sform(affine, code=1)
            nifti.header.set_xyzt_units("mm", "sec")
            nib.save(nifti, tmp)
        else:
            spatial = image.geometry.ndim
            if image.array.ndim == spatial:
                sitk_image = sitk.GetImageFromArray(array.transpose(*reversed(range(spatial))))
            else:
                order = (*reversed(range(spatial)), spatial)
                sitk_image = sitk.GetImageFromArray(array.transpose(order), isVector=True)
            image.geometry.apply_to_sitk(sitk_image)
            sitk.WriteImage(sitk_image, str(tmp), useCompression=ending != ".png")
    return path


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise ImageReadError(f"{path}: {what}. Check the path")
    if image_ending(path) is None:
        raise ImageReadError(
            f"{path}: unsupported file type. Use one of {', '.join(SUPPORTED_ENDINGS)} "
            "(DICOM series: medmamba.io.read_dicom_series or `medmamba convert dicom`)"
        )
    return path


def _load_nifti(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(path, mmap=False)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as err:
        raise ImageReadError(
            f"{path}: not a readable NIfTI file ({_short(err)}). Check that the file is complete and really NIfTI"
        ) from None


def _nifti_header(path: Path, nifti: Any) -> ImageHeader:
    header = nifti.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) > 4 and not (len(shape) == 5 and shape[3] == 1):
        raise ImageReadError(
            f"{path}: {len(shape)}-D NIfTI of shape {shape} is not an image medmamba reads (3-D, or 4-D with "
            "volumes). Split it into 3-D files"
        )
    spatial, volumes = (shape[:3], int(np.prod(shape[3:]))) if len(shape) > 3 else (shape, 1)
    if len(spatial) < 3:
        spatial = (*spatial, *([1] * (3 - len(spatial))))
    pixdim = [float(v) for v in _raw_pixdim(path, header)[1 : 1 + min(len(shape), 3)]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        raise GeometryError(
            f"{path}: spacing (pixdim) {tuple(pixdim)} has a zero, negative or non-finite entry. "
            "Fix pixdim in the header or re-export the volume"
        )
    qform, qcode = nifti.get_qform(coded=True)
    sform, scode = nifti.get_sform(coded=True)
    if qcode and scode and not _same_affine(qform, sform):
        raise GeometryError(
            f"{path}: qform (code {int(qcode)}) and sform (code {int(scode)}) describe different grids "
            f"(qform origin {tuple(np.round(qform[:3, 3], 3))}, sform origin {tuple(np.round(sform[:3, 3], 3))}); "
            "nibabel uses the sform, ITK/SimpleITK (and so nnU-Net) the qform. Make them agree, e.g. with nibabel: "
            "img.set_qform(img.get_sform()) if the sform is right"
        )
    if not qcode and not scode:
        logger.warning("%s: qform_code = sform_code = 0, no orientation stored; assuming nibabel's default", path)
    affine = sform if scode else (qform if qcode else nifti.affine)
    try:
        geometry = Geometry.from_affine(affine)
    except GeometryError as err:
        raise GeometryError(f"{path}: {err}") from None
    geometry.validate(str(path))
    if len(shape) > 3 and volumes == 1:
        logger.info("%s: trailing singleton axes of %s squeezed", path, shape)
    return ImageHeader(path, spatial, volumes, np.dtype(nifti.get_data_dtype()), geometry)


def _raw_pixdim(path: Path, header: Any) -> np.ndarray:
    """Pixdim as stored: nibabel's loader silently "fixes" zero (to 1) and negative (to abs) entries."""
    import gzip

    import nibabel as nib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            block = handle.read(540)
        klass = nib.Nifti2Header if isinstance(header, nib.Nifti2Header) else nib.Nifti1Header
        raw = klass(block[: klass.template_dtype.itemsize], endianness=header.endianness, check=False)
        return np.asarray(raw["pixdim"], dtype=np.float64)
    except (OSError, EOFError, ValueError):
        return np.asarray(header["pixdim"], dtype=np.float64)


def _same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(
        np.allclose(a[:3, 3], b[:3, 3], rtol=0, atol=_QS_ATOL_MM)
        and np.allclose(a[:3, :3], b[:3, :3], rtol=0, atol=_QS_ATOL_MATRIX * max(1.0, np.abs(a[:3, :3]).max()))
    )


def _sitk_reader(path: Path) -> Any:
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(
            f"{path}: not a readable image file ({_short(err)}). Check that the file is complete and of the type "
            "its ending says"
        ) from None
    return reader


def _sitk_header(path: Path, reader: Any) -> ImageHeader:
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    dim = reader.GetDimension()
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    spacing, origin = reader.GetSpacing(), reader.GetOrigin()
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)
    if dim == 4:
        spatial, volumes = size[:3], size[3] * components
        spacing, origin, direction = spacing[:3], origin[:3], direction[:3, :3]
    elif dim in (2, 3):
        spatial, volumes = size, components
    else:
        raise ImageReadError(f"{path}: {dim}-D image; medmamba reads 2-D, 3-D and 4-D images")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise GeometryError(
            f"{path}: spacing {tuple(spacing)} has a zero, negative or non-finite entry. "
            "Fix the spacing in the header or re-export the volume"
        )
    geometry = Geometry(spacing, origin, direction.ravel())
    geometry.validate(str(path))
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    dtype = _SITK_DTYPES.get(pixel.replace("vector of ", ""), np.dtype(np.float64))
    return ImageHeader(path, spatial, volumes, dtype, geometry)


_SITK_DTYPES: dict[str, np.dtype] = {
    "8-bit unsigned integer": np.dtype(np.uint8),
    "8-bit signed integer": np.dtype(np.int8),
    "16-bit unsigned integer": np.dtype(np.uint16),
    "16-bit signed integer": np.dtype(np.int16),
    "32-bit unsigned integer": np.dtype(np.uint32),
    "32-bit signed integer": np.dtype(np.int32),
    "64-bit unsigned integer": np.dtype(np.uint64),
    "64-bit signed integer": np.dtype(np.int64),
    "32-bit float": np.dtype(np.float32),
    "64-bit float": np.dtype(np.float64),
}


def _from_sitk_array(array: np.ndarray, dim: int, header: ImageHeader) -> np.ndarray:
    """SimpleITK's ``(z, y, x[, c])`` / 4-D ``(t, z, y, x[, c])`` → ``(x, y, z[, volumes])``."""
    spatial = len(header.shape)
    if dim == 4:
        array = np.moveaxis(array, 0, -1)  # (z, y, x, [c,] t)
        array = array.reshape(*array.shape[:3], -1)
        array = array.transpose(2, 1, 0, 3)
    elif array.ndim == spatial + 1:
        array = array.transpose(*reversed(range(spatial)), spatial)
    else:
        array = array.transpose(*reversed(range(spatial)))
    if header.num_volumes == 1 and array.ndim > spatial:
        array = array[..., 0]
    return np.ascontiguousarray(array)


def _check_size(header: ImageHeader, multi_volume: bool, max_bytes: int | None) -> None:
    budget = _memory_budget() if max_bytes is None else max_bytes
    if header.nbytes > budget:
        raise ImageReadError(
            f"{header.path}: the header promises {header.nbytes / 2**30:.1f} GiB of voxels "
            f"(shape {header.shape} × {header.num_volumes} volume(s), {header.dtype}), more than the "
            f"{budget / 2**30:.1f} GiB allowed; the header is probably corrupt. Re-export the file"
        )
    if header.num_volumes > 1 and not multi_volume:
        raise ImageReadError(
            f"{header.path}: has {header.num_volumes} volumes (shape {header.shape} × {header.num_volumes}) where one "
            "3-D image was expected. Split it into one file per channel (_0000, _0001, …; `medmamba convert msd` "
            "does this for MSD tasks)"
        )


def _memory_budget() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _writable(array: np.ndarray, dtype: Any) -> np.ndarray:
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if dtype is not None:
        target = np.dtype(dtype)
        if target.kind in "iu" and array.dtype.kind == "f":
            array = np.rint(array)
        array = array.astype(target, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype == np.int64 and (array.size == 0 or np.abs(array).max() < 2**31):
        array = array.astype(np.int32)
    return np.ascontiguousarray(array)


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK prints warnings to stderr where they can't be caught; our own checks report the problems instead."""
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 160 else text[:157] + "…"

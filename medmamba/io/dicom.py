"""DICOM series: discovery, choice by SeriesInstanceUID, slice-geometry checks, then SimpleITK's reader.

SimpleITK's ``ImageSeriesReader`` only *prints* a warning for missing slices or mixed orientations and returns
a volume with an averaged, wrong spacing (ecosystem spec §2.1: pydicom's ``77654033/CT2`` reads with 68 mm
slices). So the headers are read first with pydicom and checked here — one orientation, one pixel grid,
distinct positions, uniform gaps (within 1 %) — and only then are the pixels read, by SimpleITK (GDCM decodes
JPEG 2000/JPEG-LS/RLE/12-bit JPEG and applies Rescale Slope/Intercept), from the files in the order of their
position along the slice normal (not InstanceNumber). Localizers (``ImageType`` containing ``LOCALIZER``) are
dropped with a warning. Non-uniform spacing is an error, never a silent resample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmamba.errors import GeometryError, ImageReadError
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image

__all__ = ["DicomSeries", "check_dicom_series", "find_dicom_series", "read_dicom_series"]

logger = logging.getLogger(__name__)

#: relative tolerance on slice gaps: beyond it a series has missing slices or variable spacing
GAP_RTOL = 0.01
#: tolerance on direction cosines between slices of one series
ORIENTATION_ATOL = 1e-4


@dataclass(frozen=True, slots=True)
class DicomSeries:
    """One series found on disk.

    Attributes:
        uid: SeriesInstanceUID.
        files: its image files (localizers removed), in position order once read.
        description: SeriesDescription ("" when absent).
        modality: Modality (CT, MR, …).
        number: SeriesNumber or None.
        localizers: how many localizer images of this UID were dropped.
    """

    uid: str
    files: tuple[Path, ...]
    description: str
    modality: str
    number: int | None
    localizers: int = 0

    def summary(self) -> str:
        """One line: UID, number, description, modality, file count."""
        number = f"#{self.number} " if self.number is not None else ""
        return f"{self.uid} ({number}{self.description or 'no description'}, {self.modality}, {len(self.files)} files)"


def find_dicom_series(folder: str | os.PathLike[str], *, recursive: bool = True) -> list[DicomSeries]:
    """Every image series under ``folder``, grouped by SeriesInstanceUID, largest first.

    Non-DICOM files and DICOMDIR are skipped; localizer images are counted, not listed. Series made only of
    localizers are left out.

    Raises:
        ImageReadError: ``folder`` is not a folder or holds no DICOM image.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder. Give the folder that holds the DICOM series")
    paths = sorted(folder.rglob("*") if recursive else folder.iterdir())
    groups: dict[str, list[tuple[Path, Any]]] = {}
    localizers: dict[str, int] = {}
    for path in paths:
        if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
            logger.debug("%s: not DICOM, skipped", path)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid or "Rows" not in ds:
            continue  # no pixel data: structured reports, RT plans, DICOMDIR-like files
        if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
            localizers[uid] = localizers.get(uid, 0) + 1
            continue
        groups.setdefault(uid, []).append((path, ds))
    for uid, count in localizers.items():
        logger.warning("series %s: %d localizer image(s) dropped", uid, count)
    if not groups:
        raise ImageReadError(
            f"{folder}: no DICOM image series found{' (only localizers)' if localizers else ''}. Check the folder"
        )
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        number = first.get("SeriesNumber")
        series.append(
            DicomSeries(
                uid=uid,
                files=tuple(p for p, _ in members),
                description=str(first.get("SeriesDescription", "")).strip(),
                modality=str(first.get("Modality", "")),
                number=int(number) if number not in (None, "") else None,
                localizers=localizers.get(uid, 0),
            )
        )
    return sorted(series, key=lambda s: (-len(s.files), s.uid))


def read_dicom_series(
    folder: str | os.PathLike[str] | DicomSeries, *, series_uid: str | None = None, recursive: bool = True
) -> Image:
    """Read one DICOM series into an ``Image`` (array ``(x, y, z)``; modality LUT applied; LPS geometry).

    Args:
        folder: a folder with DICOM files (searched recursively unless ``recursive=False``), or a ``DicomSeries``
            from ``find_dicom_series``.
        series_uid: which series when the folder holds several.
        recursive: look into sub-folders too.

    Raises:
        ImageReadError: no series, several series and no ``series_uid``, unknown ``series_uid``, unreadable pixels.
        GeometryError: mixed orientations or pixel grids, duplicate positions, missing slices / non-uniform
            slice spacing.

    Example:
        >>> from pydicom.data import get_testdata_file
        >>> folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
        >>> read_dicom_series(folder).shape
        (16, 16, 5)
    """
    import pydicom

    if isinstance(folder, DicomSeries):
        series, where = folder, Path(os.path.commonpath([str(f.parent) for f in folder.files]))
    else:
        where = Path(folder)
        series = _choose(find_dicom_series(where, recursive=recursive), where, series_uid)
    headers = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in series.files]
    if len(headers) == 1 and int(headers[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(headers[0][0])
    ordered, spacing = _check_slices(headers, where, series)
    return _read_sorted(ordered, spacing, where, series)


def check_dicom_series(series: DicomSeries) -> None:
    """Run the slice-geometry checks of ``read_dicom_series`` on the headers only (no pixel data read).

    Raises:
        GeometryError: mixed orientations or grids, duplicate positions, non-uniform slice spacing.
    """
    import pydicom

    where = Path(os.path.commonpath([str(f.parent) for f in series.files]))
    headers = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in series.files]
    if len(headers) > 1 or int(headers[0][1].get("NumberOfFrames", 1) or 1) == 1:
        _check_slices(headers, where, series)


def _choose(found: Sequence[DicomSeries], folder: Path, series_uid: str | None) -> DicomSeries:
    listing = "; ".join(s.summary() for s in found)
    if series_uid is not None:
        for series in found:
            if series.uid == series_uid:
                return series
        raise ImageReadError(f"{folder}: no series with UID {series_uid}. Found: {listing}")
    if len(found) > 1:
        raise ImageReadError(
            f"{folder}: holds {len(found)} series: {listing}. Choose one by its UID "
            "(series_uid=… in Python, --series-uid on the command line)"
        )
    return found[0]


def _check_slices(headers: list[tuple[Path, Any]], folder: Path, series: DicomSeries) -> tuple[list[Path], float]:
    """Sort by position along the normal; check orientation, grid and gaps; return files and slice spacing."""
    where = f"{folder} (series {series.uid})"
    missing = [p.name for p, ds in headers if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds]
    if missing:
        raise GeometryError(
            f"{where}: {len(missing)} image(s) lack ImageOrientationPatient/ImagePositionPatient (e.g. {missing[0]}), "
            "so their place in space is unknown. Re-export the series with its geometry tags"
        )
    orientation = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    for path, ds in headers[1:]:
        other = np.array([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(orientation, other, atol=ORIENTATION_ATOL):
            raise GeometryError(
                f"{where}: mixed slice orientations ({headers[0][0].name}: {orientation.round(4).tolist()}, "
                f"{path.name}: {other.round(4).tolist()}); this is not one volume (a localizer or a multi-planar "
                "series). Export the volume you need as its own series"
            )
    grids = {
        (int(ds.Rows), int(ds.Columns), tuple(float(v) for v in ds.get("PixelSpacing", (1, 1)))) for _, ds in headers
    }
    if len(grids) > 1:
        raise GeometryError(
            f"{where}: slices have different sizes or pixel spacings {sorted(grids)}. Re-export the series"
        )
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [(float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)), path) for path, ds in headers]
    positions.sort(key=lambda item: item[0])
    files = [path for _, path in positions]
    if len(files) == 1:
        thickness = float(headers[0][1].get("SliceThickness", 1.0) or 1.0)
        logger.warning("%s: a single slice; slice spacing taken from SliceThickness (%g mm)", where, thickness)
        return files, thickness
    gaps = np.diff([z for z, _ in positions])
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise GeometryError(
            f"{where}: {files[i].name} and {files[i + 1].name} lie at the same position; the series holds "
            "duplicate slices or several volumes (time points, echoes). Split it or export one volume"
        )
    median = float(np.median(gaps))
    worst = float(np.abs(gaps - median).max())
    if worst > GAP_RTOL * median:
        raise GeometryError(
            f"{where}: non-uniform slice spacing: gaps between consecutive slices range from {gaps.min():.3g} to "
            f"{gaps.max():.3g} mm (median {median:.3g}); slices are missing or the spacing varies. Re-export the "
            "complete series; medmamba does not resample it silently"
        )
    return files, median


def _read_sorted(files: list[Path], spacing: float, folder: Path, series: DicomSeries) -> Image:
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    from medmamba.io.image import quiet_itk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        with quiet_itk():
            volume = reader.Execute()
    except RuntimeError as err:
        raise ImageReadError(
            f"{folder} (series {series.uid}): pixel data cannot be read ({' '.join(str(err).split())[:160]}); a "
            "file is truncated or uses a compression GDCM cannot decode. Re-export the series"
        ) from None
    geometry = Geometry.from_sitk(volume)
    # ITK takes the slice spacing from the first two positions; ours is the checked median of all gaps.
    geometry = Geometry((*geometry.spacing[:2], spacing), geometry.origin, geometry.direction)
    array = sitk.GetArrayFromImage(volume)
    if array.ndim == 4:  # RGB slices
        raise ImageReadError(
            f"{folder} (series {series.uid}): colour (RGB) images are not supported. Use a greyscale series"
        )
    # MONOCHROME1 (bright = low values) comes back inverted by GDCM already: larger means brighter everywhere.
    array = array.transpose(2, 1, 0)
    logger.info("read DICOM series %s: %s, spacing %s", series.uid, array.shape, geometry.spacing)
    return Image(np.ascontiguousarray(array), geometry)


def _read_multiframe(path: Path) -> Image:
    """Enhanced (multi-frame) DICOM: SimpleITK reads the functional groups; no groups means no geometry."""
    import pydicom
    import SimpleITK as sitk  # noqa: N813 - SimpleITK's own convention

    from medmamba.io.image import quiet_itk

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        raise GeometryError(
            f"{path}: multi-frame DICOM without functional groups stores no slice geometry (spacing and position "
            "would be made up). Re-export it as an enhanced object or as single-frame slices"
        )
    try:
        with quiet_itk():
            volume = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ImageReadError(f"{path}: pixel data cannot be read ({' '.join(str(err).split())[:160]})") from None
    return Image(np.ascontiguousarray(sitk.GetArrayFromImage(volume).transpose(2, 1, 0)), Geometry.from_sitk(volume))

"""Bytes on disk: medical images (NIfTI, NRRD, MHA, DICOM) with their geometry, datasets, atomic writes.

Arrays are indexed ``(x, y, z)`` (file order, as nibabel and MONAI); geometry is ITK's LPS convention
(``medmamba.io.geometry``). Nothing here imports torch.
"""

from __future__ import annotations

from medmamba.io.atomic import atomic_dir, atomic_write, write_json
from medmamba.io.dicom import DicomSeries, find_dicom_series, read_dicom_series
from medmamba.io.geometry import Geometry
from medmamba.io.image import SUPPORTED_ENDINGS, Image, ImageHeader, read_header, read_image, write_image
from medmamba.io.verify import VerifyReport, check_dataset, verify_dataset

__all__ = [
    "SUPPORTED_ENDINGS",
    "DicomSeries",
    "Geometry",
    "Image",
    "ImageHeader",
    "VerifyReport",
    "atomic_dir",
    "atomic_write",
    "check_dataset",
    "find_dicom_series",
    "read_dicom_series",
    "read_header",
    "read_image",
    "verify_dataset",
    "write_image",
    "write_json",
]

"""Bytes on disk: medical images (NIfTI, NRRD, MHA, DICOM) with their geometry, datasets, atomic writes."""

from __future__ import annotations

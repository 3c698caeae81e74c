"""Registration dataset format: images with optional label maps, and fixed/moving pairs — Learn2Reg's layout.

Follows the Learn2Reg challenge's ``dataset.json`` (e.g. OASIS, AbdomenCTCT, ThoraxCBCT) so its datasets open
unchanged::

    DatasetXXX_Name/
      dataset.json
      imagesTr/CASE_0000.nii.gz     image of CASE in modality 0 (CASE_0001: modality 1, e.g. CT of an MR-CT pair)
      labelsTr/CASE_0000.nii.gz     optional label map of that image (same grid)
      imagesTs/…, labelsTs/…        optional

    dataset.json
      "name", "description", "licence", "reference", "release"      free text
      "modality": {"0": "MR", "1": "CT"}                              per file suffix _0000, _0001
      "labels": {"0": {"0": "background", "1": "GM", "2": "WM"}}      per modality: value → name
      "tensorImageShape": {"0": [X, Y, Z]}                            every image's grid (pairs share it)
      "pairings": "paired" | "unpaired",  "provided_data": {"0": ["image", "label"]}
      "registration_direction": {"fixed": 0, "moving": 1}
      "numTraining", "training": [{"image": "./imagesTr/…", "label": "./labelsTr/…"}]
      "numTest", "test": [...]
      "numPairedTraining", "training_paired_images": [{"fixed": "./imagesTr/…", "moving": "./imagesTr/…"}]
      "numRegistration_val", "registration_val": [...];  "numRegistration_test", "registration_test": [...]

Paths are relative to the dataset folder. Pairs name images; an image's label is found through the
``training``/``test`` lists. MambaMorph-style networks need both images of a pair on one grid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from medmamba.errors import DatasetError, Problem
from medmamba.io.atomic import atomic_dir, write_json
from medmamba.io.datasets.nnunet_raw import dataset_folder_name
from medmamba.io.image import Image, write_image

__all__ = [
    "RegistrationDataset",
    "RegistrationDatasetWriter",
    "RegistrationImage",
    "RegistrationPair",
    "check_registration_dataset",
    "is_registration_json",
    "open_registration_dataset",
]

#: dataset.json key of each split's pair list
PAIR_KEYS = {"train": "training_paired_images", "val": "registration_val", "test": "registration_test"}
_COUNT_KEYS = {"train": "numPairedTraining", "val": "numRegistration_val", "test": "numRegistration_test"}


@dataclass(frozen=True, slots=True)
class RegistrationImage:
    """One image of the dataset and its optional label map (absolute paths)."""

    image: Path
    label: Path | None = None


@dataclass(frozen=True, slots=True)
class RegistrationPair:
    """A fixed/moving pair of one split (``"train"``, ``"val"``, ``"test"``)."""

    fixed: RegistrationImage
    moving: RegistrationImage
    split: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistrationDataset:
    """A registration dataset on disk.

    Attributes:
        root: its folder.
        modalities: ``{0: "MR", 1: "CT"}``.
        labels: per modality, label value → name.
        shape: the common image shape (``tensorImageShape["0"]``), or None if not declared.
        images: every listed image (training then test).
        pairs: every pair, training, then validation, then test.
        raw: the dataset.json object as read.
    """

    root: Path
    modalities: dict[int, str]
    labels: dict[int, dict[int, str]]
    shape: tuple[int, ...] | None
    images: tuple[RegistrationImage, ...]
    pairs: tuple[RegistrationPair, ...]
    raw: dict[str, Any]

    def pairs_of(self, split: str) -> tuple[RegistrationPair, ...]:
        """The pairs of one split."""
        return tuple(p for p in self.pairs if p.split == split)

    def label_values(self, modality: int = 0) -> tuple[int, ...]:
        """Declared label values of a modality, sorted (always including 0)."""
        return tuple(sorted({0, *self.labels.get(modality, {})}))


def is_registration_json(data: Mapping[str, Any]) -> bool:
    """True when a dataset.json describes registration pairs (Learn2Reg keys)."""
    return any(k in data for k in (*PAIR_KEYS.values(), "registration_direction"))


def open_registration_dataset(root: str | os.PathLike[str]) -> RegistrationDataset:
    """Read a registration dataset's dataset.json and resolve its files.

    Raises:
        DatasetError: dataset.json missing, not JSON, or malformed (every problem listed).
    """
    dataset, problems = _parse(Path(root))
    if dataset is None or problems:
        raise DatasetError(problems, header=f"{root}: not a valid registration dataset")
    return dataset


def _parse(root: Path) -> tuple[RegistrationDataset | None, list[Problem]]:
    path = root / "dataset.json"
    problems: list[Problem] = []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Problem(str(path), "missing", "Create it (Learn2Reg-style dataset.json)")]
    except (OSError, ValueError) as err:
        return None, [Problem(str(path), f"cannot be read as JSON ({err})", "Fix the syntax")]
    fix_pairs = 'List pairs as {"fixed": "./imagesTr/A_0000.nii.gz", "moving": "./imagesTr/B_0000.nii.gz"}'
    try:
        modalities = {int(k): str(v) for k, v in dict(data.get("modality", {"0": "image"})).items()}
        labels = {
            int(m): {int(v): str(n) for k, n in dict(table).items() for v in [k]}
            for m, table in dict(data.get("labels", {})).items()
        }
    except (TypeError, ValueError) as err:
        return None, [
            Problem(
                str(path),
                f"modality/labels are malformed ({err})",
                'Use "modality": {"0": "MR"}, "labels": {"0": {"0": "background", "1": "…"}}',
            )
        ]
    shape_entry = dict(data.get("tensorImageShape", {})).get("0")
    shape = tuple(int(s) for s in shape_entry) if shape_entry else None
    resolve = lambda rel: (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)  # noqa: E731
    listed: dict[Path, RegistrationImage] = {}
    for key in ("training", "test"):
        for entry in data.get(key, []) or []:
            if not isinstance(entry, Mapping) or "image" not in entry:
                problems.append(
                    Problem(
                        str(path),
                        f"an entry of {key!r} has no 'image'",
                        'Use {"image": "./imagesTr/…", "label": "./labelsTr/…"}',
                    )
                )
                continue
            image = resolve(entry["image"])
            listed[image] = RegistrationImage(image, resolve(entry["label"]) if entry.get("label") else None)
    for key, count in (("training", "numTraining"), ("test", "numTest")):
        if count in data and data[count] != len(data.get(key, []) or []):
            problems.append(
                Problem(
                    str(path),
                    f"{count} is {data[count]} but {key!r} lists {len(data.get(key, []) or [])} image(s)",
                    f"Make {count} match the list",
                )
            )
    pairs = []
    for split, key in PAIR_KEYS.items():
        entries = data.get(key, []) or []
        count = _COUNT_KEYS[split]
        if count in data and data[count] != len(entries):
            problems.append(
                Problem(
                    str(path),
                    f"{count} is {data[count]} but {key!r} lists {len(entries)} pair(s)",
                    f"Make {count} match the list",
                )
            )
        for entry in entries:
            if not isinstance(entry, Mapping) or "fixed" not in entry or "moving" not in entry:
                problems.append(Problem(str(path), f"an entry of {key!r} lacks 'fixed' or 'moving'", fix_pairs))
                continue
            fixed, moving = resolve(entry["fixed"]), resolve(entry["moving"])
            pairs.append(
                RegistrationPair(
                    listed.get(fixed, RegistrationImage(fixed)), listed.get(moving, RegistrationImage(moving)), split
                )
            )
    if not pairs and data.get("pairings") != "unpaired":
        problems.append(
            Problem(str(path), "lists no pairs", f'Add {PAIR_KEYS["train"]} (or set "pairings": "unpaired")')
        )
    dataset = RegistrationDataset(
        root=root,
        modalities=modalities,
        labels=labels,
        shape=shape,
        images=tuple(listed.values()),
        pairs=tuple(pairs),
        raw=data,
    )
    return dataset, problems


def check_registration_dataset(
    root: str | os.PathLike[str], *, allow_empty_foreground: bool = False, num_workers: int = 1
) -> Any:
    """Check a registration dataset: dataset.json, every image and label file, label values, grids.

    Each image is read once (readable, finite, valid geometry); labels must share their image's grid and hold only
    declared values; both images of a pair must share one shape (and ``tensorImageShape`` when declared).
    """
    from medmamba.io.verify import (
        VerifyReport,
        check_image_file,
        check_label_file,
        compare_geometry,
        orientation_warnings,
        run_cases,
    )

    root = Path(root)
    dataset, problems = _parse(root)
    if dataset is None:
        return VerifyReport(root=root, kind="registration", num_cases=0, problems=tuple(problems))
    warnings: list[Problem] = []
    every = {entry.image: entry for entry in dataset.images}
    for pair in dataset.pairs:
        for entry in (pair.fixed, pair.moving):
            every.setdefault(entry.image, entry)

    def one(entry: RegistrationImage) -> Any:
        from medmamba.io.verify import CaseFindings

        found = CaseFindings()
        if not entry.image.is_file():
            found.problems.append(
                Problem(str(entry.image), "listed in dataset.json but missing", "Fix the path or add the file")
            )
            return found
        image = check_image_file(entry.image, found.problems)
        if image is None:
            return found
        found.axcodes = image.geometry.axcodes
        if dataset.shape is not None and image.shape != dataset.shape:
            found.problems.append(
                Problem(
                    str(entry.image),
                    f"shape {image.shape} differs from tensorImageShape {dataset.shape}",
                    "Resample the image onto the common grid",
                )
            )
        if entry.label is not None:
            if not entry.label.is_file():
                found.problems.append(
                    Problem(str(entry.label), "listed in dataset.json but missing", "Fix the path or add the file")
                )
                return found
            modality = _modality_of(entry.image)
            label = check_label_file(
                entry.label,
                dataset.label_values(modality),
                found.problems,
                found.warnings,
                allow_empty_foreground=allow_empty_foreground,
            )
            if label is not None:
                compare_geometry((entry.image, image), (entry.label, label), found.problems, what="image and label")
        return found

    entries = list(every.values())
    findings = run_cases(one, entries, num_workers=num_workers, desc="verify")
    for found in findings:
        problems += found.problems
        warnings += found.warnings
    warnings += orientation_warnings([f.axcodes for f in findings], root)
    if dataset.shape is None:
        from medmamba.io.image import read_header

        for pair in dataset.pairs:
            try:
                a, b = read_header(pair.fixed.image), read_header(pair.moving.image)
            except Exception:
                continue
            if a.shape != b.shape:
                problems.append(
                    Problem(
                        str(pair.moving.image),
                        f"shape {b.shape} differs from its fixed image's {a.shape}",
                        "Resample the pair onto one grid",
                    )
                )
    return VerifyReport(
        root=root, kind="registration", num_cases=len(dataset.pairs), problems=tuple(problems), warnings=tuple(warnings)
    )


def _modality_of(path: Path) -> int:
    stem = path.name.split(".")[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() and len(tail) == 4 else 0


class RegistrationDatasetWriter:
    """Write a Learn2Reg-style registration dataset atomically.

    Args:
        raw_root: folder that receives ``DatasetXXX_Name``.
        dataset_id: 1…999.
        name: one word.
        modalities: ``["MR"]`` or ``["MR", "CT"]`` (file suffixes _0000, _0001).
        labels: label value → name, shared by the modalities (0 must be background).
        overwrite: replace an existing folder.
        **metadata: extra dataset.json keys (description, reference, licence, …).
    """

    def __init__(
        self,
        raw_root: str | os.PathLike[str],
        dataset_id: int,
        name: str,
        *,
        modalities: Sequence[str],
        labels: Mapping[int, str] | None = None,
        overwrite: bool = False,
        **metadata: Any,
    ) -> None:
        self.path = Path(raw_root) / dataset_folder_name(dataset_id, name)
        self.name = name
        self.modalities = list(modalities)
        self.labels = {int(k): str(v) for k, v in (labels or {}).items()}
        self.overwrite = overwrite
        self.metadata = metadata
        self._images: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        self._pairs: dict[str, list[dict[str, str]]] = {split: [] for split in PAIR_KEYS}
        self._shape: tuple[int, ...] | None = None
        self._tmp: Path | None = None
        self._context: Any = None

    def __enter__(self) -> RegistrationDatasetWriter:
        if self.path.exists() and not self.overwrite:
            raise DatasetError(
                [Problem(str(self.path), "already exists", "Choose another id/name, remove it, or pass overwrite")],
                header="not writing the dataset",
            )
        self._context = atomic_dir(self.path, overwrite=self.overwrite)
        self._tmp = self._context.__enter__()
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (self._tmp / sub).mkdir()
        return self

    def add_image(
        self, case_id: str, image: Image, label: Image | None = None, *, modality: int = 0, test: bool = False
    ) -> str:
        """Write one image (and its label); returns its dataset-relative path for ``add_pair``."""
        if self._tmp is None:
            raise RuntimeError("use RegistrationDatasetWriter as a context manager")
        if self._shape is None:
            self._shape = image.shape
        suffix = "Ts" if test else "Tr"
        rel = f"./images{suffix}/{case_id}_{modality:04d}.nii.gz"
        write_image(image, self._tmp / rel, dtype=None)
        entry = {"image": rel}
        if label is not None:
            entry["label"] = f"./labels{suffix}/{case_id}_{modality:04d}.nii.gz"
            write_image(
                label, self._tmp / entry["label"], dtype=np.uint8 if max(self.labels, default=0) < 256 else np.uint16
            )
        self._images["test" if test else "training"].append(entry)
        return rel

    def add_pair(self, fixed: str, moving: str, *, split: str = "train") -> None:
        """Record a pair of relative paths returned by ``add_image``; ``split`` is train, val or test."""
        if split not in PAIR_KEYS:
            raise ValueError(f"split must be one of {sorted(PAIR_KEYS)}, got {split!r}")
        self._pairs[split].append({"fixed": fixed, "moving": moving})

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None and self._tmp is not None:
            modalities = {str(i): m for i, m in enumerate(self.modalities)}
            data: dict[str, Any] = {
                "name": self.name,
                **self.metadata,
                "tensorImageSize": dict.fromkeys(modalities, "3D"),
                "tensorImageShape": {m: list(self._shape or ()) for m in modalities},
                "modality": modalities,
                "labels": {m: {str(k): v for k, v in sorted(self.labels.items())} for m in modalities},
                "pairings": "paired",
                "provided_data": {m: ["image", "label"] if self.labels else ["image"] for m in modalities},
                "registration_direction": {"fixed": 0, "moving": 1 if len(modalities) > 1 else 0},
                "numTraining": len(self._images["training"]),
                "training": self._images["training"],
                "numTest": len(self._images["test"]),
                "test": self._images["test"],
            }
            for split, key in PAIR_KEYS.items():
                data[_COUNT_KEYS[split]] = len(self._pairs[split])
                data[key] = self._pairs[split]
            write_json(self._tmp / "dataset.json", data)
        self._context.__exit__(exc_type, exc, traceback)
        self._tmp = None

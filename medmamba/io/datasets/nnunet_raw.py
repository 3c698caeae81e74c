"""nnU-Net v2's raw dataset format — medmamba's native one.

Layout (nnU-Net v2 ``documentation/dataset_format.md``)::

    DatasetXXX_Name/              XXX: three digits
      dataset.json                channel_names, labels (background 0, consecutive), numTraining, file_ending
      imagesTr/CASE_0000.nii.gz   one file per channel: _0000, _0001, …
      labelsTr/CASE.nii.gz        integer label map on the images' grid
      imagesTs/CASE_0000.nii.gz   optional, unlabelled

or, instead of the folders, a ``"dataset"`` key in dataset.json listing each case's files. Case ids and
channel files follow nnunetv2's own rule (``nnunetv2.utilities.utils``: ``CASE_dddd`` + ending), so what we
list is what nnU-Net will train on. ``RawDatasetWriter`` builds a dataset in a hidden temporary folder and
renames it into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from medmamba.errors import DatasetError, Problem
from medmamba.io.atomic import atomic_dir
from medmamba.io.image import Image, write_image

__all__ = [
    "DatasetJson",
    "RawCase",
    "RawDataset",
    "RawDatasetWriter",
    "dataset_folder_name",
    "find_dataset",
    "load_dataset_json",
    "open_dataset",
    "parse_dataset_json",
]

_REQUIRED = ("channel_names", "labels", "numTraining", "file_ending")
_KNOWN = (
    *_REQUIRED,
    "modality",
    "name",
    "description",
    "reference",
    "licence",
    "release",
    "converted_by",
    "overwrite_image_reader_writer",
    "regions_class_order",
    "dataset",
)
_FOLDER = re.compile(r"^Dataset(\d{3})_(.+)$")


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetJson:
    """The content of an nnU-Net v2 ``dataset.json``.

    Args:
        channel_names: channel index (``"0"``, ``"1"`` …) → name; the name picks nnU-Net's normalisation
            (``"CT"`` → CT normalisation, anything else z-score).
        labels: name → value (``"background": 0`` first, consecutive), or → tuple of values for regions.
        num_training: number of training cases (``numTraining``).
        file_ending: ``".nii.gz"``, ``".nrrd"``, ``".mha"`` … shared by images and labels.
        name, description, reference, licence, release, converted_by: free text, ignored by nnU-Net.
        overwrite_image_reader_writer: nnU-Net reader class name, or None for auto-detection.
        regions_class_order: required with region labels.
        dataset: the optional explicit ``{case: {"images": [...], "label": ...}}`` listing.
        extra: any other keys, kept as they are.
    """

    channel_names: dict[str, str]
    labels: dict[str, int | tuple[int, ...]]
    num_training: int
    file_ending: str = ".nii.gz"
    name: str | None = None
    description: str | None = None
    reference: str | None = None
    licence: str | None = None
    release: str | None = None
    converted_by: str | None = None
    overwrite_image_reader_writer: str | None = None
    regions_class_order: tuple[int, ...] | None = None
    dataset: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        """How many image files each case has."""
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        """True for region-based labels (a value that is a list of several labels)."""
        return any(isinstance(v, tuple) and len(v) > 1 for v in self.labels.values())

    @property
    def ignore_label(self) -> int | None:
        """The ``"ignore"`` label's value, or None."""
        value = self.labels.get("ignore")
        return int(value) if isinstance(value, int) else None

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every value a label file may contain, sorted (regions unrolled, ignore label included)."""
        values: set[int] = set()
        for value in self.labels.values():
            values.update(value if isinstance(value, tuple) else (value,))
        return tuple(sorted(values))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object nnU-Net reads (key order as ``generate_dataset_json`` writes it)."""
        data: dict[str, Any] = {
            "channel_names": dict(self.channel_names),
            "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()},
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
        }
        for key in ("name", "description", "reference", "licence", "release", "converted_by"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.overwrite_image_reader_writer is not None:
            data["overwrite_image_reader_writer"] = self.overwrite_image_reader_writer
        if self.regions_class_order is not None:
            data["regions_class_order"] = list(self.regions_class_order)
        if self.dataset is not None:
            data["dataset"] = self.dataset
        data.update(self.extra)
        return data


def parse_dataset_json(data: Mapping[str, Any], path: str = "dataset.json") -> tuple[DatasetJson | None, list[Problem]]:
    """Validate a loaded dataset.json against nnU-Net's rules; return it (None if unusable) and every problem.

    Checks nnU-Net's: required keys; ``labels`` with ``background: 0`` and consecutive values (the ignore label
    = max + 1; regions need ``regions_class_order``); plus ours: channel keys ``"0"…"C-1"``, ``numTraining`` a
    non-negative int, ``file_ending`` starting with a dot.
    """
    problems: list[Problem] = []
    if not isinstance(data, Mapping):
        return None, [Problem(path, "is not a JSON object", "Write a JSON object with the nnU-Net v2 keys")]
    channels = data.get("channel_names", data.get("modality"))
    missing = [k for k in _REQUIRED if k not in data and not (k == "channel_names" and "modality" in data)]
    if missing:
        problems.append(
            Problem(
                path,
                f"required key(s) {', '.join(missing)} missing",
                'Add them, e.g. "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, '
                '"numTraining": N, "file_ending": ".nii.gz"',
            )
        )
    if isinstance(channels, Mapping):
        expected = [str(i) for i in range(len(channels))]
        if sorted(str(k) for k in channels) != expected:
            problems.append(
                Problem(
                    path, f"channel_names keys {sorted(channels)} are not 0…{len(channels) - 1}", "Number them 0, 1, …"
                )
            )
    elif channels is not None:
        problems.append(Problem(path, "channel_names is not an object", 'Use {"0": "CT", "1": "T2", …}'))
    labels = _parse_labels(data.get("labels"), data, path, problems)
    num_training = data.get("numTraining")
    if "numTraining" in data and (
        not isinstance(num_training, int) or isinstance(num_training, bool) or num_training < 0
    ):
        problems.append(
            Problem(path, f"numTraining {num_training!r} is not a non-negative integer", "Give the case count")
        )
    ending = data.get("file_ending")
    if "file_ending" in data and (not isinstance(ending, str) or not ending.startswith(".")):
        problems.append(Problem(path, f"file_ending {ending!r} does not start with a dot", 'Use e.g. ".nii.gz"'))
    if problems or labels is None or not isinstance(channels, Mapping):
        return None, problems
    regions = data.get("regions_class_order")
    parsed = DatasetJson(
        channel_names={str(k): str(v) for k, v in channels.items()},
        labels=labels,
        num_training=int(num_training),  # type: ignore[arg-type]
        file_ending=str(ending),
        overwrite_image_reader_writer=data.get("overwrite_image_reader_writer"),
        regions_class_order=tuple(int(r) for r in regions) if regions is not None else None,
        dataset=data.get("dataset"),
        extra={k: v for k, v in data.items() if k not in _KNOWN},
        **{k: data[k] for k in ("name", "description", "reference", "licence", "release", "converted_by") if k in data},
    )
    return parsed, problems


def _parse_labels(
    labels: Any, data: Mapping[str, Any], path: str, problems: list[Problem]
) -> dict[str, int | tuple[int, ...]] | None:
    if labels is None:
        return None
    fix = 'Use {"background": 0, "first": 1, "second": 2, …} (names → consecutive integers)'
    if not isinstance(labels, Mapping) or not labels:
        problems.append(Problem(path, "labels is not a non-empty object of name → value", fix))
        return None
    parsed: dict[str, int | tuple[int, ...]] = {}
    for name, value in labels.items():
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            problems.append(Problem(path, f"label {name!r} has value {value!r}, not a non-negative integer", fix))
            return None
        parsed[str(name)] = tuple(values) if isinstance(value, list | tuple) else int(value)
    if parsed.get("background") != 0:
        problems.append(Problem(path, 'labels lack "background": 0', 'Add "background": 0 (nnU-Net requires it)'))
    plain = sorted({v for k, v in parsed.items() if isinstance(v, int) and k != "ignore"})
    regions = {x for v in parsed.values() if isinstance(v, tuple) for x in v}
    values = sorted(set(plain) | regions)
    if values != list(range(len(values))):
        problems.append(
            Problem(
                path,
                f"label values {values} are not consecutive from 0",
                "Renumber the labels 0, 1, 2, … in the files and here",
            )
        )
    ignore = parsed.get("ignore")
    if ignore is not None and ignore != (max(values) + 1 if values else 1):
        problems.append(
            Problem(
                path, f"the ignore label {ignore} is not max(label) + 1", "nnU-Net needs ignore = highest label + 1"
            )
        )
    if any(isinstance(v, tuple) and len(v) > 1 for v in parsed.values()) and "regions_class_order" not in data:
        problems.append(
            Problem(path, "region labels without regions_class_order", "Add regions_class_order (one value per region)")
        )
    return parsed


def load_dataset_json(folder: str | os.PathLike[str]) -> DatasetJson:
    """Read and validate ``folder/dataset.json``.

    Raises:
        DatasetError: missing, unreadable or invalid file (every problem listed).
    """
    path = Path(folder) / "dataset.json"
    data, problems = _read_json(path)
    parsed, more = parse_dataset_json(data, str(path)) if data is not None else (None, [])
    problems += more
    if problems or parsed is None:
        raise DatasetError(problems, header=f"{path} is not a valid nnU-Net dataset.json")
    return parsed


def _read_json(path: Path) -> tuple[Any, list[Problem]]:
    if not path.is_file():
        return None, [
            Problem(
                str(path),
                "missing",
                "Create it (nnU-Net v2 dataset.json: channel_names, labels, numTraining, file_ending)",
            )
        ]
    try:
        return json.loads(path.read_text(encoding="utf-8")), []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [Problem(str(path), f"is not valid JSON ({err})", "Fix the syntax")]


@dataclass(frozen=True, slots=True)
class RawCase:
    """One case: its channel files (index order, only those present) and its label file (None: absent)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True, kw_only=True, slots=True)
class RawDataset:
    """A raw dataset on disk: its folder, dataset.json, training and test cases, and stray files."""

    root: Path
    dataset_json: DatasetJson
    training: tuple[RawCase, ...]
    test: tuple[RawCase, ...]
    stray_files: tuple[Path, ...] = ()
    orphan_labels: tuple[Path, ...] = ()

    @property
    def dataset_id(self) -> int | None:
        """XXX of ``DatasetXXX_Name`` (None for other folder names)."""
        match = _FOLDER.match(self.root.name)
        return int(match.group(1)) if match else None

    @property
    def name(self) -> str:
        """Name of ``DatasetXXX_Name``, or the folder name."""
        match = _FOLDER.match(self.root.name)
        return match.group(2) if match else self.root.name


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name``; raises ValueError for ids outside 1…999 or names with separators."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be 1…999 (three digits), got {dataset_id}")
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ValueError(f"dataset name must be one word without slashes or spaces, got {name!r}")
    return f"Dataset{dataset_id:03d}_{name}"


def find_dataset(id_or_path: str | int | os.PathLike[str], raw_root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a dataset folder from a path, ``DatasetXXX_Name``, ``XXX`` or ``XXX`` as int, under ``raw_root``.

    Raises:
        DatasetError: nothing or several folders match.
    """
    candidate = Path(str(id_or_path))
    if candidate.is_dir():
        return candidate
    text = str(id_or_path)
    if raw_root is None:
        raise DatasetError(
            [
                Problem(
                    text,
                    "is not a folder",
                    "Give the dataset folder, or set MEDMAMBA_RAW (or nnUNet_raw) to look up ids",
                )
            ],
            header="dataset not found",
        )
    root = Path(raw_root)
    if (root / text).is_dir():
        return root / text
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        found = sorted(p for p in root.glob(prefix + "*") if p.is_dir())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DatasetError(
                [Problem(str(root), f"id {text} matches several datasets: {names}", "Give the folder name")]
            )
    raise DatasetError(
        [Problem(str(root), f"no dataset {text!r}", "Check the id or give the dataset folder's path")],
        header="dataset not found",
    )


def open_dataset(
    id_or_path: str | int | os.PathLike[str], raw_root: str | os.PathLike[str] | None = None
) -> RawDataset:
    """Open a raw dataset: parse dataset.json and list training and test cases as nnU-Net would.

    Lenient about the cases (``medmamba.io.verify`` reports missing channels and labels); strict about
    dataset.json.

    Raises:
        DatasetError: the folder is not found or its dataset.json is invalid.
    """
    root = find_dataset(id_or_path, raw_root)
    dataset_json = load_dataset_json(root)
    if dataset_json.dataset is not None:
        training = tuple(_listed_cases(root, dataset_json.dataset))
        return RawDataset(
            root=root,
            dataset_json=dataset_json,
            training=training,
            test=_folder_cases(root / "imagesTs", None, dataset_json.file_ending)[0],
        )
    ending = dataset_json.file_ending
    training, stray = _folder_cases(root / "imagesTr", root / "labelsTr", ending)
    test, stray_ts = _folder_cases(root / "imagesTs", None, ending)
    ids = {case.case_id for case in training}
    labels_dir = root / "labelsTr"
    orphans = (
        tuple(p for p in sorted(labels_dir.iterdir()) if p.name.endswith(ending) and p.name[: -len(ending)] not in ids)
        if labels_dir.is_dir()
        else ()
    )
    stray_labels = (
        tuple(
            p
            for p in sorted(labels_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(ending)
        )
        if labels_dir.is_dir()
        else ()
    )
    return RawDataset(
        root=root,
        dataset_json=dataset_json,
        training=training,
        test=test,
        stray_files=stray + stray_ts + stray_labels,
        orphan_labels=orphans,
    )


def _folder_cases(images: Path, labels: Path | None, ending: str) -> tuple[tuple[RawCase, ...], tuple[Path, ...]]:
    """Group ``CASE_dddd<ending>`` files by case, nnunetv2's rule; anything else is a stray file."""
    if not images.is_dir():
        return (), ()
    from nnunetv2.utilities.utils import create_paths_fn

    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    names = sorted(p.name for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    ids = sorted({m.group(1) for m in map(pattern.match, names) if m})
    stray = tuple(images / n for n in names if not pattern.match(n))
    cases = []
    for case_id in ids:
        files = tuple(Path(p) for p in create_paths_fn(str(images), names, ending, case_id))
        label = labels / f"{case_id}{ending}" if labels is not None else None
        cases.append(RawCase(case_id, files, label if label is not None and label.is_file() else None))
    return tuple(cases), stray


def _listed_cases(root: Path, listing: Mapping[str, Any]) -> list[RawCase]:
    def resolve(entry: str) -> Path:
        path = Path(os.path.expandvars(entry))
        return path if path.is_absolute() else root / path

    cases = []
    for case_id, entry in listing.items():
        images = tuple(resolve(p) for p in entry.get("images", []))
        cases.append(RawCase(str(case_id), images, resolve(entry["label"]) if entry.get("label") else None))
    return cases


class RawDatasetWriter:
    """Write an nnU-Net raw dataset atomically: cases go into a hidden folder renamed into place at the end.

    Args:
        raw_root: folder that receives ``DatasetXXX_Name``.
        dataset_id: 1…999.
        name: the dataset's name (one word).
        channel_names: ``{"0": "T1"}`` or a sequence of names.
        labels: name → consecutive integers with ``background: 0``.
        file_ending: ending of every file written.
        overwrite: replace an existing folder of the same name.
        **metadata: extra dataset.json keys (description, reference, licence, …).

    Example:
        >>> import tempfile
        >>> from medmamba.io.geometry import Geometry
        >>> g = Geometry((1, 1, 1), (0, 0, 0), np.eye(3).ravel())
        >>> labels = {"background": 0, "x": 1}
        >>> with RawDatasetWriter(tempfile.mkdtemp(), 7, "Toy", channel_names=["MR"], labels=labels) as w:
        ...     image, label = Image(np.ones((4, 4, 4), np.float32), g), Image(np.ones((4, 4, 4), np.uint8), g)
        ...     w.add_case("toy_000", [image], label)
        >>> w.path.name, sorted(p.name for p in (w.path / "imagesTr").iterdir())
        ('Dataset007_Toy', ['toy_000_0000.nii.gz'])
    """

    def __init__(
        self,
        raw_root: str | os.PathLike[str],
        dataset_id: int,
        name: str,
        *,
        channel_names: Mapping[str, str] | Sequence[str],
        labels: Mapping[str, int | Sequence[int]],
        file_ending: str = ".nii.gz",
        overwrite: bool = False,
        **metadata: Any,
    ) -> None:
        self.path = Path(raw_root) / dataset_folder_name(dataset_id, name)
        if isinstance(channel_names, Mapping):
            self.channel_names = {str(k): str(v) for k, v in channel_names.items()}
        else:
            self.channel_names = {str(i): str(v) for i, v in enumerate(channel_names)}
        self.labels = {str(k): (tuple(v) if isinstance(v, Sequence) else int(v)) for k, v in labels.items()}
        self.file_ending = file_ending
        self.overwrite = overwrite
        self.metadata = metadata
        self.name = name
        self.num_training = 0
        self._context: Any = None
        self._tmp: Path | None = None

    def __enter__(self) -> RawDatasetWriter:
        if self.path.exists() and not self.overwrite:
            raise DatasetError(
                [
                    Problem(
                        str(self.path), "already exists", "Choose another dataset id/name, remove it, or pass overwrite"
                    )
                ],
                header="not writing the dataset",
            )
        self._context = atomic_dir(self.path, overwrite=self.overwrite)
        self._tmp = self._context.__enter__()
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (self._tmp / sub).mkdir()
        return self

    def add_case(
        self,
        case_id: str,
        images: Sequence[Image],
        label: Image | None = None,
        *,
        test: bool = False,
        image_dtype: Any = None,
    ) -> None:
        """Write one case: ``images`` in channel order, ``label`` (required unless ``test``) as uint8/uint16."""
        if self._tmp is None:
            raise RuntimeError("use RawDatasetWriter as a context manager")
        if len(images) != len(self.channel_names):
            raise ValueError(
                f"case {case_id}: {len(images)} image(s) given, dataset has {len(self.channel_names)} channel(s)"
            )
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", case_id) or re.search(r"_\d{4}$", case_id):
            raise ValueError(f"case id {case_id!r}: use letters, digits, '-', '_' and not a trailing _dddd")
        folder = self._tmp / ("imagesTs" if test else "imagesTr")
        for channel, image in enumerate(images):
            write_image(image, folder / f"{case_id}_{channel:04d}{self.file_ending}", dtype=image_dtype)
        if not test:
            if label is None:
                raise ValueError(f"training case {case_id} needs a label")
            dtype = np.uint8 if max(self._label_values()) < 256 else np.uint16
            write_image(label, self._tmp / "labelsTr" / f"{case_id}{self.file_ending}", dtype=dtype)
            self.num_training += 1

    def _label_values(self) -> list[int]:
        return [x for v in self.labels.values() for x in (v if isinstance(v, tuple) else (v,))]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None and self._tmp is not None:
            from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

            regions = self.metadata.pop("regions_class_order", None)
            generate_dataset_json(
                str(self._tmp),
                dict(self.channel_names),
                dict(self.labels),
                self.num_training,
                self.file_ending,
                dataset_name=self.name,
                regions_class_order=regions,
                **self.metadata,
            )
        self._context.__exit__(exc_type, exc, traceback)
        self._tmp = None

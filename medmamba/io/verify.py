"""Dataset verification: every problem of a dataset in one report (file, what, how to fix), nothing written.

``verify_dataset`` does what nnU-Net's ``--verify_dataset_integrity`` does (``nnunetv2.experiment_planning.
verify_dataset_integrity``: required dataset.json keys, case count = numTraining, a label per case, consecutive
label values, only declared values in label files, NaN, channel count, image/label shape and spacing), and
more, because nnU-Net stops at the first failed assert, only *warns* on origin/direction mismatches, reads
truncated files as zeros through SimpleITK, and never fires its empty-foreground warning:

* every file is read (truncated or damaged files, huge headers, zero/negative spacing, qform ≠ sform, sheared
  axes are reported, not crashed on);
* NaN **and** Inf in images and labels; non-integer label values;
* image/label and channel/channel geometry: shape, spacing, origin and direction must agree;
* missing channel files (named), stray files that nnU-Net would ignore or misread, labels without images;
* labels that contain only background;
* mixed orientations across cases (a warning: nnU-Net does not reorient).

It dispatches on the dataset's format: nnU-Net raw (``medmamba.io.datasets.nnunet_raw``), registration pairs
(``…registration``) and video (``…video``) each have their checker; the per-file checks below are shared.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medmamba._progress import progress
from medmamba.errors import DatasetError, MedmambaError, Problem
from medmamba.io.image import SUPPORTED_ENDINGS, Image, read_image

__all__ = [
    "CaseFindings",
    "VerifyReport",
    "check_dataset",
    "check_image_file",
    "check_label_file",
    "compare_geometry",
    "verify_dataset",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """What ``check_dataset`` found.

    Attributes:
        root: the dataset folder.
        kind: ``"nnunet"``, ``"registration"`` or ``"video"``.
        num_cases: training (or pair/clip) cases checked.
        num_test: test cases checked.
        problems: errors: the dataset must not be used as it is.
        warnings: worth a look, not blocking.
    """

    root: Path
    kind: str
    num_cases: int
    num_test: int = 0
    problems: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        """True when there is no problem (warnings allowed)."""
        return not self.problems

    def raise_for_problems(self) -> VerifyReport:
        """Raise ``DatasetError`` with every problem, or return self."""
        if self.problems:
            raise DatasetError(list(self.problems), header=f"{self.root}: the dataset has problems")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``medmamba verify --json``)."""

        def rows(items: Iterable[Problem]) -> list[dict[str, str]]:
            return [{"path": p.path, "what": p.what, "fix": p.fix} for p in items]

        return {
            "root": str(self.root),
            "kind": self.kind,
            "ok": self.ok,
            "num_cases": self.num_cases,
            "num_test": self.num_test,
            "problems": rows(self.problems),
            "warnings": rows(self.warnings),
        }


@dataclass(slots=True)
class CaseFindings:
    """Problems and warnings of one case, plus its orientation (for the cross-case check)."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    axcodes: tuple[str, ...] | None = None


def check_dataset(
    dataset: str | os.PathLike[str] | Any,
    *,
    allow_empty_foreground: bool = False,
    check_test: bool = True,
    num_workers: int = 1,
) -> VerifyReport:
    """Check a dataset and return every finding; never raises for problems in the data.

    Args:
        dataset: a dataset folder, or an already opened ``RawDataset``.
        allow_empty_foreground: report background-only label maps as warnings instead of problems.
        check_test: also read and check the unlabelled test images.
        num_workers: threads reading cases (decompression releases the GIL); 1 reads in this thread.
    """
    from medmamba.io.datasets.nnunet_raw import RawDataset

    root = dataset.root if isinstance(dataset, RawDataset) else Path(dataset)
    if not root.is_dir():
        return VerifyReport(
            root=root, kind="unknown", num_cases=0, problems=(Problem(str(root), "is not a folder", "Check the path"),)
        )
    kind = dataset_kind(root)
    if kind == "registration":
        from medmamba.io.datasets.registration import check_registration_dataset

        return check_registration_dataset(root, allow_empty_foreground=allow_empty_foreground, num_workers=num_workers)
    if kind == "video":
        from medmamba.io.datasets.video import check_video_dataset

        return check_video_dataset(root, allow_empty_foreground=allow_empty_foreground, num_workers=num_workers)
    return _check_nnunet(
        dataset if isinstance(dataset, RawDataset) else root, allow_empty_foreground, check_test, num_workers
    )


def verify_dataset(
    dataset: str | os.PathLike[str] | Any,
    *,
    allow_empty_foreground: bool = False,
    check_test: bool = True,
    num_workers: int = 1,
) -> VerifyReport:
    """Like ``check_dataset``, but raise ``DatasetError`` listing every problem when there is any.

    This is what ``medmamba verify`` and ``plan-and-preprocess`` call before writing anything.

    Raises:
        DatasetError: the dataset has problems (``err.problems`` holds them all).
    """
    report = check_dataset(
        dataset, allow_empty_foreground=allow_empty_foreground, check_test=check_test, num_workers=num_workers
    )
    for warning in report.warnings:
        logger.warning("%s", warning)
    return report.raise_for_problems()


def dataset_kind(root: Path) -> str:
    """``"registration"`` / ``"video"`` from dataset.json's markers, else ``"nnunet"``."""
    try:
        data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "nnunet"
    if not isinstance(data, dict):
        return "nnunet"
    from medmamba.io.datasets.registration import is_registration_json
    from medmamba.io.datasets.video import is_video_json

    if is_registration_json(data):
        return "registration"
    if is_video_json(data):
        return "video"
    return "nnunet"


# ---------------------------------------------------------------- nnU-Net raw


def _check_nnunet(dataset: Any, allow_empty: bool, check_test: bool, num_workers: int) -> VerifyReport:
    from medmamba.io.datasets.nnunet_raw import RawDataset, _read_json, open_dataset, parse_dataset_json

    root = dataset.root if isinstance(dataset, RawDataset) else Path(dataset)
    data, problems = _read_json(root / "dataset.json")
    if data is None:
        return VerifyReport(root=root, kind="nnunet", num_cases=0, problems=tuple(problems))
    parsed, problems = parse_dataset_json(data, str(root / "dataset.json"))
    if parsed is None:
        return VerifyReport(root=root, kind="nnunet", num_cases=0, problems=tuple(problems))
    raw = dataset if isinstance(dataset, RawDataset) else open_dataset(root)
    dj = raw.dataset_json
    warnings: list[Problem] = []
    if dj.file_ending not in SUPPORTED_ENDINGS:
        problems.append(
            Problem(
                str(root / "dataset.json"),
                f"file_ending {dj.file_ending} is not one medmamba reads",
                f"Convert to one of {', '.join(SUPPORTED_ENDINGS)}",
            )
        )
        return VerifyReport(root=root, kind="nnunet", num_cases=len(raw.training), problems=tuple(problems))
    if dj.dataset is None:
        for sub in ("imagesTr", "labelsTr"):
            if not (root / sub).is_dir():
                problems.append(
                    Problem(str(root / sub), "missing", f'Create {sub}/ (or list the files under a "dataset" key)')
                )
    if len(raw.training) != dj.num_training:
        examples = ", ".join(c.case_id for c in raw.training[:5]) or "none"
        problems.append(
            Problem(
                str(root / "dataset.json"),
                f"numTraining is {dj.num_training} but {len(raw.training)} training case(s) were found "
                f"(e.g. {examples})",
                "Set numTraining to the number of cases in imagesTr, or add the missing cases",
            )
        )
    for path in raw.stray_files:
        problems.append(
            Problem(
                str(path),
                f"does not follow the naming rule CASE_dddd{dj.file_ending} (labels: CASE{dj.file_ending})",
                "Rename it (channel index as four digits) or move it out of the dataset",
            )
        )
    for path in raw.orphan_labels:
        problems.append(
            Problem(str(path), "label without images in imagesTr", "Add the case's images or remove the label")
        )
    values = dj.label_values
    jobs: list[tuple[Any, bool]] = [(case, True) for case in raw.training]
    if check_test:
        jobs += [(case, False) for case in raw.test]

    def one(job: tuple[Any, bool]) -> CaseFindings:
        case, labelled = job
        return _check_raw_case(case, labelled, dj.num_channels, dj.file_ending, values, allow_empty, root)

    findings = run_cases(one, jobs, num_workers=num_workers, desc="verify")
    for found in findings:
        problems += found.problems
        warnings += found.warnings
    warnings += orientation_warnings([f.axcodes for f in findings], root)
    return VerifyReport(
        root=root,
        kind="nnunet",
        num_cases=len(raw.training),
        num_test=len(raw.test) if check_test else 0,
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def _check_raw_case(
    case: Any, labelled: bool, num_channels: int, ending: str, values: Sequence[int], allow_empty: bool, root: Path
) -> CaseFindings:
    found = CaseFindings()
    folder = root / ("imagesTr" if labelled else "imagesTs")
    present = {p.name for p in case.images}
    expected = [f"{case.case_id}_{c:04d}{ending}" for c in range(num_channels)]
    for name in expected:
        if name not in present and not any(Path(p).name == name for p in case.images):
            found.problems.append(
                Problem(
                    str(folder / name),
                    f"missing: case {case.case_id} has no file for channel {name[-len(ending) - 4 : -len(ending)]}",
                    f"Add it; every case needs {num_channels} channel file(s)",
                )
            )
    extra = sorted(n for n in present if n not in expected)
    for name in extra:
        found.problems.append(
            Problem(
                str(folder / name),
                f"channel beyond the {num_channels} declared in channel_names",
                "Remove it or declare the channel in dataset.json",
            )
        )
    images: list[tuple[Path, Image]] = []
    for path in case.images:
        if not Path(path).is_file():
            found.problems.append(
                Problem(str(path), "listed in dataset.json but missing", "Fix the path or add the file")
            )
            continue
        image = check_image_file(path, found.problems)
        if image is not None:
            images.append((Path(path), image))
    if images:
        found.axcodes = images[0][1].geometry.axcodes
        for path, image in images[1:]:
            compare_geometry(images[0], (path, image), found.problems, what="channels of one case")
    if not labelled:
        return found
    if case.label is None or not Path(case.label).is_file():
        label_path = case.label if case.label is not None else root / "labelsTr" / f"{case.case_id}{ending}"
        found.problems.append(
            Problem(
                str(label_path),
                f"missing: case {case.case_id} has no label",
                "Add the label map or move the case to imagesTs",
            )
        )
        return found
    label = check_label_file(case.label, values, found.problems, found.warnings, allow_empty_foreground=allow_empty)
    if label is not None and images:
        compare_geometry(images[0], (Path(case.label), label), found.problems, what="image and label")
    return found


# ---------------------------------------------------------------- shared per-file checks


def check_image_file(path: str | os.PathLike[str], problems: list[Problem]) -> Image | None:
    """Read an image; append a problem for unreadable files, bad geometry or NaN/Inf voxels; None if unreadable."""
    try:
        image = read_image(path)
    except MedmambaError as err:
        problems.append(_problem_from_error(path, err))
        return None
    if image.array.dtype.kind == "f":
        bad = int(np.size(image.array) - np.count_nonzero(np.isfinite(image.array)))
        if bad:
            nans = int(np.count_nonzero(np.isnan(image.array)))
            problems.append(
                Problem(
                    str(path),
                    f"{bad} non-finite voxel(s) ({nans} NaN, {bad - nans} ±Inf; "
                    f"{100 * bad / image.array.size:.2g} % of the image)",
                    "Replace them with a meaningful value (e.g. the background intensity) before training",
                )
            )
    return image


def check_label_file(
    path: str | os.PathLike[str],
    declared: Sequence[int],
    problems: list[Problem],
    warnings: list[Problem],
    *,
    allow_empty_foreground: bool = False,
) -> Image | None:
    """Read a label map; append problems for NaN/Inf, non-integers, undeclared values and no foreground.

    A background-only map goes to ``warnings`` instead when ``allow_empty_foreground``.
    """
    image = check_image_file(path, problems)
    if image is None:
        return None
    array = image.array
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        if finite.size and not np.array_equal(finite, np.round(finite)):
            odd = np.unique(finite[finite != np.round(finite)])[:5]
            problems.append(
                Problem(
                    str(path),
                    f"non-integer label values (e.g. {', '.join(f'{v:.6g}' for v in odd)})",
                    "Round the label map and store it as an integer type",
                )
            )
            return image
        array = finite
    present = [int(v) for v in np.unique(array)]
    undeclared = sorted(set(present) - set(declared))
    if undeclared:
        problems.append(
            Problem(
                str(path),
                f"label value(s) {undeclared} not declared in dataset.json (declared: {list(declared)})",
                'Declare them under "labels" in dataset.json, or relabel the file',
            )
        )
    if present and all(v == 0 for v in present):
        finding = Problem(
            str(path),
            "contains only background (0): no foreground voxel",
            "Check the label map (wrong file or empty export)"
            + ("" if allow_empty_foreground else "; if empty cases are intended, pass --allow-empty-labels"),
        )
        (warnings if allow_empty_foreground else problems).append(finding)
    return image


def compare_geometry(
    reference: tuple[Path, Image], other: tuple[Path, Image], problems: list[Problem], *, what: str
) -> bool:
    """Append a problem when two images' shapes or geometries differ; True when they agree."""
    ref_path, ref = reference
    path, image = other
    if ref.shape != image.shape:
        problems.append(
            Problem(
                str(path),
                f"shape {image.shape} differs from {ref_path.name}'s {ref.shape} ({what} must share one grid)",
                "Resample or re-export it onto the same grid",
            )
        )
        return False
    differences = image.geometry.mismatches(ref.geometry)
    if differences:
        problems.append(
            Problem(
                str(path),
                f"geometry differs from {ref_path.name}'s: {'; '.join(differences)} ({what} must share one grid)",
                "Copy the reference's header geometry if the voxels are aligned, otherwise resample",
            )
        )
        return False
    return True


def orientation_warnings(axcodes: Iterable[tuple[str, ...] | None], root: Path) -> list[Problem]:
    """One warning when the cases are stored in more than one orientation."""
    counts = Counter("".join(a) for a in axcodes if a)
    if len(counts) <= 1:
        return []
    listing = ", ".join(f"{code}: {n}" for code, n in counts.most_common())
    return [
        Problem(
            str(root),
            f"cases are stored in {len(counts)} orientations ({listing}); nnU-Net does not reorient, so the "
            "network sees flipped anatomy",
            "Reorient all cases to one orientation (e.g. RAS) before training",
        )
    ]


def run_cases(
    function: Callable[[Any], CaseFindings], jobs: Sequence[Any], *, num_workers: int, desc: str
) -> list[CaseFindings]:
    """Run ``function`` over ``jobs`` (in order), in ``num_workers`` threads, with a progress bar."""
    if num_workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in progress(jobs, desc=desc, total=len(jobs))]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(progress(pool.map(function, jobs), desc=desc, total=len(jobs)))


def _problem_from_error(path: str | os.PathLike[str], err: MedmambaError) -> Problem:
    message = str(err)
    prefix = f"{path}: "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    # "<problem>. <Fix>": the fix starts at the first sentence break followed by a capital letter
    parts = re.split(r"\.\s+(?=[A-Z])", message, maxsplit=1)
    what, fix = (parts[0], parts[1]) if len(parts) == 2 else (message, "")
    return Problem(str(path), what.rstrip("."), fix.rstrip(".") + ("." if fix else ""))

"""``medmamba convert``: import an MSD task or a DICOM tree into nnU-Net's raw format, or write the demo data."""

from __future__ import annotations

import argparse

from medmamba.cli.common import common_parser
from medmamba.cli.verify import raw_root

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert`` with its sources ``msd``, ``dicom`` and ``demo``."""
    parser = subparsers.add_parser(
        "convert",
        help="import an MSD task or DICOM series into nnU-Net's raw format (or write the MNI demo datasets)",
        description="Convert a dataset into nnU-Net v2's raw format (DatasetXXX_Name with dataset.json, imagesTr, "
        "labelsTr, imagesTs). Every source problem is reported at once (exit 2) and nothing is written unless the "
        "result passes `medmamba verify`. Prints the new dataset folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True, help="what to convert")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o", "--raw-root", default=None, help="where DatasetXXX_Name goes (default: $MEDMAMBA_RAW, else $nnUNet_raw)"
    )
    output.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder of that name")
    parents = [common_parser(), output]

    msd = sources.add_parser(
        "msd",
        parents=parents,
        help="a Medical Segmentation Decathlon TaskXX_Name folder",
        description="Split the MSD task's 4-D images into _0000, _0001 … channel files (nnunetv2's split_4d_nifti), "
        "copy the labels and translate dataset.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    msd.add_argument("task", metavar="TASK_FOLDER", help="extracted MSD task, e.g. Task04_Hippocampus")
    msd.add_argument("-d", "--dataset-id", type=int, default=None, help="target id (default: the task number)")

    dicom = sources.add_parser(
        "dicom",
        parents=parents,
        help="a folder with one sub-folder per case: its DICOM series and a label map",
        description="Each sub-folder of SOURCE is a case: its DICOM series (one per channel, any depth) and, for "
        "training cases, one label file (.nii.gz/.nii/.nrrd/.mha) on the series' grid. Cases without a label go to "
        "imagesTs. Series are checked (one orientation, uniform slice spacing) and rescaled (slope/intercept).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dicom.add_argument("source_folder", metavar="SOURCE", help="folder of case folders")
    dicom.add_argument("-d", "--dataset-id", type=int, required=True, help="target dataset id (1-999)")
    dicom.add_argument("--name", required=True, help="dataset name (DatasetXXX_NAME)")
    dicom.add_argument(
        "--labels",
        nargs="+",
        required=True,
        metavar="NAME=VALUE",
        help="label names and values, background first: background=0 liver=1 tumour=2",
    )
    dicom.add_argument(
        "--channels", nargs="+", default=None, metavar="NAME", help="channel names (default: the series' Modality)"
    )
    dicom.add_argument(
        "--channel-series",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="with several series per case: one SeriesDescription pattern per channel, e.g. '*T1*' '*FLAIR*'",
    )

    demo = sources.add_parser(
        "demo",
        parents=parents,
        help="write the MNI152-derived demo datasets (segmentation and registration) from nilearn's wheel",
        description="Build the demo datasets from the MNI ICBM152 2009a T1 template and its tissue maps: per-case "
        "random smooth deformation, bias field, noise and anisotropic resampling (real anatomy, synthetic "
        "variation). Deterministic from --seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--kind", choices=("segmentation", "registration", "both"), default="both")
    demo.add_argument("--cases", type=int, default=10, help="labelled segmentation cases")
    demo.add_argument("--subjects", type=int, default=6, help="registration subjects (pairs: consecutive ones)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert and print the dataset folder(s) written."""
    from medmamba.errors import UsageError

    root = raw_root(args)
    if root is None:
        raise UsageError("no output folder: pass -o/--raw-root or set MEDMAMBA_RAW (or nnUNet_raw)")
    if args.source == "msd":
        from medmamba.io.datasets.convert import convert_msd

        written = [convert_msd(args.task, root, dataset_id=args.dataset_id, overwrite=args.overwrite)]
    elif args.source == "dicom":
        from medmamba.io.datasets.convert import convert_dicom_tree

        written = [
            convert_dicom_tree(
                args.source_folder,
                root,
                dataset_id=args.dataset_id,
                name=args.name,
                labels=_parse_labels(args.labels),
                channel_names=args.channels,
                channel_series=args.channel_series,
                overwrite=args.overwrite,
            )
        ]
    else:
        from medmamba.io.datasets.demo import build_demo_registration, build_demo_segmentation

        if args.kind != "segmentation" and args.subjects < 3:
            raise UsageError(f"--subjects must be at least 3 (one pair is kept for validation), got {args.subjects}")
        if args.kind != "registration" and args.cases < 1:
            raise UsageError(f"--cases must be at least 1, got {args.cases}")

        written = []
        if args.kind in ("segmentation", "both"):
            written.append(
                build_demo_segmentation(root, num_cases=args.cases, seed=args.seed, overwrite=args.overwrite)
            )
        if args.kind in ("registration", "both"):
            written.append(
                build_demo_registration(root, num_subjects=args.subjects, seed=args.seed, overwrite=args.overwrite)
            )
    for path in written:
        print(path)
    return 0


def _parse_labels(items: list[str]) -> dict[str, int]:
    from medmamba.errors import UsageError

    labels: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise UsageError(f"--labels {item!r}: write NAME=VALUE with an integer value, e.g. background=0 liver=1")
        labels[name] = int(value)
    return labels

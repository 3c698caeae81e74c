"""``medmamba predict -i INPUT -o OUTPUT -m MODEL_DIR``: segment NIfTI/NRRD/MHA files or a DICOM series.

stdout: one line per label map written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medmamba.cli.common import common_parser, scan_backend_context

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``predict``."""
    parser = subparsers.add_parser(
        "predict",
        parents=[common_parser()],
        help="segment images with a trained model",
        description="Segment every case of INPUT - a folder of images (CASE_0000.nii.gz … for several channels, or "
        "one file per case), one image file, or one DICOM series folder - with the model MODEL_DIR that `medmamba "
        "train` wrote. Sliding window with Gaussian weighting (nnU-Net's), optional mirroring. Each label map is a "
        "NIfTI with exactly its input's geometry, written atomically.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, type=Path, help="image folder, image file or DICOM folder")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="output folder, or a .nii.gz file name for one case"
    )
    parser.add_argument(
        "-m", "--model", required=True, type=Path, help="MedmambaTrainer__<plans>__<config> folder (or a fold_k in it)"
    )
    parser.add_argument(
        "-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: every fold with the checkpoint)"
    )
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file in each fold folder")
    parser.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation (8× slower in 3D)")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window step, fraction of the patch")
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write CASE_probabilities.nii.gz (one volume per class)"
    )
    parser.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default="bf16", help="autocast dtype on the GPU")
    parser.add_argument("--series-uid", default=None, help="DICOM SeriesInstanceUID when the folder has several")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Predict; print the label maps written."""
    from medmamba.engines.segmentation.predict import predict

    folds = [f if f == "all" else int(f) for f in args.folds] if args.folds else None
    with scan_backend_context(args):
        written = predict(
            args.input,
            args.output,
            args.model,
            device=args.device,
            folds=folds,
            checkpoint=args.checkpoint,
            mirror=args.mirror,
            step_size=args.step_size,
            save_probabilities=args.save_probabilities,
            amp_dtype=args.amp,
            series_uid=args.series_uid,
        )
    for path in written:
        print(path)
    return 0

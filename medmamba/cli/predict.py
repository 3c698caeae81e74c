"""``medmamba predict -i INPUT -o OUTPUT -m MODEL_DIR``: segment NIfTI/NRRD/MHA files or a DICOM series.

With a video model (``medmamba train --network vivim``; its folder's model.json says so) INPUT is a video case —
a frame folder, a 2D+t NIfTI, an MP4/AVI file — or a folder of them, and per-frame masks are written
(``engines.video.predict``).

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
    parser.add_argument(
        "-i", "--input", required=True, type=Path, metavar="INPUT", help="image folder, image file or DICOM folder"
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="OUTPUT",
        help="output folder, or a .nii.gz file name for one case",
    )
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        type=Path,
        metavar="MODEL_DIR",
        help="MedmambaTrainer__<plans>__<config> folder (or a fold_k in it)",
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

    if _model_task(args.model) == "video":  # a `medmamba train --network vivim` folder: per-frame masks
        from medmamba.engines.video.predict import predict_videos

        with scan_backend_context(args):
            written = predict_videos(
                args.input, args.output, args.model, device=args.device, checkpoint=args.checkpoint
            )
        for path in written:
            print(path)
        return 0

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


def _model_task(model: Path) -> str:
    """The task a registration or video run folder declares in its model.json ("segmentation" otherwise)."""
    import json

    from medmamba.errors import UsageError

    description = model / "model.json"
    task = json.loads(description.read_text()).get("task", "segmentation") if description.is_file() else "segmentation"
    if task == "registration":
        raise UsageError(f"{model}: is a registration model. Use `medmamba register --fixed F --moving M -m {model}`")
    return task

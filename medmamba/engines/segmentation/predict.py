"""Segmentation inference: NIfTI/NRRD/MHA files or a DICOM series → label maps in exactly the input's geometry.

Images are read by ``medmamba.io`` (geometry checked, DICOM series assembled) and handed to nnU-Net v2's
predictor as arrays in the axis order nnU-Net's readers produce (``(C, z, y, x)``, spacing reversed), so
preprocessing (crop, normalisation, resampling), the sliding window with Gaussian weighting, optional mirroring
and the export back to the original grid are nnU-Net's (``plans-and-pipeline.md`` §3.6). The label map returned
is written with the *input's* ``Geometry`` by ``medmamba.io.write_image``, atomically — never a half-written
file, and it overlays the original image in 3D Slicer or ITK-SNAP even when the input was a DICOM series.

Checkpoints are read with ``torch.load(weights_only=True)`` (:class:`MedmambaPredictor` replaces nnU-Net's model
folder loader, which unpickles).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medmamba._progress import progress
from medmamba.engines.checkpoint import check_checkpoint, load_checkpoint, load_weights
from medmamba.engines.segmentation.trainer import MedmambaTrainer, nnunet_environment
from medmamba.engines.training import amp_policy, default_autocast_dtype, resolve_device, stdout_to_log
from medmamba.errors import CheckpointError, GeometryError, ImageReadError, PlanError, UsageError
from medmamba.io.dicom import find_dicom_series, read_dicom_series
from medmamba.io.image import SUPPORTED_ENDINGS, Image, image_ending, read_image, write_image

__all__ = ["InputCase", "MedmambaPredictor", "find_input_cases", "predict"]

logger = logging.getLogger(__name__)

#: readers whose array/spacing convention is the one we feed (SimpleITK's (z, y, x)); the *WithReorient readers
#: reorient to RAS first, which these inputs do not
_READERS = ("SimpleITKIO", "NibabelIO", "NaturalImage2DIO")
#: nnU-Net's channel suffix ``_0000``
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: nnU-Net's fake spacing of the missing axis of 2D images (``SimpleITKIO``, ``NaturalImage2DIO``)
_SPACING_2D = 999.0


@dataclass(frozen=True, slots=True)
class InputCase:
    """One case to segment: its id (output file name) and where its channels come from.

    Attributes:
        case_id: output name without ending (``liver_007`` → ``liver_007.nii.gz``).
        sources: one path per channel (image files), or one DICOM series folder.
        dicom: the source is a DICOM series folder.
        volumes_as_channels: one multi-volume file whose volumes are the channels (4-D NIfTI).
    """

    case_id: str
    sources: tuple[Path, ...]
    dicom: bool = False
    volumes_as_channels: bool = False


class MedmambaPredictor(nnUNetPredictor):
    """nnU-Net's predictor with weights-only checkpoint loading and medmamba's AMP dtype (bf16 on GPUs).

    Args:
        device: where the network runs.
        tile_step_size: sliding-window step as a fraction of the patch (0.5: half-overlapping tiles).
        use_mirroring: average over the flips of every allowed axis (8 passes per tile in 3D).
        amp_dtype: autocast dtype on CUDA (``"bf16"``, ``"fp16"``, ``"fp32"``); the CPU runs fp32.
    """

    def __init__(
        self, device: torch.device, *, tile_step_size: float = 0.5, use_mirroring: bool = False, amp_dtype: str = "bf16"
    ) -> None:
        with stdout_to_log(logger):
            super().__init__(
                tile_step_size=tile_step_size,
                use_gaussian=True,
                use_mirroring=use_mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
        self.amp = amp_policy(device, amp_dtype)
        self.network_name: str | None = None

    def initialize_from_trained_model_folder(
        self,
        model_training_output_dir: str | os.PathLike[str],
        use_folds: Sequence[int | str] | None,
        checkpoint_name: str = "checkpoint_final.pth",
    ) -> None:
        """Load plans, dataset.json and the folds' checkpoints (weights only) of a ``medmamba train`` run.

        Raises:
            PlanError: no ``plans.json``/``dataset.json``, or a plans reader this predictor does not feed.
            CheckpointError: missing checkpoints, another network or channel count, weights that do not fit.
        """
        folder = Path(model_training_output_dir)
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).is_file():
                raise PlanError(f"{folder}: no {name}; this is not a model folder written by `medmamba train`")
        plans = json.loads((folder / "plans.json").read_text())
        dataset_json = json.loads((folder / "dataset.json").read_text())
        reader = plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in _READERS:
            raise PlanError(
                f"{folder / 'plans.json'}: image_reader_writer {reader!r} reorients images on reading, which "
                f"medmamba predict does not reproduce (supported: {', '.join(_READERS)}). Re-plan the dataset "
                "without overwrite_image_reader_writer"
            )
        folds = list(use_folds) if use_folds else _available_folds(folder, checkpoint_name)
        paths = [folder / f"fold_{fold}" / checkpoint_name for fold in folds]
        checkpoints = [load_checkpoint(path) for path in paths]
        first = checkpoints[0]
        configuration = first["init_args"]["configuration"]
        if configuration not in plans.get("configurations", {}):
            raise CheckpointError(
                f"{paths[0]}: was trained as configuration {configuration!r} ({first['network']}), which "
                f"{folder / 'plans.json'} does not define (it has {', '.join(plans.get('configurations', {}))}). The "
                "checkpoint comes from another model folder; predict with that folder"
            )
        plans_manager = PlansManager(plans)
        configuration_manager = plans_manager.get_configuration(configuration)
        label_manager = plans_manager.get_label_manager(dataset_json)
        in_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        out_channels = label_manager.num_segmentation_heads
        for path, checkpoint in zip(paths, checkpoints, strict=True):
            check_checkpoint(
                checkpoint, path, network=first["network"], in_channels=in_channels, out_channels=out_channels
            )
            if checkpoint["init_args"]["configuration"] != configuration:
                raise CheckpointError(
                    f"{path}: trained on configuration {checkpoint['init_args']['configuration']!r}, but "
                    f"{paths[0]} on {configuration!r}. Predict with folds of one configuration (--folds)"
                )
        network = MedmambaTrainer.build_network_architecture(
            plans_manager, configuration_manager, in_channels, out_channels, enable_deep_supervision=False
        )
        for path, checkpoint in zip(paths, checkpoints, strict=True):
            load_weights(network, checkpoint["network_weights"], path)  # every fold must fit before we start
        mirror_axes = first.get("inference_allowed_mirroring_axes")
        with nnunet_environment():  # no torch.compile from a user's nnUNet_compile (Triton scans)
            self.manual_initialization(
                network,
                plans_manager,
                configuration_manager,
                [checkpoint["network_weights"] for checkpoint in checkpoints],
                dataset_json,
                first.get("trainer_name", MedmambaTrainer.__name__),
                tuple(mirror_axes) if mirror_axes is not None else None,
            )
        self.network_name = first["network"]
        logger.info("loaded %s (%s), folds %s, from %s", self.network_name, configuration, folds, folder)

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's sliding window, under this predictor's autocast dtype on CUDA."""
        if self.device.type != "cuda":
            return super().predict_sliding_window_return_logits(input_image)
        with default_autocast_dtype("cuda", self.amp.dtype):
            return super().predict_sliding_window_return_logits(input_image)

    def segment(self, image: Image | Sequence[Image], *, probabilities: bool = False) -> tuple[Image, Image | None]:
        """Segment one case given as one ``Image`` per channel (same grid); returns label map and probabilities.

        Both results carry the input's geometry: the label map ``(X, Y, Z)`` (uint8, or int16 beyond 255 labels)
        and, if asked, the class probabilities as a multi-volume image ``(X, Y, Z, classes)`` (float32).
        """
        channels = [image] if isinstance(image, Image) else list(image)
        data, spacing = _to_nnunet(channels)
        with stdout_to_log(logger):
            result = self.predict_single_npy_array(data, {"spacing": spacing}, None, None, probabilities)
        segmentation, probs = result if probabilities else (result, None)
        geometry = channels[0].geometry
        labels = _from_nnunet(np.asarray(segmentation), geometry.ndim)
        label_map = Image(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int16), geometry)
        if probs is None:
            return label_map, None
        volumes = np.stack([_from_nnunet(np.asarray(p), geometry.ndim) for p in probs], axis=-1)
        return label_map, Image(volumes.astype(np.float32), geometry)


def predict(
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    mirror: bool = False,
    step_size: float = 0.5,
    save_probabilities: bool = False,
    amp_dtype: str = "bf16",
    series_uid: str | None = None,
) -> list[Path]:
    """Segment every case of ``inputs`` with the model in ``model_dir``; returns the label-map paths written.

    Args:
        inputs: a folder of images (nnU-Net naming ``CASE_0000.nii.gz`` for several channels, or one file per
            case), one image file, or one DICOM series folder.
        output: folder for ``<case>.nii.gz`` (created), or — for a single case — a ``.nii.gz``/``.nii`` path.
        model_dir: the ``MedmambaTrainer__<plans>__<configuration>`` folder, or one of its ``fold_<k>`` folders.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        folds: folds to ensemble (logits averaged); None = every fold with ``checkpoint``.
        checkpoint: checkpoint file name in each fold folder.
        mirror: mirroring test-time augmentation over the axes the trainer allowed.
        step_size: sliding-window step as a fraction of the patch size (0 < step ≤ 1).
        save_probabilities: also write ``<case>_probabilities.nii.gz`` (one volume per class).
        amp_dtype: autocast dtype on CUDA.
        series_uid: which DICOM series when the input folder holds several.

    Raises:
        ImageReadError / GeometryError: unreadable inputs, channels on different grids, missing channels.
        PlanError / CheckpointError: not a usable model folder.
        UsageError: an invalid option.
    """
    if not 0 < step_size <= 1:
        raise UsageError(f"--step-size {step_size}: must lie in (0, 1]")
    device = resolve_device(device)
    model_dir, folds = _model_folder(Path(model_dir), folds)
    predictor = MedmambaPredictor(device, tile_step_size=step_size, use_mirroring=mirror, amp_dtype=amp_dtype)
    predictor.initialize_from_trained_model_folder(model_dir, folds, checkpoint)
    num_channels = determine_num_input_channels(
        predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    )
    cases = find_input_cases(inputs, num_channels)
    targets = _targets(Path(output), cases)
    sources = {source.resolve() for case in cases for source in case.sources}
    clash = [t for t in targets if t.resolve() in sources]
    if clash:
        raise UsageError(f"-o {output}: {clash[0].name} would overwrite an input image. Write to another folder")
    written = []
    for case, target in progress(list(zip(cases, targets, strict=True)), desc="predict", total=len(cases)):
        images = _read_case(case, num_channels, series_uid)
        label_map, probabilities = predictor.segment(images, probabilities=save_probabilities)
        written.append(write_image(label_map, target))
        if probabilities is not None:
            write_image(probabilities, target.with_name(target.name.replace(".nii", "_probabilities.nii", 1)))
        logger.info("%s → %s", case.case_id, target)
    return written


def find_input_cases(inputs: str | os.PathLike[str], num_channels: int = 1) -> list[InputCase]:
    """The cases in ``inputs``: an image file, a folder of images, or a DICOM series folder.

    A folder's files named ``CASE_XXXX<ending>`` are grouped into multi-channel cases (nnU-Net's rule); other
    image files are one case each (single-channel models). A folder with no image files is read as one DICOM
    series.

    Raises:
        ImageReadError: nothing to segment, or a case with missing channels.
    """
    path = Path(inputs)
    if path.is_file():
        return [_file_case(path, num_channels)]
    if not path.is_dir():
        raise ImageReadError(f"{path}: does not exist. Give an image file, a folder of images or a DICOM folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and image_ending(p))
    if not images:
        find_dicom_series(path)  # raises ImageReadError when there is no series either
        return [InputCase(path.name, (path,), dicom=True)]
    groups: dict[str, dict[int, Path]] = {}
    singles: list[Path] = []
    for image in images:
        match = _CHANNEL.match(image.name[: -len(image_ending(image) or "")])
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = image
        else:
            singles.append(image)
    cases = [_grouped_case(case_id, channels, num_channels, path) for case_id, channels in sorted(groups.items())]
    cases += [_file_case(single, num_channels) for single in singles]
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ImageReadError(
            f"{path}: case ids {duplicates} occur twice (as CASE_0000 and CASE files). Rename one of them"
        )
    return sorted(cases, key=lambda case: case.case_id)


def _file_case(path: Path, num_channels: int) -> InputCase:
    ending = image_ending(path)
    if ending is None:
        raise ImageReadError(f"{path}: unsupported file type. Use one of {', '.join(SUPPORTED_ENDINGS)}")
    stem = path.name[: -len(ending)]
    match = _CHANNEL.match(stem)
    if match and num_channels > 1:  # one channel file given: collect its siblings
        siblings = {
            int(m["channel"]): p
            for p in path.parent.glob(f"{match['case']}_[0-9][0-9][0-9][0-9]{ending}")
            if (m := _CHANNEL.match(p.name[: -len(ending)]))
        }
        return _grouped_case(match["case"], siblings, num_channels, path.parent)
    case_id = match["case"] if match else stem
    if num_channels > 1:
        return InputCase(case_id, (path,), volumes_as_channels=True)
    return InputCase(case_id, (path,))


def _grouped_case(case_id: str, channels: dict[int, Path], num_channels: int, folder: Path) -> InputCase:
    expected = list(range(num_channels))
    if sorted(channels) != expected:
        have = ", ".join(f"{c:04d}" for c in sorted(channels))
        raise ImageReadError(
            f"{folder}: case {case_id!r} has channels {have}, but the model needs {num_channels} "
            f"({case_id}_0000 … {case_id}_{num_channels - 1:04d}). Add the missing channel files"
        )
    return InputCase(case_id, tuple(channels[c] for c in expected))


def _read_case(case: InputCase, num_channels: int, series_uid: str | None) -> list[Image]:
    if case.dicom:
        return [read_dicom_series(case.sources[0], series_uid=series_uid)]
    if case.volumes_as_channels:
        image = read_image(case.sources[0], multi_volume=True)
        if image.num_volumes != num_channels:
            raise ImageReadError(
                f"{case.sources[0]}: has {image.num_volumes} volume(s), but the model needs {num_channels} channels. "
                f"Give one file per channel ({case.case_id}_0000 … {case.case_id}_{num_channels - 1:04d})"
            )
        _check_finite(case.sources[0], image)
        return [image.volume(i) for i in range(num_channels)]
    images = [read_image(source) for source in case.sources]
    for source, image in zip(case.sources, images, strict=True):
        _check_finite(source, image)
    for source, image in zip(case.sources[1:], images[1:], strict=True):
        problems = image.geometry.mismatches(images[0].geometry)
        if image.shape != images[0].shape or problems:
            what = (
                f"shape {image.shape} vs {images[0].shape}" if image.shape != images[0].shape else "; ".join(problems)
            )
            raise GeometryError(
                f"{source}: lies on another grid than {case.sources[0].name} ({what}). Resample the channels of a "
                "case onto one grid"
            )
    return images


def _check_finite(source: Path, image: Image) -> None:
    # nnU-Net's z-score normalisation turns one NaN into an all-NaN volume and an all-background label map
    bad = int(np.size(image.array) - np.count_nonzero(np.isfinite(image.array)))
    if bad:
        raise ImageReadError(
            f"{source}: {bad} non-finite voxel(s) (NaN or ±Inf); the prediction would be meaningless. Replace them "
            "with a valid intensity (e.g. the background value) and predict again"
        )


def _to_nnunet(channels: Sequence[Image]) -> tuple[np.ndarray, list[float]]:
    """Our ``(X, Y, Z)`` channel images → nnU-Net's ``(C, z, y, x)`` float32 array and reversed spacing."""
    geometry = channels[0].geometry
    arrays = [np.asarray(c.array, dtype=np.float32).T for c in channels]
    if geometry.ndim == 2:  # nnU-Net's 2D images are one-slice volumes with a huge fake spacing
        return np.stack(arrays)[:, None], [_SPACING_2D * max(geometry.spacing), *geometry.spacing[::-1]]
    return np.stack(arrays), list(geometry.spacing[::-1])


def _from_nnunet(array: np.ndarray, ndim: int) -> np.ndarray:
    """nnU-Net's ``(z, y, x)`` (or ``(1, y, x)`` for 2D) → our ``(X, Y, Z)`` / ``(X, Y)``."""
    return np.ascontiguousarray((array[0] if ndim == 2 else array).T)


def _model_folder(folder: Path, folds: Sequence[int | str] | None) -> tuple[Path, list[int | str] | None]:
    """Accept the trainer folder or one of its ``fold_k`` folders (then that fold)."""
    if (folder / "plans.json").is_file():
        return folder, list(folds) if folds else None
    match = re.fullmatch(r"fold_(\d+|all)", folder.name)
    if match and (folder.parent / "plans.json").is_file():
        fold: int | str = int(match[1]) if match[1].isdigit() else match[1]
        if folds and list(folds) != [fold]:
            raise UsageError(f"-m {folder} is fold {fold}; --folds {list(folds)} disagrees. Give the parent folder")
        return folder.parent, [fold]
    raise PlanError(
        f"{folder}: not a model folder (no plans.json). Give the MedmambaTrainer__<plans>__<configuration> folder "
        "that `medmamba train` wrote"
    )


def _available_folds(folder: Path, checkpoint_name: str) -> list[int | str]:
    found = sorted(p for p in folder.glob("fold_*") if (p / checkpoint_name).is_file())
    numeric = [int(p.name[5:]) for p in found if p.name[5:].isdigit()]
    if numeric:
        return sorted(numeric)
    if any(p.name == "fold_all" for p in found):
        return ["all"]
    present = sorted({c.name for c in folder.glob("fold_*/*.pth")})
    raise CheckpointError(
        f"{folder}: no fold has {checkpoint_name}"
        + (f" (found {', '.join(present)}; choose one with --checkpoint)" if present else "; train the model first")
    )


def _targets(output: Path, cases: Sequence[InputCase]) -> list[Path]:
    if output.name.endswith((".nii.gz", ".nii")):
        if len(cases) != 1:
            raise UsageError(f"-o {output}: a file name needs exactly one input case, got {len(cases)}. Give a folder")
        output.parent.mkdir(parents=True, exist_ok=True)
        return [output]
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: exists and is not a folder. Give a folder or a .nii.gz file name")
    output.mkdir(parents=True, exist_ok=True)
    return [output / f"{case.case_id}.nii.gz" for case in cases]

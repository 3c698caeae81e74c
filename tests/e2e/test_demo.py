"""`medmamba demo --quick` end to end (about a minute on the 2-core box): the report exists, shows what is on disk,
and its numbers are real — recomputed here from the label maps and displacement fields the demo wrote.

The full demo (``make demo``) runs the same code with bigger settings: about 7 minutes on an idle 2-core box
(measured; README.md). The quick run's numbers mean little (one epoch of two iterations); their provenance is
what is checked.
"""

from __future__ import annotations

import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from medmamba.cli import build_parser, main
from medmamba.engines.registration.register import displacement_to_voxels, read_displacement_field
from medmamba.metrics.registration import jacobian_determinant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("demo") / "medmamba-demo"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--quick", "-o", str(output), "--device", "cpu", "--no-progress", "-q"])
    assert code == 0
    summary = json.loads((output / "report" / "summary.json").read_text())
    return {"output": output, "stdout": stdout.getvalue(), "summary": summary}


def dice(reference: np.ndarray, prediction: np.ndarray, label: int) -> float:
    a, b = reference == label, prediction == label
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_it_says_where_the_report_is_and_the_report_has_every_part(demo):
    output = demo["output"]
    lines = demo["stdout"].strip().splitlines()
    assert lines[-1] == f"report: {output / 'report' / 'index.html'}"
    assert lines[0].startswith("segmentation (umamba_bot, 1 held-out cases): mean Dice ")
    assert lines[1].startswith("registration (MambaMorph, 1 held-out pairs): warped-label Dice ")
    figures = demo["summary"]["figures"]
    names = {p.name for p in (output / "report").iterdir()}
    expected = {"index.html", "README.md", "summary.json", *figures["curves"], *figures["segmentation"]}
    assert names == expected | set(figures["registration"])
    assert figures["curves"] == ["training_curves.png"] and len(figures["segmentation"]) == 1
    page = (output / "report" / "index.html").read_text()
    markdown = (output / "report" / "README.md").read_text()
    for figure in [*figures["curves"], *figures["segmentation"], *figures["registration"]]:
        assert f'src="{figure}"' in page and f"({figure})" in markdown
        pixels = matplotlib.image.imread(output / "report" / figure)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels[..., :3].std() > 0.05  # a real picture


def test_segmentation_numbers_are_those_of_the_files_on_disk(demo):
    output, seg = demo["output"], demo["summary"]["segmentation"]
    splits = json.loads((output / "preprocessed" / "Dataset990_MNITissue" / "splits_final.json").read_text())
    assert seg["held_out"] == sorted(splits[0]["val"])  # fold 0's validation cases
    assert not set(seg["held_out"]) & set(splits[0]["train"])  # never trained on
    for case in seg["held_out"]:
        reference = np.asarray(nib.load(output / "heldout" / "labels" / f"{case}.nii.gz").dataobj)
        predicted = nib.load(output / "predictions" / f"{case}.nii.gz")
        source = nib.load(output / "heldout" / "images" / f"{case}_0000.nii.gz")
        np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-4)  # the input's geometry
        for label, name in ((1, "grey matter"), (2, "white matter")):
            recorded = seg["per_case"][case][name]["dice"]
            assert recorded == pytest.approx(dice(reference, np.asarray(predicted.dataobj), label), abs=1e-6)
    metrics = json.loads((output / "predictions" / "metrics.json").read_text())
    assert seg["foreground_mean"]["dice"] == pytest.approx(metrics["foreground_mean"]["dice"])
    assert f"{seg['foreground_mean']['dice']:.3f}" in (output / "report" / "README.md").read_text()


def test_registration_numbers_are_those_of_the_files_on_disk(demo):
    output, reg = demo["output"], demo["summary"]["registration"]
    ((pair, values),) = reg["per_pair"].items()
    folder = output / "registrations" / pair
    info = json.loads((folder / "pair.json").read_text())
    fixed_labels = np.asarray(nib.load(info["fixed_labels"]).dataobj)
    warped_labels = np.asarray(nib.load(folder / "warped_labels.nii.gz").dataobj)
    for label, name in ((1, "grey matter"), (2, "white matter")):
        recorded = values["structures"][name]["dice"]
        assert recorded == pytest.approx(dice(fixed_labels, warped_labels, label), abs=1e-6)
    displacement, geometry = read_displacement_field(folder / "displacement.nii.gz")
    det = jacobian_determinant(displacement_to_voxels(displacement, geometry))
    assert values["folding_fraction"] == pytest.approx(float((det <= 0).mean()), abs=1e-9)
    assert values["jacobian_min"] == pytest.approx(float(det.min()), rel=1e-5)


def test_the_reports_commands_are_valid_medmamba_command_lines(demo):
    commands = demo["summary"]["commands"]
    assert [c["step"] for c in commands] == [
        "segmentation data", "plan and preprocess", "train segmentation", "predict held-out cases",
        "evaluate segmentations", "registration data", "train registration", "register held-out pairs",
        "evaluate registrations",
    ]  # fmt: skip
    parser = build_parser()
    for command in commands:
        assert command["argv"][0] == "medmamba"
        assert callable(parser.parse_args(command["argv"][1:]).run)


def test_a_second_run_refuses_to_overwrite_and_foreign_folders_are_left_alone(demo, tmp_path, capsys):
    assert main(["demo", "--quick", "-o", str(demo["output"])]) == 2
    assert "holds an earlier demo. Pass --overwrite" in capsys.readouterr().err
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("x")
    assert main(["demo", "--quick", "-o", str(foreign), "--overwrite"]) == 2
    assert "is not empty and holds no earlier demo (chapter1.tex)" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["chapter1.tex"]
    assert main(["demo", "--no-segmentation", "--no-registration", "-o", str(tmp_path / "x")]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_overwrite_removes_only_the_demos_own_folders(tmp_path):
    from medmamba.engines.demo import FOLDERS, _prepare_output

    root = tmp_path / "medmamba-demo"
    for name in FOLDERS:
        (root / name / "sub").mkdir(parents=True)
    (root / "my_notes.txt").write_text("keep me")
    assert _prepare_output(root, overwrite=True) == root.resolve()
    assert [p.name for p in root.iterdir()] == ["my_notes.txt"]

"""``medmamba evaluate --task registration|video``: user errors exit 2 with one message, nothing written."""

from __future__ import annotations

import pytest

from medmamba.cli import main


def empty(tmp_path):
    (tmp_path / "pred").mkdir()
    return tmp_path / "pred"


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        ("registration", [], "holds no pair folder"),
        ("registration", ["-ref", "x"], "reads the fixed labels from each pair.json"),
        ("video", [], "-ref/--reference is required"),
        ("video", ["-ref", "nowhere"], "is not a folder"),
    ],
    ids=["no-pairs", "registration-with-ref", "video-without-ref", "video-missing-ref"],
)
def test_evaluate_task_errors_exit_2(task, extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prediction = empty(tmp_path)
    code = main(["evaluate", "--task", task, "-pred", str(prediction), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert not any(prediction.iterdir())

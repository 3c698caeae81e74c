from __future__ import annotations

import csv
import io
import json

import pytest

from medmamba.metrics.tables import MetricTable


def table() -> MetricTable:
    t = MetricTable(("dice", "hd95"), meta={"reference": "labels"})
    t.add("a", {"1": {"dice": 0.5, "hd95": 2.0}, "2": {"dice": None, "hd95": None}})
    t.add("b", {"1": {"dice": 1.0, "hd95": float("nan")}, "2": {"dice": 0.25, "hd95": 4.0}})
    return t


def test_means_skip_undefined_values_and_foreground_averages_structures():
    t = table()
    assert t.means() == {"1": {"dice": 0.75, "hd95": 2.0}, "2": {"dice": 0.25, "hd95": 4.0}}
    assert t.foreground_mean() == {"dice": 0.5, "hd95": 3.0}


def test_json_is_strict_and_holds_cases_means_and_meta():
    data = json.loads(table().to_json())  # json.loads would accept NaN; to_json must not write it
    assert "NaN" not in table().to_json()
    assert data["meta"] == {"reference": "labels"} and data["metrics"] == ["dice", "hd95"]
    assert data["metric_per_case"][1] == {"case": "b", "metrics": {"1": {"dice": 1.0, "hd95": None},
                                                                   "2": {"dice": 0.25, "hd95": 4.0}}}  # fmt: skip
    assert data["foreground_mean"]["dice"] == 0.5


def test_csv_rows_per_case_and_structure_then_means():
    rows = list(csv.reader(io.StringIO(table().to_csv())))
    assert rows[0] == ["case", "structure", "dice", "hd95"]
    assert rows[1:5] == [["a", "1", "0.5", "2"], ["a", "2", "", ""], ["b", "1", "1", ""], ["b", "2", "0.25", "4"]]
    assert rows[5:] == [["mean", "1", "0.75", "2"], ["mean", "2", "0.25", "4"], ["mean", "foreground", "0.5", "3"]]


def test_a_case_is_added_once():
    t = table()
    with pytest.raises(ValueError, match="already"):
        t.add("a", {})

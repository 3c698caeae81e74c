"""Metric tables: per-case rows and their means, rendered as JSON and CSV text (the caller writes the files).

A table holds, for every case and structure, a mapping metric name → value. Means are taken per structure and
metric over the cases where the value is defined (NaN = undefined, e.g. Dice when a structure is absent from
reference and prediction); ``foreground_mean`` averages those per-structure means, as nnU-Net's summary does.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MetricTable"]


@dataclass(slots=True)
class MetricTable:
    """Per-case, per-structure metric values.

    Args:
        metrics: metric names, the column order (e.g. ``("dice", "hd95", "surface_dice")``).
        rows: ``case id → structure name → metric → value``; filled by :meth:`add`.
        meta: anything describing the evaluation (folders, spacing rule, tolerances), copied into the JSON.

    Example:
        >>> table = MetricTable(("dice",))
        >>> table.add("a", {"1": {"dice": 0.5}}); table.add("b", {"1": {"dice": 1.0}})
        >>> table.means()["1"]["dice"]
        0.75
    """

    metrics: Sequence[str]
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, case: str, values: Mapping[str, Mapping[str, Any]]) -> None:
        """Add one case: ``structure → metric → value`` (None or NaN = undefined); a case id may appear once."""
        if case in self.rows:
            raise ValueError(f"case {case!r} is already in the table")
        self.rows[case] = {str(s): dict(m) for s, m in values.items()}

    @property
    def structures(self) -> list[str]:
        """Structure names in first-seen order."""
        seen: dict[str, None] = {}
        for per_case in self.rows.values():
            seen.update(dict.fromkeys(per_case))
        return list(seen)

    def means(self) -> dict[str, dict[str, float | None]]:
        """``structure → metric → mean`` over the cases where the value is defined (None if never defined)."""
        return {
            structure: {metric: _mean(self._column(structure, metric)) for metric in self.metrics}
            for structure in self.structures
        }

    def foreground_mean(self) -> dict[str, float | None]:
        """``metric → mean of the per-structure means``."""
        means = self.means()
        return {metric: _mean([means[s][metric] for s in means]) for metric in self.metrics}

    def to_dict(self) -> dict[str, Any]:
        """``{"meta", "metric_per_case": [{"case", "metrics": {structure: {...}}}], "mean", "foreground_mean"}``."""
        return {
            "meta": self.meta,
            "metrics": list(self.metrics),
            "metric_per_case": [
                {"case": case, "metrics": {s: {k: _clean(v) for k, v in m.items()} for s, m in per_case.items()}}
                for case, per_case in self.rows.items()
            ],
            "mean": self.means(),
            "foreground_mean": self.foreground_mean(),
        }

    def to_json(self) -> str:
        """Strict JSON (NaN → null), indented."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_csv(self) -> str:
        """CSV text: one row per case and structure, then the means.

        Columns ``case, structure, <metrics…>``; ``mean`` rows per structure and a ``mean``/``foreground`` row
        follow; undefined values are empty cells.
        """
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["case", "structure", *self.metrics])
        for case, per_case in self.rows.items():
            for structure, values in per_case.items():
                writer.writerow([case, structure, *(_cell(values.get(m)) for m in self.metrics)])
        for structure, values in self.means().items():
            writer.writerow(["mean", structure, *(_cell(values[m]) for m in self.metrics)])
        foreground = self.foreground_mean()
        writer.writerow(["mean", "foreground", *(_cell(foreground[m]) for m in self.metrics)])
        return out.getvalue()

    def _column(self, structure: str, metric: str) -> list[Any]:
        return [per_case[structure].get(metric) for per_case in self.rows.values() if structure in per_case]


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _mean(values: Sequence[Any]) -> float | None:
    defined = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(defined) / len(defined) if defined else None


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)

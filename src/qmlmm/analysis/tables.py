"""Markdown tables of results shared by the pipeline summary and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["learning_curve_table"]

Point = Mapping[str, Any]


def learning_curve_table(
    curves: Mapping[str, Sequence[Point]],
    baseline: Mapping[str, Any] | None = None,
    extra: Mapping[str, Callable[[Point], str]] | None = None,
    baseline_label: str = "baseline alone (shifted)",
) -> list[str]:
    """Markdown lines of a learning-curve table: one row per (model, training-set size) point.

    ``curves``: {model name: points}, each point with ``n_train`` and test ``energy_mae`` (kJ/mol),
    ``qm_forces_mae`` and ``mm_forces_mae`` (kJ/mol/nm), as :func:`qmlmm.workflows.learning_curve.
    learning_curve` returns them. ``extra``: further columns {header: cell of a point}, after the
    errors. ``baseline``: the baseline's own errors ({"energy": {"mae"}, "qm_forces": ..., "mm_forces":
    ...}), a last row so that every model error stands beside it.
    """
    extra = dict(extra or {})
    head = ["model", "train frames", "E MAE (kJ/mol)", "QM F MAE (kJ/mol/nm)", "MM F MAE (kJ/mol/nm)", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, points in curves.items():
        for p in points:
            cells = [name, str(p["n_train"]), f"{p['energy_mae']:.3f}", f"{p['qm_forces_mae']:.2f}"]
            cells += [f"{p['mm_forces_mae']:.3f}", *(cell(p) for cell in extra.values())]
            lines.append("| " + " | ".join(cells) + " |")
    if baseline:
        cells = [baseline_label, "-", f"{baseline['energy']['mae']:.3f}", f"{baseline['qm_forces']['mae']:.2f}"]
        cells += [f"{baseline['mm_forces']['mae']:.3f}", *("-" for _ in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines

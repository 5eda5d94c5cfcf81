"""Markdown tables of results shared by the pipeline summary and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["learning_curve_table", "validation_markdown"]

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


def _pm(d: Mapping[str, float], fmt: str = ".3f") -> str:
    return f"{d['mean']:{fmt}} +- {d['se']:{fmt}}"


def validation_markdown(res: Mapping[str, Any]) -> str:
    """Markdown of the validation step's result (``qmlmm.workflows.pipeline.validation``): per driver the
    Ramachandran populations, H-bonds, RDF peaks and speed (mean +- standard error over runs), then each
    driver against the reference with permutation p-values over runs."""
    from qmlmm.analysis.validation import REGIONS

    s, drivers = res["settings"], res["drivers"]
    lines = [
        f"{s['runs']} independent runs per driver, {s['steps']} steps of {s['dt_fs']} fs "
        f"(HMR {s['hmr_amu']} amu), {s['temperature']} K; the first {s['skip_ps']} ps of every run left out "
        f"({res['production_ps_per_run']:.2f} ps a run kept). Mean +- standard error over runs, every start "
        "weighted equally.",
        "",
        "| driver | runs (starts) | "
        + " | ".join(REGIONS)
        + " | H-bonds solute-water | region changes per run | ns/day |",
        "|" + "---|" * (len(REGIONS) + 5),
    ]
    for d, st in drivers.items():
        pops = " | ".join(_pm(st["populations"][k]) for k in REGIONS)
        starts = ", ".join(str(x) for x in st.get("starts", []))
        lines.append(
            f"| {d} | {st['n_runs']} ({starts}) | {pops} | {_pm(st['hbonds']['total'], '.2f')} | "
            f"{', '.join(str(x) for x in st['region_changes_per_run'])} | {st['ns_per_day']['mean']:.2f} |"
        )
    guarded = {d: st.get("fallback_steps_per_run", []) for d, st in drivers.items() if d.endswith("_guarded")}
    if guarded:
        lines += [
            "",
            f"Guarded drivers: steps above an ensemble energy spread of {s.get('max_uncertainty')} kJ/mol took "
            f"their forces from the {s.get('fallback')} engine; such force calls per run (about one a step, "
            f"of {s['steps']} steps): "
            + "; ".join(f"{d} {', '.join(str(x) for x in n)}" for d, n in guarded.items())
            + ".",
        ]
    pairs = sorted({p for st in drivers.values() for p in st["rdf_peak"]})
    lines += [
        "",
        "| driver | " + " | ".join(f"{p} peak r (nm) / g" for p in pairs) + " |",
        "|" + "---|" * (len(pairs) + 1),
    ]
    for d, st in drivers.items():
        cells = [f"{_pm(st['rdf_peak'][p]['r_nm'])} / {_pm(st['rdf_peak'][p]['g'], '.2f')}" for p in pairs]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if "reference" in drivers and "js_halves_bits" in drivers["reference"]:
        lines += [
            "",
            "Run-to-run noise: Jensen-Shannon divergence between the Ramachandran histograms of two halves of "
            "the runs (each start's runs alternating between them): reference "
            f"{drivers['reference']['js_halves_bits']:.4f} bits"
            + "".join(
                f", {d} {st['js_halves_bits']:.4f}"
                for d, st in drivers.items()
                if d != "reference" and "js_halves_bits" in st
            )
            + ".",
        ]
    comp = res.get("against_reference") or {}
    if comp:
        lines += [
            "",
            "Against the reference (p: permutation test over runs; p >= 0.05: within run-to-run noise), on the "
            "starts both have runs from, every start weighted equally:",
            "",
            "| driver | largest population difference (p) | Ramachandran JS bits (p) | JS half vs half, "
            "against reference's own halves | "
            + " | ".join(f"RDF {p} rms g difference (p)" for p in pairs)
            + " | H-bond difference (p) |",
            "|" + "---|" * (len(pairs) + 5),
        ]
        for d, c in comp.items():
            rd = " | ".join(f"{c['rdf'][p]['rms_g_difference']:.3f} ({c['rdf'][p]['p']:.3f})" for p in pairs)
            hb = c["hbonds_total"]
            halves = (
                f"{c['ramachandran_js_cross_halves_bits']:.4f} vs {c['ramachandran_js_reference_halves_bits']:.4f}"
                if "ramachandran_js_cross_halves_bits" in c
                else "-"
            )
            n = c.get("runs_compared", {})
            name = f"{d} ({n.get('other')} vs {n.get('reference')} runs, starts {c.get('common_starts')})" if n else d
            lines.append(
                f"| {name} | {c['populations_max_abs_difference']:.3f} ({c['populations_p']:.3f}) | "
                f"{c['ramachandran_js_bits']:.4f} ({c['ramachandran_p']:.3f}) | {halves} | {rd} | "
                f"{hb['difference']:+.2f} +- {hb['se']:.2f} ({hb['p']:.3f}) |"
            )
        lines += [
            "",
            "| driver | " + " | ".join(f"{k} difference" for k in REGIONS) + " |",
            "|" + "---|" * (len(REGIONS) + 1),
        ]
        for d, c in comp.items():
            lines.append(
                f"| {d} | "
                + " | ".join(
                    f"{c['populations'][k]['difference']:+.3f} +- {c['populations'][k]['se']:.3f}" for k in REGIONS
                )
                + " |"
            )
    stopped = res.get("runs_stopped") or {}
    if stopped:
        lines += [
            "",
            "Runs that stopped early, left out of the statistics above (their last frames can be of a molecule"
            " coming apart):",
            "",
        ]
        lines += [f"- {d} {run}: {why}" for d, runs in stopped.items() for run, why in runs.items()]
    lines += _refit_lines(res.get("refit"), s["runs"])
    return "\n".join(lines) + "\n"


def _refit_lines(refit: Mapping[str, Any] | None, runs: int) -> list[str]:
    """The refit round of a validation (``qmlmm.workflows.pipeline.refit.refit_models``' record) as lines."""
    if not refit:
        return []
    lines = [
        "",
        "Refit round: the frames each guarded driver queued, labelled and added to its model's training frames "
        f"(validation and test frames unchanged); the model's {runs} unguarded runs repeated as `<mode>_refit`.",
        "",
        "| model | frames queued | labelled | training frames before -> after | test E MAE before -> after "
        "| test QM-F MAE before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in refit.items():
        if not r.get("model"):
            lines.append(f"| {mode} | {r['n_queued']} | {r['n_labelled']} | {r.get('why', '-')} | - | - |")
            continue
        n, e = r["n_train"], r["test_mae"]
        lines.append(
            f"| {mode} | {r['n_queued']} | {r['n_labelled']} | {n['before']} -> {n['after']} | "
            f"{e['before']['energy']:.2f} -> {e['after']['energy']:.2f} | "
            f"{e['before']['qm_forces']:.1f} -> {e['after']['qm_forces']:.1f} |"
        )
    return lines

"""The pipeline's summary: JSON, Markdown, step times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["step_seconds_all", "summary_markdown"]


def step_seconds_all(out: str | Path) -> dict[str, float]:
    """Seconds spent on each pipeline step in a run folder, summed over all the invocations that worked
    on it (its ``timings.jsonl``; a resumed run's reused steps add ~0). Empty if the folder has none."""
    p = Path(out) / "timings.jsonl"
    total: dict[str, float] = {}
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            total[rec["step"]] = total.get(rec["step"], 0.0) + float(rec["seconds"])
    return total


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _n_frames(labels: Path) -> int:
    from qmlmm.data import Dataset

    with Dataset(labels) as ds:
        return len(ds)


def summary_markdown(s: dict[str, Any], out: Path) -> str:
    lines = [
        f"# {s['name']}: summary",
        "",
        f"{s['n_frames']} frames labelled; total time {s['total_s']:.0f} s.",
        "",
        "## Test-set errors (energies kJ/mol, forces kJ/mol/nm)",
        "",
        "| model | energy MAE | QM force MAE | MM force MAE |",
        "|---|---|---|---|",
    ]
    for mode, ev in s["evaluation"].items():
        m = ev["model"]
        lines.append(
            f"| {mode} | {m['energy']['mae']:.3f} | {m['qm_forces']['mae']:.2f} | {m['mm_forces']['mae']:.3f} |"
        )
    b = s["evaluation"].get("delta", {}).get("baseline_alone")
    if b:
        lines.append(
            f"| baseline alone (shifted) | {b['energy']['mae']:.3f} | {b['qm_forces']['mae']:.2f} | "
            f"{b['mm_forces']['mae']:.3f} |"
        )
    lc = s.get("learning_curve") or {}
    if lc.get("curves"):
        from qmlmm.analysis.tables import learning_curve_table

        lines += ["", "## Learning curve (test set)", ""]
        lines += learning_curve_table(lc["curves"], lc.get("baseline_alone"))
    lines += ["", "## MD", "", "| run | steps | ns/day | stopped | fallback force calls |", "|---|---|---|---|---|"]
    for k, v in s["md"].items():
        fb = f"{v['fallback_steps']} ({v['fallback']})" if v.get("fallback") not in (None, "stop") else "-"
        lines.append(f"| {k} | {v['steps_done']} | {v['ns_per_day']:.3f} | {v['stopped'] or '-'} | {fb} |")
    an = s.get("analysis") or {}
    if an.get("rdf_peak") or an.get("dihedrals"):
        lines += [
            "",
            "## MD observables",
            "",
            "| run | RDF solute - water: r (nm), g at the maximum | nearest pair (nm), mean over frames "
            "| chain single bonds: mean abs dihedral (deg), s-trans fraction |",
            "|---|---|---|---|",
        ]
        for run in s["md"]:
            pk, dh = an.get("rdf_peak", {}).get(run) or {}, an.get("dihedrals", {}).get(run)
            near = an.get("nearest_nm", {}).get(run) or {}
            rdf_txt = "; ".join(f"{pair} {v['r_nm']:.3f}, {v['g']:.2f}" for pair, v in pk.items()) or "-"
            near_txt = "; ".join(f"{pair} {v:.3f}" for pair, v in near.items()) or "-"
            dih_txt = f"{dh['mean_abs_single_deg']:.1f}, {dh['frac_s_trans']:.3f}" if dh else "-"
            lines.append(f"| {run} | {rdf_txt} | {near_txt} | {dih_txt} |")
    if s.get("reaction"):
        lines += ["", "## Free-energy profile (umbrella sampling, MBAR)", ""]
        for k, v in s["reaction"].items():
            early = v.get("windows_stopped_early", {})
            lines.append(
                f"- {k}: forward barrier {v.get('barrier_forward_kjmol', float('nan')):.1f} "
                f"+- {v.get('barrier_forward_err_kjmol', float('nan')):.1f} kJ/mol "
                f"(top at {v.get('x_top_nm', float('nan')):.3f} nm), barrier above the higher end minimum "
                f"{v['barrier_kjmol']:.1f} kJ/mol; {v.get('windows', '?')} windows"
                + (f", {len(early)} stopped early (see summary.json)" if early else "")
                + (
                    f", {sum(v['window_fallback_calls'])} force calls from the guard's fallback"
                    if sum(v.get("window_fallback_calls") or []) > 0
                    else ""
                )
                + (
                    "; from the first / second half of every window's samples: "
                    + " / ".join(
                        f"{b:.1f} +- {e:.1f}"
                        for b, e in zip(
                            v["barrier_forward_halves_kjmol"],
                            v.get("barrier_forward_halves_err_kjmol", [float("nan")] * 2),
                            strict=True,
                        )
                    )
                    + f" kJ/mol ({'agree' if v.get('halves_agree') else 'do not agree'} within their error bars)"
                    if v.get("barrier_forward_halves_kjmol")
                    else ""
                )
                + (
                    f"; keep-together restraint removed by reweighting: {v['barrier_forward_unbiased_kjmol']:.1f} "
                    f"+- {v['barrier_forward_unbiased_err_kjmol']:.1f} kJ/mol (effective samples "
                    f"{v['ess_unbiased']:.0f})"
                    if "barrier_forward_unbiased_kjmol" in v
                    else ""
                )
                + (
                    f"; correlation time per window {min(v['window_correlation_time_ps']):.3f}-"
                    f"{max(v['window_correlation_time_ps']):.3f} ps"
                    if v.get("window_correlation_time_ps")
                    else ""
                )
                + (
                    f"; weakest overlap across the coordinate {v['weakest_cut_overlap']:.4f} at "
                    f"{v['weakest_cut_nm']:.3f} nm"
                    if "weakest_cut_overlap" in v
                    else ""
                )
                + (f"; no profile: {v['profile_error']}" if v.get("profile_error") else "")
            )
    if s.get("validation"):
        from qmlmm.analysis.tables import validation_markdown

        lines += ["", "## Validation: independent MD runs of each driver against the reference", ""]
        lines += [validation_markdown(s["validation"]).rstrip("\n"), "", "Plot: validation/validation.png"]
    every = s.get("timings_all_s") or {}
    lines += ["", "## Timings (s)", "", "| step | this invocation | all invocations on this folder |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {every.get(k, float('nan')):.0f} |" for k, v in s["timings_s"].items()]
    plots = sorted(p.name for p in out.glob("*.png")) + sorted(
        str(p.relative_to(out)) for p in [*out.glob("models/*.png"), *out.glob("learning_curve/*.png")]
    )
    lines += ["", "## Plots", ""] + [f"- {p}" for p in plots]
    return "\n".join(lines) + "\n"

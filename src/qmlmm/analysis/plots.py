"""Plots people would rather look at than read: parity plots, learning curves (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.models.evaluation import Collected

__all__ = [
    "dihedral_panels",
    "learning_curve_plot",
    "md_observables_plot",
    "parity_plot",
    "parity_plot_of_model",
    "profile_plot",
    "validation_plot",
]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(plt: Any, fig: Any, path: str | Path, title: str = "") -> Path:
    """Save ``fig`` (with ``title`` as its suptitle, if any) to ``path`` at 110 dpi, close it, and
    return the path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parity_plot(c: Collected, path: str | Path, title: str = "") -> Path:
    """Three panels: energies (shifted by the reference mean), QM forces, MM forces; prediction vs reference."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    e0 = float(np.mean(c.e_ref)) if len(c.e_ref) else 0.0
    panels = [
        (c.e_ref - e0, c.e_pred - e0, "energy - mean (kJ/mol)"),
        (c.fq_ref.ravel(), c.fq_pred.ravel(), "QM forces (kJ/mol/nm)"),
        (c.fm_ref.ravel(), c.fm_pred.ravel(), "MM forces (kJ/mol/nm)"),
    ]
    for ax, (ref, pred, label) in zip(axes, panels, strict=True):
        if ref.size:
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(ref, pred, s=4, alpha=0.5, rasterized=True)
            mae = float(np.mean(np.abs(pred - ref)))
            rmse = float(np.sqrt(np.mean((pred - ref) ** 2)))
            ax.set_title(f"MAE {mae:.3g}, RMSE {rmse:.3g}", fontsize=10)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"model {label}")
    return _saved(plt, fig, path, title)


def learning_curve_plot(
    curves: dict[str, Sequence[dict[str, float]]],
    path: str | Path,
    keys: Sequence[tuple[str, str]] = (
        ("energy_mae", "energy MAE (kJ/mol)"),
        ("qm_forces_mae", "QM force MAE (kJ/mol/nm)"),
        ("mm_forces_mae", "MM force MAE (kJ/mol/nm)"),
    ),
    baseline: dict[str, float] | None = None,
    title: str = "",
) -> Path:
    """Errors against training-set size (log-log), one line per curve (e.g. direct, delta)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 4))
    sizes = sorted({p["n_train"] for pts in curves.values() for p in pts})
    for ax, (key, label) in zip(np.atleast_1d(axes), keys, strict=True):
        for name, pts in curves.items():
            n = [p["n_train"] for p in pts]
            y = [p[key] for p in pts]
            ax.plot(n, y, "o-" if len(pts) > 1 else "*", ms=6 if len(pts) > 1 else 12, label=name)
        if baseline and key in baseline:
            ax.axhline(baseline[key], color="0.4", ls="--", label="baseline alone")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes)  # the sizes themselves as plain numbers (log-scale minor labels overlap)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training frames")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    return _saved(plt, fig, path, title)


def parity_plot_of_model(model_path: str | Path) -> Path | None:
    """The parity plot of a trained model's test set (``<stem>.test.npz`` written by training) as
    ``<stem>.parity.png`` next to it; None when the model has no test predictions."""
    from qmlmm.models.evaluation import Collected

    model_path = Path(model_path)
    stem = model_path.with_suffix("") if model_path.suffix else model_path
    npz = stem.parent / f"{stem.name}.test.npz"
    if not npz.exists():
        return None
    meta = {}
    mj = stem.parent / f"{stem.name}.metrics.json"
    if mj.exists():
        import json

        meta = json.loads(mj.read_text())
    what = (
        f"delta {meta.get('target')} - {meta.get('baseline')}" if meta.get("baseline") else str(meta.get("target", ""))
    )
    return parity_plot(
        Collected.load(npz), stem.parent / f"{stem.name}.parity.png", title=f"{model_path.name}: test set ({what})"
    )


def profile_plot(result: dict[str, Any], path: Path) -> None:
    """The free-energy profiles of ``result`` (model name -> umbrella_profile entry) with MBAR error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in result.items():
        if res.get("f_kjmol"):
            ax.errorbar(res["x_nm"], res["f_kjmol"], yerr=res["df_kjmol"], fmt="o-", ms=4, capsize=2, label=name)
    ax.set_xlabel("reaction coordinate (nm)")
    ax.set_ylabel("free energy (kJ/mol)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dihedral_panels(angles: dict[str, np.ndarray], labels: list[str], path: Path) -> None:
    """One histogram panel per chain dihedral (|angle|, deg), the MD runs overlaid."""
    plt = _plt()

    n = len(labels)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for q, ax in enumerate(axes.ravel()):
        if q >= n:
            ax.axis("off")
            continue
        for name, ang in angles.items():
            ax.hist(np.abs(ang[:, q]), bins=36, range=(0, 180), histtype="step", density=True, label=name)
        ax.set_title(labels[q], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("|dihedral| (deg); solute atom indices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def md_observables_plot(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    angles: dict[str, np.ndarray],
    quads: Sequence[Sequence[Any]],
    path: str | Path,
) -> Path:
    """Two panels: solute-water RDFs of every run (run -> pair -> (r nm, g)) and the pooled |dihedral|
    distribution around chain single bonds (run -> angles (F, Q) deg, ``quads`` the dihedrals' atoms and kind)."""
    from qmlmm.analysis.report import single_bond_angles

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, cs in curves.items():
        for pair, (r, g) in cs.items():
            axes[0].plot(r, g, label=f"{name} {pair}")
    for name, ang in angles.items():
        axes[1].hist(single_bond_angles(ang, quads), bins=36, range=(0, 180), histtype="step", density=True, label=name)  # type: ignore[arg-type]
    axes[0].set_xlabel("r (nm)")
    axes[0].set_ylabel("g(r) solute - water")
    axes[1].set_xlabel("|dihedral| around chain single bonds (deg)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def validation_plot(stats: dict[str, Any], runs: dict[str, Sequence[Any]], path: str | Path) -> Path:
    """Top row: each driver's pooled Ramachandran histogram (phi across, psi up, log density); bottom
    row: region populations (mean +- SE over runs) and the run-averaged RDFs carbonyl O - water H and
    amide H - water O. ``stats`` {driver: driver_statistics}, ``runs`` {driver: [RunObservables]}."""
    from qmlmm.analysis.validation import REGIONS, mean_curve

    plt = _plt()
    n = max(len(stats), 3)
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 6.6), squeeze=False)
    for ax, (d, st) in zip(axes[0], stats.items(), strict=False):
        h = np.asarray(st["histogram"], dtype=float)
        dens = np.log10(np.where(h > 0, h / h.sum(), np.nan))
        ax.imshow(dens.T, origin="lower", extent=(-180, 180, -180, 180), cmap="viridis", aspect="equal")
        ax.set_title(d)
        ax.set_xlabel("phi (deg)")
        ax.set_ylabel("psi (deg)")
    for ax in axes[0][len(stats) :]:
        ax.axis("off")
    width = 0.8 / max(1, len(stats))
    x = np.arange(len(REGIONS))
    for j, (d, st) in enumerate(stats.items()):
        m = [st["populations"][k]["mean"] for k in REGIONS]
        e = [st["populations"][k]["se"] for k in REGIONS]
        axes[1][0].bar(x + j * width, m, width, yerr=e, label=d, capsize=2)
    axes[1][0].set_xticks(x + 0.4 - width / 2, list(REGIONS), fontsize=8)
    axes[1][0].set_ylabel("population")
    axes[1][0].legend(fontsize=7)
    for ax, pair in zip(axes[1][1:3], ("O=C-HW", "HN-OW"), strict=True):
        for d, rs in runs.items():
            if rs and pair in rs[0].rdf:
                ax.plot(rs[0].rdf[pair][0], mean_curve(rs, pair), label=d)  # every start weighted equally
        ax.set_xlabel("r (nm)")
        ax.set_ylabel(f"g(r) {pair}")
        ax.legend(fontsize=7)
    for ax in axes[1][3:]:
        ax.axis("off")
    return _saved(plt, fig, path)

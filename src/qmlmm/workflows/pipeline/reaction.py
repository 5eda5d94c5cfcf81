"""The reaction step: umbrella windows along the reaction coordinate (qmlmm.md.umbrella) and their MBAR
profiles with their checks, per model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.errors import AnalysisError, InputError
from qmlmm.workflows.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

__all__ = ["reaction_restraints", "reaction_step", "umbrella_profile"]


def _reaction_atoms(cfg: PipelineConfig, system: Path) -> tuple[list[int], list[int] | None]:
    """System indices of the reaction coordinate's atoms (i, j, k, l) and of the keep-together pair."""
    r = cfg.reaction or {}
    offsets = json.loads((system / "meta.json").read_text())["solute_offsets"]

    def atom(x: Any) -> int:  # "k:idx" = atom idx of solute k, or a plain system index
        if isinstance(x, str) and ":" in x:
            sol, idx = x.split(":")
            return int(offsets[int(sol)]) + int(idx)
        return int(x)

    kt = r.get("keep_together")
    return [atom(x) for x in r["atoms"]], ([atom(kt[0]), atom(kt[1])] if kt else None)


def reaction_restraints(
    cfg: PipelineConfig, system: Path, r0s: list[float] | None = None, ks: list[float] | None = None
) -> list[list[str]] | None:
    """Restraint texts of each umbrella window (the coordinate restraint plus keep-together).

    ``r0s`` (nm) default to the config's regular windows; ``ks`` (kJ/mol/nm^2, one per window) to the
    reaction's force constant.
    """
    if not cfg.reaction:
        return None
    from qmlmm.md.restraints import umbrella_windows

    r = cfg.reaction
    (i, j, k, l), kt = _reaction_atoms(cfg, system)
    out = []
    centres = r0s if r0s is not None else umbrella_windows(cfg.reaction_windows or r["windows"])
    forces = ks if ks is not None else [float(r.get("k", 2000.0))] * len(centres)
    for r0, kf in zip(centres, forces, strict=True):
        w = [f"rc:{i},{j},{k},{l},{int(r.get('d', -1))},{r0},{float(kf)}"]
        if kt:
            w.append(f"dist:{kt[0]},{kt[1]},{float(r['keep_together'][2])},{float(r['keep_together'][3])}")
        out.append(w)
    return out


def _umbrella_windows(cfg: PipelineConfig, system: Path) -> list[Any]:
    """The umbrella windows of the reaction: the regular ones (config ``reaction_windows`` or the reaction's
    ``windows``, its ``k``), then the extra ones with their own force constant; each with the
    keep-together restraint (same in every window) after the coordinate restraint."""
    from qmlmm.md.restraints import DistanceRestraint, RCRestraint, Restraint, umbrella_windows
    from qmlmm.md.umbrella import make_windows

    r = cfg.reaction or {}
    (i, j, k, l), kt = _reaction_atoms(cfg, system)
    k_reg = float(r.get("k", 2000.0))
    coordinate = RCRestraint(i, j, k, l, int(r.get("d", -1)), 0.0, k_reg)
    others: list[Restraint] = (
        [DistanceRestraint(kt[0], kt[1], float(r["keep_together"][2]), float(r["keep_together"][3]))] if kt else []
    )
    return make_windows(
        coordinate,
        umbrella_windows(cfg.reaction_windows or r["windows"]),
        others,
        k_reg,
        umbrella_windows(cfg.reaction_extra_windows) if cfg.reaction_extra_windows else None,
        cfg.reaction_extra_k,
    )


def _window_samples(folder: Path, win: Any, dt_ps: float) -> dict[str, Any]:
    """A window's samples for MBAR: the coordinate (nm) from its log after the first fifth (relaxation), the
    common (keep-together) restraint energy of each sample (kJ/mol), the time between samples; {} if none."""
    from qmlmm.md.restraints import DistanceRestraint

    p = folder / "log.csv"
    if not p.exists() or len(p.read_text().splitlines()) < 2:
        return {}
    data = np.genfromtxt(p, delimiter=",", names=True)
    drop = len(np.atleast_1d(data["rc0_nm"])) // 5
    x = np.atleast_1d(data["rc0_nm"])[drop:]
    if len(x) == 0:
        return {}
    out: dict[str, Any] = {"r0": win.r0, "k": win.k, "x": x, "dt_ps": dt_ps}
    common = np.zeros(len(x))
    for n, rs in enumerate(win.restraints[1:], start=1):
        if isinstance(rs, DistanceRestraint):
            common += 0.5 * rs.k * (np.atleast_1d(data[f"rc{n}_nm"])[drop:] - rs.r0) ** 2
    if len(win.restraints) > 1:
        out["u_common"] = common
    return out


def _profile_result(wins: list[dict[str, Any]], bins: int) -> dict[str, Any]:
    """MBAR profile of windows with samples, its barriers with uncertainties, the first / second half check
    and the decorrelation per window (summary fields; ``profile_error`` when MBAR has no solution)."""
    from qmlmm.analysis.md_analysis import barrier, barrier_uncertainty, forward_barrier, free_energy_profile

    try:
        prof = free_energy_profile(wins, n_bins=bins)
    except AnalysisError as e:  # recorded; the other model's profile and the summary still come
        return {"profile_error": str(e)}
    fwd, x_top = forward_barrier(prof)
    weakest = int(np.argmin(prof["cut_overlap"]))
    # convergence check: the same analysis on the first and on the second half of every window's samples
    halves, halves_err = [], []
    for part in (0, 1):
        sub = []
        for wd in wins:
            h = len(wd["x"]) // 2
            sl = slice(0, h) if part == 0 else slice(h, None)
            if len(wd["x"][sl]):
                sub.append({**wd, "x": wd["x"][sl], **({"u_common": wd["u_common"][sl]} if "u_common" in wd else {})})
        try:  # half the samples may not overlap enough for MBAR: the check is lost, not the profile
            hp = free_energy_profile(sub, n_bins=bins)
            halves.append(forward_barrier(hp)[0])
            halves_err.append(barrier_uncertainty(hp))
        except (AnalysisError, InputError) as e:
            log.warning("umbrella: no profile from half %d of the samples (%s)", part + 1, e)
            halves.append(float("nan"))
            halves_err.append(float("nan"))
    res: dict[str, Any] = {
        "profile_ensemble": (
            "the windows' common restraints kept (the keep-together restraint, if any: the reactive pair held "
            "at its distance), the umbrella biases removed by MBAR"
        ),
        "x_nm": prof["x"].tolist(),
        "f_kjmol": prof["f"].tolist(),
        "df_kjmol": np.nan_to_num(prof["df"], nan=0.0).tolist(),  # MBAR, uncorrelated samples
        "counts": prof["counts"].tolist(),
        "barrier_kjmol": barrier(prof),  # above the higher of the two end minima (the smaller barrier)
        # from the minimum on the low-xi (reactant) side up to the highest interior point
        "barrier_forward_kjmol": fwd,
        "barrier_forward_err_kjmol": barrier_uncertainty(prof),
        "x_top_nm": x_top,
        "barrier_forward_halves_kjmol": halves,
        "barrier_forward_halves_err_kjmol": halves_err,
        # the halves agree when their difference is within the sum of their error bars
        "halves_agree": bool(abs(halves[0] - halves[1]) <= halves_err[0] + halves_err[1])
        if np.all(np.isfinite(halves + halves_err))
        else False,
        "window_statistical_inefficiency": prof["g"].tolist(),
        "window_correlation_time_ps": np.nan_to_num(prof["tau_ps"], nan=-1.0).tolist(),
        "window_uncorrelated_samples": prof["n_used"].tolist(),
        # MBAR's overlap: 0 means windows in disconnected groups; the weakest place along the coordinate
        "overlap_scalar": float(prof["overlap_scalar"]),
        "weakest_cut_overlap": float(prof["cut_overlap"][weakest]),
        "weakest_cut_nm": float(prof["cut_nm"][weakest]),
    }
    if "f_unbiased" in prof:  # the keep-together restraint removed by reweighting (a known bias)
        fu, xu = forward_barrier(prof, "f_unbiased")
        res.update(
            f_unbiased_kjmol=np.nan_to_num(prof["f_unbiased"], nan=0.0).tolist(),
            df_unbiased_kjmol=np.nan_to_num(prof["df_unbiased"], nan=0.0).tolist(),
            barrier_forward_unbiased_kjmol=fu,
            barrier_forward_unbiased_err_kjmol=barrier_uncertainty(prof, "f_unbiased"),
            x_top_unbiased_nm=xu,
            ess_unbiased=float(prof["ess_unbiased"]),
        )
    return res


def umbrella_profile(
    cfg: PipelineConfig,
    out: Path,
    system: Path,
    name: str,
    make: Any,
    embedding: Any,
    progress: bool = True,
    analyze_only: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) the umbrella windows of the reaction for one engine (``make()`` builds it) into
    ``out/umbrella/<name>`` and return its summary entry: windows, samples, the MBAR profile and its checks
    (:func:`_profile_result`). ``analyze_only`` reads what the folder holds."""
    from qmlmm.md.runner import MDSettings, engine_of_runs
    from qmlmm.md.umbrella import run_windows, window_folder
    from qmlmm.workflows.pipeline.steps import guard_settings

    r = cfg.reaction or {}
    wins = _umbrella_windows(cfg, system)
    steps = int(cfg.reaction_steps or r.get("steps", cfg.md_steps))
    every = int(r.get("every", 5))
    folder = out / "umbrella" / name
    if not analyze_only:
        s = MDSettings(
            steps=steps,
            dt_fs=cfg.md_dt_fs,
            report_every=every,
            dcd_every=steps,
            seed=cfg.seed,
            threads=cfg.total_threads,
            **(guard_settings(cfg) if name == "delta_ml" else {}),  # as in the free MD
        )
        run_windows(system, make(), folder, wins, s, embedding, progress=progress)
    else:  # the windows analysed are those of this engine (a model retrained since is another)
        engine_of_runs([window_folder(folder, w.index) for w in wins], make, redo=folder, analyze_only=True)
    stopped: dict[int, str] = {}
    fallback_calls: list[int] = []  # force calls each window took from the guard's fallback (all invocations)
    samples = []
    for w in wins:
        d = window_folder(folder, w.index)
        info = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
        fallback_calls.append(int(info.get("fallback_steps_total", info.get("fallback_steps", 0)) or 0))
        if info:
            if info.get("stopped") or info.get("steps_done", 0) < steps:
                stopped[w.index] = info.get("stopped") or f"{info.get('steps_done', 0)} of {steps} steps"
        elif not analyze_only:
            stopped[w.index] = "failed to start (see the log)"
        samples.append(_window_samples(d, w, every * cfg.md_dt_fs / 1000.0))
    res: dict[str, Any] = {
        "windows": len(wins),
        "steps_per_window": steps,
        "window_centres_nm": [w.r0 for w in wins],
        "window_k": [w.k for w in wins],
        "window_mean_nm": [float(np.mean(sm["x"])) if sm else float("nan") for sm in samples],
        "windows_stopped_early": dict(sorted(stopped.items())),
        "window_fallback_calls": fallback_calls,
        "samples_per_window": [len(sm.get("x", [])) for sm in samples],  # after dropping the first fifth
        "x_nm": [],
        "f_kjmol": [],
        "barrier_kjmol": float("nan"),
    }
    with_samples = [sm for sm in samples if sm]
    if len(with_samples) < 2:
        log.warning("umbrella %s: fewer than two windows with samples; no profile", name)
        return res
    res.update(_profile_result(with_samples, int(r.get("bins", 25))))
    if "profile_error" in res:
        log.error("umbrella %s: no profile: %s", name, res["profile_error"])
    return res


def reaction_step(
    cfg: PipelineConfig, out: Path, system: Path, model: Any, progress: bool = True, analyze_only: bool = False
) -> dict[str, Any]:
    """Umbrella sampling along the reaction coordinate (:mod:`qmlmm.md.umbrella`: windows chained from
    their neighbours' final positions and velocities), an MBAR profile per model, delta-ML/MM vs
    baseline."""
    from qmlmm.analysis.plots import profile_plot
    from qmlmm.engines import make_engine
    from qmlmm.environment import EmbeddingSettings

    r = cfg.reaction or {}
    emb = EmbeddingSettings(cfg.cutoff, cfg.switch_width)
    threads = cfg.total_threads
    makers = {"delta_ml": (lambda: model.engine(threads), model.embedding)}
    if r.get("compare_baseline", True):
        makers["baseline"] = (lambda: make_engine(cfg.baseline, threads=threads), emb)
    result = {
        name: umbrella_profile(cfg, out, system, name, mk, e_set, progress, analyze_only)
        for name, (mk, e_set) in makers.items()
    }
    profile_plot(result, out / "free_energy_profile.png")
    return result

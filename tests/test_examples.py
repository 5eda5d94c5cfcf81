"""The two seed studies, `tiny` size, end to end: build, sample, label, train, evaluate, MD, analysis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qmlmm.cli import app
from qmlmm.data import Dataset
from qmlmm.md.restraints import umbrella_windows
from qmlmm.workflows.pipeline import PipelineConfig, load_pipeline_config, run_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _check_common(summary: dict, out: Path, cfg: PipelineConfig) -> None:
    assert summary["n_frames"] >= 5

    f_qm, f_mm = [], []  # reference forces of every labelled frame: the error of predicting zero
    with Dataset(out / "labels.h5") as ds:
        for i in range(len(ds)):
            fr = ds.frame(i)
            lab = fr.labels.get("ref")
            if lab is not None:
                f_qm.append(np.abs(lab.forces[fr.qm_indices]).ravel())
                f_mm.append(np.abs(lab.forces[fr.mm_indices]).ravel())
    zero_qm, zero_mm = float(np.concatenate(f_qm).mean()), float(np.concatenate(f_mm).mean())
    for mode in ("direct", "delta"):
        m = summary["evaluation"][mode]["model"]
        for key in ("energy", "qm_forces", "mm_forces"):
            assert np.isfinite(m[key]["mae"])
        # loose sanity bounds for a tiny smoke run (kJ/mol, kJ/mol/nm). Forces against predicting zero:
        # a model trained on 4 frames is about that good (SAM tiny, direct: QM force MAE 1735, 1847 and
        # 2018 in three runs; mean |F| of the reference 1650-2040 per frame); a sign error gives ~2x
        assert m["energy"]["mae"] < 200, mode
        assert m["qm_forces"]["mae"] < 1.5 * zero_qm and m["mm_forces"]["mae"] < 1.5 * zero_mm, (mode, zero_qm, zero_mm)
    runs = {"delta_ml", "baseline"} | ({"reference"} if cfg.md_reference_steps else set())
    assert set(summary["md"]) == runs
    for run, info in summary["md"].items():
        md_steps = cfg.md_reference_steps if run == "reference" else cfg.md_steps
        assert info["steps_done"] == md_steps, run
        assert info["stopped"] is None, run
        rows = np.genfromtxt(out / "md" / run / "log.csv", delimiter=",", names=True)
        assert int(np.atleast_1d(rows["step"])[-1]) == md_steps
        assert np.all(np.isfinite(rows["total_kjmol"]))
    assert (out / "summary.md").exists() and (out / "md_observables.png").exists()
    assert (out / "models" / "delta.parity.png").exists()


@pytest.mark.slow
@pytest.mark.examples
def test_tiny_retinoic_acid(tmp_path: Path) -> None:
    cfg = load_pipeline_config(EXAMPLES / "retinoic_acid" / "config.yaml", "tiny")
    out = tmp_path / "ra"
    summary = run_pipeline(cfg, out, progress=False)
    _check_common(summary, out, cfg)
    dih = summary["analysis"]["dihedrals"]
    assert dih and all(v["n_dihedrals"] >= 8 for v in dih.values())  # the polyene chain was found
    assert set(dih) == {"delta_ml", "baseline", "reference"}  # compared with a short DFT/MM stretch
    for run, v in dih.items():  # per-dihedral circular statistics over the run's frames
        assert len(v["per_dihedral"]) == v["n_dihedrals"], run
        assert all(0 <= d["std_deg"] < 90 and -180 <= d["mean_deg"] <= 180 for d in v["per_dihedral"]), run
    assert (out / "dihedrals.png").exists()
    # carboxyl O - water O: the solute has no N, so the default N-OW pair is left out
    peaks = summary["analysis"]["rdf_peak"]
    assert all(set(v) == {"O-OW"} for v in peaks.values())
    for run in ("delta_ml", "baseline"):  # the maximum lies outside the excluded core
        assert 0.22 < peaks[run]["O-OW"]["r_nm"] < 0.8 and np.isfinite(peaks[run]["O-OW"]["g"]), run
        # nearest water O to a carboxyl O, mean over frames: an H-bonded contact is ~0.27 nm
        assert 0.22 < summary["analysis"]["nearest_nm"][run]["O-OW"] < 0.32, run
    # hydrogen bonds to the solute from the first frame: the MM-only stages see its fixed charges, so the
    # water is oriented before the QM/MM MD starts. Nearest water H to a solute O, mean over the frames:
    # measured 0.17-0.19 nm; 0.26-0.28 nm in the first frames of runs started before the charges. (The
    # RDF's argmax over 4 frames is too noisy for this: one run put it at 0.63 nm.)
    from qmlmm.analysis.md_analysis import load_run
    from qmlmm.analysis.report import nearest_distances
    from qmlmm.md.system import MDSystem

    msys = MDSystem.load(out / "system")
    o_qm = np.flatnonzero(msys.is_qm & (msys.numbers == 8))
    hw = np.flatnonzero(~msys.is_qm & (msys.numbers == 1))
    for run in ("delta_ml", "baseline"):
        pos, boxes = load_run(out / "md" / run)
        assert boxes is not None and len(pos) >= 4, run
        nearest = nearest_distances(pos, boxes, o_qm, hw)
        assert float(np.mean(nearest)) < 0.22, (run, nearest)
    # the runs start thermalised (water relaxed at 300 K around the frozen solute, not only minimised) and
    # stay there. The tiny delta model (6 frames, 2 members) leaves its domain within 40 steps (2026-12-07:
    # ensemble spread 0.2 -> 6000 kJ/mol, 560-1580 K at the last report); the config's uncertainty guard takes
    # those steps from DFTB3 (md_fallback: baseline), and run.json counts them
    for run in ("delta_ml", "baseline"):
        t = np.atleast_1d(np.genfromtxt(out / "md" / run / "log.csv", delimiter=",", names=True)["temperature_K"])
        assert 250.0 < float(t[0]) < 350.0 and 250.0 < float(np.mean(t)) < 350.0, (run, t)
    guarded = summary["md"]["delta_ml"]
    assert guarded["fallback"] == "baseline" and 0 <= guarded["fallback_steps"] <= cfg.md_steps * 2 + 10
    # the learning-curve step: one direct and one delta model per size, finite test errors, a plot
    lc = summary["learning_curve"]
    for mode in ("direct", "delta"):
        pts = lc["curves"][mode]
        assert [p["n_train"] for p in pts] == sorted(cfg.learning_curve or [])
        assert all(np.isfinite(p[k]) for p in pts for k in ("energy_mae", "qm_forces_mae", "mm_forces_mae"))
    assert (out / "learning_curve" / "learning_curve.png").exists()
    # a second call reuses every step and changes nothing
    again = run_pipeline(cfg, out, progress=False)
    assert again["n_frames"] == summary["n_frames"]
    assert again["timings_s"]["label"] < 30
    # `qmlmm analyze RUN/` recomputes the analysis only, and keeps the run's timings
    res = CliRunner().invoke(app, ["analyze", str(out)])
    assert res.exit_code == 0, res.output
    after = json.loads((out / "summary.json").read_text())
    assert after["timings_s"] == again["timings_s"] and set(after["md"]) == set(again["md"])
    assert after["analysis"]["dihedrals"].keys() == dih.keys()
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "nothing")])
    assert res.exit_code != 0


@pytest.mark.slow
@pytest.mark.examples
def test_tiny_sam_cytosine(tmp_path: Path) -> None:
    cfg = load_pipeline_config(EXAMPLES / "sam_cytosine" / "config.yaml", "tiny")
    out = tmp_path / "sam"
    summary = run_pipeline(cfg, out, progress=False)
    _check_common(summary, out, cfg)
    meta = json.loads((out / "system" / "meta.json").read_text())
    assert meta["qm_charge"] == 1
    prof = summary["reaction"]
    # DFTB3/MM: a profile along the whole window range with a barrier between the two ends
    f = np.asarray(prof["baseline"]["f_kjmol"])
    assert len(f) >= 5 and np.all(np.isfinite(f))
    x = np.asarray(prof["baseline"]["x_nm"])
    assert np.ptp(x) > 0.15  # the windows spread along the coordinate (k = 1500 let them slide back)
    # methyl transfer costs free energy: from the reactant-side minimum up to the TS region (xi ~ 0)
    # the profile rises by tens of kJ/mol (the too-weak restraint gave < 16 kJ/mol over the range)
    k0 = int(np.argmin(np.abs(x)))
    assert x[int(np.argmin(f))] < -0.05 and f[k0] - f.min() > 30
    assert prof["baseline"]["barrier_forward_kjmol"] > 30
    # delta-ML/MM with a model trained on four frames may fail at TS geometries (SCC of the baseline
    # under its forces): a window without samples must be recorded with the reason it stopped
    d = prof["delta_ml"]
    assert len(d["samples_per_window"]) == d["windows"] == len(umbrella_windows(str(cfg.reaction_windows)))
    for w, n in enumerate(d["samples_per_window"]):
        assert n > 0 or str(w) in map(str, d["windows_stopped_early"]), w
    if d.get("profile_error"):  # windows cut short may not overlap: the reason is recorded, the run goes on
        assert "overlap" in d["profile_error"] and d["windows_stopped_early"]
    else:
        assert all(np.isfinite(d["f_kjmol"])) and d["weakest_cut_overlap"] >= 0.0
    assert prof["baseline"]["weakest_cut_overlap"] >= 0.0  # (NaN fails too)
    assert (out / "free_energy_profile.png").exists()


@pytest.mark.slow
@pytest.mark.examples
def test_tiny_alanine_dipeptide_validation(tmp_path: Path) -> None:
    """The validation step: the QM/MM drivers' runs ran to their end, the models' (guarded or not) ran
    to their end or are listed as stopped, the guarded ones with their threshold and fallback counts, the
    observables are computed from the finished runs, and a second call reuses the runs."""
    from qmlmm.analysis.validation import REGIONS
    from qmlmm.workflows.pipeline.validation import ValidationSettings

    cfg = load_pipeline_config(EXAMPLES / "alanine_dipeptide" / "config.yaml", "tiny")
    out = tmp_path / "ad"
    summary = run_pipeline(cfg, out, progress=False)
    _check_common(summary, out, cfg)
    vs = ValidationSettings.from_dict(cfg.validation or {})
    v = summary["validation"]
    assert len(vs.drivers) == 6 and {"reference", "baseline"} <= set(v["drivers"])
    refit = {f"{m}_refit" for m, r in v["refit"].items() if r["model"]}  # the refit round's drivers (below)
    assert set(v["drivers"]) | set(v["runs_stopped"]) == set(vs.drivers) | refit  # analysed, or every run stopped
    assert set(v["against_reference"]) <= set(v["drivers"]) - {"reference"}
    kept = vs.steps // vs.every - vs.skip_frames
    for d, st in v["drivers"].items():
        run = json.loads((out / "validation" / d / "run0" / "run.json").read_text())
        assert run["settings"]["hmr_amu"] == vs.hmr_amu and run["settings"]["dt_fs"] == vs.dt_fs, d
        assert sum(st["populations"][k]["mean"] for k in REGIONS) == pytest.approx(1.0)
        if d in ("reference", "baseline"):  # QM/MM MD runs to the end
            assert st["n_runs"] == vs.runs and st["frames_per_run"] == [kept] * vs.runs, d
            assert run["steps_done"] == vs.steps and d not in v["runs_stopped"], d
            assert np.asarray(st["histogram"]).sum() == pytest.approx(kept * vs.runs)
        else:  # a model trained on 12 frames may leave its domain (measured: the direct model stretched the
            # solute past the box's unique-image size at step 30): a stopped run is recorded with its reason
            for k in range(vs.runs):
                rec = json.loads((out / "validation" / d / f"run{k}" / "run.json").read_text())
                assert rec["steps_done"] == vs.steps or f"run{k}" in v["runs_stopped"].get(d, {}), (d, k)
        # an amide H's nearest-water peak: an H-bond at ~0.2 nm (or, in a tiny run, anywhere inside 0.8)
        assert 0.1 < st["rdf_peak"]["HN-OW"]["r_nm"]["mean"] < 0.8
    for d in ("delta_guarded", "direct_guarded"):  # the guard's settings and counts are recorded
        rec = json.loads((out / "validation" / d / "run0" / "run.json").read_text())
        assert rec["settings"]["max_uncertainty"] == vs.max_uncertainty and rec["settings"]["fallback"] == "reference"
        assert rec["fallback_steps_total"] >= 0
    for d, c in v["against_reference"].items():  # 2 + 2 runs: no relabelling can give p < 0.05
        assert c["smallest_p"] >= 0.05 and all(x is None for x in c["agree"].values()), d
    # every run starts from the built backbone (starts: null): the first saved frame (10 fs in) is still there
    from qmlmm.analysis.md_analysis import dihedrals, load_run
    from qmlmm.analysis.validation import peptide_sites
    from qmlmm.md.system import MDSystem

    assert vs.starts is None
    sites = peptide_sites(cfg.solutes[0])
    built = dihedrals(MDSystem.load(out / "system").positions[None], [sites.phi, sites.psi])[0]
    for k in range(vs.runs):
        pos, boxes = load_run(out / "validation" / "reference" / f"run{k}")
        ang = dihedrals(pos[:1], [sites.phi, sites.psi], boxes[:1] if boxes is not None else None)[0]
        diff = (ang - built + 180.0) % 360.0 - 180.0
        assert np.all(np.abs(diff) < 25.0), (k, ang, built)
    assert (out / "validation" / "validation.md").exists() and (out / "validation" / "validation.png").exists()
    # the refit round: each guarded mode's queued frames labelled and, if any, a retrained model whose
    # unguarded runs are analysed (or listed as stopped) as <mode>_refit
    assert vs.refit and set(v["refit"]) == {"delta", "direct"}
    assert any(r["model"] for r in v["refit"].values())  # the tiny threshold queues frames: the round's MD ran
    for mode, r in v["refit"].items():
        runs = [json.loads((out / "validation" / f"{mode}_guarded" / f"run{k}" / "run.json").read_text())
                for k in range(vs.runs)]  # fmt: skip
        assert r["n_queued"] == sum(x["uncertain_frames_queued"] for x in runs) >= r["n_labelled"], mode
        if r["model"] is None:
            assert f"{mode}_refit" not in v["drivers"] and r["why"], mode
            continue
        assert r["n_train"]["after"] == r["n_train"]["before"] + r["n_labelled"], mode
        assert f"{mode}_refit" in set(v["drivers"]) | set(v["runs_stopped"]), mode
        rec = json.loads((out / "validation" / f"{mode}_refit" / "run0" / "run.json").read_text())
        assert rec["settings"]["max_uncertainty"] is None, mode
    again = run_pipeline(cfg, out, progress=False)
    assert again["timings_s"]["validation"] < 60  # the runs are reused, only the analysis is redone
    assert again["validation"]["drivers"]["reference"]["histogram"] == v["drivers"]["reference"]["histogram"]


def test_pipeline_config_errors(tmp_path: Path) -> None:
    from qmlmm.errors import InputError

    with pytest.raises(InputError, match="no size"):
        load_pipeline_config(EXAMPLES / "retinoic_acid" / "config.yaml", "huge")
    (tmp_path / "bad.yaml").write_text("name: x\nsolutes: [CO]\nsizes: {tiny: {no_such: 1}}\n")
    with pytest.raises(InputError, match="no_such"):
        load_pipeline_config(tmp_path / "bad.yaml", "tiny")
    # analysis settings are checked at load time, not after the labelling
    (tmp_path / "rdf.yaml").write_text("name: x\nsolutes: [CO]\nrdf_pairs: [[Xx, OW]]\nsizes: {tiny: {}}\n")
    with pytest.raises(InputError, match="unknown element 'Xx'"):
        load_pipeline_config(tmp_path / "rdf.yaml", "tiny")
    (tmp_path / "rdf.yaml").write_text("name: x\nsolutes: [CO]\nrdf_pairs: [[O, MW]]\nsizes: {tiny: {}}\n")
    with pytest.raises(InputError, match="'OW' or 'HW'"):
        load_pipeline_config(tmp_path / "rdf.yaml", "tiny")

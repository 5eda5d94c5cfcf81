"""`qmlmm active`: the selection rule, the settings' checks, and a tiny study end to end (methanol in
water, GFN2-xTB as the reference stand-in, DFTB3 baseline): the flags as the issue writes them, the
record, labels counted once, resume without recomputing, and the picks equal to the rule applied to the
saved model's spreads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from qmlmm.errors import InputError
from qmlmm.workflows.active import ActiveSettings, select_uncertain


def test_select_uncertain_ranks_all_spreads_and_keeps_picks_apart() -> None:
    """The score is the mean rank over energy, QM-force and MM-force spreads (so no unit dominates); picks
    from one run keep ``min_gap`` frames apart while the candidates allow it, then the next most
    uncertain fill up."""
    # candidate 2 is the most uncertain in every quantity; 3 is next; 1 and 0 least
    spread = np.array([[0.1, 1.0, 0.01], [0.2, 2.0, 0.02], [9.0, 900.0, 9.0], [5.0, 500.0, 5.0]])
    run, step = np.array([0, 0, 0, 1]), np.array([10, 20, 30, 10])
    assert list(select_uncertain(spread, run, step, 2, min_gap=0, every=10)) == [2, 3]
    # 3 is in another run, so the gap rule does not touch it; within run 0, 1 (step 20) is too close to 2
    assert list(select_uncertain(spread, run, step, 3, min_gap=2, every=10)) == [2, 3, 0]
    # a unit change of one quantity (MM forces x 1000) changes nothing: ranks, not values
    scaled = spread * np.array([1.0, 1.0, 1000.0])
    assert list(select_uncertain(scaled, run, step, 3, 2, 10)) == [2, 3, 0]
    # too few candidates apart: filled with the next most uncertain; k beyond C gives all
    same = np.zeros(4, dtype=int)
    assert list(select_uncertain(spread, same, step, 3, min_gap=5, every=10)) == [2, 3, 1]
    assert sorted(select_uncertain(spread, run, step, 10, 0, 10)) == [0, 1, 2, 3]
    assert len(select_uncertain(spread[:0], run[:0], step[:0], 3, 0, 10)) == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"per_round": 2}, "per_round"),
        ({"budget": 5, "per_round": 6}, "budget"),
        ({"train": {"ensemble": 1}}, "ensemble of at least 2"),
        ({"target": "nosuch:x"}, "nosuch"),
        ({"temperatures": []}, "temperatures"),
        ({"steps": 5, "every": 10}, "steps"),
    ],
)
def test_bad_active_settings_are_refused_when_loaded(changes: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        ActiveSettings(**{"target": "xtb:gfn2", **changes})


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A finished study, run through the CLI with the issue's flags (the rest from a YAML config)."""
    from typer.testing import CliRunner

    from qmlmm.cli import app
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system

    tmp = tmp_path_factory.mktemp("active")
    build_system([SoluteSpec(smiles="CO")], tmp / "sys", BuildSettings(cutoff=0.8, equilibrate_ps=1.0, threads=1))
    cfg = tmp / "active.yaml"
    cfg.write_text(
        "replicas: 2\ntemperatures: [300, 350]\nsteps: 40\nevery: 10\nequil_steps: 100\nheldout_runs: 1\n"
        "cutoff: 0.8\nmax_uncertainty: 50\ntrain: {ensemble: 2, epochs: 15, hidden: [8], patience: 10}\n"
        "warm_start: true\n"
    )
    args = ["active", str(tmp / "sys"), "--target", "xtb:gfn2", "--baseline", "dftb3:3ob", "--budget", "6"]
    args += ["--per-round", "3", "--workers", "0", "--config", str(cfg), "-o", str(tmp / "run")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return tmp / "run", tmp / "sys", args


def test_active_study_records_errors_against_labels_for_both_arms(tiny_study: tuple[Path, Path, list[str]]) -> None:
    from qmlmm.data import Dataset

    run, _, _ = tiny_study
    rec = json.loads((run / "active.json").read_text())
    assert set(rec["arms"]) == {"active", "random"} and (run / "active.png").exists()
    for arm, pts in rec["arms"].items():
        n = [p["n_labels"] for p in pts]
        assert n[0] == 3 and n[-1] == 6 and n == sorted(n), (arm, n)  # the budget, reached in rounds
        assert all(np.isfinite([p["energy_mae"], p["qm_forces_mae"], p["mm_forces_mae"]]).all() for p in pts)
        # every label counted once: the labels in the arm's round files add up to what the record says
        done = 0
        for lab in [run / "initial" / "labels.h5", *sorted((run / arm).glob("round_*/labels.h5"))]:
            with Dataset(lab) as ds:
                done += int(((ds.status("xtb") == 1) & (ds.status("dftb3") == 1)).sum())
        assert done == n[-1], (arm, done)
    # warm start: every later round trains from the round before it
    for arm in rec["arms"]:
        rounds = sorted((run / arm).glob("round_*/model.metrics.json"))
        assert len(rounds) >= 2 and json.loads(rounds[0].read_text())["warm_start_from"] is None
        for prev, cur in itertools.pairwise(rounds):
            assert json.loads(cur.read_text())["warm_start_from"] == str(prev.parent / "model.pt")
    # both arms start from the same first labels and model (trained once, copied), so their first points
    # are identical
    assert rec["arms"]["active"][0] == rec["arms"]["random"][0]
    first = [run / arm / "round_00" for arm in ("active", "random")]
    for name in ("model.pt", "model.metrics.json", "train.h5"):
        assert (first[0] / name).read_bytes() == (first[1] / name).read_bytes(), name
    assert set(rec["baseline_alone"]) == {"energy", "qm_forces", "mm_forces"} and rec["heldout_frames"] > 0
    # calibration: spread against true error on every held-out frame, per round, and its plot
    assert set(rec["arms"]["active"][-1]["spread_error_spearman"]) == {"energy", "qm_forces"}
    cal = json.loads((run / "active" / "round_00" / "calibration.json").read_text())
    assert len(cal["energy"]["spread"]) == len(cal["energy"]["error"]) == rec["heldout_frames"]
    assert min(cal["qm_forces"]["spread"]) > 0.0 and (run / "active_calibration.png").exists()


def test_active_picks_are_the_most_uncertain_candidates_of_the_saved_model(
    tiny_study: tuple[Path, Path, list[str]],
) -> None:
    """Round 0's picks (the labels added after the first model) equal the selection rule applied to the
    round-0 ensemble's spreads on its candidates, which come from ML/MM MD with that ensemble."""
    from qmlmm.workflows.active import _uncertain_picks

    run, _, _ = tiny_study
    s = ActiveSettings(**json.loads((run / "settings.json").read_text()))
    rd = run / "active" / "round_00"
    picks = json.loads((rd / "picks.json").read_text())
    assert picks == _uncertain_picks(rd / "candidates.h5", rd / "model.pt", s, s.per_round)
    from qmlmm.data import Dataset

    with Dataset(rd / "candidates.h5") as ds:
        frames = ds.frames()
    assert all(str(fr.info["sampled_with"]).startswith("model:") for fr in frames)
    # the barely trained ensemble passes max_uncertainty (50 kJ/mol) early: the runs stopped there and kept
    # the geometry of the stop as a candidate
    assert any(int(fr.info["stopped"]) == 1 for fr in frames)


def test_active_rerun_resumes_without_recomputing_and_refuses_other_settings(
    tiny_study: tuple[Path, Path, list[str]],
) -> None:
    from typer.testing import CliRunner

    from qmlmm.cli import app

    run, _, args = tiny_study
    files = sorted(run.rglob("*.h5")) + sorted(run.rglob("*.pt"))
    before = {p: p.stat().st_mtime_ns for p in files}
    rec = (run / "active.json").read_text()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing sampled, labelled or trained again
    assert json.loads((run / "active.json").read_text())["arms"] == json.loads(rec)["arms"]
    other = [a if a != "6" else "9" for a in args]  # another budget: another study
    res = CliRunner().invoke(app, other)
    assert res.exit_code != 0 and "other settings" in res.output and "budget" in res.output


@pytest.mark.slow
def test_active_study_killed_hard_resumes_with_nothing_labelled_twice(tmp_path: Path) -> None:
    """kill -9 while the first model trains (sampling and the first labels done), then the same command:
    the study finishes, the labels made before the kill are kept as they were, and the labels add up to
    the budget (none made twice)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from qmlmm.data import Dataset
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system

    build_system([SoluteSpec(smiles="CO")], tmp_path / "sys", BuildSettings(cutoff=0.8, equilibrate_ps=1.0, threads=1))
    cfg = tmp_path / "active.yaml"
    cfg.write_text(
        "replicas: 2\nsteps: 40\nevery: 10\nequil_steps: 100\nheldout_runs: 1\ncutoff: 0.8\nrandom_control: false\n"
        "train: {ensemble: 2, epochs: 200, hidden: [8], patience: 200}\n"
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from qmlmm.cli import app; app()", "active", str(tmp_path / "sys"), "--target"]
    cmd += ["xtb:gfn2", "--budget", "6", "--per-round", "3", "--workers", "0", "--config", str(cfg), "-o", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list((run / "active" / "round_00").glob("model*ckpt*")) and time.time() - t0 < 600:
        assert proc.poll() is None, "the study ended before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "active" / "round_00" / "model.pt").exists()  # killed inside the first training
    with Dataset(run / "initial" / "labels.h5") as ds:
        before = ds.energies("xtb")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    with Dataset(run / "initial" / "labels.h5") as ds:
        assert np.array_equal(ds.energies("xtb"), before, equal_nan=True)  # kept, not labelled again
    rec = json.loads((run / "active.json").read_text())
    done = 0
    for lab in [run / "initial" / "labels.h5", *sorted((run / "active").glob("round_*/labels.h5"))]:
        with Dataset(lab) as ds:
            done += int((ds.status("xtb") == 1).sum())
    assert done == rec["arms"]["active"][-1]["n_labels"] == 6

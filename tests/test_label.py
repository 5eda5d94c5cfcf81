"""Parallel, resumable labelling: serial vs Dask, kill and resume, failures, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import cluster_frame
from qmlmm.cli import app
from qmlmm.data import Dataset, read_extxyz, write_extxyz
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import LevelConflictError, SchemaError
from qmlmm.workflows.label import LevelRequest, label_dataset

CUT = EmbeddingSettings(cutoff=0.9)


def _write_frames(path: Path, n: int, bad: tuple[int, ...] = ()) -> None:
    frames = []
    for k in range(n):
        fr = cluster_frame("water", n_waters=5, radius=0.35, seed=k)
        if k in bad:
            fr.qm_mult = 2  # impossible for water: this frame must fail, the others not
        frames.append(fr)
    write_extxyz(path, frames)


def test_serial_and_dask_agree_and_rerun_computes_nothing(tmp_path: Path) -> None:
    _write_frames(tmp_path / "f.extxyz", 4)
    req = [LevelRequest.from_spec("xtb:gfn2")]
    rep = label_dataset(tmp_path / "f.extxyz", tmp_path / "serial.h5", req, CUT, workers=0, progress=False)
    assert rep.ok and rep.computed == {"xtb": 4}
    rep2 = label_dataset(tmp_path / "f.extxyz", tmp_path / "dask.h5", req, CUT, workers=2, progress=False)
    assert rep2.ok and rep2.computed == {"xtb": 4}
    with Dataset(tmp_path / "serial.h5") as a, Dataset(tmp_path / "dask.h5") as b:
        assert np.allclose(a.energies("xtb"), b.energies("xtb"), atol=1e-6)
        for i in range(4):
            fa = a.label("xtb", i)
            fb = b.label("xtb", i)
            assert fa is not None and fb is not None
            assert np.allclose(fa.forces, fb.forces, atol=1e-5)
            # zero force exactly on MM atoms outside the embedding, nonzero inside
            fr = a.frame(i)
            assert np.any(fa.forces[~fr.is_qm] != 0)
    again = label_dataset(tmp_path / "f.extxyz", tmp_path / "serial.h5", req, CUT, workers=0, progress=False)
    assert again.computed == {"xtb": 0} and again.skipped_done == {"xtb": 4}


def test_other_settings_on_existing_level_is_an_error(tmp_path: Path) -> None:
    _write_frames(tmp_path / "f.extxyz", 2)
    req = [LevelRequest.from_spec("xtb:gfn2")]
    label_dataset(tmp_path / "f.extxyz", tmp_path / "o.h5", req, CUT, workers=0, progress=False)
    with pytest.raises(LevelConflictError):
        label_dataset(
            tmp_path / "f.extxyz", tmp_path / "o.h5", req, EmbeddingSettings(cutoff=0.8), workers=0, progress=False
        )
    # a different level name is fine
    rep = label_dataset(
        tmp_path / "f.extxyz",
        tmp_path / "o.h5",
        [LevelRequest.from_spec("xtb:gfn2", "xtb08")],
        EmbeddingSettings(cutoff=0.8),
        workers=0,
        progress=False,
    )
    assert rep.computed == {"xtb08": 2}


def test_output_with_other_frames_is_refused(tmp_path: Path) -> None:
    _write_frames(tmp_path / "a.extxyz", 2)
    write_extxyz(tmp_path / "b.extxyz", [cluster_frame("water", 5, 0.35, seed=99)])
    req = [LevelRequest.from_spec("xtb:gfn2")]
    label_dataset(tmp_path / "a.extxyz", tmp_path / "o.h5", req, CUT, workers=0, progress=False)
    with pytest.raises(SchemaError, match="other frames"):
        label_dataset(tmp_path / "b.extxyz", tmp_path / "o.h5", req, CUT, workers=0, progress=False)


def test_failures_recorded_and_exit_code(tmp_path: Path) -> None:
    _write_frames(tmp_path / "f.extxyz", 3, bad=(1,))
    runner = CliRunner()
    args = [
        "label",
        str(tmp_path / "f.extxyz"),
        "-o",
        str(tmp_path / "f.h5"),
        "-m",
        "xtb:gfn2",
        "--cutoff",
        "0.9",
        "--workers",
        "0",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "1 frame(s) failed" in res.output and "frame 1" in res.output and "impossible" in res.output
    with Dataset(tmp_path / "f.h5") as ds:
        assert list(ds.status("xtb")) == [1, 2, 1]
        assert "multiplicity" in ds.errors("xtb")[1]
    # a rerun skips the failed frame and reports it again; --retry-failed tries it again
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    res = runner.invoke(app, [*args, "--retry-failed"])
    assert res.exit_code == 1 and "computed now" in res.output
    # export: failed frame has no label, others do
    res = runner.invoke(app, ["export", str(tmp_path / "f.h5"), "-o", str(tmp_path / "out.extxyz")])
    assert res.exit_code == 0
    back = read_extxyz(tmp_path / "out.extxyz")
    assert [("xtb" in f.labels) for f in back] == [True, False, True]


def test_cli_bad_spec_is_a_clear_error(tmp_path: Path) -> None:
    _write_frames(tmp_path / "f.extxyz", 1)
    res = CliRunner().invoke(
        app, ["label", str(tmp_path / "f.extxyz"), "-o", str(tmp_path / "x.h5"), "-m", "hf:sto-3g"]
    )
    assert res.exit_code == 2 and "unknown engine family" in res.output


def _n_done(path: Path) -> int:
    """Frames labelled so far, read while the labelling process writes (without locks: a read can meet
    half-written metadata, which h5py reports as OSError, KeyError or RuntimeError; then try again)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int((f["levels/dft/status"][()] == 1).sum()) if "levels/dft/status" in f else 0
    except (OSError, KeyError, RuntimeError):
        return 0


def test_resume_after_kill_labels_every_frame_once(tmp_path: Path) -> None:
    n = 14
    _write_frames(tmp_path / "f.extxyz", n)
    out = tmp_path / "k.h5"
    cmd = [
        sys.executable,
        "-m",
        "qmlmm.cli",
        "label",
        str(tmp_path / "f.extxyz"),
        "-o",
        str(out),
        "-m",
        "dft:pbe/sto-3g",
        "--cutoff",
        "0.9",
        "--workers",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while _n_done(out) < 3 and time.time() - t0 < 120:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Dataset(out) as ds:  # the file survived the kill
        st = ds.status("dft")
        done_before = np.flatnonzero(st == 1)
        assert 3 <= len(done_before) < n
        kept = {int(i): (ds.energies("dft")[i], ds.label("dft", int(i)).forces.copy()) for i in done_before}  # type: ignore[union-attr]
    rep = label_dataset(
        tmp_path / "f.extxyz", out, [LevelRequest.from_spec("dft:pbe/sto-3g")], CUT, workers=0, progress=False
    )
    assert rep.computed == {"dft": n - len(done_before)}  # each missing frame once, nothing twice
    with Dataset(out) as ds:
        assert (ds.status("dft") == 1).all()
        for i, (e, f) in kept.items():
            lab = ds.label("dft", i)
            assert lab is not None and lab.energy == e and np.array_equal(lab.forces, f)


def test_labels_keep_the_engines_qm_charges_and_delta_targets_their_difference(tmp_path: Path) -> None:
    """The dataset stores each level's QM charges (NaN on MM atoms); a level written before charges were
    recorded reads as None and gets the array on its next write; the delta training target's charges
    are the target's minus the baseline's, frame by frame."""
    from qmlmm.data.training_set import SplitSettings, load_training_data

    _write_frames(tmp_path / "f.extxyz", 3)
    req = [LevelRequest.from_spec("xtb:gfn2"), LevelRequest.from_spec("dftb3:3ob")]
    assert label_dataset(tmp_path / "f.extxyz", tmp_path / "l.h5", req, CUT, workers=0, progress=False).ok
    with Dataset(tmp_path / "l.h5") as ds:
        fr = ds.frame(0)
        qx, qd = fr.labels["xtb"].charges, fr.labels["dftb3"].charges
        assert qx is not None and qd is not None
        assert np.all(np.isfinite(qx[fr.is_qm])) and np.all(np.isnan(qx[~fr.is_qm]))
        assert abs(np.nansum(qx)) < 1e-6 and not np.allclose(qx[fr.is_qm], qd[fr.is_qm], atol=1e-3)
        copy = fr.copy()
        qc = copy.labels["xtb"].charges
        assert qc is not None and qc is not qx and np.array_equal(qc, qx, equal_nan=True)
    data = load_training_data(tmp_path / "l.h5", "xtb", "dftb3", split=SplitSettings(kind="blocks", block_size=1))
    it = next(x for x in data.items if x.index == 0)
    assert it.qm_q_ref is not None and np.allclose(it.qm_q_ref, qx[fr.is_qm] - qd[fr.is_qm])
    with h5py.File(tmp_path / "l.h5", "a") as f:  # as written by qmlmm before charges were recorded
        del f["levels/xtb/qm_charges"]
    with Dataset(tmp_path / "l.h5", "a") as ds:
        lab = ds.label("xtb", 1)
        assert lab is not None and lab.charges is None
        ds.write_label("xtb", 1, type(lab)(lab.energy, lab.forces, qx))
        again = ds.label("xtb", 1)
        assert again is not None and again.charges is not None
        assert np.array_equal(again.charges, qx, equal_nan=True)
        assert ds.label("xtb", 0).charges is None  # type: ignore[union-attr]
    data = load_training_data(tmp_path / "l.h5", "xtb", split=SplitSettings(kind="blocks", block_size=1))
    assert [it.qm_q_ref is not None for it in sorted(data.items, key=lambda x: x.index)] == [False, True, False]

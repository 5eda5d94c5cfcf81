"""Bad input as a hostile user gives it: every case gets a named error (exit code 2 from the CLI, never a
traceback, hang, silent wrong result or lost file). The cases are the table of docs/errors.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import cluster_frame
from qmlmm.cli import app
from qmlmm.data import Dataset, write_dataset, write_extxyz
from qmlmm.errors import InputError, SchemaError
from synthetic import make_dataset


def _run(args: list[object]) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small labelled dataset, its extxyz, an (untrained) model file and a built methanol system."""
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
    from qmlmm.models import ModelMeta, QMLMMModel
    from qmlmm.models.ensemble import Ensemble
    from qmlmm.models.hdnnp import ModelConfig

    d = tmp_path_factory.mktemp("rel")
    ds = make_dataset(d / "d.h5", n_frames=6, cutoff=0.8)
    with Dataset(ds) as h:
        write_extxyz(d / "d.extxyz", list(h))
    model = QMLMMModel(Ensemble(ModelConfig(cutoff=0.8, switch_width=0.0), 1), ModelMeta(target="ref"))
    model.save(d / "m.pt")
    build_system([SoluteSpec(smiles="CO")], d / "sys", BuildSettings(cutoff=0.6, margin=0.1, equilibrate_ps=0.0))
    return {"h5": ds, "xyz": d / "d.extxyz", "model": d / "m.pt", "system": d / "sys", "dir": d}


# (case, arguments with {placeholders}, expected text in the error)
CLI_CASES = [
    ("md report-every 0 (looped forever)", ["md", "{system}", "--engine", "dftb3:3ob", "--steps", "5",
                                           "--report-every", "0", "-o", "{tmp}/r0"], "report_every"),
    ("md steps 0", ["md", "{system}", "--engine", "dftb3:3ob", "--steps", "0", "-o", "{tmp}/s0"], "steps"),
    ("md steps -5", ["md", "{system}", "--engine", "dftb3:3ob", "--steps", "-5", "-o", "{tmp}/s1"], "steps"),
    ("md negative dt", ["md", "{system}", "--engine", "dftb3:3ob", "--dt", "-1", "-o", "{tmp}/s2"], "dt_fs"),
    ("md negative temperature", ["md", "{system}", "--engine", "dftb3:3ob", "--temperature", "-3",
                                 "-o", "{tmp}/s3"], "temperature"),
    ("export onto its input", ["export", "{h5}", "-o", "{h5}"], "replace the input"),
    ("export unknown level", ["export", "{h5}", "--level", "nope", "-o", "{tmp}/x.extxyz"], "no level"),
    ("export into a file as if a folder", ["export", "{h5}", "-o", "{xyz}/sub/x.extxyz"], "cannot write"),
    ("predict onto its input", ["predict", "{model}", "{h5}", "-o", "{h5}"], "replace the input"),
    ("build padding 0 (silently 1.2 before)", ["build", "--smiles", "CO", "--padding", "0", "-o", "{tmp}/b0"],
     "padding must be positive"),
    ("build padding -1", ["build", "--smiles", "CO", "--padding", "-1", "-o", "{tmp}/b1"], "padding must be positive"),
    ("build padding too small for the cutoff", ["build", "--smiles", "CO", "--padding", "0.8", "-o", "{tmp}/b2"],
     "too small for a 1.4 nm embedding"),
    ("build into a built system", ["build", "--smiles", "CO", "-o", "{system}"], "holds a built system"),
    ("label bad option value", ["label", "{xyz}", "-o", "{tmp}/l0.h5", "-m", "xtb:gfn2,acc=abc"], "must be a number"),
    ("label negative maxcycle", ["label", "{xyz}", "-o", "{tmp}/l1.h5", "-m", "dft:pbe/sto-3g,maxcycle=-5"],
     "maxcycle"),
    ("label dftb tol -1", ["label", "{xyz}", "-o", "{tmp}/l2.h5", "-m", "dftb3:3ob,tol=-1"], "tol"),
    ("label dftb maxiter 0", ["label", "{xyz}", "-o", "{tmp}/l3.h5", "-m", "dftb3:3ob,maxiter=0"], "maxiter"),
    ("label unknown basis", ["label", "{xyz}", "-o", "{tmp}/l4.h5", "-m", "dft:b3lyp/def2-svpx"], "unknown basis"),
    ("label unknown functional", ["label", "{xyz}", "-o", "{tmp}/l5.h5", "-m", "dft:b3lipp/6-31g"],
     "unknown DFT functional"),
    ("label level a/b", ["label", "{xyz}", "-o", "{tmp}/l6.h5", "-m", "xtb:gfn2", "--level", "a/b"], "level name"),
    ("train onto an existing model", ["train", "{h5}", "--target", "ref", "-o", "{model}"], "exists"),
    ("learning-curve sizes 0", ["learning-curve", "{h5}", "--target", "ref", "--sizes", "0", "-o", "{tmp}/lc"],
     "positive"),
    ("learning-curve sizes -2", ["learning-curve", "{h5}", "--target", "ref", "--sizes", "4,-2", "-o", "{tmp}/lc"],
     "positive"),
    ("learning-curve sizes not numbers", ["learning-curve", "{h5}", "--target", "ref", "--sizes", "a", "-o",
                                          "{tmp}/lc"], "whole numbers"),
    ("learning-curve more than the frames", ["learning-curve", "{h5}", "--target", "ref", "--sizes", "500",
                                             "--epochs", "1", "-o", "{tmp}/lc"], "must lie in 1.."),
]  # fmt: skip


@pytest.mark.parametrize("case,args,expect", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input_with_a_named_error(
    files: dict[str, Path], tmp_path: Path, case: str, args: list[str], expect: str
) -> None:
    before = {k: (p.stat().st_mtime_ns, p.stat().st_size) for k, p in files.items() if p.is_file()}
    fmt = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    code, out = _run([a.format(**fmt) for a in args])
    assert code == 2, (case, code, out)
    assert expect in out, (case, out)
    assert "Traceback" not in out
    after = {k: (p.stat().st_mtime_ns, p.stat().st_size) for k, p in files.items() if p.is_file()}
    assert after == before, case  # no input was touched


def test_xtb_beyond_its_elements_is_a_recorded_failure_not_a_crash(tmp_path: Path) -> None:
    """A uranium atom in the QM region under xtb (libxtb segfaulted, exit 139): the frame fails with the
    reason, the other frame is labelled, exit code 1."""
    frames = [cluster_frame("water", n_waters=3, radius=0.35, seed=k) for k in range(2)]
    frames[1].numbers[0] = 92  # U in place of O
    frames[1].qm_mult = 1
    write_extxyz(tmp_path / "u.extxyz", frames)
    code, out = _run(["label", tmp_path / "u.extxyz", "-o", tmp_path / "u.h5", "-m", "xtb:gfn2", "--workers", "0"])
    assert code == 1, out
    with Dataset(tmp_path / "u.h5") as ds:
        assert ds.status("xtb").tolist() == [1, 2]
        assert "elements 1-86" in ds.errors("xtb")[1]


def test_md_restart_refuses_other_settings_and_md_keeps_its_results(files: dict[str, Path], tmp_path: Path) -> None:
    """`md --restart` with another engine, cutoff or temperature than the run it continues is refused (the
    log would mix two Hamiltonians); a second `md` into a run folder without --restart or --overwrite is
    refused; the same command with --restart continues."""
    base = ["md", files["system"], "--engine", "dftb3:3ob", "--cutoff", "0.6", "--steps", "4", "--report-every",
            "2", "--threads", "1", "-o", tmp_path / "run"]  # fmt: skip
    code, out = _run(base)
    assert code == 0, out
    code, out = _run(base)
    assert code == 2 and "holds an MD run" in out
    for change in (["--engine", "dftb2:mio"], ["--cutoff", "0.55"], ["--temperature", "310"]):
        args = [*base[:-2], *change, "--steps", "6", "--restart", "-o", tmp_path / "run"]
        code, out = _run(args)
        assert code == 2 and "--restart of" in out, (change, out)
    code, out = _run([*base[:-2], "--steps", "6", "--restart", "-o", tmp_path / "run"])
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps_done"] == 6


def test_analyze_with_another_system_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system

    code, out = _run(["md", files["system"], "--engine", "dftb3:3ob", "--cutoff", "0.6", "--steps", "2",
                      "--report-every", "1", "--threads", "1", "-o", tmp_path / "run"])  # fmt: skip
    assert code == 0, out
    other = tmp_path / "other"
    build_system([SoluteSpec(smiles="CCO")], other, BuildSettings(cutoff=0.6, margin=0.1, equilibrate_ps=0.0))
    code, out = _run(["analyze", tmp_path / "run", "--system", other])
    assert code == 2 and "atoms" in out and "Traceback" not in out


def test_training_and_pipeline_configs_are_checked_when_read(tmp_path: Path) -> None:
    from qmlmm.training import load_config
    from qmlmm.workflows.pipeline import load_pipeline_config

    bad_train = {
        "lr: fast": "lr must be float",
        "hidden: 16": "hidden must be list[int]",
        "epochs: 3.7": "epochs must be int",
        "activation: relux": "activation must be one of",
        "descriptor: {qm_radial_cutof: 0.6}": "unknown descriptor setting",
        "descriptor: {qm_radial_cutoff: -0.6}": "must be a positive number",
        "lr: [0.1": "not valid YAML",
    }
    for text, msg in bad_train.items():
        p = tmp_path / "t.yaml"
        p.write_text(text + "\n")
        with pytest.raises(InputError, match=re.escape(msg)):
            load_config(p)
    good = "name: x\nsolutes: [CO]\nsizes:\n  tiny: {}\n"
    bad_pipe = {
        "sample_steps: many": "sample_steps must be int",
        "train: {lr: fast}": "lr must be float",
        "reference: dft:b3lyp/nobasis": "unknown basis",
        "baseline: dftb3:3ob,tol=-1": "tol",
        "reaction_windows: '1:2'": "start:stop:n",
        "reaction_windows: 1:2": "must be str",  # YAML reads 1:2 as the base-60 number 62
        "cutoff: -1": "cutoff must be positive",
        "workers: 0": "workers must be at least 1",
        "unknown_key: 3": "unknown pipeline setting",
        "reaction: {atoms: [1, 2, 3], windows: '0:1:2'}": "4 atoms",
    }
    for text, msg in bad_pipe.items():
        p = tmp_path / "p.yaml"
        p.write_text(good + text + "\n")
        with pytest.raises(InputError, match=re.escape(msg)):
            load_pipeline_config(p, "tiny")
    (tmp_path / "s.yaml").write_text("name: x\nsizes: {tiny: {}\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_pipeline_config(tmp_path / "s.yaml", "tiny")


def test_pipeline_refuses_a_changed_setting_where_results_exist(tmp_path: Path) -> None:
    """After the build and sampling ran with one padding and sample_steps, a config with others is refused
    (before, the old build and frames were reused while the summary recorded the new values)."""
    from qmlmm.workflows.pipeline import PipelineConfig, check_fingerprints, record_fingerprint

    cfg = PipelineConfig(name="x", solutes=["CO"], padding=1.8, sample_steps=200)
    (tmp_path / "system").mkdir()
    (tmp_path / "frames.h5").write_text("")
    record_fingerprint(cfg, tmp_path, "build")
    record_fingerprint(cfg, tmp_path, "sample")
    check_fingerprints(cfg, tmp_path)  # same settings: fine
    with pytest.raises(InputError, match=r"'padding' changed \(1.8 -> 2.0\).*delete .*system.*frames.h5"):
        check_fingerprints(PipelineConfig(name="x", solutes=["CO"], padding=2.0, sample_steps=200), tmp_path)
    with pytest.raises(InputError, match=r"'sample_steps' changed \(200 -> 400\)"):
        check_fingerprints(PipelineConfig(name="x", solutes=["CO"], padding=1.8, sample_steps=400), tmp_path)
    # a setting of a step without results is free to change (md_dt_fs: no md folder yet)
    check_fingerprints(PipelineConfig(name="x", solutes=["CO"], padding=1.8, sample_steps=200, md_dt_fs=1.0), tmp_path)
    # a folder from before fingerprints.json adopts the current values
    old = tmp_path / "old"
    (old / "system").mkdir(parents=True)
    check_fingerprints(cfg, old)
    assert json.loads((old / "fingerprints.json").read_text())["build"]["padding"] == 1.8
    # a record from before a setting existed ran with what qmlmm did then: the md step stopped at the guard
    (tmp_path / "md").mkdir()
    record_fingerprint(cfg, tmp_path, "md")
    rec = json.loads((tmp_path / "fingerprints.json").read_text())
    for key in ("md_fallback", "md_fallback_hold"):
        del rec["md"][key]
    (tmp_path / "fingerprints.json").write_text(json.dumps(rec))
    check_fingerprints(cfg, tmp_path)  # stop, hold 0: as it ran
    guarded = PipelineConfig(name="x", solutes=["CO"], padding=1.8, sample_steps=200, max_uncertainty=5.0,
                             md_fallback="baseline")  # fmt: skip
    with pytest.raises(InputError, match=r"'max_uncertainty' changed|'md_fallback' changed \('stop' -> 'baseline'\)"):
        check_fingerprints(guarded, tmp_path)


def test_bad_data_is_refused_when_read(tmp_path: Path) -> None:
    import h5py

    fr = cluster_frame("water", n_waters=2)
    fr.charges[3] = np.nan
    with pytest.raises(InputError, match="MM charges contain NaN"):
        fr.__post_init__()
    good = cluster_frame("water", n_waters=2)
    write_dataset(tmp_path / "d.h5", [good, good.copy()], overwrite=True).close()
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        off = f["frames/atom_offset"]
        off[-1] = off[-1] - 1  # one atom fewer than the arrays hold
    with pytest.raises(SchemaError, match="atom_offset"):
        Dataset(tmp_path / "d.h5")


def test_a_dataset_being_written_can_be_read(tmp_path: Path) -> None:
    """`qmlmm info` while `qmlmm label` holds the file open for writing (HDF5's lock refused it before)."""
    write_dataset(tmp_path / "d.h5", [cluster_frame("water", n_waters=2)], overwrite=True).close()
    hold = (
        "import sys, time; from qmlmm.data import Dataset; ds = Dataset(sys.argv[1], mode='a'); "
        "print('open', flush=True); time.sleep(30)"
    )
    writer = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "d.h5")], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        t0 = time.perf_counter()
        code, out = _run(["info", tmp_path / "d.h5"])
        assert code == 0 and "1 frames" in out, out
        assert time.perf_counter() - t0 < 20
    finally:
        writer.kill()
        writer.wait()


def test_written_files_get_the_umask_not_0600(tmp_path: Path) -> None:
    from qmlmm.fileio import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.txt") as p:
            p.write_text("x")
        write_extxyz(tmp_path / "f.extxyz", [cluster_frame("water", n_waters=1)])
    finally:
        os.umask(old)
    for name in ("f.txt", "f.extxyz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_import_labels_computed_elsewhere_with_their_embedding(files: dict[str, Path], tmp_path: Path) -> None:
    """Labelled extxyz from another code: imported with the declared embedding, which the levels record and
    `train` then uses; a wrong declaration (forces on MM atoms outside it) or missing MM forces are refused
    with the frame named."""
    from qmlmm.data import read_extxyz
    from qmlmm.training import load_training_data

    code, out = _run(["import", files["xyz"], "-o", tmp_path / "imp.h5", "--cutoff", "0.8", "--switch-width", "0",
                      "--method-of", "ref=orca:b3lyp/def2-svp"])  # fmt: skip
    assert code == 0, out
    with Dataset(tmp_path / "imp.h5") as ds:
        info = ds.level_info("ref")
        assert info.method == "orca:b3lyp/def2-svp"
        assert info.settings["embedding"] == {"cutoff": 0.8, "switch_width": 0.0}
    data = load_training_data(tmp_path / "imp.h5", "ref")  # `train` refused imported levels before
    assert len(data.items) == 6 and data.embedding.cutoff == 0.8
    # labels made with a larger embedding than declared: a water 1.2 nm away carries forces
    frames = read_extxyz(files["xyz"])
    far = frames[2].mol_ids == frames[2].mol_ids[~frames[2].is_qm][0]
    frames[2].positions[far] += np.array([1.2, 0.0, 0.0])
    write_extxyz(tmp_path / "far.extxyz", frames)
    code, out = _run(["import", tmp_path / "far.extxyz", "-o", tmp_path / "bad.h5", "--cutoff", "0.8",
                      "--switch-width", "0"])  # fmt: skip
    assert code == 2 and "frame 2, level 'ref'" in out and "outside the declared embedding" in out, out
    # MM forces missing in frame 3
    frames = read_extxyz(files["xyz"])
    frames[3].labels["ref"].forces[~frames[3].is_qm] = 0.0
    write_extxyz(tmp_path / "nomm.extxyz", frames)
    code, out = _run(["import", tmp_path / "nomm.extxyz", "-o", tmp_path / "nomm.h5", "--cutoff", "0.8",
                      "--switch-width", "0"])  # fmt: skip
    assert code == 2 and "frame 3" in out and "has no force" in out, out
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "nomm.h5").exists()
    code, out = _run(["import", files["xyz"], "-o", tmp_path / "x.h5", "--method-of", "dft=orca"])
    assert code == 2 and "does not have" in out


def test_unreachable_scheduler_is_named(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qmlmm.workflows.label as label

    monkeypatch.setattr(label, "SCHEDULER_TIMEOUT_S", 2)  # 20 s in use
    code, out = _run(["label", files["xyz"], "-o", tmp_path / "s.h5", "-m", "xtb:gfn2", "--scheduler",
                      "tcp://127.0.0.1:1"])  # fmt: skip
    assert code == 2 and "cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'" in out, out

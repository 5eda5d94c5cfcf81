"""Training: recovering a known target, delta bookkeeping, the model file, resume, CLI commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qmlmm.cli import app
from qmlmm.data import Dataset, read_extxyz, write_extxyz
from qmlmm.data.batch import collate
from qmlmm.errors import InputError, SchemaError
from qmlmm.models import QMLMMModel
from qmlmm.training import TrainConfig, block_split, load_training_data, train
from synthetic import make_dataset

FAST = {
    "hidden": [32, 32],
    "lr": 3e-3,
    "batch_size": 8,
    "lr_patience": 15,
    "patience": 60,
    "descriptor": {"qm_radial_cutoff": 0.5, "mm_radial_cutoff": 0.8, "mm_angular_cutoff": 0.5},
    # the synthetic frames are independent draws, not a trajectory (no runs, no time): blocks of them are
    # as independent as runs would be
    "split": "blocks",
}


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("syn") / "syn.h5", n_frames=80, cutoff=0.8, baseline_fraction=0.8)


@pytest.fixture(scope="module")
def direct_model(syn: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A quickly trained ensemble of two (for the model-file, engine, CLI and ASE tests)."""
    out = tmp_path_factory.mktemp("m") / "direct.pt"
    cfg = TrainConfig(target="ref", ensemble=2, epochs=15, **FAST)  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    res = train(data, cfg, out, progress=False)
    return out, res.metrics


def test_block_split_keeps_blocks_together() -> None:
    tr, va, te = block_split(100, 10, 0.1, 0.2, seed=3)
    assert len(set(tr) | set(va) | set(te)) == 100 and not (set(tr) & set(te)) and not (set(va) & set(te))
    for part in (va, te):
        assert all(len(set(range(b * 10, b * 10 + 10)) & set(part)) in (0, 10) for b in range(10))
    assert np.array_equal(block_split(100, 10, 0.1, 0.2, seed=3)[2], te)  # reproducible


def test_training_recovers_known_target(tmp_path: Path) -> None:
    """240 training frames of the synthetic QM/MM-like target: held-out errors are a small fraction
    of the target's own variation (measured with two seeds: energy 2.6-6 %, QM forces ~10 %, MM
    forces ~4 % RMSE relative to the spread of the target)."""
    path = make_dataset(tmp_path / "big.h5", n_frames=300, cutoff=0.8, seed=7)
    cfg = TrainConfig(target="ref", ensemble=1, epochs=80, **FAST)  # type: ignore[arg-type]
    data = load_training_data(path, "ref", split=cfg.split_settings)
    m = train(data, cfg, tmp_path / "m.pt", progress=False).metrics
    test = data.subset(data.test)
    e = np.array([it.energy for it in test])
    fq = np.concatenate([it.qm_forces for it in test])
    fm = np.concatenate([it.mm_forces for it in test])
    t = m["test"]
    assert t["energy"]["rmse"] < 0.08 * e.std()
    assert t["qm_forces"]["rmse"] < 0.15 * np.sqrt(np.mean(fq**2))
    assert t["mm_forces"]["rmse"] < 0.08 * np.sqrt(np.mean(fm**2))


def test_model_file_is_self_describing_and_round_trips(direct_model: tuple[Path, dict], syn: Path) -> None:
    path, _ = direct_model
    st = torch.load(path, weights_only=True)
    assert st["format"] == "qmlmm-model" and st["meta"]["target"] == "ref" and st["units"]["energy"] == "kJ/mol"
    assert st["config"]["cutoff"] == 0.8 and len(st["members"]) == 2 and "feat_mean" in st["members"][0]
    model = QMLMMModel.load(path)
    with Dataset(syn) as ds:
        frames = [ds.frame(i) for i in range(3)]
    p1 = model.predict_frames(frames)
    p2 = QMLMMModel.load(path, dtype=torch.float64).predict_frames(frames)
    for a, b in zip(p1, p2, strict=True):
        assert a.energy == pytest.approx(b.energy, abs=1e-3)
        assert np.allclose(a.forces, b.forces, atol=1e-2)
        assert a.energy_std >= 0 and a.forces_std is not None
    with pytest.raises(SchemaError):
        (path.parent / "junk.pt").write_bytes(b"not a model")
        QMLMMModel.load(path.parent / "junk.pt")


def test_model_as_engine_equals_batch_prediction(direct_model: tuple[Path, dict], syn: Path) -> None:
    from qmlmm.engines import label_frame

    model = QMLMMModel.load(direct_model[0], dtype=torch.float64)
    with Dataset(syn) as ds:
        fr = ds.frame(5)
    lab, res = label_frame(model.engine(), fr, model.embedding)
    p = model.predict_frames([fr])[0]
    assert lab.energy == pytest.approx(p.energy, abs=1e-8)
    assert np.allclose(lab.forces, p.forces, atol=1e-8)
    assert res.info["energy_std"] == pytest.approx(p.energy_std, abs=1e-8)


def test_delta_bookkeeping_reproduces_reference(syn: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(target="ref", baseline="base", ensemble=1, epochs=40, **FAST)  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", "base", split=cfg.split_settings)
    res = train(data, cfg, tmp_path / "delta.pt", progress=False)
    model = res.model
    assert model.meta.delta and model.meta.baseline == "base"
    with Dataset(syn) as ds:
        frames = [ds.frame(int(data.items[int(i)].index)) for i in data.train[:10]]
    preds = model.predict_frames(frames)  # baseline taken from the frames' 'base' labels
    for fr, p in zip(frames, preds, strict=True):
        ref = fr.labels["ref"]
        assert p.baseline_energy == pytest.approx(fr.labels["base"].energy)
        # total = baseline + network reproduces the reference within the fit error
        assert abs(p.energy - ref.energy) < 4 * res.metrics["train"]["energy"]["rmse"] + 0.05
        assert np.abs(p.forces - ref.forces).mean() < 3 * res.metrics["train"]["qm_forces"]["mae"]
    # and the network really learned the difference: it beats the baseline alone
    data_all = data.subset(data.test)
    base_err = np.mean([abs(it.energy) for it in data_all])  # |ref - base| on the test frames
    assert res.metrics["test"]["energy"]["mae"] < 0.5 * base_err


def test_added_training_frames_leave_the_split_alone(syn: Path, tmp_path: Path) -> None:
    """Frames of ``add_train`` datasets all go to training; the main dataset alone decides validation and
    test (so the two models' test errors compare); datasets labelled otherwise are refused; merged
    datasets keep their labels; ``qmlmm train --add-train`` trains on them and a changed list retrains."""
    from qmlmm.data import merge_datasets
    from qmlmm.training import SplitSettings, TrainJob, train_jobs

    extra = make_dataset(tmp_path / "extra.h5", n_frames=10, cutoff=0.8, seed=5, baseline_fraction=0.8)
    sp = SplitSettings(kind="blocks", valid_fraction=0.2, test_fraction=0.2, block_size=4)
    plain = load_training_data(syn, "ref", "base", sp)
    more = load_training_data(syn, "ref", "base", sp, add_train=[extra])
    assert np.array_equal(plain.valid, more.valid) and np.array_equal(plain.test, more.test)
    assert np.array_equal(more.train, np.concatenate([plain.train, np.arange(80, 90)]))
    assert more.split_info is not None and more.split_info["added_train"] == {str(extra): 10}
    with Dataset(extra) as ds:  # the added items carry the delta targets of their own frames
        e = [ds.frame(i).labels["ref"].energy - ds.frame(i).labels["base"].energy for i in range(10)]
    assert np.allclose([it.energy for it in more.items[80:]], e)

    other = make_dataset(tmp_path / "other.h5", n_frames=6, cutoff=0.7, seed=6, baseline_fraction=0.8)
    with pytest.raises(InputError, match=r"other\.h5.*same methods, settings and embedding"):
        load_training_data(syn, "ref", "base", sp, add_train=[other])

    with pytest.raises(InputError, match=r"other\.h5: level '(ref|base)' is .* an earlier source has"):
        merge_datasets([(syn, [0]), (other, None)], tmp_path / "mixed.h5")  # labels of another embedding
    assert not (tmp_path / "mixed.h5").exists()
    merged = merge_datasets([(syn, [0, 3]), (extra, None)], tmp_path / "merged.h5")
    with Dataset(merged) as ds, Dataset(extra) as ex:
        assert len(ds) == 12 and ds.levels() == ["base", "ref"]
        assert ds.frame(2).labels["ref"].energy == ex.frame(0).labels["ref"].energy
        assert ds.frame(2).info["merged_from"] == str(extra) and float(ds.frame(2).info["run"]) >= 1000

    cfg = TrainConfig(target="ref", baseline="base", ensemble=1, epochs=2, threads=1, **FAST)  # type: ignore[arg-type]
    job = TrainJob(str(syn), cfg, str(tmp_path / "m.pt"), {"require": ("base",), "add_train": [str(extra)]})
    m = train_jobs([job], workers=1, progress=False)[job.out][0]
    n_plain = len(load_training_data(syn, "ref", "base", cfg.split_settings).train)
    assert m["n_train"] == n_plain + 10 and m["split"]["added_train"] == {str(extra): 10}
    mtime = (tmp_path / "m.pt").stat().st_mtime
    train_jobs([job], workers=1, progress=False)
    assert (tmp_path / "m.pt").stat().st_mtime == mtime  # same frames: reused
    train_jobs([replace(job, data={"require": ("base",)})], workers=1, progress=False)
    assert (tmp_path / "m.pt").stat().st_mtime != mtime  # without the added frames: trained again
    # an added file of the same name with other frames since: not reused either
    from qmlmm.training.parallel import finished

    few = merge_datasets([(extra, [0, 1, 2])], tmp_path / "few.h5")
    job_few = replace(job, out=str(tmp_path / "few.pt"), data={"require": ("base",), "add_train": [str(few)]})
    train_jobs([job_few], workers=1, progress=False)
    assert finished(job_few) is not None
    # the folder moved (the files copied elsewhere): the same files by name, so the model is reused
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in [few, *tmp_path.glob("few.*")]:
        shutil.copy2(f, moved / f.name)
    job_moved = replace(
        job_few, out=str(moved / "few.pt"), data={"require": ("base",), "add_train": [str(moved / "few.h5")]}
    )
    assert finished(job_moved) is not None
    from qmlmm.training.parallel import _same_added

    assert not _same_added({"/a/x.h5": 5, "/b/x.h5": 5}, {"/c/x.h5": 5})  # two files recorded, one asked for
    merge_datasets([(extra, None)], tmp_path / "all.h5").replace(few)
    assert finished(job_few) is None

    res = CliRunner().invoke(
        app,
        ["train", str(syn), "-o", str(tmp_path / "cli.pt"), "--target", "ref", "--ensemble", "1", "--epochs", "1",
         "--add-train", str(extra), "--add-train", str(merged)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "cli.metrics.json").read_text())
    assert meta["split"]["added_train"] == {str(extra): 10, str(merged): 12}


def test_split_seed_keeps_the_split_while_seed_changes_the_weights(syn: Path, tmp_path: Path) -> None:
    from qmlmm.training.config import result_settings_of

    a = TrainConfig(target="ref", ensemble=1, epochs=1, **{**FAST, "split": "blocks"})  # type: ignore[arg-type]
    b, c = replace(a, seed=1, split_seed=0), replace(a, seed=1)
    da, db, dc = (load_training_data(syn, "ref", split=x.split_settings) for x in (a, b, c))
    assert np.array_equal(da.test, db.test) and np.array_equal(da.train, db.train)
    assert not np.array_equal(da.test, dc.test)  # the seed alone moves the split, as before
    assert result_settings_of(a.to_dict()) != result_settings_of(b.to_dict())
    # a model file from before the setting (no split_seed key) matches split_seed None: not retrained
    old = {k: v for k, v in a.to_dict().items() if k != "split_seed"}
    assert result_settings_of(old) == result_settings_of(a.to_dict())
    assert result_settings_of(replace(a, split_seed=a.seed).to_dict()) == result_settings_of(old)  # the same split
    ra, rb = (train(d, x, tmp_path / f"{n}.pt", progress=False) for d, x, n in ((da, a, "a"), (db, b, "b")))
    assert ra.metrics["test"]["energy"]["mae"] != rb.metrics["test"]["energy"]["mae"]  # other weights


def test_config_errors(tmp_path: Path) -> None:
    from qmlmm.training import load_config

    (tmp_path / "c.yaml").write_text("ensemble: 2\nnot_a_setting: 3\n")
    with pytest.raises(InputError, match="not_a_setting"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(InputError):
        TrainConfig(dtype="float16")
    with pytest.raises(InputError, match="lr_min"):
        TrainConfig(lr_schedule="cosine", lr=1e-3, lr_min=1e-2)
    with pytest.raises(InputError, match="fit nothing"):
        TrainConfig(w_energy=0, w_qm_forces=0, w_mm_forces=0)


def test_cli_evaluate_predict_and_ase(direct_model: tuple[Path, dict], syn: Path, tmp_path: Path) -> None:
    path, _ = direct_model
    r = CliRunner().invoke(app, ["evaluate", str(path), str(syn), "--split", "test", "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert ev["model"]["n_frames"] > 0 and (tmp_path / "ev" / "evaluation_parity.png").stat().st_size > 1000
    with Dataset(syn) as ds:
        write_extxyz(tmp_path / "in.extxyz", [ds.frame(i) for i in range(4)])
    r = CliRunner().invoke(app, ["predict", str(path), str(tmp_path / "in.extxyz"), "-o", str(tmp_path / "out.extxyz")])
    assert r.exit_code == 0, r.output
    back = read_extxyz(tmp_path / "out.extxyz")
    assert all("model" in f.labels and "model_std" in f.labels and "ref" in f.labels for f in back)
    # ASE calculator gives the same numbers (eV, eV/Angstrom)
    from ase.io import read

    from qmlmm.models.ase_calculator import QMLMMCalculator

    atoms = read(tmp_path / "in.extxyz", index=0)
    assert not isinstance(atoms, list)
    atoms.calc = QMLMMCalculator(QMLMMModel.load(path))
    e = atoms.get_potential_energy()
    assert e == pytest.approx(back[0].labels["model"].energy / 96.48533212331, abs=1e-4)
    assert np.allclose(atoms.get_forces(), back[0].labels["model"].forces / 964.8533212331, atol=1e-4)


def test_train_resumes_after_interruption(syn: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.pt"
    (tmp_path / "cfg.yaml").write_text(json.dumps({**FAST, "ensemble": 1, "epochs": 60, "patience": 100}))
    cmd = [
        sys.executable,
        "-m",
        "qmlmm.cli",
        "train",
        str(syn),
        "--target",
        "ref",
        "-o",
        str(out),
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    ckpt = tmp_path / "r.ckpt"
    t0 = time.time()
    while time.time() - t0 < 120:
        if ckpt.exists():
            st = torch.load(ckpt, weights_only=False)
            if st.get("current") and st["current"]["epoch"] >= 5:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists()
    epoch_at_kill = torch.load(ckpt, weights_only=False)["current"]["epoch"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(member 1, epoch {epoch_at_kill})" in r.stderr  # the epoch it resumes at (it logged 0 before)
    hist = json.loads((tmp_path / "r.history.json").read_text())[0]
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))  # no epoch lost or repeated
    assert len(hist) >= epoch_at_kill and out.exists() and not ckpt.exists()
    # the training, validation and test MAEs are reported side by side, as the metrics file has them
    m = json.loads((tmp_path / "r.metrics.json").read_text())
    assert "MAE on the training, validation and test frames" in r.stdout
    assert f"{m['train']['qm_forces']['mae']:.4g}" in r.stdout and f"{m['valid']['energy']['mae']:.4g}" in r.stdout


def test_learning_curve_cli(syn: Path, tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(json.dumps({**FAST, "epochs": 25}))
    r = CliRunner().invoke(
        app,
        [
            "learning-curve",
            str(syn),
            "-o",
            str(tmp_path / "lc"),
            "--sizes",
            "10,40",
            "--target",
            "ref",
            "--baseline",
            "base",
            "--config",
            str(tmp_path / "cfg.yaml"),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "lc" / "learning_curve.json").read_text())
    assert [p["n_train"] for p in res["curves"]["direct"]] == [10, 40]
    assert [p["n_train"] for p in res["curves"]["delta"]] == [10, 40]
    assert "baseline_alone" in res and (tmp_path / "lc" / "learning_curve.png").exists()


def test_parallel_training_matches_serial_and_is_reused(syn: Path, tmp_path: Path) -> None:
    """Two models trained side by side in single-threaded processes give bit-identical results to the
    same runs done one after the other here; a second call reuses them instead of retraining."""
    from qmlmm.training import TrainJob, train_jobs

    cfgs = [
        TrainConfig(target="ref", ensemble=1, epochs=4, threads=1, **FAST),  # type: ignore[arg-type]
        TrainConfig(target="ref", baseline="base", ensemble=1, epochs=4, threads=1, **FAST),  # type: ignore[arg-type]
    ]
    par = [TrainJob(str(syn), c, str(tmp_path / f"p{k}.pt"), {"require": ("base",)}) for k, c in enumerate(cfgs)]
    ser = [TrainJob(str(syn), c, str(tmp_path / f"s{k}.pt"), {"require": ("base",)}) for k, c in enumerate(cfgs)]
    rp = train_jobs(par, workers=2, progress=False)
    rs = train_jobs(ser, workers=1, progress=False)
    for k in range(2):
        mp_, ms = rp[par[k].out][0], rs[ser[k].out][0]
        assert mp_["mode"] == ("direct", "delta")[k]
        assert mp_["test"]["energy"]["mae"] == ms["test"]["energy"]["mae"]
        assert mp_["test"]["qm_forces"]["mae"] == ms["test"]["qm_forces"]["mae"]
    mtime = Path(par[0].out).stat().st_mtime
    again = train_jobs(par, workers=2, progress=False)
    assert Path(par[0].out).stat().st_mtime == mtime  # not retrained
    assert again[par[1].out][0]["test"]["energy"]["mae"] == rp[par[1].out][0]["test"]["energy"]["mae"]
    # a split parameter its split kind does not use decides nothing: reused (the pipeline retrained
    # every learning-curve point of a runs-split after the config's unused block_size changed)
    assert cfgs[0].split == "blocks"
    unused = [TrainJob(str(syn), replace(cfgs[0], split_gap_frames=7), par[0].out, {"require": ("base",)})]
    train_jobs(unused, workers=1, progress=False)
    assert Path(par[0].out).stat().st_mtime == mtime
    changed = [TrainJob(str(syn), TrainConfig(target="ref", ensemble=1, epochs=5, threads=1, **FAST), par[0].out)]  # type: ignore[arg-type]
    train_jobs(changed, workers=1, progress=False)
    assert Path(par[0].out).stat().st_mtime != mtime  # other settings: trained again


def test_model_is_trained_again_when_its_dataset_changed(syn: Path, tmp_path: Path) -> None:
    """A model is reused only while its dataset holds the labels it was trained on: one relabelled energy
    makes it train again; a change to a level the model does not read does not."""
    from qmlmm.system import Label
    from qmlmm.training import TrainJob, train_jobs
    from qmlmm.training.parallel import finished

    data = tmp_path / "syn.h5"
    shutil.copy2(syn, data)
    cfg = TrainConfig(target="ref", ensemble=1, epochs=1, threads=1, **FAST)  # type: ignore[arg-type]
    job = TrainJob(str(data), cfg, str(tmp_path / "m.pt"))
    train_jobs([job], workers=1, progress=False)
    assert finished(job) is not None
    with Dataset(data, "a") as ds:
        i = int(np.flatnonzero(ds.labelled_at(["ref"]))[0])
        lab = ds.label("ref", i)
        assert lab is not None
        ds.write_label("ref", i, Label(lab.energy + 1.0, lab.forces, lab.charges))
    assert finished(job) is None  # one energy changed by 1 kJ/mol
    mtime = Path(job.out).stat().st_mtime
    train_jobs([job], workers=1, progress=False)
    assert Path(job.out).stat().st_mtime != mtime and finished(job) is not None
    with Dataset(data, "a") as ds:  # the untouched baseline level does not take part in a direct model
        j = int(np.flatnonzero(ds.labelled_at(["base"]))[0])
        lab = ds.label("base", j)
        assert lab is not None
        ds.write_label("base", j, Label(lab.energy + 1.0, lab.forces, lab.charges))
    assert finished(job) is not None
    from qmlmm.training.parallel import labels_changed

    assert not labels_changed(job)
    with Dataset(data, "a") as ds:  # labelled again (e.g. --overwrite to record charges): a new wall time
        lab = ds.label("ref", i)
        assert lab is not None
        ds.write_label("ref", i, Label(lab.energy, lab.forces, lab.charges), time_s=1.5)
    assert labels_changed(job) and finished(job) is None


def test_bootstrap_members_fit_their_own_resamples(syn: Path, tmp_path: Path) -> None:
    """``bootstrap``: each member fits its own resample of the training frames (as many, with replacement,
    the same on a rerun, another for each member); off, every member fits them all, and a model trained
    before the setting existed keeps matching."""
    from qmlmm.training.config import result_settings_of
    from qmlmm.training.trainer import _member_items

    items = list(range(40))
    cfg = TrainConfig(target="ref", bootstrap=True, seed=3)
    a, b = _member_items(items, cfg, 0), _member_items(items, cfg, 1)  # type: ignore[arg-type]
    assert len(a) == len(b) == 40 and a != b and len(set(a)) < 40 and set(a) <= set(items)
    assert _member_items(items, cfg, 0) == a  # type: ignore[arg-type]
    assert _member_items(items, replace(cfg, bootstrap=False), 0) == items  # type: ignore[arg-type]
    old = replace(cfg, bootstrap=False).to_dict()
    del old["bootstrap"]  # a metrics file from before the setting
    assert result_settings_of(old) == replace(cfg, bootstrap=False).result_settings() != cfg.result_settings()
    # a training with it runs, and its metrics record the setting
    data = load_training_data(syn, "ref", split=TrainConfig(target="ref").split_settings)
    fast = {**FAST, "epochs": 2, "ensemble": 2}
    res = train(data, TrainConfig(target="ref", bootstrap=True, **fast), tmp_path / "b.pt", progress=False)  # type: ignore[arg-type]
    assert res.metrics["config"]["bootstrap"] is True and np.isfinite(res.metrics["test"]["energy"]["mae"])


def test_split_by_runs_keeps_runs_whole_and_falls_back_to_time_with_gaps() -> None:
    """Default split: whole sampling runs per part; with fewer than three runs, each run in time order into
    train | gap | valid | gap | test, the gap one statistical inefficiency of the energies."""
    from qmlmm.data.training_set import SplitSettings, choose_split

    rng = np.random.default_rng(0)
    runs = np.repeat(np.arange(6), 10)
    times = np.tile(np.arange(10) * 0.025, 6)
    sp = choose_split(SplitSettings(valid_fraction=0.17, test_fraction=0.17), runs, times, rng.normal(size=60))
    assert sp.info["kind"] == "runs"
    parts = {k: set(runs[getattr(sp, k)].tolist()) for k in ("train", "valid", "test")}
    assert len(parts["test"]) == 1 and len(parts["valid"]) == 1 and len(parts["train"]) == 4
    assert not (parts["train"] & parts["test"]) and not (parts["valid"] & parts["test"])
    assert len(sp.train) + len(sp.valid) + len(sp.test) == 60  # every frame of every run used
    # two runs of an AR(1) energy (phi 0.8, g = 9 frames): time split, gaps of ~g frames
    e = np.zeros(400)
    for t in range(1, 400):
        e[t] = 0.8 * e[t - 1] + rng.normal()
    runs2 = np.repeat([0, 1], 200)
    times2 = np.tile(np.arange(200) * 0.01, 2)
    sp = choose_split(SplitSettings(), runs2, times2, e)
    assert sp.info["kind"] == "time" and "fallback" in sp.info
    gap = int(sp.info["gap_frames"])  # type: ignore[call-overload]
    assert 6 <= gap <= 13, gap
    assert sp.info["gap_ps"] == pytest.approx(gap * 0.01)
    for r in (0, 1):
        tr, va, te = (times2[idx][runs2[idx] == r] for idx in (sp.train, sp.valid, sp.test))
        assert tr.max() < va.min() and va.max() < te.min()
        assert va.min() - tr.max() == pytest.approx((gap + 1) * 0.01) and te.min() - va.max() == pytest.approx(
            (gap + 1) * 0.01
        )
    # no run information at all: one time-ordered series; an explicit gap is used as given
    sp = choose_split(SplitSettings(gap_frames=2), None, None, rng.normal(size=30))
    assert sp.info["gap_frames"] == 2 and sp.valid.min() - sp.train.max() == 3 and sp.test.min() - sp.valid.max() == 3
    with pytest.raises(InputError, match="split must be"):
        SplitSettings(kind="random")
    with pytest.raises(InputError, match="split must be"):
        TrainConfig(split="random")


def test_old_model_files_keep_their_block_split() -> None:
    from qmlmm.data.training_set import SplitSettings

    s = SplitSettings.of_training({"block_size": 4, "valid_fraction": 0.2, "seed": 3})
    assert s.kind == "blocks" and s.block_size == 4 and s.valid_fraction == 0.2 and s.seed == 3
    assert SplitSettings.of_training(TrainConfig().to_dict()).kind == "runs"


def test_training_without_reference_charges_warns(syn: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Labels without QM charges (the synthetic set, imported or older levels) train the electrostatic term's
    charges from energies and forces alone; the user is told, with the remedy. With charges off, no warning."""
    from qmlmm.data.training_set import SplitSettings

    data = load_training_data(syn, "ref", split=SplitSettings(kind="blocks", block_size=4))
    assert not any(it.qm_q_ref is not None for it in data.items)
    with caplog.at_level("WARNING", logger="qmlmm.training.trainer"):
        train(data, TrainConfig(target="ref", ensemble=1, epochs=1, **FAST), tmp_path / "a.pt", progress=False)  # type: ignore[arg-type]
    assert "carry no QM charges" in caplog.text and "--overwrite" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qmlmm.training.trainer"):
        cfg = TrainConfig(target="ref", ensemble=1, epochs=1, electrostatics="none", **FAST)  # type: ignore[arg-type]
        train(data, cfg, tmp_path / "b.pt", progress=False)
    assert "carry no QM charges" not in caplog.text


def test_validation_loss_is_the_training_loss_of_the_whole_validation_set(syn: Path) -> None:
    """The validation loss that picks the best epoch is the training loss function evaluated on all
    validation frames at once: summed batch by batch it equals one batch of them all, and its MAEs equal
    the evaluation module's."""
    from qmlmm.data.batch import collate
    from qmlmm.models.evaluation import collect_predictions, compute_metrics
    from qmlmm.models.hdnnp import HDNNP
    from qmlmm.training.trainer import _error_sums, _loss, _model_config, _statistics, _validation

    cfg = TrainConfig(target="ref", batch_size=3, **{k: v for k, v in FAST.items() if k != "batch_size"})  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    items = data.items[:11]  # batches of 3, 3, 3, 2
    torch.manual_seed(0)
    mcfg = _model_config(cfg, data)
    st = _statistics(mcfg, items, torch.float64)
    model = HDNNP(mcfg).double().train()
    with torch.no_grad():
        model.feat_mean.copy_(st.feat_mean)
        model.feat_std.copy_(st.feat_std)
        model.e_shift.copy_(st.e_shift)
    vloss, mae = _validation(model, items, st, cfg, torch.float64, "cpu")
    whole, _ = _loss(_error_sums(model, collate(items, dtype=torch.float64), cfg, create_graph=False), st, cfg)
    assert vloss == pytest.approx(float(whole), rel=1e-10) and vloss > 0
    m = compute_metrics(collect_predictions(model, items, torch.float64))
    for k in ("energy", "qm_forces", "mm_forces"):
        assert mae[k] == pytest.approx(m[k]["mae"], rel=1e-9), k  # type: ignore[index]


def test_weight_decay_shrinks_the_weights_and_zero_is_plain_adam(syn: Path, tmp_path: Path) -> None:
    """Decoupled weight decay (AdamW) gives smaller network weights than none on the same data and seed;
    ``weight_decay: 0`` is the plain Adam of before (same numbers); a negative value is refused."""
    from qmlmm.training.trainer import _optimizer

    with pytest.raises(InputError, match="weight_decay"):
        TrainConfig(weight_decay=-1e-3)
    base = TrainConfig(target="ref", ensemble=1, epochs=6, **{**FAST, "patience": 100})  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", split=base.split_settings)

    def weight_norm(cfg: TrainConfig, name: str) -> float:
        model = train(data, cfg, tmp_path / name, progress=False).model
        sd = model.ensemble.members[0].state_dict()
        return float(sum((v.double() ** 2).sum() for k, v in sd.items() if k.endswith("weight")) ** 0.5)

    assert type(_optimizer(torch.nn.Linear(2, 2), base)) is torch.optim.Adam
    plain = weight_norm(base, "plain.pt")
    decayed = weight_norm(replace(base, weight_decay=0.5), "decayed.pt")
    assert decayed < 0.97 * plain


def test_cosine_schedule_follows_half_a_cosine_and_resumes_on_it(
    syn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lr_schedule: cosine`` lowers the rate from lr to lr_min along half a cosine over the epochs, whatever
    the validation loss does; a run interrupted part-way resumes on the same curve (the schedule is in the
    checkpoint). An unknown schedule is refused when the config is made."""
    import math

    import qmlmm.training.trainer as trainer

    with pytest.raises(InputError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    cfg = TrainConfig(target="ref", ensemble=1, epochs=8, lr_schedule="cosine", lr_min=1e-4,
                      **{**FAST, "patience": 100})  # type: ignore[arg-type]  # fmt: skip
    want = [cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * e / cfg.epochs)) for e in range(1, 9)]
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    assert [h["lr"] for h in train(data, cfg, tmp_path / "whole.pt", progress=False).history[0]] == pytest.approx(
        want, rel=1e-9
    )
    real_epoch, calls = trainer._train_epoch, []

    def interrupted(*args: object, **kw: object) -> tuple[float, int]:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_epoch(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(data, cfg, tmp_path / "cut.pt", progress=False)
    monkeypatch.setattr(trainer, "_train_epoch", real_epoch)
    resumed = train(data, cfg, tmp_path / "cut.pt", progress=False)
    assert [h["epoch"] for h in resumed.history[0]] == list(range(1, 9))
    assert [h["lr"] for h in resumed.history[0]] == pytest.approx(want, rel=1e-9)


def test_electrostatic_term_lowers_the_error_on_a_charged_solute(tmp_path: Path) -> None:
    """End to end on a small charged case: acetate (-1) whose target couples fixed atomic charges to the water
    charges by 1/r. With the electrostatic term (charges anchored to the label's) the held-out energy and
    MM-force errors are far below those of the same network without it, which has to learn the 1/r coupling
    from its potential and field features; the learnt charges add up to -1 e."""
    from synthetic import make_charged_dataset

    data_path = make_charged_dataset(tmp_path / "acetate.h5", n_frames=48)
    maes = {}
    for elec in ("charges", "none"):
        cfg = TrainConfig(target="ref", ensemble=1, epochs=60, electrostatics=elec, lr_schedule="cosine",
                          **{**FAST, "patience": 100, "block_size": 4})  # type: ignore[arg-type]  # fmt: skip
        data = load_training_data(data_path, "ref", split=cfg.split_settings)
        res = train(data, cfg, tmp_path / f"{elec}.pt", progress=False)
        maes[elec] = {q: res.metrics["test"][q]["mae"] for q in ("energy", "qm_forces", "mm_forces")}
        if elec == "charges":
            b = collate(data.subset(data.test), dtype=torch.float64)
            from qmlmm.models.hdnnp import HDNNP

            member = res.model.ensemble.members[0]
            assert isinstance(member, HDNNP)
            q = member.double().charges(b)
            per_frame = torch.zeros(b.n_frames, dtype=q.dtype).index_add(0, b.qm_frame, q)
            torch.testing.assert_close(per_frame, torch.full_like(per_frame, -1.0), rtol=0, atol=1e-9)
    assert maes["charges"]["mm_forces"] < 0.3 * maes["none"]["mm_forces"], maes
    assert maes["charges"]["energy"] < 0.5 * maes["none"]["energy"], maes


def test_polarisable_model_trains_saves_and_loads(syn: Path, tmp_path: Path) -> None:
    """A model with induced dipoles (``electrostatics: charges+polarisability``) trains (its polarisabilities
    move from 0), and its file loads to the same predictions as the trained ensemble."""
    cfg = TrainConfig(target="ref", ensemble=2, epochs=4, electrostatics="charges+polarisability",
                      **{**FAST, "patience": 100})  # type: ignore[arg-type]  # fmt: skip
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    res = train(data, cfg, tmp_path / "pol.pt", progress=False)
    b = collate(data.subset(data.test[:3]), dtype=torch.float32)
    alpha = res.model.ensemble.members[0].polarisabilities(b)  # type: ignore[operator]
    assert float(alpha.abs().max()) > 0
    loaded = QMLMMModel.load(tmp_path / "pol.pt")
    assert loaded.ensemble.cfg.electrostatics == "charges+polarisability"
    e1 = res.model.ensemble.eval()(b)
    e2 = loaded.ensemble.eval()(b)
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-6)


def test_term_feature_scaling_uses_one_scale_per_descriptor_term(syn: Path) -> None:
    """``feature_scaling: term`` divides every column of a descriptor term by the RMS of that term's standard
    deviations (per element), so a rare feature keeps its small size; ``feature`` (default) by its own."""
    from qmlmm.training.trainer import _model_config, _statistics

    with pytest.raises(InputError, match="feature_scaling"):
        TrainConfig(feature_scaling="minmax")
    cfg = TrainConfig(target="ref", **FAST)  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    items = data.subset(data.train)
    mcfg = _model_config(cfg, data)
    own = _statistics(mcfg, items, torch.float64, "feature")
    term = _statistics(mcfg, items, torch.float64, "term")
    torch.testing.assert_close(own.feat_mean, term.feat_mean)
    from qmlmm.descriptors.acsf import ACSF

    start, checked = 0, 0
    for name, width in ACSF(mcfg.descriptor).sizes.items():
        if not width:
            continue
        block = term.feat_std[:, start : start + width]
        assert torch.all(block == block[:, :1]), name  # one scale per element and term
        # the RMS of the term's own standard deviations (where the element has atoms and the term varies)
        sd = own.feat_std[:, start : start + width]
        varying = sd != 1.0
        for e in range(len(block)):
            if varying[e].all():
                assert float(block[e, 0]) == pytest.approx(float(torch.sqrt((sd[e] ** 2).mean())), rel=1e-12)
                checked += 1
        start += width
    assert checked >= 3
    # a term that does not vary beyond rounding (a rigid QM region) is left unscaled, not blown up by its noise
    from qmlmm.training.trainer import _term_scales

    sizes = {"a": 2, "b": 2}
    std = torch.tensor([[1e-9, 2e-9, 0.3, 0.4]], dtype=torch.float64)
    mean = torch.tensor([[1.0, 2.0, 0.1, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(_term_scales(std, mean, sizes), torch.tensor([[1.0, 1.0, 0.125**0.5, 0.125**0.5]],
                                                                             dtype=torch.float64))  # fmt: skip


def _run_metrics(f_train: float, f_valid: float) -> dict:
    return {"train": {"qm_forces": {"mae": f_train}}, "valid": {"qm_forces": {"mae": f_valid}}, "n_train": 100,
            "n_parameters_per_network": 50_000}  # fmt: skip


def _history(best: int, run: int) -> list[dict[str, float]]:
    return [{"epoch": e, "valid_loss": abs(e - best) + 1.0} for e in range(1, run + 1)]


def test_fit_diagnosis_names_what_limits_the_model() -> None:
    from qmlmm.training.diagnosis import fit_diagnosis

    mem = fit_diagnosis(_run_metrics(20.0, 60.0), [_history(40, 100)])
    assert mem.verdict == "memorising" and mem.valid_over_train == pytest.approx(3.0) and "more frames" in mem.message
    # not memorising, and every member's best epoch is in its last tenth: it was still learning
    late = fit_diagnosis(_run_metrics(40.0, 50.0), [_history(100, 100), _history(95, 100)])
    assert late.verdict == "still learning" and late.best_epochs == (100, 95) and "more epochs" in late.message
    # one member converged early: the run as a whole is limited by its data
    conv = fit_diagnosis(_run_metrics(40.0, 50.0), [_history(100, 100), _history(50, 100)])
    assert conv.verdict == "data-limited" and conv.parameters_per_frame == pytest.approx(500.0)
    with pytest.raises(ValueError, match="valid"):
        fit_diagnosis({"train": {"qm_forces": {"mae": 1.0}}, "n_train": 1, "n_parameters_per_network": 1}, [])


def test_trained_model_reports_its_diagnosis(direct_model: tuple[Path, dict]) -> None:
    from qmlmm.training.diagnosis import fit_diagnosis

    path, metrics = direct_model
    history = json.loads(path.with_suffix(".history.json").read_text())
    assert metrics["diagnosis"]["message"] == fit_diagnosis(metrics, history).message
    assert json.loads(path.with_suffix(".metrics.json").read_text())["diagnosis"] == metrics["diagnosis"]


def test_warm_start_begins_at_the_trained_model(direct_model: tuple[Path, dict], syn: Path, tmp_path: Path) -> None:
    """A run warm-started from a model, at a learning rate too small to move it, reproduces that model's
    errors (its start is the model, restandardised on the run's statistics); fresh weights do not; a model
    of another architecture is refused."""
    path, metrics = direct_model
    tiny = {**FAST, "lr": 1e-12, "lr_min": 1e-14}
    cfg = TrainConfig(target="ref", ensemble=2, epochs=1, **tiny)  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    warm = train(data, cfg, tmp_path / "warm.pt", progress=False, init=path).metrics
    cold = train(data, cfg, tmp_path / "cold.pt", progress=False).metrics
    for q in ("energy", "qm_forces", "mm_forces"):
        assert warm["test"][q]["mae"] == pytest.approx(metrics["test"][q]["mae"], rel=1e-4)
        assert cold["test"][q]["mae"] > 1.5 * metrics["test"][q]["mae"]
    other = TrainConfig(target="ref", ensemble=1, epochs=1, **{**tiny, "hidden": [8]})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="hidden"):
        train(data, other, tmp_path / "other.pt", progress=False, init=path)
    # a model of another quantity (here: direct, for a delta run) is refused: its energy offsets would stay
    delta = TrainConfig(target="ref", baseline="base", ensemble=1, epochs=1, **tiny)  # type: ignore[arg-type]
    delta_data = load_training_data(syn, "ref", "base", split=delta.split_settings)
    with pytest.raises(InputError, match="baseline"):
        train(delta_data, delta, tmp_path / "delta.pt", progress=False, init=path)


def test_warm_start_members_beyond_the_start_model_start_fresh(
    direct_model: tuple[Path, dict], syn: Path, tmp_path: Path
) -> None:
    """An ensemble of three warm-started from a model of two: at a learning rate too small to move them,
    members 1 and 2 are the start model's members; member 3 starts from random weights, not as a copy of
    one (which would begin the ensemble with no spread)."""
    import torch

    from qmlmm.models import QMLMMModel

    path, _ = direct_model
    cfg = TrainConfig(target="ref", ensemble=3, epochs=1, **{**FAST, "lr": 1e-12, "lr_min": 1e-14})  # type: ignore[arg-type]
    data = load_training_data(syn, "ref", split=cfg.split_settings)
    out = tmp_path / "warm.pt"
    train(data, cfg, out, progress=False, init=path)
    start = QMLMMModel.load(path, dtype=torch.float64).ensemble.members
    warm = QMLMMModel.load(out, dtype=torch.float64).ensemble.members
    last = [[p for n, p in m.named_parameters() if n.startswith("nets.")][-1] for m in (*start, *warm)]
    s0, s1, w0, w1, w2 = last
    assert torch.allclose(w0, s0, atol=1e-9) and torch.allclose(w1, s1, atol=1e-9)
    assert not torch.allclose(w2, s0, atol=1e-3) and not torch.allclose(w2, s1, atol=1e-3)


def test_learning_curve_points_train_the_configured_epochs_unless_scaled() -> None:
    """By default every point trains ``epochs`` (scaled points were under-trained at 400 frames); with
    ``scale_epochs`` the steps stay those of 100 frames above it, at least 50 epochs."""
    import inspect

    from qmlmm.workflows.learning_curve import learning_curve, point_epochs

    assert inspect.signature(learning_curve).parameters["scale_epochs"].default is False
    assert [point_epochs(200, n, False) for n in (25, 100, 400)] == [200, 200, 200]
    assert [point_epochs(200, n, True) for n in (25, 100, 200, 400, 1000)] == [200, 200, 100, 50, 50]
    assert point_epochs(30, 400, True) == 30

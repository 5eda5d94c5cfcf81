"""The validation's refit round: queued frames labelled by the real engines, models retrained with them
on an unchanged split, reuse, refusal of a queue that changed, and the refit drivers' settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import cluster_frame
from qmlmm.data import Dataset, write_dataset
from qmlmm.errors import InputError
from qmlmm.workflows.pipeline import load_pipeline_config
from qmlmm.workflows.pipeline.validation import ValidationSettings

ALA2 = "CC(=O)N[C@@H](C)C(=O)NC"  # the config's solute (validation needs a peptide); the frames are water's
CUTOFF, SWITCH = 0.8, 0.1
TRAIN = {
    "ensemble": 1,
    "epochs": 3,
    "hidden": [8, 8],
    "batch_size": 4,
    "split": "blocks",
    "block_size": 2,
    "valid_fraction": 0.25,
    "test_fraction": 0.25,
    "descriptor": {"qm_radial_cutoff": 0.5, "mm_radial_cutoff": 0.6, "mm_angular_cutoff": 0.5},
}


def _frames(n: int, seed: int) -> list:
    """Water with 4 TIP3P waters, its atoms jiggled (0.005 nm): ``n`` frames."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        fr = cluster_frame("water", n_waters=4, seed=1 + k % 3)
        fr.positions = fr.positions + rng.normal(scale=0.005, size=fr.positions.shape)
        fr.info = {"run": k // 4, "time_ps": 0.01 * k}
        out.append(fr)
    return out


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A pipeline folder with real labels (GFN2-xTB/MM and DFTB3/MM) and both models trained on them."""
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.label import LevelRequest, label_dataset
    from qmlmm.workflows.pipeline.steps import train_step

    out = tmp_path_factory.mktemp("refit")
    val = {"runs": 2, "steps": 40, "every": 10, "skip_ps": 0.0, "starts": None, "refit": True,
           "drivers": ["reference", "delta", "direct", "delta_guarded", "direct_guarded"]}  # fmt: skip
    d = {"name": "w", "solutes": [ALA2], "reference": "xtb:gfn2", "baseline": "dftb3:3ob", "seed": 0,
         "sizes": {"t": {"cutoff": CUTOFF, "switch_width": SWITCH, "workers": 2, "threads": 1, "train": TRAIN,
                         "validation": val}}}  # fmt: skip
    (out / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = load_pipeline_config(out / "c.yaml", "t")
    write_dataset(out / "frames.h5", _frames(16, seed=0)).close()
    reqs = [LevelRequest.from_spec("xtb:gfn2", "ref"), LevelRequest.from_spec("dftb3:3ob", "base")]
    label_dataset(out / "frames.h5", out / "labels.h5", reqs, EmbeddingSettings(CUTOFF, SWITCH), workers=0,
                  progress=False)  # fmt: skip
    train_step(cfg, out / "labels.h5", out / "models", progress=False)
    return out, cfg


def _queue(path: Path, frames: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(path, frames, overwrite=True).close()


def _label_files(out: Path) -> dict[str, list[float]]:
    """Each refit label file of the delta mode with the wall seconds its reference labels took (a frame
    labelled again would have new ones)."""
    from qmlmm.workflows.pipeline.refit import refit_folder

    files = {}
    for p in (refit_folder(out) / "delta").glob("*.labels.h5"):
        with Dataset(p) as ds:
            files[p.name] = ds._level("ref")["time_s"][()].tolist()
    return files


def test_refit_labels_the_queued_frames_and_retrains_on_an_unchanged_split(pipeline_folder: tuple) -> None:
    from qmlmm.engines import label_frame, make_engine
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.pipeline.refit import queued_sources, refit_models

    out, cfg = pipeline_folder
    queued = _frames(8, seed=7)
    runs = out / "validation" / "delta_guarded"
    _queue(runs / "run0" / "uncertain.h5", queued[:3])
    _queue(runs / "run1" / "uncertain.h5", queued[3:5])
    _queue(runs / "run2" / "uncertain.h5", queued[:1])  # not a run of this validation (runs: 2)
    assert [p.parent.name for p in queued_sources(out, "delta", 2)] == ["run0", "run1"]

    rec = refit_models(cfg, out, ["delta", "direct"], runs=2)
    assert rec["direct"]["model"] is None and "queued no frame" in rec["direct"]["why"]
    r = rec["delta"]
    assert (r["n_queued"], r["n_labelled"]) == (5, 5)
    assert r["sources"] == {"delta_guarded/run0/uncertain.h5": 3, "delta_guarded/run1/uncertain.h5": 2}
    assert r["n_train"]["after"] == r["n_train"]["before"] + 5
    before = json.loads((out / "models" / "delta.metrics.json").read_text())
    after = json.loads(Path(r["model"]).with_suffix(".metrics.json").read_text())
    # the same held-out frames (their identity: test_training's add_train test), so the errors compare
    assert (after["n_valid"], after["n_test"]) == (before["n_valid"], before["n_test"])
    files = _label_files(out)
    assert sorted(after["split"]["added_train"].values()) == [2, 3] and len(files) == 2
    assert all(Path(p).is_absolute() and Path(p).name in files for p in after["split"]["added_train"])
    # the added labels are the engines' own numbers for the queued frames (not copies of anything)

    emb = EmbeddingSettings(CUTOFF, SWITCH)
    run1 = next(p for p in (out / "validation" / "refit" / "delta").glob("delta_guarded_run1-*.labels.h5"))
    with Dataset(run1) as ds:
        got = ds.frame(1).labels
    for level, spec in (("ref", "xtb:gfn2"), ("base", "dftb3:3ob")):
        want, _ = label_frame(make_engine(spec), queued[4], emb)
        assert got[level].energy == pytest.approx(want.energy, abs=1e-6)
        assert np.allclose(got[level].forces, want.forces, atol=1e-4)
    assert json.loads((out / "validation" / "refit" / "refit.json").read_text()) == json.loads(json.dumps(rec))

    model_time = Path(r["model"]).stat().st_mtime
    again = refit_models(cfg, out, ["delta"], runs=2)  # the same queue: labels and model reused
    assert Path(r["model"]).stat().st_mtime == model_time and _label_files(out) == files
    assert again["delta"]["n_train"] == r["n_train"]
    # run 1 queued other frames since (run again, the same number of frames): only its frames are labelled
    # anew, into a new file beside the old one, and the model is trained again on the new set
    _queue(runs / "run1" / "uncertain.h5", queued[6:8])
    third = refit_models(cfg, out, ["delta"], runs=2)
    now = _label_files(out)
    assert len(now) == 3 and {k: now[k] for k in files} == files  # run 0's labels reused, nothing replaced
    assert Path(r["model"]).stat().st_mtime != model_time and third["delta"]["n_train"] == r["n_train"]
    # and a run that went on (more frames): the same again
    _queue(runs / "run1" / "uncertain.h5", queued[5:8])
    fourth = refit_models(cfg, out, ["delta"], runs=2)
    assert len(_label_files(out)) == 4 and fourth["delta"]["n_train"]["after"] == r["n_train"]["before"] + 6


def test_refit_drivers_and_their_settings(tmp_path: Path) -> None:
    from qmlmm.workflows.pipeline.validation import validation_md_settings

    vs = ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0, refit=True,
                            drivers=["reference", "delta", "direct", "direct_guarded"])  # fmt: skip
    with pytest.raises(InputError, match="refit needs a guarded driver"):
        ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0, refit=True, drivers=["reference", "delta"])
    with pytest.raises(InputError, match=r"drivers must include \['delta'\]"):
        ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0, refit=True, drivers=["reference", "delta_guarded"])
    val = {"runs": 2, "steps": 40, "every": 10, "skip_ps": 0.0, "refit": True, "drivers": vs.drivers}
    d: dict[str, Any] = {"name": "x", "solutes": [ALA2], "reference": "xtb:gfn2", "sizes": {"s": {"validation": val}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = load_pipeline_config(tmp_path / "c.yaml", "s")
    for k in range(2):  # a refit run repeats its pipeline model's run: same seed, no guard
        plain, refit = validation_md_settings(cfg, vs, "direct", k), validation_md_settings(cfg, vs, "direct_refit", k)
        assert refit.seed == plain.seed and refit.max_uncertainty is None and refit.steps == plain.steps
    d["sizes"]["s"]["train"] = {"max_train_frames": 100}  # would drop added frames at random: refused at load
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(InputError, match="refit with train max_train_frames"):
        load_pipeline_config(tmp_path / "c.yaml", "s")

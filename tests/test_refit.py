"""The validation's refit round: queued frames labelled by the real engines, models retrained with them
on an unchanged split, reuse, refusal of a queue that changed, and the refit drivers' settings."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_refit_labels_the_queued_frames_and_retrains_on_an_unchanged_split(pipeline_folder: tuple) -> None:
    from qmlmm.engines import label_frame, make_engine
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.pipeline.refit import queued_sources, refit_folder, refit_models

    out, cfg = pipeline_folder
    queued = _frames(5, seed=7)
    _queue(out / "validation" / "delta_guarded" / "run0" / "uncertain.h5", queued[:3])
    _queue(out / "validation" / "delta_guarded" / "run1" / "uncertain.h5", queued[3:])
    _queue(out / "validation" / "delta_guarded" / "run2" / "uncertain.h5", queued[:1])  # not a validation run
    assert [p.parent.name for p in queued_sources(out, "delta", 2)] == ["run0", "run1"]

    rec = refit_models(cfg, out, ["delta", "direct"], runs=2)
    assert rec["direct"]["model"] is None and "queued no frame" in rec["direct"]["why"]
    r = rec["delta"]
    assert (r["n_queued"], r["n_labelled"]) == (5, 5)
    assert r["n_train"]["after"] == r["n_train"]["before"] + 5
    before = json.loads((out / "models" / "delta.metrics.json").read_text())
    after = json.loads((Path(r["model"]).with_suffix("")).with_suffix(".metrics.json").read_text())
    # the same held-out frames (their identity: test_training's add_train test), so the errors compare
    assert (after["n_valid"], after["n_test"]) == (before["n_valid"], before["n_test"])
    assert after["split"]["added_train"] == {str(refit_folder(out) / "delta" / "labels.h5"): 5}
    assert r["test_mae"]["before"]["energy"] == before["test"]["energy"]["mae"]
    # the added labels are the engines' own numbers for the queued frames (not copies of anything)
    emb = EmbeddingSettings(CUTOFF, SWITCH)
    with Dataset(refit_folder(out) / "delta" / "labels.h5") as ds:
        got = ds.frame(4).labels
    for level, spec in (("ref", "xtb:gfn2"), ("base", "dftb3:3ob")):
        want, _ = label_frame(make_engine(spec), queued[4], emb)
        assert got[level].energy == pytest.approx(want.energy, abs=1e-6)
        assert np.allclose(got[level].forces, want.forces, atol=1e-4)
    assert json.loads((refit_folder(out) / "refit.json").read_text()) == json.loads(json.dumps(rec))

    mtime = Path(r["model"]).stat().st_mtime
    again = refit_models(cfg, out, ["delta"], runs=2)  # same queue: labels and model reused
    assert Path(r["model"]).stat().st_mtime == mtime and again["delta"]["n_train"] == r["n_train"]
    _queue(out / "validation" / "delta_guarded" / "run1" / "uncertain.h5", queued[2:])  # the run went on
    with pytest.raises(InputError, match=r"refit/delta holds the frames.*Delete"):
        refit_models(cfg, out, ["delta"], runs=2)


def test_refit_drivers_and_their_settings(tmp_path: Path) -> None:
    from qmlmm.workflows.pipeline.validation import validation_md_settings

    vs = ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0, refit=True,
                            drivers=["reference", "delta", "direct", "direct_guarded"])  # fmt: skip
    assert vs.analysed_drivers == ["reference", "delta", "direct", "direct_guarded", "direct_refit"]
    assert ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0).analysed_drivers == DEFAULT_DRIVERS
    with pytest.raises(InputError, match="refit needs a guarded driver"):
        ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0, refit=True, drivers=["reference", "delta"])
    d = {"name": "x", "solutes": [ALA2], "reference": "xtb:gfn2", "sizes": {"s": {}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = load_pipeline_config(tmp_path / "c.yaml", "s")
    for k in range(2):  # a refit run repeats its pipeline model's run: same seed, no guard
        plain, refit = validation_md_settings(cfg, vs, "direct", k), validation_md_settings(cfg, vs, "direct_refit", k)
        assert refit.seed == plain.seed and refit.max_uncertainty is None and refit.steps == plain.steps


DEFAULT_DRIVERS = ["reference", "baseline", "delta", "direct"]

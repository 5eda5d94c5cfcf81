"""A small solute in TIP3P water, sampled in independent DFTB3/MM runs and labelled at two levels: the data
several accuracy benchmarks share (generalisation, learning curves, electrostatics ablation).

Every stage is reused when a previous call left it in ``work`` (system/, frames.h5, labels.h5).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qmlmm.environment import EmbeddingSettings

#: the embedding of every benchmark label: 1.4 nm with a 0.2 nm switching shell (the project's default)
EMB = EmbeddingSettings(1.4, 0.2)


@dataclass(frozen=True)
class SolventSampling:
    """``runs`` independent DFTB3/MM runs (each after ``equil_steps`` MM-only steps of 2 fs and
    ``qm_equil_steps`` discarded QM/MM steps), ``frames_per_run`` frames ``every`` 0.5 fs steps apart."""

    runs: int
    frames_per_run: int
    every: int = 20
    equil_steps: int = 2500
    qm_equil_steps: int = 200


def labelled_solute(
    work: Path,
    smiles: str,
    sampling: SolventSampling,
    levels: tuple[tuple[str, str], ...] = (("xtb:gfn2", "xtb"), ("dftb3:3ob", "dftb3")),
    workers: int = 2,
) -> dict[str, float]:
    """Build ``smiles`` in water, sample and label it in ``work`` (each stage reused when present);
    ``levels`` (engine spec, level name) pairs. Returns the seconds each stage took here."""
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
    from qmlmm.workflows.label import LevelRequest, label_dataset
    from qmlmm.workflows.sample import SampleSettings, sample

    work.mkdir(parents=True, exist_ok=True)
    _same_recipe(work, {"smiles": smiles, "sampling": asdict(sampling), "levels": [list(lv) for lv in levels]})
    t0 = time.time()
    if not (work / "system" / "meta.json").exists():
        build_system([SoluteSpec(smiles=smiles)], work / "system", BuildSettings(cutoff=EMB.cutoff))
    t1 = time.time()
    if not (work / "frames.h5").exists():
        s = SampleSettings(
            engine="dftb3:3ob",
            steps=sampling.frames_per_run * sampling.every,
            every=sampling.every,
            runs=sampling.runs,
            equil_steps=sampling.equil_steps,
            qm_equil_steps=sampling.qm_equil_steps,
            cutoff=EMB.cutoff,
            switch_width=EMB.switch_width,
            threads=1,
        )
        sample(work / "system", work / "frames.h5", s, workers=workers, progress=False)
    t2 = time.time()
    req = [LevelRequest.from_spec(spec, name) for spec, name in levels]
    rep = label_dataset(work / "frames.h5", work / "labels.h5", req, EMB, workers=workers, threads=1, progress=False)
    if not rep.ok:
        failed = {k: len(v) for k, v in rep.failed.items() if v}
        raise RuntimeError(f"labels failed in {work}: {failed}")
    return {"build": t1 - t0, "sample": t2 - t1, "label": time.time() - t2}


def _same_recipe(work: Path, recipe: dict[str, object]) -> None:
    """Record how ``work`` is made (recipe.json); refuse a folder made another way, whose frames would be
    reused under settings they were not made with."""
    path = work / "recipe.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(recipe)):
            raise SystemExit(f"{work} was made with {old}, not {recipe}: use another --work folder")
    else:
        path.write_text(json.dumps(recipe, indent=1))

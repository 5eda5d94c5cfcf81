"""``qmlmm active``: reach a target error with few reference labels, by choosing the frames the model is
least sure of.

A run folder holds one study; every stage writes its output once and a rerun skips what exists, so a
run killed at any point resumes without labelling a frame twice (labelling itself resumes frame by
frame, :func:`qmlmm.workflows.label.label_dataset`):

- ``heldout/``: a fixed test set, ``heldout_runs`` sampling runs with the sampler engine (seeds apart
  from every other run), labelled at target and baseline. Every model is measured on it.
- ``initial/``: candidates from sampler MD; ``per_round`` of them, evenly spaced in time, are the first
  labels of both arms.
- ``active/round_NN/`` and ``random/round_NN/``: per round a model (``model.pt``) trained on the arm's
  labels so far (``train.h5``), its held-out errors, then new candidates and ``per_round`` new labels.
  *active*: candidates from ML/MM MD with the round's ensemble (``replicas`` runs spread over
  ``temperatures``; a run that fails part-way keeps its frames up to there, and with ``max_uncertainty``
  a run stops at that ensemble spread, keeping the geometry it stopped at as a candidate),
  ranked by the ensemble's spread (energy, QM and MM forces, each as a rank) and picked greedily with
  at least ``min_gap_frames`` frames between two picks of one run (no near-duplicates). *random* (the
  control, same budget): candidates from sampler MD, picked uniformly at random.
- ``active.json``: per arm and round the number of labels and the held-out MAEs (energy, QM and MM
  forces), with the baseline's own errors; ``active.png``: error against labels, active vs random.

The loop stops at ``budget`` labels per arm or when the active arm's held-out energy MAE reaches
``until_energy_mae``. Each round trains its ensemble from random weights, or, with ``warm_start``,
from the last round's networks (:mod:`qmlmm.training.warm_start`; off by default: warm-started networks
can generalise worse than fresh ones, Ash & Adams, NeurIPS 2020, and did on methanol: higher held-out
errors in every round, ``benchmarks/active_learning.py --warm-start``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.engines import parse_spec
from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH, EmbeddingSettings
from qmlmm.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["ActiveSettings", "run_active", "select_uncertain"]


@dataclass
class ActiveSettings:
    """One active-learning study (spectra of the engines: ``qmlmm.engines.parse_spec``).

    ``target``: reference engine spec (``dft:b3lyp/6-31g*``; ``xtb:gfn2`` as a cheap stand-in);
    ``baseline``: delta baseline spec, None for a direct model; ``sampler``: engine of the held-out, the
    initial and the random arm's MD (default: the baseline, else ``dftb3:3ob``). ``budget`` labels per
    arm in all, ``per_round`` per round (the first round's too). ``steps`` MD steps of ``dt_fs`` per
    candidate run, a frame every ``every``; ``train``: TrainConfig settings (YAML keys); ``warm_start``:
    each round's training starts from the last round's model (same architecture) instead of random weights.
    """

    target: str
    baseline: str | None = "dftb3:3ob"
    budget: int = 60
    per_round: int = 10
    until_energy_mae: float | None = None
    sampler: str | None = None
    replicas: int = 2
    temperatures: list[float] = field(default_factory=lambda: [300.0, 350.0])
    steps: int = 400
    every: int = 10
    dt_fs: float = 0.5
    equil_steps: int = 500
    heldout_runs: int = 2
    max_uncertainty: float | None = None
    min_gap_frames: int = 2
    random_control: bool = True
    cutoff: float = DEFAULT_CUTOFF
    switch_width: float = DEFAULT_SWITCH_WIDTH
    workers: int = 1
    threads: int = 1
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    warm_start: bool = False

    def __post_init__(self) -> None:
        parse_spec(self.target)
        for spec in (self.baseline, self.sampler):
            if spec is not None:
                parse_spec(spec)
        checks = [
            ("per_round", self.per_round >= 3, "at least 3 (the first model needs training and validation frames)"),
            ("budget", self.budget >= self.per_round, f"at least per_round ({self.per_round})"),
            ("replicas", self.replicas >= 1, "at least 1"),
            ("temperatures", len(self.temperatures) >= 1 and all(t > 0 for t in self.temperatures), "positive"),
            ("steps", self.steps >= self.every >= 1, "at least every >= 1"),
            ("heldout_runs", self.heldout_runs >= 1, "at least 1"),
            ("min_gap_frames", self.min_gap_frames >= 0, "at least 0"),
            ("max_uncertainty", self.max_uncertainty is None or self.max_uncertainty > 0, "positive (kJ/mol)"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise InputError(f"active-learning setting {name} must be {need}, got {getattr(self, name)!r}")
        if int(self.train.get("ensemble", 4)) < 2:
            raise InputError("active learning needs an ensemble of at least 2 networks (train: ensemble)")

    @property
    def target_level(self) -> str:
        return parse_spec(self.target).family

    @property
    def baseline_level(self) -> str | None:
        return parse_spec(self.baseline).family if self.baseline else None

    @property
    def sampler_spec(self) -> str:
        return self.sampler or self.baseline or "dftb3:3ob"

    @property
    def embedding(self) -> EmbeddingSettings:
        return EmbeddingSettings(self.cutoff, self.switch_width)


def select_uncertain(
    spread: np.ndarray, run: np.ndarray, step: np.ndarray, k: int, min_gap: int, every: int
) -> np.ndarray:
    """Indices of ``k`` candidates (all when there are fewer), most uncertain first, no two from one run
    closer than ``min_gap`` frames while the candidates allow it.

    ``spread`` (C, Q): the ensemble's spread per candidate in Q quantities (energy, QM forces, MM forces);
    each is ranked across the candidates and a candidate's score is its mean rank, so that no quantity's
    unit dominates. ``run``, ``step`` (C,): the candidate's sampling run and MD step; ``every`` the steps
    between stored frames. When the gap rule leaves fewer than ``k``, the next most uncertain candidates
    fill up.
    """
    c = len(spread)
    if c == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64)
    ranks = np.argsort(np.argsort(np.asarray(spread, dtype=float), axis=0, kind="stable"), axis=0)
    score = ranks.mean(1)
    order = [int(i) for i in np.argsort(-score, kind="stable")]
    chosen: list[int] = []
    for i in order:
        near = [j for j in chosen if run[j] == run[i] and abs(step[j] - step[i]) < min_gap * every]
        if not near:
            chosen.append(i)
            if len(chosen) == k:
                break
    if len(chosen) < k:  # the gap rule left too few (short, stopped runs): the next most uncertain ones
        chosen += [i for i in order if i not in chosen][: k - len(chosen)]
    return np.asarray(chosen, dtype=np.int64)


def run_active(system_dir: str | Path, out: str | Path, s: ActiveSettings, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study ``s`` on the built system ``system_dir`` in the folder ``out``; returns
    the content of ``active.json``."""
    from qmlmm.md.system import MDSystem

    MDSystem.load(system_dir)  # fail early on a bad folder
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, s)
    heldout = _labelled_candidates(
        system_dir, out / "heldout", s, s.sampler_spec, runs=s.heldout_runs, seed=1, frames=None
    )
    initial = _labelled_candidates(
        system_dir, out / "initial", s, s.sampler_spec, runs=s.replicas, seed=2, frames="even"
    )
    arms = ["active"] + (["random"] if s.random_control else [])
    record: dict[str, Any] = {"settings": asdict(s), "arms": {a: [] for a in arms}}
    for arm in arms:
        sources = [(initial, _done(initial, s))]
        r = 0
        model: Path | None = None
        while True:
            rd = out / arm / f"round_{r:02d}"
            if r == 0 and arm != "active":
                _first_round_of(out / "active" / "round_00", rd)
            model = _trained(rd, sources, s, progress, model if s.warm_start else None)
            point = _evaluated(rd, model, heldout, sum(len(i) for _, i in sources))
            record["arms"][arm].append(point)
            _write_record(out, record, heldout, s)
            n = point["n_labels"]
            if n >= s.budget or (
                s.until_energy_mae is not None and point["energy_mae"] <= s.until_energy_mae and arm == "active"
            ):
                break
            k = min(s.per_round, s.budget - n)
            labelled = _next_labels(system_dir, rd, s, arm, r, model, k)
            new = _done(labelled, s)
            if not new:  # every pick failed to label (recorded in its labels.h5): more rounds would loop
                record["arms"][arm][-1]["stopped"] = f"no frame of round {r + 1} could be labelled ({labelled})"
                log.error("%s arm stopped: %s", arm, record["arms"][arm][-1]["stopped"])
                _write_record(out, record, heldout, s)
                break
            sources.append((labelled, new))
            r += 1
    _plot(out, record)
    return record


def _first_round_of(active: Path, folder: Path) -> None:
    """Every arm's first round trains on the same initial labels with the same settings: ``folder`` takes the
    active arm's first-round model and training files (copied, the model last: its presence marks the round
    trained) instead of training the same ensemble again."""
    import shutil

    from qmlmm.fileio import atomic_path

    if (folder / "model.pt").exists() or not (active / "model.pt").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        p
        for p in active.iterdir()
        if p.is_file() and p.suffix != ".tmp" and (p.name.startswith("model.") or p.name == "train.h5")
    ]
    for src in sorted(files, key=lambda p: p.name == "model.pt"):
        with atomic_path(folder / src.name) as tmp:
            shutil.copyfile(src, tmp)


def _write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically (:func:`qmlmm.fileio.atomic_path`)."""
    from qmlmm.fileio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _check_settings(out: Path, s: ActiveSettings) -> None:
    """Record the settings in ``out/settings.json``; a rerun with other settings is refused (it would mix
    frames chosen under different rules)."""
    p = out / "settings.json"
    want = json.loads(json.dumps(asdict(s)))  # as it reads back (tuples as lists)
    if not p.exists():
        _write_json(p, want)
        return
    have = json.loads(p.read_text())
    for f in fields(ActiveSettings):  # a setting added since the run began: the run used its default
        if f.name not in have and f.default is not MISSING:
            have[f.name] = f.default
    if have != want:
        diff = sorted(k for k in want if have.get(k) != want[k])
        raise InputError(f"{out} holds an active-learning run with other settings ({diff}); use another -o")


def _sample(system_dir: str | Path, folder: Path, s: ActiveSettings, engine: str, runs: int, seed: int) -> Path:
    """Candidate frames of ``runs`` MD runs with ``engine`` (a spec, or ``model:<file>``), at the
    settings' temperatures in turn; ``folder/candidates.h5`` (kept: a rerun reuses it)."""
    from qmlmm.workflows.sample import SampleSettings, sample

    path = folder / "candidates.h5"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    ss = SampleSettings(
        engine=engine,
        steps=s.steps,
        every=s.every,
        runs=runs,
        equil_steps=s.equil_steps,
        dt_fs=s.dt_fs,
        cutoff=s.cutoff,
        switch_width=s.switch_width,
        seed=s.seed * 100 + seed,
        threads=s.threads,
        temperatures=list(s.temperatures),
        max_uncertainty=s.max_uncertainty if engine.startswith("model:") else None,
        keep_partial=engine.startswith("model:"),
    )
    return sample(system_dir, path, ss, workers=min(s.workers, runs), progress=False)  # written whole, at the end


def _label(candidates: Path, folder: Path, s: ActiveSettings, frames: list[int] | None) -> Path:
    """``folder/labels.h5``: the candidates with ``frames`` (default all) labelled at target and baseline
    (resumable: frames already labelled are not labelled again)."""
    from qmlmm.workflows.label import LevelRequest, label_dataset

    reqs = [LevelRequest.from_spec(s.target)] + ([LevelRequest.from_spec(s.baseline)] if s.baseline else [])
    out = folder / "labels.h5"
    if out.exists() and _all_attempted(out, [r.level for r in reqs], frames):
        return out  # a resumed run: nothing left to label (failures stay recorded, not retried)
    label_dataset(
        candidates, out, reqs, s.embedding, workers=s.workers, threads=s.threads, frames=frames, progress=False
    )
    return out


def _all_attempted(path: Path, levels: list[str], frames: list[int] | None) -> bool:
    """Whether every frame of ``frames`` (default all) of the dataset has a label or a recorded failure at
    every level."""
    from qmlmm.data import Dataset

    with Dataset(path) as ds:
        if any(lvl not in ds.levels() for lvl in levels):
            return False
        idx = np.arange(len(ds)) if frames is None else np.asarray(frames, dtype=np.int64)
        return all(bool((ds.status(lvl)[idx] != 0).all()) for lvl in levels)


def _labelled_candidates(
    system_dir: str | Path, folder: Path, s: ActiveSettings, engine: str, runs: int, seed: int, frames: str | None
) -> Path:
    """Sample and label: every frame (``frames`` None) or ``per_round`` frames evenly spaced ("even")."""
    cand = _sample(system_dir, folder, s, engine, runs, seed)
    pick = None
    if frames == "even":
        from qmlmm.data import Dataset

        with Dataset(cand) as ds:
            n = len(ds)
        pick = sorted({round(float(x)) for x in np.linspace(0, n - 1, min(s.per_round, n))})
    return _label(cand, folder, s, pick)


def _done(labels: Path, s: ActiveSettings) -> list[int]:
    """Frames of ``labels`` with every needed level done."""
    from qmlmm.data import Dataset

    with Dataset(labels) as ds:
        ok = ds.labelled_at([s.target_level, *([s.baseline_level] if s.baseline_level else [])])
    return [int(i) for i in np.flatnonzero(ok)]


def _train_config(s: ActiveSettings) -> Any:
    """TrainConfig of every round: the settings' ``train`` keys, the study's levels, and a split that
    keeps no test frames (the held-out set is the test) and validates on a fifth of the labels."""
    from qmlmm.training import load_config

    d = {"ensemble": 4, "split": "blocks", "block_size": 1, "valid_fraction": 0.2, "test_fraction": 0.0}
    d.update(s.train)
    d.update(target=s.target_level, baseline=s.baseline_level, threads=s.threads)
    return load_config(None, **d)


def _trained(folder: Path, sources: list[tuple[Path, list[int]]], s: ActiveSettings, progress: bool,
             init: Path | None = None) -> Path:  # fmt: skip
    """``folder/model.pt`` trained on the labelled frames ``sources`` (resumes a killed training), from the
    model ``init`` when given (warm start)."""
    from qmlmm.training import load_training_data, train

    model = folder / "model.pt"
    if model.exists():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    from qmlmm.data import merge_datasets

    data = merge_datasets(sources, folder / "train.h5")
    cfg = _train_config(s)
    train(load_training_data(data, cfg.target, cfg.baseline, cfg.split_settings), cfg, model, progress=progress,
          init=init)  # fmt: skip
    return model


def _evaluated(folder: Path, model: Path, heldout: Path, n_labels: int) -> dict[str, Any]:
    """Held-out errors of ``model`` (``folder/heldout.json``, written once)."""
    from qmlmm.analysis.evaluate import evaluate_model

    p = folder / "heldout.json"
    if not p.exists():
        _write_json(p, evaluate_model(model, heldout, out_dir=folder / "heldout").metrics)
    m = json.loads(p.read_text())
    cal = _calibration(folder, model, heldout)
    return {
        "n_labels": n_labels,
        "energy_mae": m["model"]["energy"]["mae"],
        "qm_forces_mae": m["model"]["qm_forces"]["mae"],
        "mm_forces_mae": m["model"]["mm_forces"]["mae"],
        "spread_error_spearman": {k: cal[k]["spearman"] for k in ("energy", "qm_forces")},
    }


def _calibration(folder: Path, model_path: Path, heldout: Path) -> dict[str, Any]:
    """The ensemble's spread against its true error on the held-out frames (``folder/calibration.json``,
    written once): per frame the energy spread and |energy error| (kJ/mol), and the largest QM-atom force
    spread and force error (kJ/mol/nm), with Spearman's rank correlation of each pair (NaN for fewer
    than 3 frames). A threshold on the spread is only as good as this correlation."""
    p = folder / "calibration.json"
    if p.exists():
        return dict(json.loads(p.read_text()))
    from scipy.stats import spearmanr

    from qmlmm.data import Dataset
    from qmlmm.models import QMLMMModel

    model = QMLMMModel.load(model_path)
    target = model.meta.target
    with Dataset(heldout) as ds:
        frames = [fr for fr in ds.frames() if target in fr.labels]
    preds = model.predict_frames(frames, force_spread=True)
    e_spread = [pr.energy_std for pr in preds]
    e_err = [abs(pr.energy - fr.labels[target].energy) for pr, fr in zip(preds, frames, strict=True)]
    f_spread, f_err = [], []
    for pr, fr in zip(preds, frames, strict=True):
        qm = fr.is_qm
        f_err.append(float(np.linalg.norm(pr.forces[qm] - fr.labels[target].forces[qm], axis=1).max()))
        f_spread.append(float(np.linalg.norm(pr.forces_std[qm], axis=1).max()) if pr.forces_std is not None else 0.0)
    out: dict[str, Any] = {}
    for key, sp, er in (("energy", e_spread, e_err), ("qm_forces", f_spread, f_err)):
        rho = float(spearmanr(sp, er).statistic) if len(sp) >= 3 and np.ptp(sp) > 0 and np.ptp(er) > 0 else float("nan")
        out[key] = {"spread": [float(x) for x in sp], "error": [float(x) for x in er], "spearman": rho}
    _write_json(p, out)
    return out


def _next_labels(
    system_dir: str | Path, folder: Path, s: ActiveSettings, arm: str, r: int, model: Path, k: int
) -> Path:
    """The round's ``k`` new labels in ``folder/labels.h5``: candidates by ML/MM MD with ``model`` picked
    by uncertainty (active) or by sampler MD picked at random (random); the picks are kept in
    ``folder/picks.json`` so that a resumed run labels the same frames."""
    engine = f"model:{model}" if arm == "active" else s.sampler_spec
    cand = _sample(system_dir, folder, s, engine, runs=s.replicas, seed=10 + 10 * r + (5 if arm == "random" else 0))
    picks_path = folder / "picks.json"
    if not picks_path.exists():
        picks = _uncertain_picks(cand, model, s, k) if arm == "active" else _random_picks(cand, s, r, k)
        _write_json(picks_path, picks)
    return _label(cand, folder, s, json.loads(picks_path.read_text()))


def _random_picks(cand: Path, s: ActiveSettings, r: int, k: int) -> list[int]:
    from qmlmm.data import Dataset

    with Dataset(cand) as ds:
        n = len(ds)
    rng = np.random.default_rng(s.seed * 1000 + r)
    return sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False))


def _uncertain_picks(cand: Path, model_path: Path, s: ActiveSettings, k: int) -> list[int]:
    """The ``k`` candidates of ``cand`` the ensemble ``model_path`` is least sure of (:func:`select_uncertain`)."""
    from qmlmm.data import Dataset
    from qmlmm.data.batch import frame_tensors
    from qmlmm.models import QMLMMModel

    model = QMLMMModel.load(model_path)
    with Dataset(cand) as ds:
        frames = ds.frames()
    items = [frame_tensors(fr, model.embedding) for fr in frames]
    preds = model.predict_tensors(items, force_spread=True)
    spread = np.array(
        [
            [
                p["energy_std"],
                float(np.abs(p["qm_forces_std"]).max()),
                float(np.abs(p["mm_forces_std"]).max()) if np.size(p["mm_forces_std"]) else 0.0,
            ]
            for p in preds
        ]
    )
    run = np.array([int(fr.info.get("run", 0)) for fr in frames])
    step = np.array([int(fr.info.get("step", i)) for i, fr in enumerate(frames)])
    return sorted(int(i) for i in select_uncertain(spread, run, step, k, s.min_gap_frames, s.every))


def _write_record(out: Path, record: dict[str, Any], heldout: Path, s: ActiveSettings) -> None:
    """``out/active.json`` (atomic), with the baseline's own held-out errors for a delta study."""
    if s.baseline_level and "baseline_alone" not in record:
        first = next(p for p in (out / "active").glob("round_*/heldout.json"))
        m = json.loads(first.read_text())
        if "baseline_alone" in m:
            b = m["baseline_alone"]
            record["baseline_alone"] = {q: b[q]["mae"] for q in ("energy", "qm_forces", "mm_forces")}
    record["heldout_frames"] = _n_frames(heldout)
    _write_json(out / "active.json", record)


def _n_frames(path: Path) -> int:
    from qmlmm.data import Dataset

    with Dataset(path) as ds:
        return len(ds)


def _plot(out: Path, record: dict[str, Any]) -> None:
    """``out/active.png``: held-out MAE of energy, QM and MM forces against labels, one line per arm, and
    the baseline's own errors as a line."""
    from qmlmm.analysis.plots import learning_curve_plot

    curves: dict[str, Sequence[dict[str, float]]] = {
        arm: [{**p, "n_train": p["n_labels"]} for p in pts] for arm, pts in record["arms"].items()
    }
    base = record.get("baseline_alone")
    baseline = {f"{q}_mae": v for q, v in base.items()} if base else None
    learning_curve_plot(curves, out / "active.png", baseline=baseline, title="held-out error against labels")
    last = sorted((out / "active").glob("round_*/calibration.json"))
    if last:
        _calibration_plot(json.loads(last[-1].read_text()), out / "active_calibration.png", last[-1].parent.name)


def _calibration_plot(cal: dict[str, Any], path: Path, name: str) -> None:
    """Spread against true error on the held-out frames, energy and QM forces, with Spearman's rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, (key, unit) in zip(axes, (("energy", "kJ/mol"), ("qm_forces", "kJ/mol/nm")), strict=True):
        ax.scatter(cal[key]["spread"], cal[key]["error"], s=12)
        ax.set_xlabel(f"ensemble spread ({unit})")
        ax.set_ylabel(f"|error| ({unit})")
        ax.set_title(f"{key}: Spearman rho {cal[key]['spearman']:.2f}", fontsize=10)
    fig.suptitle(f"calibration of the active arm's {name} model on the held-out set")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

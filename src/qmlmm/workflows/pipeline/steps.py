"""The pipeline's steps before the reaction: build, sample, label, train, learning curve, evaluate, MD.

Each step writes into the run folder and is skipped (or resumes inside) when its result exists."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qmlmm.workflows.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

__all__ = [
    "build_step",
    "evaluate_step",
    "label_step",
    "learning_curve_step",
    "md_step",
    "sample_step",
    "train_step",
]


def is_done(out: Path, name: str, marker: str) -> bool:
    """True (and logged) if the step's result ``out/marker`` exists: the step is skipped."""
    done = (out / marker).exists()
    log.info("[%s] %s", name, "done before, reused" if done else "running")
    return done


def build_step(cfg: PipelineConfig, system: Path) -> None:
    """Build the config's solutes in water into the folder ``system`` (box sized for ``cfg.cutoff``)."""
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system

    anchors = {int(k): v for k, v in cfg.anchors.items()}
    specs = [
        SoluteSpec(smiles=smi, anchor=tuple(anchors[k]) if k in anchors else None)  # type: ignore[arg-type]
        for k, smi in enumerate(cfg.solutes)
    ]
    build_system(
        specs,
        system,
        BuildSettings(
            padding=cfg.padding, cutoff=cfg.cutoff, gap=cfg.gap, seed=cfg.seed, equilibrate_ps=cfg.equilibrate_ps
        ),
        total_charge=cfg.charge,
    )


def sample_step(cfg: PipelineConfig, system: Path, frames: Path, progress: bool) -> None:
    """Baseline QM/MM MD runs (restrained along the reaction coordinate, one run per sampling window, for a
    reaction) storing frames for labelling into ``frames``."""
    from qmlmm.md.restraints import umbrella_windows
    from qmlmm.workflows.pipeline.reaction import reaction_restraints
    from qmlmm.workflows.sample import SampleSettings, sample

    per_run = reaction_restraints(cfg, system, umbrella_windows(cfg.sample_windows) if cfg.sample_windows else None)
    runs = len(per_run) if per_run else cfg.sample_runs
    starts = None
    if cfg.validation is not None:  # sample where the validation runs start (several backbone basins)
        from qmlmm.md.system import MDSystem
        from qmlmm.workflows.pipeline.validation import ValidationSettings, validation_starts

        starts = [
            p.tolist()
            for p in validation_starts(cfg, ValidationSettings.from_dict(cfg.validation), MDSystem.load(system))
        ]
    sample(
        system,
        frames,
        SampleSettings(
            engine=cfg.sample_engine,
            steps=cfg.sample_steps,
            every=cfg.sample_every,
            runs=runs,
            equil_steps=cfg.equil_steps,
            cutoff=cfg.cutoff,
            switch_width=cfg.switch_width,
            seed=cfg.seed,
            threads=cfg.threads,
            restraints_per_run=per_run,
            starts=starts,
        ),
        workers=min(cfg.workers, runs),
        progress=progress,
    )


def label_step(cfg: PipelineConfig, frames: Path, labels: Path, progress: bool, analyze_only: bool) -> Any:
    """Reference ("ref") and baseline ("base") QM/MM labels of every frame (resumable); returns the
    LabelReport (with ``analyze_only``: the failures the file records, nothing computed)."""
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.workflows.label import LevelRequest, label_dataset

    if analyze_only:
        from qmlmm.data import Dataset
        from qmlmm.workflows.label import LabelReport

        with Dataset(labels) as ds:
            return LabelReport(failed={lev: ds.errors(lev) for lev in ds.levels()})
    rep = label_dataset(
        frames,
        labels,
        [LevelRequest.from_spec(cfg.reference, "ref"), LevelRequest.from_spec(cfg.baseline, "base")],
        EmbeddingSettings(cfg.cutoff, cfg.switch_width),
        workers=cfg.workers,
        threads=cfg.threads,
        progress=progress,
    )
    if not rep.ok:
        log.warning(
            "labelling: %d frame(s) failed; they are left out of training", sum(len(v) for v in rep.failed.values())
        )
    return rep


def _train_config(cfg: PipelineConfig, mode: str, **extra: Any) -> Any:
    from qmlmm.training import TrainConfig

    tc = TrainConfig.from_dict(
        {**{"target": "ref", "seed": cfg.seed}, **cfg.train, "baseline": "base" if mode == "delta" else None, **extra}
    )
    if mode == "delta" and cfg.delta_hidden:
        tc.hidden = list(cfg.delta_hidden)
    return tc


def train_step(cfg: PipelineConfig, labels: Path, models: Path, progress: bool) -> dict[str, Any]:
    """Direct and delta ensembles on the same frames and split (reused when trained), side by side, one
    single-threaded process each (qmlmm.training.parallel); parity plots. Returns their metrics by mode."""
    from qmlmm.analysis.plots import parity_plot_of_model
    from qmlmm.training import TrainJob, train_jobs
    from qmlmm.training.parallel import labels_changed

    metrics: dict[str, Any] = {}
    jobs = []
    for mode in ("direct", "delta"):
        path = models / f"{mode}.pt"
        job = TrainJob(str(labels), _train_config(cfg, mode), str(path), {"require": ("base",)})
        # the settings are the fingerprints' to check; the labels (e.g. failed frames labelled since) here
        if path.exists() and not labels_changed(job):
            log.info("[train %s] done before, reused", mode)
            metrics[mode] = json.loads((models / f"{mode}.metrics.json").read_text())
            continue
        jobs.append(job)
    for path_s, (m, _) in train_jobs(jobs, workers=min(cfg.workers, 2), progress=progress).items():
        metrics[Path(path_s).stem] = m
    for mode in ("direct", "delta"):
        if not (models / f"{mode}.parity.png").exists():
            parity_plot_of_model(models / f"{mode}.pt")
    return metrics


def learning_curve_step(
    cfg: PipelineConfig, labels: Path, out: Path, progress: bool, analyze_only: bool
) -> dict[str, Any] | None:
    """Test errors against training-set size, direct and delta, one network per point (None when the config
    asks for none)."""
    path = out / "learning_curve" / "learning_curve.json"
    if analyze_only:
        return json.loads(path.read_text()) if path.exists() else None
    if not cfg.learning_curve:
        return None
    from qmlmm.workflows.learning_curve import learning_curve

    return learning_curve(
        labels,
        _train_config(cfg, "direct", ensemble=1, baseline="base"),
        sorted(int(n) for n in cfg.learning_curve),
        out / "learning_curve",
        progress=progress,
        hidden_by_mode={"delta": list(cfg.delta_hidden)} if cfg.delta_hidden else None,
        workers=min(cfg.workers, 2),
    )


def evaluate_step(labels: Path, models: Path) -> dict[str, Any]:
    """Test-set errors of both models (the baseline's own errors come with the delta model's)."""
    from qmlmm.analysis.evaluate import evaluate_model

    return {
        mode: evaluate_model(models / f"{mode}.pt", labels, models / f"eval_{mode}", split="test").metrics
        for mode in ("direct", "delta")
    }


def guard_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The MDSettings of the uncertainty guard of delta-ML/MM runs (threshold, fallback, hold; the reference
    fallback is the config's reference engine)."""
    if cfg.max_uncertainty is None:
        return {}
    return {
        "max_uncertainty": cfg.max_uncertainty,
        "fallback": cfg.md_fallback,
        "fallback_hold": cfg.md_fallback_hold,
        **({"reference": cfg.reference} if cfg.md_fallback == "reference" else {}),
    }


def md_step(
    cfg: PipelineConfig, out: Path, system: Path, delta_model: Any, progress: bool, analyze_only: bool
) -> dict[str, Any]:
    """Free MD with the delta model, the baseline (``md_compare_baseline``) and a short reference stretch
    (``md_reference_steps``), each continued from its checkpoint; returns each run's run.json."""
    from qmlmm.engines import make_engine
    from qmlmm.environment import EmbeddingSettings
    from qmlmm.md.runner import MDSettings, engine_of_runs, run_md

    emb = EmbeddingSettings(cfg.cutoff, cfg.switch_width)
    threads = cfg.total_threads
    engines: dict[str, tuple[Any, Any]] = {"delta_ml": (lambda: delta_model.engine(threads), delta_model.embedding)}
    if cfg.md_compare_baseline:
        engines["baseline"] = (lambda: make_engine(cfg.baseline, threads=threads), emb)
    if cfg.md_reference_steps > 0:
        engines["reference"] = (lambda: make_engine(cfg.reference, threads=threads), emb)
    runs: dict[str, Any] = {}
    for name, (make, e_set) in engines.items():
        rdir = out / "md" / name
        n_steps = cfg.md_reference_steps if name == "reference" else cfg.md_steps
        # the (expensive) reference stretch is short: report, save frames and checkpoint more often
        n_rep = max(1, min(cfg.md_report_every, n_steps // 10)) if name == "reference" else cfg.md_report_every
        s = MDSettings(
            steps=n_steps,
            dt_fs=cfg.md_dt_fs,
            report_every=n_rep,
            dcd_every=n_rep,
            checkpoint_every=n_rep if name == "reference" else 100,
            seed=cfg.seed,
            threads=threads,
            **(guard_settings(cfg) if name == "delta_ml" else {}),
        )
        engine = engine_of_runs([rdir], make, analyze_only=analyze_only)  # refuses a run of another model
        done = (rdir / "run.json").exists() and json.loads((rdir / "run.json").read_text())["steps_done"] >= n_steps
        if done:
            log.info("[md %s] done before, reused", name)
        elif analyze_only:
            if not (rdir / "run.json").exists():
                continue
        else:
            restart = (rdir / "checkpoint.chk").exists()
            run_md(system, engine or make(), rdir, s, e_set, restart=restart, progress=progress)
        runs[name] = json.loads((rdir / "run.json").read_text())
    return runs

"""End-to-end recipes: build -> sample (baseline QM/MM) -> label (reference + baseline) -> train
(direct and delta) -> evaluate -> ML/MM and baseline MD -> analysis -> summary.

A pipeline is a YAML config (see examples/*/config.yaml) with a section per size (tiny, small,
full). Every step writes into the output folder and is skipped when its result exists, so an
interrupted run continues where it stopped (labelling and training also resume inside a step).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH
from qmlmm.errors import AnalysisError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "PipelineConfig",
    "build_step",
    "load_pipeline_config",
    "load_run_config",
    "profile_plot",
    "run_lock",
    "run_pipeline",
    "umbrella_profile",
]


@dataclass
class PipelineConfig:
    """One size of an example (all lengths nm, times fs/ps)."""

    name: str
    solutes: list[str]  # SMILES
    charge: int | None = None
    padding: float | None = None  # None: derived from the cutoff (unique periodic images, qmlmm.md.build)
    gap: float = 0.35
    equilibrate_ps: float = 10.0  # MM NPT at build time (water density)
    anchors: dict[int, list[float]] = field(default_factory=dict)  # solute index -> (p, c, s, d), see SoluteSpec
    # sampling
    sample_engine: str = "dftb3:3ob"
    sample_steps: int = 200
    sample_every: int = 10
    sample_runs: int = 1
    equil_steps: int = 1000
    cutoff: float = DEFAULT_CUTOFF
    switch_width: float = DEFAULT_SWITCH_WIDTH
    # labelling
    reference: str = "dft:b3lyp/6-31g*"
    baseline: str = "dftb3:3ob"
    workers: int = 2
    threads: int = 1
    # training
    train: dict[str, Any] = field(default_factory=dict)
    delta_hidden: list[int] | None = None
    learning_curve: list[int] | None = None  # training-set sizes for a learning curve (None: none)
    # MD with the models
    md_steps: int = 200
    md_dt_fs: float = 0.5
    md_report_every: int = 10
    md_compare_baseline: bool = True
    md_reference_steps: int = 0  # a short stretch of reference (DFT) QM/MM MD to compare with (0: none)
    max_uncertainty: float | None = None
    # analysis
    dihedral_solute: int | None = 0  # solute index whose conjugated chain dihedrals are analysed
    # solute element - water site ("OW" or "HW") radial distribution functions
    rdf_pairs: list[list[str]] = field(default_factory=lambda: _default_rdf_pairs())
    # reaction (optional): restraint rc:i,j,k,l,d (atom indices within the QM region), umbrella windows
    reaction: dict[str, Any] | None = None
    reaction_windows: str | None = None  # start:stop:n (nm), overrides reaction["windows"]
    reaction_steps: int | None = None  # MD steps per umbrella window
    # extra windows start:stop:n (nm), e.g. over the transition state where windows with the regular force
    # constant slide off to either side, with their own force constant (kJ/mol/nm^2; default the regular
    # one); numbered after the regular windows, so adding them to a finished run reuses its windows
    reaction_extra_windows: str | None = None
    reaction_extra_k: float | None = None
    sample_windows: str | None = None  # start:stop:n windows for sampling (default: the umbrella windows)
    seed: int = 0

    def __post_init__(self) -> None:
        from qmlmm.typecheck import check_field_types

        check_field_types(self, "pipeline")
        positive = ("sample_steps", "sample_every", "sample_runs", "workers", "threads", "md_steps", "md_report_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"pipeline setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("equil_steps", "md_reference_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"pipeline setting {name} must be >= 0, got {getattr(self, name)}")
        if self.sample_steps < self.sample_every:
            raise InputError(f"sample_steps ({self.sample_steps}) must be >= sample_every ({self.sample_every})")
        if not self.solutes:
            raise InputError("pipeline setting solutes names no solute")

    def validate(self) -> None:
        """Everything that can be checked before the first step runs: engine specs (options, functional,
        basis), the training settings, the embedding, windows, the reaction block, the RDF pairs."""
        from qmlmm.engines import parse_spec
        from qmlmm.environment import EmbeddingSettings
        from qmlmm.md.build import BuildSettings
        from qmlmm.md.restraints import umbrella_windows
        from qmlmm.training import TrainConfig

        for spec in (self.sample_engine, self.reference, self.baseline):
            parse_spec(spec)
        EmbeddingSettings(self.cutoff, self.switch_width)
        BuildSettings(padding=self.padding, cutoff=self.cutoff, gap=self.gap, equilibrate_ps=self.equilibrate_ps)
        if self.padding is not None and self.padding <= 0:
            raise InputError(f"pipeline setting padding must be positive, got {self.padding}")
        for mode in ("direct", "delta"):
            TrainConfig.from_dict(
                {**{"target": "ref", "seed": self.seed}, **self.train, "baseline": "base" if mode == "delta" else None}
            )
        for name in ("reaction_windows", "reaction_extra_windows", "sample_windows"):
            if getattr(self, name):
                umbrella_windows(getattr(self, name))
        if self.learning_curve is not None and (not self.learning_curve or min(self.learning_curve) < 1):
            raise InputError(f"pipeline setting learning_curve must list positive sizes, got {self.learning_curve}")
        if self.reaction is not None:
            known = {"atoms", "d", "k", "keep_together", "windows", "steps", "every", "bins", "compare_baseline"}
            unknown = sorted(set(self.reaction) - known)
            if unknown:
                raise InputError(f"unknown reaction setting(s) {unknown}; known: {sorted(known)}")
            if not isinstance(self.reaction.get("atoms"), list) or len(self.reaction["atoms"]) != 4:
                raise InputError("reaction atoms must list 4 atoms (i, j, k, l of xi = r_ij + d r_kl)")
            if not (self.reaction_windows or self.reaction.get("windows")):
                raise InputError("a reaction needs windows (reaction_windows or reaction: windows)")
            umbrella_windows(self.reaction_windows or self.reaction["windows"])
            kt = self.reaction.get("keep_together")
            if kt is not None and (not isinstance(kt, list) or len(kt) != 4):
                raise InputError("reaction keep_together must be [atom, atom, r0 (nm), k (kJ/mol/nm^2)]")

    @property
    def total_threads(self) -> int:
        """Threads for the steps that run in one process (MD, umbrella sampling): all workers' threads."""
        return self.threads * max(1, self.workers)


def _default_rdf_pairs() -> list[list[str]]:
    """A fresh copy of the analysis' default pairs (imported when needed, like the steps' modules)."""
    from qmlmm.analysis.report import DEFAULT_RDF_PAIRS

    return [list(p) for p in DEFAULT_RDF_PAIRS]


def load_pipeline_config(path: str | Path, size: str) -> PipelineConfig:
    import yaml

    try:
        d = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(d, dict) or "sizes" not in d:
        raise InputError(f"{path}: a pipeline config needs a 'sizes' mapping (tiny, small, full)")
    if size not in d["sizes"]:
        raise InputError(f"{path}: no size {size!r}; sizes: {sorted(d['sizes'])}")
    common = {k: v for k, v in d.items() if k != "sizes"}
    merged = {**common, **(d["sizes"][size] or {})}
    known = {f.name for f in fields(PipelineConfig)}
    unknown = set(merged) - known
    if unknown:
        raise InputError(f"{path}: unknown pipeline setting(s) {sorted(unknown)}")
    cfg = PipelineConfig(**merged)
    cfg.validate()
    from qmlmm.analysis.report import rdf_pair_atoms

    try:  # checked now, not after hours of labelling and MD
        rdf_pair_atoms(cfg.rdf_pairs, np.zeros(0, dtype=int), np.zeros(0, dtype=bool))
    except (InputError, KeyError, ValueError) as e:
        raise InputError(f"{path}: {e}") from e
    return cfg


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


#: the settings each step's results depend on, and the files that hold those results. A folder's
#: fingerprints.json records the values each step ran with; a changed value where results exist is refused
#: (the step would be "done before, reused" with the old value while the summary showed the new one).
STEP_SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "build": (("solutes", "charge", "padding", "gap", "equilibrate_ps", "anchors", "seed", "cutoff"), ("system",)),
    "sample": (
        (
            *("sample_engine", "sample_steps", "sample_every", "sample_runs", "equil_steps", "switch_width"),
            *("sample_windows", "reaction:atoms", "reaction:d", "reaction:k", "reaction:keep_together"),
            "reaction:windows",
        ),
        ("frames.h5", "frames.h5.parts"),
    ),
    "label": (("reference", "baseline"), ("labels.h5",)),
    "train": (("train", "delta_hidden"), ("models",)),
    "learning_curve": (("learning_curve",), ("learning_curve",)),
    "md": (("md_dt_fs", "max_uncertainty"), ("md",)),
    "reaction": (("reaction_windows", "reaction_extra_windows", "reaction_extra_k"), ("umbrella",)),
}


def _setting(cfg: PipelineConfig, key: str) -> Any:
    if key.startswith("reaction:"):
        return (cfg.reaction or {}).get(key.split(":", 1)[1])
    return getattr(cfg, key)


def step_fingerprints(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per step, the values of the settings its results depend on (JSON-normalised)."""
    return {
        step: json.loads(json.dumps({k: _setting(cfg, k) for k in keys}, default=_jsonable))
        for step, (keys, _) in STEP_SETTINGS.items()
    }


def check_fingerprints(cfg: PipelineConfig, out: Path) -> None:
    """Refuse (InputError naming the setting, its old and new value and what to delete) a config whose
    settings differ from those that made the results already in ``out``; record the current values for
    steps that have results and no record (folders from before fingerprints.json)."""
    path = out / "fingerprints.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    now = step_fingerprints(cfg)
    changed = False
    for step, (_, files) in STEP_SETTINGS.items():
        if not any((out / f).exists() for f in files):
            continue
        if step not in stored:
            stored[step], changed = now[step], True
            continue
        for key, value in now[step].items():
            if key in stored[step] and stored[step][key] != value:
                later = [f for s_, (_, fs) in STEP_SETTINGS.items() for f in fs if (out / f).exists()]
                first = list(STEP_SETTINGS).index(step)
                redo = [f for f in later if list(STEP_SETTINGS).index(_step_of(f)) >= first]
                raise InputError(
                    f"setting {key!r} changed ({stored[step][key]!r} -> {value!r}) since the {step} step ran in "
                    f"{out}: its results were made with the old value. Use a new output folder, or delete "
                    f"{', '.join(str(out / f) for f in redo)} to redo the {step} step and what follows"
                )
    if changed:
        _write_json_atomic(path, stored)


def _step_of(file: str) -> str:
    return next(s for s, (_, fs) in STEP_SETTINGS.items() if file in fs)


def record_fingerprint(cfg: PipelineConfig, out: Path, step: str) -> None:
    """Record the values ``step`` ran with (after it ran)."""
    path = out / "fingerprints.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[step] = step_fingerprints(cfg)[step]
    _write_json_atomic(path, stored)


def _step(out: Path, name: str, marker: str) -> bool:
    """True if the step's result exists (skip it)."""
    done = (out / marker).exists()
    log.info("[%s] %s", name, "done before, reused" if done else "running")
    return done


_NEEDED_FOR_ANALYSIS = ("system/meta.json", "frames.h5", "labels.h5", "models/direct.pt", "models/delta.pt")


def run_pipeline(
    cfg: PipelineConfig, out: str | Path, progress: bool = True, analyze_only: bool = False
) -> dict[str, Any]:
    """Run (or continue) the pipeline; returns the summary (also written to summary.json/.md).

    ``analyze_only``: compute nothing new (no labels, training or MD), only the evaluation, analysis,
    profiles and summary from what the folder holds (``qmlmm analyze RUN/``).
    """
    out = Path(out)
    if analyze_only:
        missing = [m for m in _NEEDED_FOR_ANALYSIS if not (out / m).exists()]
        if missing:
            raise InputError(f"{out}: no {', '.join(missing)}; run `qmlmm pipeline CONFIG -o {out}` first")
        return _run_pipeline(cfg, out, progress, analyze_only)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        return _run_pipeline(cfg, out, progress, analyze_only)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.pipeline.lock`` (holding this process's PID) while a pipeline writes to ``folder``.

    Raises InputError when a live process holds it (two runs would write the same labels and models);
    the lock of a process that no longer exists (a killed run) is taken over. Released on exit.
    """
    lock = folder / ".pipeline.lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise InputError(
                    f"{folder} is in use by another qmlmm pipeline (pid {pid}); wait for it or stop it "
                    f"(if no such run exists, delete {lock})"
                ) from None
            log.warning("taking over the stale lock %s (pid %d is gone)", lock, pid)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise InputError(f"could not take the lock {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _run_pipeline(cfg: PipelineConfig, out: Path, progress: bool, analyze_only: bool) -> dict[str, Any]:
    from qmlmm.environment import EmbeddingSettings

    if not analyze_only:  # what `qmlmm analyze RUN/` reads back
        check_fingerprints(cfg, out)
        _write_json_atomic(out / "pipeline_config.json", {f.name: getattr(cfg, f.name) for f in fields(cfg)})
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    emb = EmbeddingSettings(cfg.cutoff, cfg.switch_width)

    def timed(name: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + dt
        if not analyze_only and name in STEP_SETTINGS:
            record_fingerprint(cfg, out, name)
        if not analyze_only:  # every invocation's step times, appended as each step ends (survives a kill)
            with open(out / "timings.jsonl", "a") as f:
                f.write(json.dumps({"step": name, "seconds": dt, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    # 1. build
    t0 = time.perf_counter()
    system = out / "system"
    if not _step(out, "build", "system/meta.json"):
        build_step(cfg, system)
    timed("build", t0)
    # 2. sample with the baseline
    t0 = time.perf_counter()
    frames = out / "frames.h5"
    if not _step(out, "sample", "frames.h5"):
        # reactions: sample along the coordinate, one run per window
        from qmlmm.md.restraints import umbrella_windows
        from qmlmm.workflows.sample import SampleSettings, sample

        per_run = _reaction_restraints(
            cfg, system, umbrella_windows(cfg.sample_windows) if cfg.sample_windows else None
        )
        runs = len(per_run) if per_run else cfg.sample_runs
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
            ),
            workers=min(cfg.workers, runs),
            progress=progress,
        )
    timed("sample", t0)
    # 3. label (resumable inside)
    t0 = time.perf_counter()
    from qmlmm.workflows.label import LevelRequest, label_dataset

    labels = out / "labels.h5"
    if analyze_only:
        rep = _label_report_of(labels)
    else:
        rep = label_dataset(
            frames,
            labels,
            [LevelRequest.from_spec(cfg.reference, "ref"), LevelRequest.from_spec(cfg.baseline, "base")],
            emb,
            workers=cfg.workers,
            threads=cfg.threads,
            progress=progress,
        )
    if not rep.ok:
        log.warning(
            "labelling: %d frame(s) failed; they are left out of training", sum(len(v) for v in rep.failed.values())
        )
    timed("label", t0)
    # 4. train direct and delta (resumable inside)
    t0 = time.perf_counter()
    from qmlmm.training import TrainConfig, TrainJob, train_jobs

    models = out / "models"
    metrics: dict[str, Any] = {}
    jobs = []
    for mode in ("direct", "delta"):
        path = models / f"{mode}.pt"
        tc = TrainConfig.from_dict(
            {**{"target": "ref", "seed": cfg.seed}, **cfg.train, "baseline": "base" if mode == "delta" else None}
        )
        if mode == "delta" and cfg.delta_hidden:
            tc.hidden = list(cfg.delta_hidden)
        if path.exists():
            log.info("[train %s] done before, reused", mode)
            metrics[mode] = json.loads((models / f"{mode}.metrics.json").read_text())
            continue
        jobs.append(TrainJob(str(labels), tc, str(path), {"require": ("base",)}))
    # direct and delta side by side, one single-threaded process each (see qmlmm.training.parallel)
    for path_s, (m, _) in train_jobs(jobs, workers=min(cfg.workers, 2), progress=progress).items():
        metrics[Path(path_s).stem] = m
    from qmlmm.analysis.plots import parity_plot_of_model

    for mode in ("direct", "delta"):
        if not (models / f"{mode}.parity.png").exists():
            parity_plot_of_model(models / f"{mode}.pt")
    timed("train", t0)
    # 4b. learning curve (optional): test errors against training-set size, direct and delta
    t0 = time.perf_counter()
    curve = None
    if analyze_only and (out / "learning_curve" / "learning_curve.json").exists():
        curve = json.loads((out / "learning_curve" / "learning_curve.json").read_text())
    elif cfg.learning_curve and not analyze_only:
        from qmlmm.workflows.learning_curve import learning_curve

        lc_cfg = TrainConfig.from_dict(
            {**{"target": "ref", "seed": cfg.seed}, **cfg.train, "ensemble": 1, "baseline": "base"}
        )
        curve = learning_curve(
            labels,
            lc_cfg,
            sorted(int(n) for n in cfg.learning_curve),
            out / "learning_curve",
            progress=progress,
            hidden_by_mode={"delta": list(cfg.delta_hidden)} if cfg.delta_hidden else None,
            workers=min(cfg.workers, 2),
        )
    timed("learning_curve", t0)
    # 5. evaluate (the baseline's own errors on the same test frames come with the delta model)
    t0 = time.perf_counter()
    from qmlmm.analysis.evaluate import evaluate_model

    evals = {
        mode: evaluate_model(models / f"{mode}.pt", labels, models / f"eval_{mode}", split="test").metrics
        for mode in ("direct", "delta")
    }
    timed("evaluate", t0)
    # 6. MD: delta-ML/MM (and the baseline QM/MM for comparison)
    t0 = time.perf_counter()
    from qmlmm.engines import make_engine
    from qmlmm.md.runner import MDSettings, run_md
    from qmlmm.models import QMLMMModel

    md_runs: dict[str, Any] = {}
    delta_model = QMLMMModel.load(models / "delta.pt")
    engines = {"delta_ml": (lambda: delta_model.engine(cfg.total_threads), delta_model.embedding)}
    if cfg.md_compare_baseline:
        engines["baseline"] = (lambda: make_engine(cfg.baseline, threads=cfg.total_threads), emb)  # type: ignore[assignment, return-value]
    if cfg.md_reference_steps > 0:
        engines["reference"] = (lambda: make_engine(cfg.reference, threads=cfg.total_threads), emb)  # type: ignore[assignment, return-value]
    for name, (mk, e_set) in engines.items():
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
            threads=cfg.total_threads,
            max_uncertainty=cfg.max_uncertainty if name == "delta_ml" else None,
        )
        if (rdir / "run.json").exists() and json.loads((rdir / "run.json").read_text())["steps_done"] >= n_steps:
            log.info("[md %s] done before, reused", name)
        elif analyze_only:
            if not (rdir / "run.json").exists():
                continue
        else:
            restart = (rdir / "checkpoint.chk").exists()
            run_md(system, mk(), rdir, s, e_set, restart=restart, progress=progress)
        md_runs[name] = json.loads((rdir / "run.json").read_text())
    timed("md", t0)
    # 7. reaction: restrained run near the transition state and umbrella sampling
    t0 = time.perf_counter()
    reaction = _reaction(cfg, out, system, delta_model, emb, progress, analyze_only) if cfg.reaction else None
    timed("reaction", t0)
    # 8. analysis and summary
    t0 = time.perf_counter()
    analysis = _analysis(cfg, out, system, list(md_runs))
    timed("analysis", t0)
    summary = {
        "name": cfg.name,
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        "n_frames": _n_frames(labels),
        "label_failures": {k: len(v) for k, v in rep.failed.items()},
        "train_metrics": {m: metrics[m].get("test") for m in metrics},
        "evaluation": evals,
        "md": {
            k: {kk: v.get(kk) for kk in ("steps_done", "ns_per_day", "stopped", "qmmm_seconds_per_call")}
            for k, v in md_runs.items()
        },
        "analysis": analysis,
        "reaction": reaction,
        "learning_curve": curve,
        "timings_s": timings,
        "total_s": time.perf_counter() - t_start,
        "timings_all_s": step_seconds_all(out),
    }
    if analyze_only and (out / "summary.json").exists():  # keep the timings of the run that did the work
        before = json.loads((out / "summary.json").read_text())
        summary["timings_s"], summary["total_s"] = before.get("timings_s", timings), before.get("total_s", 0.0)
    _write_json_atomic(out / "summary.json", summary)
    tmp = out / "summary.md.tmp"
    tmp.write_text(_summary_md(summary, out))
    tmp.replace(out / "summary.md")
    return summary


def step_seconds_all(out: str | Path) -> dict[str, float]:
    """Seconds spent on each pipeline step in a run folder, summed over all the invocations that worked
    on it (its ``timings.jsonl``; a resumed run's reused steps add ~0). Empty if the folder has none."""
    p = Path(out) / "timings.jsonl"
    total: dict[str, float] = {}
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            total[rec["step"]] = total.get(rec["step"], 0.0) + float(rec["seconds"])
    return total


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _label_report_of(labels: Path) -> Any:
    """A LabelReport of the failures recorded in a labels file (nothing computed)."""
    from qmlmm.data import Dataset
    from qmlmm.workflows.label import LabelReport

    with Dataset(labels) as ds:
        return LabelReport(failed={lev: ds.errors(lev) for lev in ds.levels()})


def load_run_config(out: str | Path) -> PipelineConfig:
    """The config a pipeline folder was run with (its ``pipeline_config.json``)."""
    p, s = Path(out) / "pipeline_config.json", Path(out) / "summary.json"
    if p.exists():
        d = json.loads(p.read_text())
    elif s.exists():  # folders made before pipeline_config.json existed
        d = json.loads(s.read_text())["config"]
    else:
        raise InputError(f"{out} is not a pipeline folder (no pipeline_config.json or summary.json)")
    known = {f.name for f in fields(PipelineConfig)}
    d = {k: v for k, v in d.items() if k in known}
    d["anchors"] = {int(k): v for k, v in (d.get("anchors") or {}).items()}  # JSON made the keys strings
    return PipelineConfig(**d)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _n_frames(labels: Path) -> int:
    from qmlmm.data import Dataset

    with Dataset(labels) as ds:
        return len(ds)


def _analysis(cfg: PipelineConfig, out: Path, system: Path, runs: list[str]) -> dict[str, Any]:
    """RDFs of solute atoms to water sites and chain dihedral distributions, per MD run; plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qmlmm.analysis.md_analysis import conjugated_chain_dihedrals, load_run
    from qmlmm.analysis.report import Quad, rdf_pair_atoms, single_bond_angles, structure_observables
    from qmlmm.md.system import MDSystem

    msys = MDSystem.load(system)
    res: dict[str, Any] = {"rdf_peak": {}, "nearest_nm": {}, "dihedrals": {}}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    quads: list[Quad] = []
    off = 0
    if cfg.dihedral_solute is not None and cfg.dihedral_solute < len(cfg.solutes):
        off = int(msys.meta["solute_offsets"][cfg.dihedral_solute])
        quads = conjugated_chain_dihedrals(cfg.solutes[cfg.dihedral_solute], offset=off)
    # one label per dihedral: its solute-atom indices (RDKit order with hydrogens, as built)
    labels = ["-".join(str(int(i) - off) for i in q[:4]) + f" ({q[4]})" for q in quads]
    per_run_angles: dict[str, np.ndarray] = {}
    pair_atoms = rdf_pair_atoms(cfg.rdf_pairs, msys.numbers, msys.is_qm)
    for name in runs:
        pos, boxes = load_run(out / "md" / name)
        if len(pos) == 0 or boxes is None:
            continue
        summary, curves, ang = structure_observables(pos, boxes, pair_atoms, quads, labels)
        if summary["rdf_peak"]:
            res["rdf_peak"][name] = summary["rdf_peak"]
            res["nearest_nm"][name] = summary["nearest_nm"]
        for pair, (r, g) in curves.items():
            axes[0].plot(r, g, label=f"{name} {pair}")
        if ang is not None:
            axes[1].hist(
                single_bond_angles(ang, quads), bins=36, range=(0, 180), histtype="step", density=True, label=name
            )
            per_run_angles[name] = ang
            res["dihedrals"][name] = summary["dihedrals"]
    axes[0].set_xlabel("r (nm)")
    axes[0].set_ylabel("g(r) solute - water")
    axes[1].set_xlabel("|dihedral| around chain single bonds (deg)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "md_observables.png", dpi=110)
    plt.close(fig)
    if per_run_angles:
        _dihedral_panels(per_run_angles, labels, out / "dihedrals.png")
    return res


def _dihedral_panels(angles: dict[str, np.ndarray], labels: list[str], path: Path) -> None:
    """One histogram panel per chain dihedral (|angle|, deg), the MD runs overlaid."""
    import matplotlib.pyplot as plt

    n = len(labels)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for q, ax in enumerate(axes.ravel()):
        if q >= n:
            ax.axis("off")
            continue
        for name, ang in angles.items():
            ax.hist(np.abs(ang[:, q]), bins=36, range=(0, 180), histtype="step", density=True, label=name)
        ax.set_title(labels[q], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("|dihedral| (deg); solute atom indices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reaction_atoms(cfg: PipelineConfig, system: Path) -> tuple[list[int], list[int] | None]:
    """System indices of the reaction coordinate's atoms (i, j, k, l) and of the keep-together pair."""
    r = cfg.reaction or {}
    offsets = json.loads((system / "meta.json").read_text())["solute_offsets"]

    def atom(x: Any) -> int:  # "k:idx" = atom idx of solute k, or a plain system index
        if isinstance(x, str) and ":" in x:
            sol, idx = x.split(":")
            return int(offsets[int(sol)]) + int(idx)
        return int(x)

    kt = r.get("keep_together")
    return [atom(x) for x in r["atoms"]], ([atom(kt[0]), atom(kt[1])] if kt else None)


def _reaction_restraints(
    cfg: PipelineConfig, system: Path, r0s: list[float] | None = None, ks: list[float] | None = None
) -> list[list[str]] | None:
    """Restraint texts of each umbrella window (the coordinate restraint plus keep-together).

    ``r0s`` (nm) default to the config's regular windows; ``ks`` (kJ/mol/nm^2, one per window) to the
    reaction's force constant.
    """
    if not cfg.reaction:
        return None
    from qmlmm.md.restraints import umbrella_windows

    r = cfg.reaction
    (i, j, k, l), kt = _reaction_atoms(cfg, system)
    out = []
    centres = r0s if r0s is not None else umbrella_windows(cfg.reaction_windows or r["windows"])
    forces = ks if ks is not None else [float(r.get("k", 2000.0))] * len(centres)
    for r0, kf in zip(centres, forces, strict=True):
        w = [f"rc:{i},{j},{k},{l},{int(r.get('d', -1))},{r0},{float(kf)}"]
        if kt:
            w.append(f"dist:{kt[0]},{kt[1]},{float(r['keep_together'][2])},{float(r['keep_together'][3])}")
        out.append(w)
    return out


def _umbrella_windows(cfg: PipelineConfig, system: Path) -> list[Any]:
    """The umbrella windows of the reaction: the regular ones (config ``reaction_windows`` or the reaction's
    ``windows``, its ``k``), then the extra ones with their own force constant; each with the
    keep-together restraint (same in every window) after the coordinate restraint."""
    from qmlmm.md.restraints import DistanceRestraint, RCRestraint, Restraint, umbrella_windows
    from qmlmm.md.umbrella import make_windows

    r = cfg.reaction or {}
    (i, j, k, l), kt = _reaction_atoms(cfg, system)
    k_reg = float(r.get("k", 2000.0))
    coordinate = RCRestraint(i, j, k, l, int(r.get("d", -1)), 0.0, k_reg)
    others: list[Restraint] = (
        [DistanceRestraint(kt[0], kt[1], float(r["keep_together"][2]), float(r["keep_together"][3]))] if kt else []
    )
    return make_windows(
        coordinate,
        umbrella_windows(cfg.reaction_windows or r["windows"]),
        others,
        k_reg,
        umbrella_windows(cfg.reaction_extra_windows) if cfg.reaction_extra_windows else None,
        cfg.reaction_extra_k,
    )


def _window_samples(folder: Path, win: Any, dt_ps: float) -> dict[str, Any]:
    """A window's samples for MBAR: the coordinate (nm) from its log after the first fifth (relaxation), the
    common (keep-together) restraint energy of each sample (kJ/mol), the time between samples; {} if none."""
    from qmlmm.md.restraints import DistanceRestraint

    p = folder / "log.csv"
    if not p.exists() or len(p.read_text().splitlines()) < 2:
        return {}
    data = np.genfromtxt(p, delimiter=",", names=True)
    drop = len(np.atleast_1d(data["rc0_nm"])) // 5
    x = np.atleast_1d(data["rc0_nm"])[drop:]
    if len(x) == 0:
        return {}
    out: dict[str, Any] = {"r0": win.r0, "k": win.k, "x": x, "dt_ps": dt_ps}
    common = np.zeros(len(x))
    for n, rs in enumerate(win.restraints[1:], start=1):
        if isinstance(rs, DistanceRestraint):
            common += 0.5 * rs.k * (np.atleast_1d(data[f"rc{n}_nm"])[drop:] - rs.r0) ** 2
    if len(win.restraints) > 1:
        out["u_common"] = common
    return out


def _profile_result(wins: list[dict[str, Any]], bins: int) -> dict[str, Any]:
    """MBAR profile of windows with samples, its barriers with uncertainties, the first / second half check
    and the decorrelation per window (summary fields; ``profile_error`` when MBAR has no solution)."""
    from qmlmm.analysis.md_analysis import barrier, barrier_uncertainty, forward_barrier, free_energy_profile

    try:
        prof = free_energy_profile(wins, n_bins=bins)
    except AnalysisError as e:  # recorded; the other model's profile and the summary still come
        return {"profile_error": str(e)}
    fwd, x_top = forward_barrier(prof)
    weakest = int(np.argmin(prof["cut_overlap"]))
    # convergence check: the same analysis on the first and on the second half of every window's samples
    halves, halves_err = [], []
    for part in (0, 1):
        sub = []
        for wd in wins:
            h = len(wd["x"]) // 2
            sl = slice(0, h) if part == 0 else slice(h, None)
            if len(wd["x"][sl]):
                sub.append({**wd, "x": wd["x"][sl], **({"u_common": wd["u_common"][sl]} if "u_common" in wd else {})})
        try:  # half the samples may not overlap enough for MBAR: the check is lost, not the profile
            hp = free_energy_profile(sub, n_bins=bins)
            halves.append(forward_barrier(hp)[0])
            halves_err.append(barrier_uncertainty(hp))
        except (AnalysisError, InputError) as e:
            log.warning("umbrella: no profile from half %d of the samples (%s)", part + 1, e)
            halves.append(float("nan"))
            halves_err.append(float("nan"))
    res: dict[str, Any] = {
        "profile_ensemble": (
            "the windows' common restraints kept (the keep-together restraint, if any: the reactive pair held "
            "at its distance), the umbrella biases removed by MBAR"
        ),
        "x_nm": prof["x"].tolist(),
        "f_kjmol": prof["f"].tolist(),
        "df_kjmol": np.nan_to_num(prof["df"], nan=0.0).tolist(),  # MBAR, uncorrelated samples
        "counts": prof["counts"].tolist(),
        "barrier_kjmol": barrier(prof),  # above the higher of the two end minima (the smaller barrier)
        # from the minimum on the low-xi (reactant) side up to the highest interior point
        "barrier_forward_kjmol": fwd,
        "barrier_forward_err_kjmol": barrier_uncertainty(prof),
        "x_top_nm": x_top,
        "barrier_forward_halves_kjmol": halves,
        "barrier_forward_halves_err_kjmol": halves_err,
        # the halves agree when their difference is within the sum of their error bars
        "halves_agree": bool(abs(halves[0] - halves[1]) <= halves_err[0] + halves_err[1])
        if np.all(np.isfinite(halves + halves_err))
        else False,
        "window_statistical_inefficiency": prof["g"].tolist(),
        "window_correlation_time_ps": np.nan_to_num(prof["tau_ps"], nan=-1.0).tolist(),
        "window_uncorrelated_samples": prof["n_used"].tolist(),
        # MBAR's overlap: 0 means windows in disconnected groups; the weakest place along the coordinate
        "overlap_scalar": float(prof["overlap_scalar"]),
        "weakest_cut_overlap": float(prof["cut_overlap"][weakest]),
        "weakest_cut_nm": float(prof["cut_nm"][weakest]),
    }
    if "f_unbiased" in prof:  # the keep-together restraint removed by reweighting (a known bias)
        fu, xu = forward_barrier(prof, "f_unbiased")
        res.update(
            f_unbiased_kjmol=np.nan_to_num(prof["f_unbiased"], nan=0.0).tolist(),
            df_unbiased_kjmol=np.nan_to_num(prof["df_unbiased"], nan=0.0).tolist(),
            barrier_forward_unbiased_kjmol=fu,
            barrier_forward_unbiased_err_kjmol=barrier_uncertainty(prof, "f_unbiased"),
            x_top_unbiased_nm=xu,
            ess_unbiased=float(prof["ess_unbiased"]),
        )
    return res


def umbrella_profile(
    cfg: PipelineConfig,
    out: Path,
    system: Path,
    name: str,
    make: Any,
    embedding: Any,
    progress: bool = True,
    analyze_only: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) the umbrella windows of the reaction for one engine (``make()`` builds it) into
    ``out/umbrella/<name>`` and return its summary entry: windows, samples, the MBAR profile and its checks
    (:func:`_profile_result`). ``analyze_only`` reads what the folder holds."""
    from qmlmm.md.runner import MDSettings
    from qmlmm.md.umbrella import run_windows, window_folder

    r = cfg.reaction or {}
    wins = _umbrella_windows(cfg, system)
    steps = int(cfg.reaction_steps or r.get("steps", cfg.md_steps))
    every = int(r.get("every", 5))
    folder = out / "umbrella" / name
    if not analyze_only:
        s = MDSettings(
            steps=steps,
            dt_fs=cfg.md_dt_fs,
            report_every=every,
            dcd_every=steps,
            seed=cfg.seed,
            threads=cfg.total_threads,
            max_uncertainty=cfg.max_uncertainty if name == "delta_ml" else None,  # as in the free MD
        )
        run_windows(system, make(), folder, wins, s, embedding, progress=progress)
    stopped: dict[int, str] = {}
    samples = []
    for w in wins:
        d = window_folder(folder, w.index)
        if (d / "run.json").exists():
            info = json.loads((d / "run.json").read_text())
            if info.get("stopped") or info.get("steps_done", 0) < steps:
                stopped[w.index] = info.get("stopped") or f"{info.get('steps_done', 0)} of {steps} steps"
        elif not analyze_only:
            stopped[w.index] = "failed to start (see the log)"
        samples.append(_window_samples(d, w, every * cfg.md_dt_fs / 1000.0))
    res: dict[str, Any] = {
        "windows": len(wins),
        "steps_per_window": steps,
        "window_centres_nm": [w.r0 for w in wins],
        "window_k": [w.k for w in wins],
        "window_mean_nm": [float(np.mean(sm["x"])) if sm else float("nan") for sm in samples],
        "windows_stopped_early": dict(sorted(stopped.items())),
        "samples_per_window": [len(sm.get("x", [])) for sm in samples],  # after dropping the first fifth
        "x_nm": [],
        "f_kjmol": [],
        "barrier_kjmol": float("nan"),
    }
    with_samples = [sm for sm in samples if sm]
    if len(with_samples) < 2:
        log.warning("umbrella %s: fewer than two windows with samples; no profile", name)
        return res
    res.update(_profile_result(with_samples, int(r.get("bins", 25))))
    if "profile_error" in res:
        log.error("umbrella %s: no profile: %s", name, res["profile_error"])
    return res


def profile_plot(result: dict[str, Any], path: Path) -> None:
    """The free-energy profiles of ``result`` (model name -> umbrella_profile entry) with MBAR error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in result.items():
        if res.get("f_kjmol"):
            ax.errorbar(res["x_nm"], res["f_kjmol"], yerr=res["df_kjmol"], fmt="o-", ms=4, capsize=2, label=name)
    ax.set_xlabel("reaction coordinate (nm)")
    ax.set_ylabel("free energy (kJ/mol)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reaction(
    cfg: PipelineConfig, out: Path, system: Path, model: Any, emb: Any, progress: bool, analyze_only: bool = False
) -> dict[str, Any]:
    """Umbrella sampling along the reaction coordinate (:mod:`qmlmm.md.umbrella`: windows chained from
    their neighbours' final positions and velocities), an MBAR profile per model, delta-ML/MM vs
    baseline."""
    from qmlmm.engines import make_engine

    r = cfg.reaction or {}
    threads = cfg.total_threads
    makers = {"delta_ml": (lambda: model.engine(threads), model.embedding)}
    if r.get("compare_baseline", True):
        makers["baseline"] = (lambda: make_engine(cfg.baseline, threads=threads), emb)
    result = {
        name: umbrella_profile(cfg, out, system, name, mk, e_set, progress, analyze_only)
        for name, (mk, e_set) in makers.items()
    }
    profile_plot(result, out / "free_energy_profile.png")
    return result


def _summary_md(s: dict[str, Any], out: Path) -> str:
    lines = [
        f"# {s['name']}: summary",
        "",
        f"{s['n_frames']} frames labelled; total time {s['total_s']:.0f} s.",
        "",
        "## Test-set errors (energies kJ/mol, forces kJ/mol/nm)",
        "",
        "| model | energy MAE | QM force MAE | MM force MAE |",
        "|---|---|---|---|",
    ]
    for mode, ev in s["evaluation"].items():
        m = ev["model"]
        lines.append(
            f"| {mode} | {m['energy']['mae']:.3f} | {m['qm_forces']['mae']:.2f} | {m['mm_forces']['mae']:.3f} |"
        )
    b = s["evaluation"].get("delta", {}).get("baseline_alone")
    if b:
        lines.append(
            f"| baseline alone (shifted) | {b['energy']['mae']:.3f} | {b['qm_forces']['mae']:.2f} | "
            f"{b['mm_forces']['mae']:.3f} |"
        )
    curves = (s.get("learning_curve") or {}).get("curves", {})
    if curves:
        lines += [
            "",
            "## Learning curve (test set)",
            "",
            "| model | train frames | energy MAE | QM force MAE | MM force MAE |",
            "|---|---|---|---|---|",
        ]
        for mode, pts in curves.items():
            for p in pts:
                lines.append(
                    f"| {mode} | {p['n_train']} | {p['energy_mae']:.3f} | {p['qm_forces_mae']:.2f} | "
                    f"{p['mm_forces_mae']:.3f} |"
                )
    lines += ["", "## MD", "", "| run | steps | ns/day | stopped |", "|---|---|---|---|"]
    for k, v in s["md"].items():
        lines.append(f"| {k} | {v['steps_done']} | {v['ns_per_day']:.3f} | {v['stopped'] or '-'} |")
    an = s.get("analysis") or {}
    if an.get("rdf_peak") or an.get("dihedrals"):
        lines += [
            "",
            "## MD observables",
            "",
            "| run | RDF solute - water: r (nm), g at the maximum | nearest pair (nm), mean over frames "
            "| chain single bonds: mean abs dihedral (deg), s-trans fraction |",
            "|---|---|---|---|",
        ]
        for run in s["md"]:
            pk, dh = an.get("rdf_peak", {}).get(run) or {}, an.get("dihedrals", {}).get(run)
            near = an.get("nearest_nm", {}).get(run) or {}
            rdf_txt = "; ".join(f"{pair} {v['r_nm']:.3f}, {v['g']:.2f}" for pair, v in pk.items()) or "-"
            near_txt = "; ".join(f"{pair} {v:.3f}" for pair, v in near.items()) or "-"
            dih_txt = f"{dh['mean_abs_single_deg']:.1f}, {dh['frac_s_trans']:.3f}" if dh else "-"
            lines.append(f"| {run} | {rdf_txt} | {near_txt} | {dih_txt} |")
    if s.get("reaction"):
        lines += ["", "## Free-energy profile (umbrella sampling, MBAR)", ""]
        for k, v in s["reaction"].items():
            early = v.get("windows_stopped_early", {})
            lines.append(
                f"- {k}: forward barrier {v.get('barrier_forward_kjmol', float('nan')):.1f} "
                f"+- {v.get('barrier_forward_err_kjmol', float('nan')):.1f} kJ/mol "
                f"(top at {v.get('x_top_nm', float('nan')):.3f} nm), barrier above the higher end minimum "
                f"{v['barrier_kjmol']:.1f} kJ/mol; {v.get('windows', '?')} windows"
                + (f", {len(early)} stopped early (see summary.json)" if early else "")
                + (
                    "; from the first / second half of every window's samples: "
                    + " / ".join(
                        f"{b:.1f} +- {e:.1f}"
                        for b, e in zip(
                            v["barrier_forward_halves_kjmol"],
                            v.get("barrier_forward_halves_err_kjmol", [float("nan")] * 2),
                            strict=True,
                        )
                    )
                    + f" kJ/mol ({'agree' if v.get('halves_agree') else 'do not agree'} within their error bars)"
                    if v.get("barrier_forward_halves_kjmol")
                    else ""
                )
                + (
                    f"; keep-together restraint removed by reweighting: {v['barrier_forward_unbiased_kjmol']:.1f} "
                    f"+- {v['barrier_forward_unbiased_err_kjmol']:.1f} kJ/mol (effective samples "
                    f"{v['ess_unbiased']:.0f})"
                    if "barrier_forward_unbiased_kjmol" in v
                    else ""
                )
                + (
                    f"; correlation time per window {min(v['window_correlation_time_ps']):.3f}-"
                    f"{max(v['window_correlation_time_ps']):.3f} ps"
                    if v.get("window_correlation_time_ps")
                    else ""
                )
                + (
                    f"; weakest overlap across the coordinate {v['weakest_cut_overlap']:.4f} at "
                    f"{v['weakest_cut_nm']:.3f} nm"
                    if "weakest_cut_overlap" in v
                    else ""
                )
                + (f"; no profile: {v['profile_error']}" if v.get("profile_error") else "")
            )
    every = s.get("timings_all_s") or {}
    lines += ["", "## Timings (s)", "", "| step | this invocation | all invocations on this folder |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {every.get(k, float('nan')):.0f} |" for k, v in s["timings_s"].items()]
    plots = sorted(p.name for p in out.glob("*.png")) + sorted(
        str(p.relative_to(out)) for p in [*out.glob("models/*.png"), *out.glob("learning_curve/*.png")]
    )
    lines += ["", "## Plots", ""] + [f"- {p}" for p in plots]
    return "\n".join(lines) + "\n"

"""The validation step: MD runs with the reference, the baseline and both models, and the observables
that say whether ML/MM MD reproduces reference QM/MM MD (``qmlmm.analysis.validation``).

Run k of every driver starts from the built structure with the solute's backbone set to
``starts[k % len(starts)]`` (phi, psi; by default one conformation in each of four basins), the water
MM-relaxed around it and velocities drawn with a seed of its own (driver and run). Runs from
different basins show whether a run is long enough to forget its start; the comparison between
drivers exchanges runs only within a start (``compare_drivers``' strata). The first ``skip_ps`` of
every run is left out of the observables. With ``refit``, one active-learning round follows
(:mod:`qmlmm.workflows.pipeline.refit`): the guarded runs' queued frames labelled, the models retrained
with them, and their unguarded runs repeated as drivers ``<mode>_refit``. Writes
``RUN/validation/<driver>/run<k>/`` (``qmlmm md`` folders, resumable) and
``RUN/validation/validation.{json,md,png}``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.errors import InputError, SchemaError
from qmlmm.workflows.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

__all__ = [
    "DRIVERS",
    "ValidationSettings",
    "check_solute",
    "relocate_clashing_waters",
    "start_positions",
    "validation_md_settings",
    "validation_start",
    "validation_starts",
    "validation_step",
]

#: what drives the validation runs: the reference engine, the baseline engine, the delta and direct models,
#: and the same models with the uncertainty guard (a step whose ensemble energy spread exceeds
#: ``max_uncertainty`` is taken from the ``fallback`` engine; the run goes on)
DRIVERS: tuple[str, ...] = ("reference", "baseline", "delta", "direct", "delta_guarded", "direct_guarded")


@dataclass
class ValidationSettings:
    """A config's ``validation`` block (time fs/ps, masses amu)."""

    runs: int = 4
    steps: int = 2500  # per run
    dt_fs: float = 2.0
    hmr_amu: float | None = 3.024  # hydrogen mass repartitioning for the 2 fs step (docs/md.md)
    every: int = 10  # steps between saved frames
    skip_ps: float = 1.0  # left out of the observables at the start of every run
    temperature: float = 300.0
    drivers: list[str] = field(default_factory=lambda: list(DRIVERS[:4]))
    # one active-learning round after the runs (qmlmm.workflows.pipeline.refit): the guarded runs' queued
    # frames labelled, each guarded mode's model retrained with them, its unguarded runs repeated as
    # driver <mode>_refit
    refit: bool = False
    # the guarded drivers: above this ensemble energy spread (kJ/mol) a step's forces come from the
    # fallback, "reference" (the config's reference engine) or "baseline" (delta only: its own baseline)
    max_uncertainty: float = 15.0
    fallback: str = "reference"
    solute: int = 0  # the solute whose backbone phi/psi are analysed
    n_bins: int = 18  # Ramachandran histogram bins per angle (20 deg)
    # (phi, psi) deg of each start: PII, alpha_R, C7eq, beta; run k starts from entry k % len; None: every
    # run from the built structure. The pipeline's sampling runs start from the same conformations (run r
    # from entry r % len), so that the models are trained where the validation runs go
    starts: list[list[float]] | None = field(
        default_factory=lambda: [[-75.0, 145.0], [-70.0, -40.0], [-80.0, 75.0], [-150.0, 155.0]]
    )

    def __post_init__(self) -> None:
        from qmlmm.typecheck import check_field_types

        check_field_types(self, "validation")
        if self.runs < 2:
            raise InputError(
                f"validation runs must be at least 2 (the noise comes from independent runs), got {self.runs}"
            )
        unknown = sorted(set(self.drivers) - set(DRIVERS))
        if unknown or "reference" not in self.drivers:
            raise InputError(
                f"validation drivers must include 'reference' and be among {list(DRIVERS)}, got {self.drivers}"
            )
        for name in ("steps", "every", "n_bins"):
            if getattr(self, name) < 1:
                raise InputError(f"validation {name} must be at least 1, got {getattr(self, name)}")
        for name, ok, want in [
            ("dt_fs", 0 < self.dt_fs <= 10, "in (0, 10] fs"),
            ("temperature", self.temperature > 0, "positive (K)"),
            ("max_uncertainty", self.max_uncertainty > 0, "positive (kJ/mol)"),
            ("fallback", self.fallback in ("reference", "baseline"), "'reference' or 'baseline'"),
            ("solute", self.solute >= 0, ">= 0"),
            (
                "starts",
                self.starts is None or (bool(self.starts) and all(len(x) == 2 for x in self.starts)),
                "None or a list of [phi, psi] (deg)",
            ),
        ]:
            if not ok:
                raise InputError(f"validation {name} must be {want}, got {getattr(self, name)!r}")
        if self.refit and not any(d.endswith("_guarded") for d in self.drivers):
            raise InputError(
                "validation refit needs a guarded driver (delta_guarded or direct_guarded): the frames its runs "
                "queue are what the refit round adds to training"
            )
        twins = [d.removesuffix("_guarded") for d in self.drivers if d.endswith("_guarded")]
        if self.refit and not set(twins) <= set(self.drivers):
            raise InputError(
                f"validation refit repeats the unguarded runs of {twins} with the retrained models: "
                f"drivers must include {twins} too (the runs they are compared with), got {self.drivers}"
            )
        if self.fallback == "baseline" and "direct_guarded" in self.drivers:
            raise InputError("validation fallback 'baseline' is for delta models; direct_guarded needs 'reference'")
        if self.skip_ps < 0 or self.skip_ps >= self.steps * self.dt_fs * 1e-3:
            raise InputError(
                f"validation skip_ps ({self.skip_ps}) must be >= 0 and shorter than a run "
                f"({self.steps} x {self.dt_fs} fs = {self.steps * self.dt_fs * 1e-3} ps)"
            )
        if self.steps // self.every - round(self.skip_ps * 1e3 / (self.dt_fs * self.every)) < 2:
            raise InputError("validation keeps fewer than 2 frames a run: more steps, a smaller every or skip_ps")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidationSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown validation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def start_of(self, k: int) -> int:
        """Index into ``starts`` of run ``k`` (0 for every run without starts)."""
        return k % len(self.starts) if self.starts else 0

    @property
    def skip_frames(self) -> int:
        return round(self.skip_ps * 1e3 / (self.dt_fs * self.every))


def _model_of(driver: str) -> str:
    """The model or engine a driver runs: ``delta`` for delta, delta_guarded and delta_refit."""
    return driver.removesuffix("_guarded").removesuffix("_refit")


def _engine_maker(cfg: PipelineConfig, models: Path, driver: str, threads: int) -> tuple[Any, Any]:
    """(a function making the driver's engine, its embedding settings)."""
    from qmlmm.engines import make_engine
    from qmlmm.environment import EmbeddingSettings

    emb = EmbeddingSettings(cfg.cutoff, cfg.switch_width)
    if driver in ("reference", "baseline"):
        spec = cfg.reference if driver == "reference" else cfg.baseline
        return (lambda: make_engine(spec, threads=threads)), emb
    from qmlmm.models import QMLMMModel

    model = QMLMMModel.load(models / f"{_model_of(driver)}.pt")
    return (lambda: model.engine(threads)), model.embedding


def _run_dir(out: Path, driver: str, k: int) -> Path:
    return out / "validation" / driver / f"run{k}"


def start_positions(positions: np.ndarray, smiles: str, offset: int, phi: float, psi: float) -> np.ndarray:
    """``positions`` (N, 3) nm with the solute's residue (SMILES, atoms from ``offset`` in RDKit order with
    hydrogens, whole as built) set to ``phi`` and ``psi`` (deg) by rotation about its N-CA and CA-C' bonds
    (RDKit moves the side of the dihedral's last atom). Returns a new (N, 3) array."""
    from rdkit import Chem
    from rdkit.Chem import rdMolTransforms
    from rdkit.Geometry import Point3D

    from qmlmm.analysis.validation import peptide_sites

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    n = mol.GetNumAtoms()
    conf = Chem.Conformer(n)
    for i in range(n):
        x, y, z = (10.0 * positions[offset + i]).tolist()  # nm -> Angstrom
        conf.SetAtomPosition(i, Point3D(x, y, z))
    mol.AddConformer(conf, assignId=True)
    c = mol.GetConformer()
    sites = peptide_sites(smiles)
    rdMolTransforms.SetDihedralDeg(c, *sites.phi, float(phi))
    rdMolTransforms.SetDihedralDeg(c, *sites.psi, float(psi))
    out = np.array(positions, dtype=float, copy=True)
    out[offset : offset + n] = np.asarray(c.GetPositions()) / 10.0
    return out


def validation_start(cfg: PipelineConfig, vs: ValidationSettings, msys: Any, i: int) -> np.ndarray:
    """Start ``i`` (N, 3) nm of the validation runs (and the pipeline's sampling runs): the built structure
    with the solute's backbone at ``vs.starts[i]`` and the waters it displaced moved; the built structure
    itself when ``vs.starts`` is None (``i`` 0 only)."""
    if not vs.starts:
        if i != 0:
            raise InputError(f"validation start {i}: without `starts` there is one start, the built structure")
        return np.array(msys.positions, dtype=float)
    off = int(msys.meta["solute_offsets"][vs.solute])
    pos = start_positions(msys.positions, cfg.solutes[vs.solute], off, *vs.starts[i])
    return relocate_clashing_waters(pos, msys.is_qm, msys.mol_ids, msys.box, seed=i)


def validation_starts(cfg: PipelineConfig, vs: ValidationSettings, msys: Any) -> list[np.ndarray]:
    """Every start (:func:`validation_start`) as a list of (N, 3) nm arrays."""
    return [validation_start(cfg, vs, msys, i) for i in range(len(vs.starts) if vs.starts else 1)]


def relocate_clashing_waters(
    positions: np.ndarray, is_qm: np.ndarray, mol_ids: np.ndarray, box: np.ndarray, min_nm: float = 0.22, seed: int = 0
) -> np.ndarray:
    """``positions`` (N, 3) nm with every MM molecule that has an atom within ``min_nm`` of a QM atom
    (minimum image, box (3, 3) nm) moved, whole, to a random place in the box where all its atoms are at
    least ``min_nm`` from every other atom. A solute turned into a new conformation can sweep through
    water that an MM relaxation cannot push out: TIP3P hydrogens have no Lennard-Jones term and the QM
    atoms no MM charges, so a water H inside a QM atom feels nothing there. Returns a new array."""
    from qmlmm.system import minimum_image

    pos = np.array(positions, dtype=float, copy=True)
    rng = np.random.default_rng(seed)
    qm = np.flatnonzero(is_qm)

    def nearest(p: np.ndarray, others: np.ndarray) -> float:
        d = minimum_image(p[:, None, :] - pos[others][None, :, :], box)
        return float(np.sqrt((d * d).sum(-1)).min())

    mm = np.flatnonzero(~is_qm)
    d = minimum_image(pos[mm][:, None, :] - pos[qm][None, :, :], box)
    close = mm[np.sqrt((d * d).sum(-1)).min(1) < min_nm]
    for mid in np.unique(mol_ids[close]):
        atoms = np.flatnonzero((mol_ids == mid) & ~is_qm)
        rest = np.setdiff1d(np.arange(len(pos)), atoms)
        shape = pos[atoms] - pos[atoms].mean(0)
        for _ in range(10000):
            trial = shape + rng.random(3) @ box
            if nearest(trial, rest) >= min_nm:
                pos[atoms] = trial
                break
        else:
            raise InputError(f"no room in the box for MM molecule {mid} displaced by the solute's new conformation")
    return pos


def _guard(cfg: PipelineConfig, vs: ValidationSettings, driver: str) -> dict[str, Any]:
    """MDSettings fields of the uncertainty guard: none for an unguarded driver."""
    if not driver.endswith("_guarded"):
        return {}
    return {"max_uncertainty": vs.max_uncertainty, "fallback": vs.fallback, "reference": cfg.reference}


def validation_md_settings(cfg: PipelineConfig, vs: ValidationSettings, driver: str, k: int) -> Any:
    """The ``MDSettings`` of run ``k`` of ``driver``: ``vs.steps`` steps of ``vs.dt_fs`` at ``vs.temperature``,
    a frame every ``vs.every``, the config's threads, the driver's uncertainty guard, and the run's seed
    (every run its own noise; a guarded run its unguarded twin's seed, though not its trajectory: measured,
    the twins' waters differ 20 fs in; a refit run the seed of its pipeline model's run). Benchmarks that
    vary one setting take ``dataclasses.replace`` of it."""
    from qmlmm.md.runner import MDSettings

    return MDSettings(
        steps=vs.steps,
        dt_fs=vs.dt_fs,
        temperature=vs.temperature,
        report_every=vs.every,
        dcd_every=vs.every,
        checkpoint_every=max(vs.every, 250),
        seed=cfg.seed + 1 + k + 1000 * (1 + DRIVERS.index(_model_of(driver))),
        threads=cfg.total_threads,
        hmr_amu=vs.hmr_amu,
        **_guard(cfg, vs, driver),
    )


def _check_same_guard(rdir: Path, rec: dict[str, Any], guard: dict[str, Any]) -> None:
    """Raise InputError when the run in ``rdir`` (its run.json ``rec``) had another uncertainty guard."""
    was = {k: rec.get("settings", {}).get(k) for k in ("max_uncertainty", "fallback")}
    now = {"max_uncertainty": guard.get("max_uncertainty"), "fallback": guard.get("fallback", "stop")}
    if rec.get("settings") and was != now:
        raise InputError(
            f"{rdir} was run with the uncertainty guard {was}, this config asks for {now}; delete {rdir.parent} "
            "to rerun that driver's validation runs"
        )


def _run_all(
    cfg: PipelineConfig,
    vs: ValidationSettings,
    out: Path,
    system: Path,
    models: Path,
    progress: bool,
    drivers: list[str] | None = None,
) -> None:
    """Every driver's runs (``drivers``, default ``vs.drivers``; models from ``models``, a refit driver's from
    the refit round's folder; runs under ``out/validation``), each resumed from its checkpoint or skipped
    when finished or stopped. Run k of every driver before run k + 1 of any: stopped part-way, the
    validation has the same runs of each."""
    from qmlmm.md.runner import StartState, require_same_engine, run_md
    from qmlmm.md.system import MDSystem
    from qmlmm.workflows.pipeline.refit import refit_folder

    threads = cfg.total_threads
    msys = MDSystem.load(system)
    starts: dict[int, np.ndarray] = {}  # made when first needed: the free-space search takes seconds

    def start_at(i: int) -> np.ndarray:
        if i not in starts:
            starts[i] = validation_start(cfg, vs, msys, i)
        return starts[i]

    drivers = vs.drivers if drivers is None else drivers
    folder = {d: refit_folder(out) / "models" if d.endswith("_refit") else models for d in drivers}
    makers = {d: _engine_maker(cfg, folder[d], d, threads) for d in drivers}
    for k in range(vs.runs):
        for driver in drivers:
            make, emb = makers[driver]
            rdir = _run_dir(out, driver, k)
            if (rdir / "run.json").exists():
                require_same_engine(rdir, make(), redo=rdir.parent)  # not compared under the wrong name
                rec = json.loads((rdir / "run.json").read_text())
                _check_same_guard(rdir, rec, _guard(cfg, vs, driver))
                if rec["steps_done"] >= vs.steps or rec.get("stopped"):
                    continue
            log.info("[validation] %s run %d of %d", driver, k + 1, vs.runs)
            s = validation_md_settings(cfg, vs, driver, k)
            what = f"at phi, psi = {vs.starts[vs.start_of(k)]} deg" if vs.starts else "as built"
            start = StartState(start_at(vs.start_of(k)), None, f"built structure {what}")
            run_md(
                system, make(), rdir, s, emb, restart=(rdir / "checkpoint.chk").exists(), progress=progress, start=start
            )


def _check_engines(cfg: PipelineConfig, vs: ValidationSettings, out: Path, models: Path) -> None:
    """Raise InputError when a validation run on disk was made by another engine or model than its driver
    names now (an analysis would show it under the wrong name)."""
    from qmlmm.md.runner import engine_of_runs
    from qmlmm.workflows.pipeline.refit import REFIT_MODES, refit_folder

    refits = [f"{m}_refit" for m in REFIT_MODES if vs.refit and f"{m}_guarded" in vs.drivers]
    for driver in [*vs.drivers, *refits]:
        folder = refit_folder(out) / "models" if driver in refits else models
        if driver not in ("reference", "baseline") and not (folder / f"{_model_of(driver)}.pt").exists():
            continue  # runs of a model since gone are not analysed
        runs = [_run_dir(out, driver, k) for k in range(vs.runs)]

        def make(driver: str = driver, folder: Path = folder) -> Any:
            return _engine_maker(cfg, folder, driver, 1)[0]()

        engine_of_runs(runs, make, redo=runs[0].parent, analyze_only=True)


def _observables(
    cfg: PipelineConfig, vs: ValidationSettings, out: Path, system: Path, drivers: list[str] | None = None
) -> tuple[dict[str, list[Any]], dict[str, list[int]], dict[str, dict[str, str]]]:
    """Per driver (``drivers``, default ``vs.drivers``), the RunObservables of every run that has a run.json
    and frames past ``skip_ps`` and did not stop early, the start index of each of those runs, and the runs
    that stopped early (driver -> run -> where, why), which the statistics leave out."""
    from qmlmm.analysis.md_analysis import load_run
    from qmlmm.analysis.validation import peptide_sites, run_observables, water_donors
    from qmlmm.md.system import MDSystem

    msys = MDSystem.load(system)
    sites = peptide_sites(cfg.solutes[vs.solute], int(msys.meta["solute_offsets"][vs.solute]))
    oh = water_donors(msys.numbers, msys.mol_ids, msys.is_qm)
    w_o, w_h = np.unique(oh[:, 0]), oh[:, 1]
    res: dict[str, list[Any]] = {}
    strata: dict[str, list[int]] = {}
    stopped: dict[str, dict[str, str]] = {}
    for driver in vs.drivers if drivers is None else drivers:
        res[driver], strata[driver] = [], []
        for k in range(vs.runs):
            rdir = _run_dir(out, driver, k)
            if not (rdir / "traj.dcd").exists() or not (rdir / "run.json").exists():
                continue  # not run yet, or killed before its first run.json
            rec = json.loads((rdir / "run.json").read_text())
            if rec.get("stopped"):  # left out: its last frames can be of a molecule coming apart
                stopped.setdefault(driver, {})[f"run{k}"] = f"step {rec['steps_done']}: {rec['stopped']}"
                continue
            try:
                pos, boxes = load_run(rdir)
            except SchemaError:  # stopped before its first frame: nothing to analyse
                continue
            pos, boxes = pos[vs.skip_frames :], None if boxes is None else boxes[vs.skip_frames :]
            if len(pos) < 2 or boxes is None:
                continue
            ro = run_observables(pos, boxes, sites, w_o, w_h, oh)
            # every invocation's speed (a run resumed for its last steps would report those alone)
            ro.ns_per_day = rec.get("ns_per_day_all", rec.get("ns_per_day")) or None  # 0.0: nothing integrated
            ro.fallback_steps = int(rec.get("fallback_steps_total", rec.get("fallback_steps")) or 0)
            ro.stratum = vs.start_of(k)
            res[driver].append(ro)
            strata[driver].append(vs.start_of(k))
    return res, strata, stopped


def check_solute(cfg: PipelineConfig, vs: ValidationSettings) -> None:
    """Raise InputError, before any run, when ``vs.solute`` names no solute or one without a residue
    between two peptide bonds."""
    from qmlmm.analysis.validation import peptide_sites

    if vs.solute >= len(cfg.solutes):
        raise InputError(f"validation solute {vs.solute}: the config has {len(cfg.solutes)} solute(s)")
    peptide_sites(cfg.solutes[vs.solute])


def _runs_and_refit(
    cfg: PipelineConfig,
    vs: ValidationSettings,
    out: Path,
    system: Path,
    models: Path,
    progress: bool,
    analyze_only: bool,
) -> dict[str, Any] | None:
    """Every driver's runs (unless ``analyze_only``), then, with ``vs.refit``, the refit round
    (:func:`qmlmm.workflows.pipeline.refit.refit_models`) and its drivers' runs. Returns the round's record
    (None without ``refit``, or, ``analyze_only``, before the round ran)."""
    from qmlmm.workflows.pipeline.refit import REFIT_MODES, refit_models, refit_record

    if analyze_only:
        _check_engines(cfg, vs, out, models)
        return refit_record(out) if vs.refit else None
    _run_all(cfg, vs, out, system, models, progress)
    if not vs.refit:
        return None
    modes = [m for m in REFIT_MODES if f"{m}_guarded" in vs.drivers]
    rec = refit_models(cfg, out, modes, vs.runs, progress)
    _run_all(cfg, vs, out, system, models, progress, drivers=[f"{m}_refit" for m in modes if rec[m]["model"]])
    return rec


def validation_step(
    cfg: PipelineConfig, out: Path, system: Path, models: Path, progress: bool, analyze_only: bool
) -> dict[str, Any] | None:
    """Run (unless ``analyze_only``) and analyse the validation runs; None when the config has no
    ``validation`` block. Returns per driver its statistics and, for every driver but the reference,
    its comparison with the reference (``qmlmm.analysis.validation.compare_drivers``)."""
    if cfg.validation is None:
        return None
    from qmlmm.analysis.validation import compare_drivers, driver_statistics
    from qmlmm.workflows.pipeline.summary import _write_json_atomic

    vs = ValidationSettings.from_dict(cfg.validation)
    check_solute(cfg, vs)
    refit = _runs_and_refit(cfg, vs, out, system, models, progress, analyze_only)
    # a refit driver's runs are analysed when the round made its model (runs of a model since gone are not)
    refitted = [f"{m}_refit" for m, r in (refit or {}).items() if r.get("model")]
    obs, strata, stopped = _observables(cfg, vs, out, system, [*vs.drivers, *refitted])
    stats = {d: driver_statistics(r, vs.n_bins) for d, r in obs.items() if r}
    ref = obs.get("reference") or []
    comparisons = {
        d: compare_drivers(ref, r, vs.n_bins, strata["reference"], strata[d])
        for d, r in obs.items()
        if d != "reference" and len(r) >= 2 and len(ref) >= 2 and set(strata[d]) & set(strata["reference"])
    }
    missing = {d: vs.runs - len(r) for d, r in obs.items() if len(r) < vs.runs}
    if missing:
        log.warning("validation: runs not analysed (not run, killed early, or stopped): %s", missing)
    res = {
        "settings": asdict(vs),
        "production_ps_per_run": (vs.steps - vs.skip_frames * vs.every) * vs.dt_fs * 1e-3,
        "drivers": stats,
        "against_reference": comparisons,
        "runs_stopped": stopped,
        "runs_analysed": {d: len(r) for d, r in obs.items()},
        "refit": refit,
    }
    vdir = out / "validation"
    vdir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(vdir / "validation.json", res)
    from qmlmm.analysis.plots import validation_plot
    from qmlmm.analysis.tables import validation_markdown

    validation_plot(stats, {d: r for d, r in obs.items() if r}, vdir / "validation.png")
    tmp = vdir / "validation.md.tmp"
    tmp.write_text(validation_markdown(res))
    tmp.replace(vdir / "validation.md")
    return res

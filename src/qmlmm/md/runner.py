"""``qmlmm md``: QM/MM or ML/MM molecular dynamics with OpenMM.

Writes into the run folder: ``traj.dcd``, ``log.csv`` (step, time, potential, kinetic and total
energy, temperature, model uncertainty, restraint coordinates), ``checkpoint.chk`` (restart with
``restart=True``: continues and appends), ``run.json`` (settings and speed), and, when the run is
stopped (non-finite forces, uncertainty above the threshold), ``last_good_state.xml`` with the state
before the failing stretch and the reason in ``run.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.engines.base import Engine
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import EngineError, InputError, QMLMMError
from qmlmm.md.hmr import H_MASS_RANGE_AMU
from qmlmm.md.qmforce import QMMMCallback, UncertainFrames, make_python_force
from qmlmm.md.restraints import Restraint, add_restraints, rc_value
from qmlmm.md.system import (
    MDSystem,
    concurrent_baseline_fits,
    cpu_properties,
    engine_threads_in_md,
    openmm_seed,
)
from qmlmm.units import KB_KJMOL_PER_K

log = logging.getLogger(__name__)

__all__ = [
    "MDSettings",
    "MDResult",
    "StartState",
    "energy_drift",
    "freeze_qm_and_relax_water",
    "load_final_state",
    "make_simulation",
    "engine_of_runs",
    "require_same_engine",
    "run_md",
    "trim_run_to_step",
]


@dataclass
class StartState:
    """Where a run starts: positions (N, 3) nm and, to continue a trajectory, velocities (N, 3) nm/ps.

    With velocities the run continues that trajectory as it is: no MM-only relaxation, no new draw
    (the solvent keeps its response to the solute, e.g. from the neighbouring umbrella window). Without
    them, velocities are drawn at the run's temperature. ``source`` says where the state came from.
    """

    positions: np.ndarray
    velocities: np.ndarray | None = None
    source: str = ""


def load_final_state(run_dir: str | Path) -> StartState | None:
    """The state a ``run_md`` folder ended in (``final_state.npz``; older folders: ``final_positions.npy``
    without velocities), as the start of a following run; None when the folder has neither."""
    d = Path(run_dir)
    if (d / "final_state.npz").exists():
        with np.load(d / "final_state.npz") as z:
            return StartState(np.array(z["positions"]), np.array(z["velocities"]), str(d))
    if (d / "final_positions.npy").exists():
        return StartState(np.load(d / "final_positions.npy"), None, str(d))
    return None


def _save_state_npz(path: Path, positions: np.ndarray, velocities: np.ndarray | None, **extra: Any) -> None:
    """Write positions (and velocities) atomically to ``path`` (.npz)."""
    tmp = path.with_name(path.name + ".tmp")
    arrays = {"positions": np.asarray(positions, dtype=np.float64), **extra}
    if velocities is not None:
        arrays["velocities"] = np.asarray(velocities, dtype=np.float64)
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(path)


@dataclass
class MDSettings:
    """Settings of one MD run (time in ps, length nm, energy kJ/mol)."""

    steps: int = 1000
    dt_fs: float = 0.5
    temperature: float = 300.0
    nve: bool = False
    friction_per_ps: float = 1.0
    report_every: int = 10
    dcd_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    minimize: bool = True  # MM-only water minimisation + thermalisation around the frozen QM atoms first
    # (never for a run that continues a trajectory: StartState with velocities)
    thermalize_steps: int = 500  # MM-only 2 fs steps of that thermalisation (Langevin 10/ps); 0: minimise only
    max_uncertainty: float | None = None
    # above max_uncertainty: stop, or take the step from the delta model's baseline or from the reference
    # engine (``reference``: an engine spec; default the model's target method), queueing the frame in
    # RUN/uncertain.h5 for labelling
    fallback: str = "stop"
    reference: str | None = None
    fallback_hold: int = 0  # after a call above max_uncertainty, this many more calls from the fallback
    platform: str = "CPU"
    threads: int = 2  # OpenMM CPU threads
    # threads of the QM/ML engine inside OpenMM's force callback; None: every core (OpenMM's threads wait
    # meanwhile), half of them for a delta model with its baseline beside (qmlmm.md.system.engine_threads_in_md)
    engine_threads: int | None = None
    # a delta model's baseline engine in a second thread beside its network, inside the force callback (the
    # callback runs while OpenMM's threads wait); None: when the cores hold both (concurrent_baseline_fits)
    concurrent_baseline: bool | None = None
    restraints: list[str] = field(default_factory=list)
    # CPU platform: deterministic force summation (same seed and threads = 1: the same trajectory, bit for
    # bit; see qmlmm.md.system.cpu_properties)
    deterministic: bool = True
    # hydrogen mass repartitioning: solute hydrogens weigh this many amu, taken from their heavy atoms
    # (qmlmm.md.hmr; None: natural masses). For steps above 0.5 fs with the flexible QM X-H bonds.
    hmr_amu: float | None = None

    def __post_init__(self) -> None:
        lo_h, hi_h = H_MASS_RANGE_AMU
        checks = [
            ("steps", self.steps >= 1, "at least 1"),
            ("dt_fs", 0 < self.dt_fs <= 10, "in (0, 10] fs"),
            ("temperature", self.temperature > 0, "positive (K)"),
            ("friction_per_ps", self.friction_per_ps >= 0, ">= 0 (1/ps)"),
            ("report_every", self.report_every >= 1, "at least 1"),
            ("dcd_every", self.dcd_every >= 1, "at least 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "at least 1"),
            ("thermalize_steps", self.thermalize_steps >= 0, ">= 0"),
            ("threads", self.threads >= 1, "at least 1"),
            ("engine_threads", self.engine_threads is None or self.engine_threads >= 1, "None or at least 1"),
            ("max_uncertainty", self.max_uncertainty is None or self.max_uncertainty > 0, "positive (kJ/mol)"),
            ("fallback", self.fallback in ("stop", "baseline", "reference"), "stop, baseline or reference"),
            ("fallback_hold", self.fallback_hold >= 0, ">= 0 calls"),
            ("hmr_amu", self.hmr_amu is None or lo_h <= self.hmr_amu <= hi_h, f"None or in [{lo_h}, {hi_h}] amu"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise InputError(f"MD setting {name} must be {want}, got {getattr(self, name)!r}")


#: settings a restarted run must share with the run it continues (a different value mixes two Hamiltonians
#: or ensembles in one log)
RESTART_KEYS = ("dt_fs", "temperature", "nve", "friction_per_ps", "hmr_amu")
#: what a run folder's run.json that lacks a restart key had (the key came later)
_LEGACY_DEFAULTS: dict[str, object] = {"hmr_amu": None}


def _run_identity(engine: Engine | None, emb: EmbeddingSettings, s: MDSettings, rs: list[Any]) -> dict[str, Any]:
    """What a continuation must share with the run it continues (written to run_settings.json at the start)."""
    return {
        "engine": engine_identity(engine),
        "embedding": emb.to_dict(),
        "restraints": [r.text() for r in rs],
        **{k: getattr(s, k) for k in RESTART_KEYS},
    }


def _check_restart(out: Path, engine: Engine | None, emb: EmbeddingSettings, s: MDSettings, rs: list[Any]) -> None:
    """Raise InputError when the run in ``out`` (its run_settings.json, written when it started, or the
    run.json of older folders) used another engine, embedding, restraints or ensemble than this
    continuation."""
    now = _run_identity(engine, emb, s, rs)
    if (out / "run_settings.json").exists():
        was = json.loads((out / "run_settings.json").read_text())
        diff = [k for k in now if now[k] != was.get(k)]
        if diff:
            raise InputError(
                f"--restart of {out}: this command has another "
                + ", ".join(f"{k} ({now[k]!r}, the run had {was.get(k)!r})" for k in diff)
                + "; continue with the run's settings or start a new run folder"
            )
        return
    p = out / "run.json"
    if not p.exists():
        return
    before = json.loads(p.read_text())
    settings = before.get("settings", {})
    # a setting the old run.json lacks predates it: the run had the value it was made with then (natural
    # masses); a key recorded as null is a value too (hmr_amu None), so only unknown ones are skipped
    unknown = object()
    was = {
        "engine": before.get("engine_identity", before.get("engine", unknown)),
        "embedding": before.get("embedding", unknown),
        "restraints": before.get("restraints", []),
        **{k: settings.get(k, _LEGACY_DEFAULTS.get(k, unknown)) for k in RESTART_KEYS},
    }
    if "engine_identity" not in before:  # run folders from before the identity was recorded: the spec only
        now["engine"] = getattr(engine, "spec", "mm-only")
    diff = [k for k in now if was[k] is not unknown and now[k] != was[k]]
    if diff:
        raise InputError(
            f"--restart of {out}: this command has another "
            + ", ".join(f"{k} ({now[k]!r}, the run had {was[k]!r})" for k in diff)
            + "; continue with the run's settings or start a new run folder"
        )


def engine_identity(engine: Engine | None) -> str:
    """The engine's spec and the settings that determine its numbers (a model: its weights' fingerprint),
    as a JSON string; "mm-only" for None. Two runs with the same identity ran on the same potential."""
    if engine is None:
        return "mm-only"
    return json.dumps({"spec": engine.spec, "settings": engine.settings()}, sort_keys=True, default=str)


def require_same_engine(run_dir: str | Path, engine: Engine | None, redo: str | Path | None = None) -> None:
    """Raise InputError when the run in ``run_dir`` (one with a log or a checkpoint: a run killed before
    either starts again anyway) was made with another engine or model than ``engine`` (e.g. a model
    retrained since): its frames would be reused or analysed under the wrong name. ``redo``: what the
    message tells the user to delete (default ``run_dir``)."""
    d = Path(run_dir)
    settings = d / "run_settings.json"
    if not settings.exists() or not ((d / "run.json").exists() or (d / "checkpoint.chk").exists()):
        return
    was = json.loads(settings.read_text()).get("engine")
    if was == engine_identity(engine):
        return
    raise InputError(
        f"{d} was run with another engine or model ({was}) than the one named now ({engine_identity(engine)}); "
        f"delete {redo or d} to run it again with this one"
    )


def engine_of_runs(
    run_dirs: list[Path], make: Callable[[], Engine], redo: str | Path | None = None, analyze_only: bool = False
) -> Engine | None:
    """``make()`` when one of ``run_dirs`` holds a run, after :func:`require_same_engine` for each; None when
    none does. ``analyze_only``: an engine that cannot be built here (a CUDA device, parameter files or a
    program this machine lacks) leaves the runs unchecked, with a warning, instead of failing the analysis."""
    if not any((d / "run_settings.json").exists() for d in run_dirs):
        return None
    try:
        engine = make()
    except (QMLMMError, ImportError, OSError) as e:
        if not analyze_only:
            raise
        log.warning("cannot build the engine of %s here (%s): its runs are not checked", run_dirs[0], e)
        return None
    for d in run_dirs:
        require_same_engine(d, engine, redo)
    return engine


@dataclass
class MDResult:
    folder: Path
    steps_done: int
    seconds: float
    ns_per_day: float
    stopped: str | None
    log_csv: Path
    drift_kjmol_per_ps: float | None = None


def _dof(system: Any) -> int:
    import openmm

    n = sum(1 for i in range(system.getNumParticles()) if system.getParticleMass(i)._value > 0)
    dof = 3 * n - system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    return dof


def make_simulation(
    msys: MDSystem,
    engine: Engine | None,
    embedding: EmbeddingSettings,
    s: MDSettings,
    restraints: list[Restraint] | None = None,
    out: Path | None = None,
) -> tuple[Any, QMMMCallback | None]:
    """An OpenMM Simulation of the MM system + the QM/MM force of ``engine`` + restraints (``out``: the run
    folder, where frames above the uncertainty threshold are queued)."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(msys.system))  # fresh copy
    if s.nve:
        for k in reversed(range(system.getNumForces())):
            if isinstance(system.getForce(k), openmm.CMMotionRemover):
                system.removeForce(k)
    if s.hmr_amu is not None:
        from qmlmm.md.hmr import repartition_hydrogen_masses

        rep = repartition_hydrogen_masses(system, msys.topology, s.hmr_amu)
        log.info("HMR: %d hydrogens at %.3f amu (from %d heavy atoms)", rep.hydrogens, s.hmr_amu, rep.heavy_atoms)
    elif s.dt_fs > 1.0 and engine is not None:
        log.warning(
            "%.2f fs steps with flexible QM X-H bonds at natural masses: the X-H stretches (periods ~8-9 fs) "
            "are under-resolved; use hydrogen mass repartitioning (qmlmm md --hmr) or <= 0.5-1 fs",
            s.dt_fs,
        )
    cb = None
    if engine is not None:
        fb_engine = None
        if s.fallback == "reference" and s.max_uncertainty is not None:
            from qmlmm.engines import make_engine

            model = getattr(engine, "model", None)  # a ModelEngine's model names its target method
            spec = s.reference or (model.meta.target_method if model is not None else None)
            if not spec:
                raise InputError("--fallback reference needs --reference ENGINE (the model names no target method)")
            fb_engine = make_engine(str(spec), threads=s.threads)
        is_delta = getattr(engine, "base", None) is not None and hasattr(engine, "concurrent_baseline")
        delta: Any = engine if is_delta else None  # a delta model's engine (its baseline may run beside the network)
        beside = delta is not None and s.concurrent_baseline is not False
        n_eng = s.engine_threads or engine_threads_in_md(baseline_beside=beside)
        for e in (engine, fb_engine):
            if e is not None:
                e.set_threads(n_eng)
        if delta is not None:
            fits = concurrent_baseline_fits(n_eng)
            delta.concurrent_baseline = fits if s.concurrent_baseline is None else s.concurrent_baseline
            log.info("delta model: baseline %s the network", "beside" if delta.concurrent_baseline else "after")
        log.info("QM/MM engine: %d thread(s) beside OpenMM's %d", n_eng, s.threads)
        queue = UncertainFrames(out / "uncertain.h5", embedding.cutoff) if out is not None else None
        fallback = s.fallback if s.max_uncertainty is not None else "stop"
        cb = QMMMCallback(
            engine, msys, embedding, s.max_uncertainty, fallback, fb_engine, queue, n_eng, hold=s.fallback_hold
        )
        system.addForce(make_python_force(cb))
    if restraints:
        add_restraints(system, restraints)
    dt = s.dt_fs * u.femtoseconds
    if s.nve:
        integ = openmm.VerletIntegrator(dt)
    else:
        integ = openmm.LangevinMiddleIntegrator(s.temperature * u.kelvin, s.friction_per_ps / u.picosecond, dt)
        integ.setRandomNumberSeed(openmm_seed(s.seed))
    plat = openmm.Platform.getPlatformByName(s.platform)
    props = cpu_properties(s.threads, s.deterministic) if s.platform == "CPU" else {}
    sim = app.Simulation(msys.topology, system, integ, plat, props)
    sim.context.setPositions(msys.positions * u.nanometer)
    bv = msys.box
    sim.context.setPeriodicBoxVectors(*(openmm.Vec3(*row) * u.nanometer for row in bv))
    return sim, cb


def frozen_solute_simulation(msys: MDSystem, integrator: Any, threads: int = 2, nve: bool = False) -> Any:
    """An MM-only OpenMM Simulation (CPU) of ``msys`` at its built positions and box, the QM atoms frozen
    (zero mass) and carrying the fixed charges of the build (``meta.json`` ``qm_mm_charges``; older system
    folders have none: uncharged, with a warning). ``nve`` drops the centre-of-mass motion remover."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    from qmlmm.md.build import with_qm_charges

    qm_q = msys.meta.get("qm_mm_charges")
    if qm_q is None:
        log.warning(
            "%s has no fixed QM charges (built by an older qmlmm): MM-only water relaxation sees an "
            "uncharged solute; rebuild the system to get them",
            msys.folder,
        )
    system = with_qm_charges(msys.system, qm_q)
    for i in msys.qm_indices:
        system.setParticleMass(int(i), 0.0)
    if nve:
        for k in reversed(range(system.getNumForces())):
            if isinstance(system.getForce(k), openmm.CMMotionRemover):
                system.removeForce(k)
    sim = app.Simulation(
        msys.topology, system, integrator, openmm.Platform.getPlatformByName("CPU"), cpu_properties(threads)
    )
    sim.context.setPositions(msys.positions * u.nanometer)
    sim.context.setPeriodicBoxVectors(*(openmm.Vec3(*row) * u.nanometer for row in msys.box))
    return sim


def freeze_qm_and_relax_water(
    msys: MDSystem,
    steps: int = 2000,
    temperature: float = 300.0,
    seed: int = 0,
    threads: int = 2,
    friction_per_ps: float = 10.0,
) -> np.ndarray:
    """MM-only: minimise and equilibrate the water around the frozen QM atoms (2 fs, Langevin with
    ``friction_per_ps``: strong by default, so the water regains its thermal potential energy soon after
    the minimisation. Measured, methanol in water: 10/ps reaches 300 K in ~0.3 ps; 1/ps is at 159 K after
    50 fs and still at 245 K after 1 ps).

    QM atoms are frozen by zero mass and feel their Lennard-Jones terms and the fixed charges of the
    build (``meta.json`` ``qm_mm_charges``; older system folders have none: uncharged),
    so water packs and orients around the solute without the QM engine. ``steps`` = 0 minimises only
    (the water then has no thermal potential energy: MD started from there cools by about 100 K).
    Returns the new positions (N, 3) nm.
    """
    import openmm
    import openmm.unit as u

    integ = openmm.LangevinMiddleIntegrator(
        temperature * u.kelvin, friction_per_ps / u.picosecond, 2.0 * u.femtoseconds
    )
    integ.setRandomNumberSeed(openmm_seed(seed))
    sim = frozen_solute_simulation(msys, integ, threads)
    sim.minimizeEnergy(maxIterations=500)
    if steps > 0:
        sim.context.setVelocitiesToTemperature(temperature * u.kelvin, openmm_seed(seed))
        sim.step(steps)
    st = sim.context.getState(getPositions=True)
    return np.asarray(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))


LOG_FIELDS = [
    "step",
    "time_ps",
    "potential_kjmol",
    "kinetic_kjmol",
    "total_kjmol",
    "temperature_K",
    "qmmm_kjmol",
    "uncertainty_kjmol",
    "n_mm_embedded",
]


@dataclass
class _Run:
    """What one ``run_md`` invocation runs: its folder, engine (None: MM only), embedding, settings,
    restraints (given and from the settings) and start state (None: the built structure)."""

    out: Path
    engine: Engine | None
    emb: EmbeddingSettings
    s: MDSettings
    rs: list[Restraint]
    start: StartState | None


@dataclass
class _Begin:
    """How this invocation begins: the step it starts at and the record of the start (run.json)."""

    start_step: int
    info: dict[str, Any]


@dataclass
class _Stretch:
    """What the integration loop did: steps done, why it stopped (None: it ran to the end), the last
    state whose energies were finite (an OpenMM State) and the wall seconds it took."""

    done: int
    stopped: str | None
    last_good: Any
    seconds: float


def run_md(
    system_dir: str | Path,
    engine: Engine | None,
    out: str | Path,
    s: MDSettings,
    embedding: EmbeddingSettings | None = None,
    restart: bool = False,
    progress: bool = True,
    start: StartState | None = None,
    restraints: list[Restraint] | None = None,
) -> MDResult:
    """Run MD of a built system with the QM/MM force of ``engine`` (None: MM only).

    ``start``: where to begin (default the built structure). A start with velocities continues that
    trajectory (no MM-only stage, no new velocities); otherwise the water is relaxed MM-only first
    (``s.minimize``) and velocities are drawn. The start is recorded in ``start_state.npz`` and, with
    what was done to it, in ``run.json`` (``start``); the end in ``final_state.npz`` (positions and
    velocities, the start of a following run, see :func:`load_final_state`).
    """
    from qmlmm.md.restraints import parse_restraint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    msys = _system_at(system_dir, start)
    emb = embedding or EmbeddingSettings()
    rs = list(restraints or []) + [parse_restraint(t) for t in s.restraints]
    sim, cb = make_simulation(msys, engine, emb, s, rs, out)
    run = _Run(out, engine, emb, s, rs, start)
    begin = _resume(sim, run) if restart else _begin_fresh(sim, msys, run)
    # what earlier invocations queued stays queued, but what the steps done again will queue again (a run with
    # no step left does none again: it keeps everything)
    if restart and cb is not None and cb.queue is not None and begin.start_step < s.steps:
        cb.queue.resume(begin.start_step)
    if restart and cb is not None:
        _restore_hold(out, begin.start_step, cb)
    phases0 = dict(cb.phase_seconds) if cb is not None else {}
    stretch = _integrate(sim, cb, msys, rs, s, out, begin.start_step, restart, progress)
    steps_done = begin.start_step + stretch.done
    _save_end(out, stretch, steps_done)
    seconds, done = stretch.seconds, stretch.done
    nsday = done * s.dt_fs * 1e-6 / (seconds / 86400.0) if seconds > 0 and done else 0.0
    drift = energy_drift(out / "log.csv") if s.nve else None
    info = {
        "settings": asdict(s),
        "embedding": emb.to_dict(),
        "engine": getattr(engine, "spec", "mm-only"),
        "engine_identity": engine_identity(engine),
        "steps_done": steps_done,
        "seconds_this_run": seconds,
        "ns_per_day": nsday,
        "stopped": stretch.stopped,
        "drift_kjmol_per_ps": drift,
        "restraints": [r.text() for r in rs],
        "start": _start_record(out, begin.info, restart),
        **_callback_record(cb, seconds, done, phases0),
    }
    before = json.loads((out / "run.json").read_text()) if restart and (out / "run.json").exists() else {}
    # every invocation's fallback force calls, as far as run.json recorded them: an invocation killed before
    # writing run.json is not counted; one resumed after a stop counts the steps it repeats again
    info["fallback_steps_total"] = int(before.get("fallback_steps_total", before.get("fallback_steps", 0))) + int(
        info["fallback_steps"]
    )
    # the speed over every invocation that recorded itself (ns_per_day: this invocation's alone, which for a
    # resume with a few steps left says little); a run.json from before these keys counts as one invocation
    if before and "seconds_total" not in before:  # a record from before: its last invocation is known
        t0, v0 = float(before.get("seconds_this_run", 0.0)), float(before.get("ns_per_day") or 0.0)
        before = {"seconds_total": t0, "steps_integrated_total": round(v0 * t0 / 86400.0 / (s.dt_fs * 1e-6))}
    info["steps_integrated_total"] = int(before.get("steps_integrated_total", 0)) + done
    info["seconds_total"] = float(before.get("seconds_total", 0.0)) + seconds
    secs, steps = info["seconds_total"], info["steps_integrated_total"]
    info["ns_per_day_all"] = steps * s.dt_fs * 1e-6 / (secs / 86400.0) if secs > 0 and steps else 0.0
    tmp = out / "run.json.tmp"  # atomic: a kill mid-write leaves the previous record whole
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(out / "run.json")
    return MDResult(out, steps_done, seconds, nsday, stretch.stopped, out / "log.csv", drift)


def _system_at(system_dir: str | Path, start: StartState | None) -> MDSystem:
    """The built system of ``system_dir``, at the positions of ``start`` when given (checked to have
    the system's atoms)."""
    msys = MDSystem.load(system_dir)
    if start is None:
        return msys
    if start.positions.shape != msys.positions.shape or (
        start.velocities is not None and start.velocities.shape != msys.positions.shape
    ):
        raise InputError(
            f"start state from {start.source or 'the caller'} has {start.positions.shape[0]} atoms, the system "
            f"{system_dir} {msys.positions.shape[0]}"
        )
    msys.positions = start.positions
    return msys


def _start_info(engine: Engine | None, s: MDSettings, start: StartState | None, restart: bool) -> dict[str, Any]:
    """Record of where this invocation starts from and what is done to the start (run.json's ``start``)."""
    continues = start is not None and start.velocities is not None
    return {
        "from": (start.source or "given positions") if start is not None else "built structure",
        "mm_relaxation": bool(s.minimize and engine is not None and not continues and not restart),
        "velocities": "continued" if continues else "drawn",
    }


def _resume(sim: Any, run: _Run) -> _Begin:
    """Load the run folder's checkpoint (after checking that the settings match the ones it was made
    with): the run continues at the checkpoint's step."""
    chk = run.out / "checkpoint.chk"
    if not chk.exists():
        raise InputError(f"--restart: no checkpoint in {run.out}")
    _check_restart(run.out, run.engine, run.emb, run.s, run.rs)
    sim.loadCheckpoint(str(chk))
    start_step = round(sim.context.getState().getStepCount())
    log.info("restarting %s at step %d", run.out, start_step)
    trim_run_to_step(run.out, start_step, run.s.dcd_every)
    return _Begin(start_step, _start_info(run.engine, run.s, run.start, restart=True))


def trim_run_to_step(out: str | Path, step: int, dcd_every: int) -> None:
    """Cut a run folder's log.csv rows after ``step`` and traj.dcd frames after ``step // dcd_every``
    (and any partial frame): what a killed run wrote after its last checkpoint is done again when it
    resumes there, and would otherwise be in the files twice."""
    import struct

    out = Path(out)
    csv_path, dcd_path = out / "log.csv", out / "traj.dcd"
    if csv_path.exists():
        lines = csv_path.read_text().splitlines(keepends=True)
        keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and int(float(ln.split(",", 1)[0])) <= step]
        if len(keep) < len(lines):
            tmp = csv_path.with_name(csv_path.name + ".tmp")
            tmp.write_text("".join(keep))
            tmp.replace(csv_path)
            log.info("%s: %d log rows after step %d removed", csv_path, len(lines) - len(keep), step)
    if not dcd_path.exists() or dcd_path.stat().st_size < 276:
        return
    with open(dcd_path, "r+b") as f:
        count, first, interval = struct.unpack("<3i", _read_at(f, 8, 12))
        (box_flag,) = struct.unpack("<i", _read_at(f, 48, 4))
        (comments,) = struct.unpack("<i", _read_at(f, 92, 4))
        header = 104 + comments + 8
        (n_atoms,) = struct.unpack("<i", _read_at(f, 104 + comments, 4))
        frame = 3 * (8 + 4 * n_atoms) + (56 if box_flag else 0)
        whole = (dcd_path.stat().st_size - header) // frame
        n_keep = min(count, whole, step // dcd_every)
        if n_keep == count and header + n_keep * frame == dcd_path.stat().st_size:
            return
        f.truncate(header + n_keep * frame)
        f.seek(8)
        f.write(struct.pack("<i", n_keep))
        f.seek(20)
        f.write(struct.pack("<i", first + n_keep * interval))
    log.info("%s: %d frames kept (up to step %d)", dcd_path, n_keep, step)


def _read_at(f: Any, offset: int, n: int) -> bytes:
    f.seek(offset)
    return bytes(f.read(n))


def _begin_fresh(sim: Any, msys: MDSystem, run: _Run) -> _Begin:
    """Set the start's positions (after an MM-only relaxation of the water, when due) and velocities
    (continued or drawn), and record the settings (run_settings.json) and the start (start_state.npz)."""
    import openmm.unit as u

    ctx, out, s, start = sim.context, run.out, run.s, run.start
    (out / "guard_hold.json").unlink(missing_ok=True)  # an earlier run's, in this folder: not this run's hold
    info = _start_info(run.engine, s, start, restart=False)
    if info["mm_relaxation"]:
        # relax and thermalise the water around the (fixed) solute with the MM force field first (QM
        # atoms do not move); minimising alone would start the QM/MM run cold: the water's thermal
        # potential energy is gone and T falls to ~175 K within 10 fs of drawing 300 K velocities
        relaxed = freeze_qm_and_relax_water(
            msys, steps=s.thermalize_steps, temperature=s.temperature, seed=s.seed, threads=s.threads
        )
        ctx.setPositions(relaxed * u.nanometer)
    try:  # OpenMM evaluates the forces here, so the QM/MM force can already fail
        if start is not None and start.velocities is not None:
            ctx.setVelocities(start.velocities * (u.nanometer / u.picosecond))
        else:
            ctx.setVelocitiesToTemperature(s.temperature * u.kelvin, openmm_seed(s.seed))
    except Exception as e:
        raise EngineError(f"MD could not start in {out}: the QM/MM force failed at the start: {e}") from e
    ctx.setStepCount(0)
    (out / "run_settings.json").write_text(json.dumps(_run_identity(run.engine, run.emb, s, run.rs), indent=2))
    st0 = ctx.getState(getPositions=True, getVelocities=True, enforcePeriodicBox=False)
    _save_state_npz(
        out / "start_state.npz",
        st0.getPositions(asNumpy=True).value_in_unit(u.nanometer),
        st0.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond),
    )
    return _Begin(0, info)


def _integrate(
    sim: Any,
    cb: QMMMCallback | None,
    msys: MDSystem,
    rs: list[Restraint],
    s: MDSettings,
    out: Path,
    start_step: int,
    restart: bool,
    progress: bool,
) -> _Stretch:
    """Integrate from ``start_step`` to ``s.steps`` in stretches of ``s.report_every`` steps: a log.csv
    row after each (appended on restart), frames to traj.dcd, a checkpoint every ``s.checkpoint_every``
    steps and at the end. A failing force, a non-finite energy or the callback's stop ends the loop."""
    import openmm.app as app
    import openmm.unit as u
    from tqdm.auto import tqdm

    ctx = sim.context
    csv_path, dcd_path, chk = out / "log.csv", out / "traj.dcd", out / "checkpoint.chk"
    dof = _dof(sim.system)
    # unwrapped positions: the QM molecule has no bonds in the MM system, so OpenMM's per-molecule
    # wrapping would split it across the box edge
    dcd = app.DCDReporter(str(dcd_path), s.dcd_every, append=restart and dcd_path.exists(), enforcePeriodicBox=False)
    sim.reporters.append(dcd)
    mode = "a" if restart and csv_path.exists() else "w"
    stopped: str | None = None
    remaining = max(0, s.steps - start_step)
    t0 = time.perf_counter()
    done = 0
    bar = tqdm(total=remaining, desc="md", unit="step", disable=not progress, dynamic_ncols=True)
    last_good = ctx.getState(getPositions=True, getVelocities=True, enforcePeriodicBox=False)
    with open(csv_path, mode, newline="") as fh:
        w = csv.writer(fh)
        if mode == "w":
            w.writerow(LOG_FIELDS + [f"rc{k}_nm" for k in range(len(rs))])
        try:
            while done < remaining:
                n = min(s.report_every, remaining - done)
                try:
                    sim.step(n)
                    # the energy evaluation calls the QM/MM force again, so it can fail the same way
                    st = ctx.getState(getEnergy=True, getPositions=True, getVelocities=True, enforcePeriodicBox=False)
                except Exception as e:
                    stopped = cb.stop_reason if cb is not None and cb.stop_reason else f"{type(e).__name__}: {e}"
                    break
                done += n
                pe = st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
                ke = st.getKineticEnergy().value_in_unit(u.kilojoule_per_mole)
                if not np.isfinite(pe + ke):
                    stopped = "non-finite energy"
                    break
                step = start_step + done
                pos = np.asarray(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
                w.writerow(_log_row(step, s.dt_fs, pe, ke, dof, cb, [rc_value(pos, r, msys.box) for r in rs]))
                fh.flush()
                if cb is not None and cb.queue is not None:
                    cb.queue.flush()
                last_good = st
                el = time.perf_counter() - t0
                nsday = done * s.dt_fs * 1e-6 / (el / 86400.0) if el > 0 else float("nan")
                bar.update(n)
                bar.set_postfix_str(f"{nsday:.3f} ns/day T={2 * ke / (dof * KB_KJMOL_PER_K):.0f} K")
                if step % s.checkpoint_every < n or done >= remaining:
                    sim.saveCheckpoint(str(chk))
                    _save_hold(out, step, cb)
        finally:
            bar.close()
            if cb is not None and cb.queue is not None:  # a stop's last stretch queued the frames most worth
                cb.queue.flush()  # labelling: written, not lost with the run
    return _Stretch(done, stopped, last_good, time.perf_counter() - t0)


def _save_hold(out: Path, step: int, cb: QMMMCallback | None) -> None:
    """Record, beside the checkpoint of ``step``, how many more force calls the uncertainty guard holds
    the fallback for (``guard_hold.json``; only for runs with a hold): a run resumed there goes on holding."""
    if cb is None or cb.hold <= 0:
        return
    p = out / "guard_hold.json"
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "held_calls": cb.held_calls}))
    tmp.replace(p)


def _restore_hold(out: Path, step: int, cb: QMMMCallback) -> None:
    """Give ``cb`` the hold recorded with the checkpoint of ``step`` (none recorded, or for another step:
    a checkpoint written before holds were recorded; the run resumes with no hold)."""
    p = out / "guard_hold.json"
    if cb.hold <= 0 or not p.exists():
        return
    rec = json.loads(p.read_text())
    if rec.get("step") == step:
        cb.held_calls = min(int(rec["held_calls"]), cb.hold)
    else:
        log.warning("%s is of step %s, not the checkpoint's %d: no hold", p, rec.get("step"), step)


def _log_row(
    step: int, dt_fs: float, pe: float, ke: float, dof: int, cb: QMMMCallback | None, rcs: list[float]
) -> list[float]:
    """One log.csv row (LOG_FIELDS, then the restraint coordinates in nm): energies kJ/mol, T in K from
    the kinetic energy and ``dof`` degrees of freedom, the QM/MM callback's last energy, uncertainty and
    number of embedded MM atoms (NaN, NaN, 0 without one)."""
    return [
        step,
        step * dt_fs / 1000.0,
        pe,
        ke,
        pe + ke,
        2 * ke / (dof * KB_KJMOL_PER_K),
        cb.last_energy if cb else float("nan"),
        cb.last_uncertainty if cb else float("nan"),
        cb.last_n_mm if cb else 0,
        *rcs,
    ]


def _save_end(out: Path, stretch: _Stretch, steps_done: int) -> None:
    """Write where the run ended (final_state.npz: unwrapped positions nm, velocities nm/ps, the start
    of a following run such as the next umbrella window) and, for a stopped run, the last good state
    (last_good_state.xml) with the reason in the log."""
    import openmm
    import openmm.unit as u

    last_good = stretch.last_good
    _save_state_npz(
        out / "final_state.npz",
        last_good.getPositions(asNumpy=True).value_in_unit(u.nanometer),
        last_good.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond),
        step=np.asarray(steps_done),
    )
    if stretch.stopped:
        (out / "last_good_state.xml").write_text(openmm.XmlSerializer.serialize(last_good))
        log.error(
            "MD stopped at step %d: %s; last good state saved to %s",
            steps_done,
            stretch.stopped,
            out / "last_good_state.xml",
        )


def _callback_record(cb: QMMMCallback | None, seconds: float, steps: int, phases0: dict[str, float]) -> dict[str, Any]:
    """run.json's record of the QM/MM force for this invocation: seconds per call, the per-step
    profile, engine threads, the fallback and its steps, and the uncertain frames queued."""
    return {
        "qmmm_seconds_per_call": (cb.seconds / cb.calls) if cb and cb.calls else None,
        "ms_per_step": _step_profile(seconds, steps, cb, phases0),
        "engine_threads": cb.engine_threads if cb else None,
        "concurrent_baseline": bool(getattr(cb.engine, "baseline_beside_network", False)) if cb else None,
        "fallback": cb.fallback if cb else None,
        "fallback_steps": cb.fallback_steps if cb else 0,  # QM/MM calls this invocation took from the fallback
        "uncertain_frames_queued": len(cb.queue.frames) if cb and cb.queue else 0,  # in uncertain.h5: all invocations
    }


def _step_profile(
    seconds: float, steps: int, cb: QMMMCallback | None, phases0: dict[str, float]
) -> dict[str, float] | None:
    """Wall ms per step of this invocation: total, each timed part of the QM/MM force calls (including
    the extra call of every energy report) and the rest (OpenMM's MM forces and integration, passing
    forces back, reporting)."""
    if steps == 0:
        return None
    prof = {"total": 1000 * seconds / steps}
    if cb is not None:
        for k, v in cb.phase_seconds.items():
            prof[k] = 1000 * (v - phases0.get(k, 0.0)) / steps
        prof["openmm_and_rest"] = prof["total"] - sum(prof[k] for k in cb.phase_seconds)
    return prof


def _start_record(out: Path, info: dict[str, Any], restart: bool) -> dict[str, Any]:
    """How the run began: this invocation's record, or for a restart the first invocation's (run.json)."""
    if restart and (out / "run.json").exists():
        before = json.loads((out / "run.json").read_text()).get("start")
        if before:
            return dict(before)
    return info


def energy_drift(csv_path: str | Path, skip_ps: float = 0.0) -> float:
    """Slope (kJ/mol/ps) of a linear fit of the total energy against time in an MD log."""
    data = np.genfromtxt(csv_path, delimiter=",", names=True)
    t, e = np.atleast_1d(data["time_ps"]), np.atleast_1d(data["total_kjmol"])
    m = t >= skip_ps
    if m.sum() < 2:
        return float("nan")
    return float(np.polyfit(t[m], e[m], 1)[0])

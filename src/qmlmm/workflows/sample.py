"""``qmlmm sample``: configurations for labelling from baseline QM/MM MD.

Each run: MM-only minimisation and equilibration of the water around the frozen solute, then
QM/MM MD with the baseline engine (Langevin, 300 K by default), a frame stored every ``every``
steps. Frames keep the QM region and every water within the embedding cutoff plus a margin (so
any later embedding finds all it needs), made whole around the solute, with the box. Independent
runs (different seeds) go to Dask workers; each finished run is saved as a part file, so a rerun
skips runs already done, and the parts are merged into the output dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.data import Dataset, write_dataset
from qmlmm.engines import make_engine
from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH, EmbeddingSettings, trim_frame
from qmlmm.errors import InputError
from qmlmm.md.runner import MDSettings, freeze_qm_and_relax_water
from qmlmm.md.system import MDSystem, openmm_seed

log = logging.getLogger(__name__)

__all__ = ["SampleSettings", "sample", "trim_frame"]


@dataclass
class SampleSettings:
    engine: str = "dftb3:3ob"
    steps: int = 1000
    every: int = 10
    runs: int = 1
    equil_steps: int = 2500  # MM-only water equilibration, 2 fs steps
    qm_equil_steps: int = 0  # QM/MM steps discarded before storing frames
    temperature: float = 300.0
    dt_fs: float = 0.5
    cutoff: float = DEFAULT_CUTOFF
    switch_width: float = DEFAULT_SWITCH_WIDTH
    margin: float = 0.3
    seed: int = 0
    threads: int = 1
    restraints_per_run: list[list[str]] | None = None  # run r uses entry r % len (e.g. umbrella windows)
    temperatures: list[float] | None = None  # run r at entry r % len (default: temperature for every run)
    # for an ML/MM sampler (engine "model:<file>"): a run whose ensemble spread passes this (kJ/mol) stops
    # there and keeps the frames stored up to the stop (qmlmm active samples where the model is unsure)
    max_uncertainty: float | None = None
    # a run that fails part-way (an ML/MM run leaving the model's domain) keeps the frames stored before
    keep_partial: bool = False
    # start positions (N, 3) nm of the runs (run r from entry r % len, e.g. solute conformations in several
    # basins); None: the built structure
    starts: list[Any] | None = None

    def run_temperature(self, run: int) -> float:
        """Temperature (K) of sampling run ``run``."""
        return float(self.temperatures[run % len(self.temperatures)]) if self.temperatures else self.temperature


def sampling_engine(spec: str, threads: int) -> Any:
    """The engine of a sampling run: an engine spec, or ``model:<file>`` for ML/MM MD with a trained model."""
    if spec.startswith("model:"):
        from qmlmm.models import QMLMMModel

        return QMLMMModel.load(spec[len("model:") :]).engine(threads)
    return make_engine(spec, threads=threads)


def run_md_settings(s: SampleSettings, temperature: float, seed: int, alone: bool = True) -> MDSettings:
    """The MD settings of one sampling run at ``temperature`` (K) with ``seed``; ``alone`` False: other runs
    share the machine (Dask workers), so the engine keeps ``s.threads`` and a delta model's baseline runs
    after its network, not in a thread of its own (the cores OpenMM leaves are the other runs')."""
    return MDSettings(
        steps=s.steps,
        dt_fs=s.dt_fs,
        temperature=temperature,
        seed=seed,
        threads=s.threads,
        max_uncertainty=s.max_uncertainty,
        engine_threads=None if alone else s.threads,
        concurrent_baseline=None if alone else False,
    )


def _one_run(system_dir: str, s: SampleSettings, run: int, part: str, alone: bool = True) -> str:
    """Runs on a worker: one sampling run, saved to ``part`` (HDF5); returns its path (``alone``: see
    :func:`run_md_settings`)."""
    import openmm.unit as u

    from qmlmm.md.runner import make_simulation

    msys = MDSystem.load(system_dir)
    if s.starts:
        start = np.asarray(s.starts[run % len(s.starts)], dtype=np.float64)
        if start.shape != msys.positions.shape:
            raise InputError(
                f"sampling start {run % len(s.starts)} has shape {start.shape}, the system {msys.positions.shape}"
            )
        msys.positions = start
    seed = s.seed * 1000 + run
    temp = s.run_temperature(run)
    msys.positions = freeze_qm_and_relax_water(
        msys, steps=s.equil_steps, temperature=temp, seed=seed, threads=s.threads
    )
    engine = sampling_engine(s.engine, s.threads)
    md = run_md_settings(s, temp, seed, alone)
    emb = EmbeddingSettings(s.cutoff, s.switch_width)
    rs = []
    if s.restraints_per_run:
        from qmlmm.md.restraints import parse_restraint

        rs = [parse_restraint(t) for t in s.restraints_per_run[run % len(s.restraints_per_run)]]
    sim, cb = make_simulation(msys, engine, emb, md, rs)
    frames: list[Any] = []
    try:  # the forces are evaluated from the velocities on, so a guarded run can stop at any point
        sim.context.setVelocitiesToTemperature(temp * u.kelvin, openmm_seed(seed))
        if s.qm_equil_steps:
            sim.step(s.qm_equil_steps)
        for k in range(s.steps // s.every):
            sim.step(s.every)
            frames.append(_stored_frame(sim, msys, s, rs, run, (k + 1) * s.every, temp))
    except Exception as e:
        # OpenMM passes the callback's stop on as its own exception: the callback says why
        reason = (cb.stop_reason if cb is not None else None) or f"{type(e).__name__}: {e}"
        unsure = cb is not None and cb.stopped_unsure
        if not (unsure or (s.keep_partial and frames)):
            raise
        step = int(sim.context.getStepCount())
        if unsure:  # the geometry the ensemble was unsure of is the most informative candidate: kept, marked
            frames.append(_stored_frame(sim, msys, s, rs, run, step, temp, stopped=True))
        log.warning("sampling run %d stopped at step %d (%d frames kept): %s", run, step, len(frames), reason)
    write_dataset(part, frames, overwrite=True).close()
    return part


def _stored_frame(
    sim: Any, msys: MDSystem, s: SampleSettings, rs: list[Any], run: int, step: int, temp: float, stopped: bool = False
) -> Any:
    """The simulation's current frame, trimmed to the QM region and its shell (positions nm), with its
    info: run, step, time, temperature, sampler, restraint coordinate and, for a guarded sampler,
    whether the run stopped here."""
    import openmm.unit as u

    st = sim.context.getState(getPositions=True, enforcePeriodicBox=False)
    pos = np.asarray(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
    box = np.asarray(st.getPeriodicBoxVectors(asNumpy=True).value_in_unit(u.nanometer))
    info: dict[str, float | int | str] = {
        "run": run,
        "step": step,
        "time_ps": step * s.dt_fs / 1000.0,
        "temperature_K": temp,
        "sampled_with": s.engine,
    }
    if s.max_uncertainty is not None or s.keep_partial:
        info["stopped"] = int(stopped)
    if rs:
        from qmlmm.md.restraints import rc_value

        info["restraint"] = rs[0].text()
        info["rc_nm"] = rc_value(pos, rs[0], box)
    return trim_frame(msys.frame(pos, box, info=info), s.cutoff, s.margin)


def sample(
    system_dir: str | Path,
    out: str | Path,
    s: SampleSettings,
    workers: int = 1,
    scheduler: str | None = None,
    progress: bool = True,
) -> Path:
    """Run ``s.runs`` independent sampling runs and merge their frames into the dataset ``out``."""
    from tqdm.auto import tqdm

    if s.every < 1 or s.steps < s.every:
        raise InputError("need steps >= every >= 1")
    MDSystem.load(system_dir)  # fail early on a bad folder
    out = Path(out)
    parts_dir = out.with_name(out.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = [parts_dir / f"run{r:03d}.h5" for r in range(s.runs)]
    todo = [r for r in range(s.runs) if not parts[r].exists()]
    if len(todo) < s.runs:
        log.info("%d of %d sampling runs already done (in %s)", s.runs - len(todo), s.runs, parts_dir)
    bar = tqdm(total=len(todo), desc="sampling runs", unit="run", disable=not progress)
    if workers == 0 or (len(todo) <= 1 and not scheduler):
        for r in todo:
            _one_run(str(system_dir), s, r, str(parts[r]))
            bar.update(1)
    elif todo:
        from dask.distributed import as_completed

        from qmlmm.workflows.label import _dask_client

        client = _dask_client(min(workers, len(todo)), s.threads, scheduler)
        try:
            futs = [
                client.submit(_one_run, str(system_dir), replace(s), r, str(parts[r]), False, pure=False) for r in todo
            ]
            for f in as_completed(futs):
                f.result()
                bar.update(1)
        finally:
            client.close()
            if not scheduler and client.cluster is not None:
                client.cluster.close()
    bar.close()
    frames: list[Any] = []
    for p in parts:
        with Dataset(p) as ds:
            frames += ds.frames()
    write_dataset(out, frames, overwrite=True).close()
    log.info("wrote %d frames from %d runs to %s", len(frames), s.runs, out)
    return out

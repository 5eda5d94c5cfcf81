"""The QM/MM (or ML/MM) force inside OpenMM: an ``openmm.PythonForce`` around any engine.

Every step: positions and box from OpenMM -> embedding (whole molecules within the cutoff, nearest
image, optional smooth switching) -> engine (QM engine, model, or delta = baseline + model) ->
energy and forces on QM and embedded MM atoms (plus the switching term) back to OpenMM. The MM
force field supplies everything else (TIP3P with PME, QM-MM Lennard-Jones).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.engines.base import Engine
from qmlmm.environment import EmbeddingSettings, embedding_forces_to_frame, select_embedding, trim_frame
from qmlmm.errors import InputError
from qmlmm.md.system import MDSystem
from qmlmm.system import Frame
from qmlmm.threads import numpy_blas_threads

log = logging.getLogger(__name__)

__all__ = ["FALLBACKS", "QMMMCallback", "MDStopError", "UncertainFrames", "make_python_force"]


class MDStopError(RuntimeError):
    """Raised inside the force callback to stop a simulation (non-finite forces, high uncertainty)."""


#: the timed parts of a QM/MM force call (QMMMCallback.phase_seconds)
PHASES = ("state_transfer", "embedding", "engine", "forces_to_frame")

#: what a step does when the model's ensemble spread exceeds the threshold
FALLBACKS = ("stop", "baseline", "reference")


class UncertainFrames:
    """Frames where the model was unsure, queued for labelling: the QM region and its environment (the
    embedding cutoff plus 0.3 nm, as sampling stores them) with the step and the spread; written to
    ``path`` (a qmlmm dataset, rewritten atomically with every flush) so ``qmlmm label`` can take it.
    At most one frame every ``every`` calls and ``limit`` in all (neighbouring steps are near-duplicates).
    A resumed run keeps what its earlier invocations queued (:meth:`resume`)."""

    def __init__(self, path: Path, cutoff: float, every: int = 20, limit: int = 1000) -> None:
        self.path = Path(path)
        self.cutoff = cutoff
        self.every = every
        self.limit = limit
        self.frames: list[Frame] = []
        self._last_call = -(10**9)
        self._flushed = 0

    def resume(self, step: int) -> None:
        """Take over the frames ``path`` holds from the run's earlier invocations, but those queued at MD step
        ``step`` or later (the run resumes at ``step`` and does those steps again; frames that record no step
        are kept). The file is rewritten at once when frames are dropped, removed when none is left; the
        next frame keeps its spacing from the last one kept."""
        from qmlmm.data import Dataset

        if not self.path.exists():
            return
        with Dataset(self.path) as ds:
            old = ds.frames()

        def queued_at(fr: Frame) -> float:  # NaN: a frame that records no step (files from before)
            v = fr.info.get("md_step")
            return float("nan") if v is None else float(v)

        at = [queued_at(fr) for fr in old]
        kept = [fr for fr, t in zip(old, at, strict=True) if not t >= step]  # NaN compares False: kept
        self.frames, self._flushed = kept, len(kept)
        steps = [t for t in at if t < step]  # the kept frames' recorded steps
        if steps:  # calls count from 0 again: about one call a step since the last frame kept
            self._last_call = int(max(steps)) - step
        if len(kept) == len(old):
            return
        if kept:
            self._flushed = -1
            self.flush()
        else:
            self.path.unlink()
        log.info("%s: %d queued frames from step %d on removed (done again)", self.path, len(old) - len(kept), step)

    def offer(self, frame: Frame, call: int, uncertainty: float, step: int | None = None) -> bool:
        """Queue ``frame`` (copied, trimmed) unless one was queued fewer than ``every`` calls ago; ``step``:
        the MD step whose force this was (recorded, so that a resumed run can drop what it does again)."""
        if call - self._last_call < self.every or len(self.frames) >= self.limit:
            return False
        fr = trim_frame(frame, self.cutoff, 0.3)
        fr.info.update({"md_call": call, "uncertainty_kjmol": uncertainty, "source": "uncertain"})
        if step is not None:
            fr.info["md_step"] = int(step)
        self.frames.append(fr)
        self._last_call = call
        return True

    def flush(self) -> None:
        if len(self.frames) == self._flushed:
            return
        from qmlmm.data import write_dataset

        write_dataset(self.path, self.frames, overwrite=True).close()
        self._flushed = len(self.frames)


class QMMMCallback:
    """Callable for ``openmm.PythonForce``: (State) -> (energy kJ/mol, forces (N, 3) kJ/mol/nm).

    Above ``max_uncertainty`` (the ensemble's energy spread, kJ/mol) a step ``fallback``s: "stop" ends the
    run (MDStopError); "baseline" takes that step's energy and forces from the delta model's baseline
    alone; "reference" from ``fallback_engine`` (the reference QM/MM engine). Either way the frame is
    queued in ``queue`` for labelling and the run goes on; ``fallback_steps`` counts such calls. With
    ``hold`` > 0 the next ``hold`` calls after one above the threshold fall back too, whatever their
    spread: a model that drifts apart slowly keeps its spread below the threshold between the steps above
    it, and one fallback step at a time does not pull the geometry back (measured on alanine dipeptide,
    ``benchmarks/uncertainty_early_warning.py``).
    """

    def __init__(
        self,
        engine: Engine,
        system: MDSystem,
        embedding: EmbeddingSettings,
        max_uncertainty: float | None = None,
        fallback: str = "stop",
        fallback_engine: Engine | None = None,
        queue: UncertainFrames | None = None,
        engine_threads: int | None = None,
        hold: int = 0,
    ) -> None:
        if fallback not in FALLBACKS:
            raise InputError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        if fallback == "baseline" and getattr(engine, "base", None) is None:
            raise InputError("--fallback baseline needs a delta model (a model with a baseline engine)")
        if fallback == "reference" and fallback_engine is None:
            raise InputError("--fallback reference needs the reference engine")
        self.engine = engine
        self.sys = system
        self.embedding = embedding
        self.max_uncertainty = max_uncertainty
        self.fallback = fallback
        self.fallback_engine = fallback_engine
        self.queue = queue
        self.fallback_steps = 0
        if hold < 0:
            raise InputError(f"fallback hold must be >= 0 calls, got {hold}")
        self.hold = int(hold)
        self.held_calls = 0  # calls still to take from the fallback after the last one above the threshold
        self.calls = 0
        self.step: int | None = None  # the MD step of the force evaluated now (from OpenMM's state)
        self.seconds = 0.0
        #: wall seconds of each part of the calls so far: OpenMM state to numpy, embedding selection, the
        #: engine (QM/ML), forces back to the frame's atoms (with the switching term)
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.engine_threads = engine_threads  # what the runner gave the engine (threads beside OpenMM's)
        self.last_energy = float("nan")
        self.last_uncertainty = float("nan")
        self.last_n_mm = 0
        self.stop_reason: str | None = None
        self.stopped_unsure = False  # the stop was the ensemble spread passing max_uncertainty
        self._frame = system.frame()
        self._frame.validate()

    def energy_forces(self, pos: np.ndarray, box: np.ndarray) -> tuple[float, np.ndarray]:
        """QM/MM energy and forces (N, 3) for positions (N, 3) nm and box (3, 3) nm."""
        marks = [time.perf_counter()]  # start, after embedding, after engine, after forces
        try:
            return self._energy_forces(pos, box, marks)
        finally:  # a call that raises (engine failure, uncertainty stop) still counts its time
            now = time.perf_counter()
            marks += [now] * (4 - len(marks))
            self.seconds += now - marks[0]
            for name, a, b in zip(("embedding", "engine", "forces_to_frame"), marks, marks[1:], strict=False):
                self.phase_seconds[name] += b - a

    def _energy_forces(self, pos: np.ndarray, box: np.ndarray, marks: list[float]) -> tuple[float, np.ndarray]:
        fr: Frame = self._frame
        fr.positions = pos
        fr.box = box
        emb = select_embedding(fr, self.embedding)  # holds numpy's BLAS to 1 thread itself
        marks.append(time.perf_counter())
        res = self.engine.compute_frame(fr, emb)
        self.calls += 1
        self.last_uncertainty = float(res.info.get("energy_std", float("nan")))  # type: ignore[arg-type]
        above = self.max_uncertainty is not None and self.last_uncertainty > self.max_uncertainty
        if above or (self.held_calls > 0 and self.fallback != "stop"):
            self.held_calls = self.hold if above else self.held_calls - 1
            if self.queue is not None and above:  # held calls below the threshold are not queued
                self.queue.offer(fr, self.calls, self.last_uncertainty, self.step)
            if self.fallback == "stop":  # the frame is queued (the runner writes the queue when the run ends)
                self.stop_reason = (
                    f"model uncertainty {self.last_uncertainty:.2f} kJ/mol exceeds the threshold "
                    f"{self.max_uncertainty:.2f} kJ/mol"
                )
                self.stopped_unsure = True
                raise MDStopError(self.stop_reason)
            if self.fallback == "baseline":
                res = self.engine.last_baseline  # type: ignore[attr-defined]
            else:
                assert self.fallback_engine is not None
                res = self.fallback_engine.compute_frame(fr, emb)
            self.fallback_steps += 1
        marks.append(time.perf_counter())  # engine time includes a fallback engine's call and the queueing
        with numpy_blas_threads(1):  # qmlmm's small products; spinning BLAS threads would slow the next call
            forces = embedding_forces_to_frame(fr, emb, res.qm_forces, res.mm_forces, res.mm_potential)
        marks.append(time.perf_counter())
        self.last_energy = res.energy
        self.last_n_mm = emb.n_mm
        if not (np.isfinite(res.energy) and np.all(np.isfinite(forces))):
            self.stop_reason = "non-finite QM/MM energy or forces"
            raise MDStopError(self.stop_reason)
        return res.energy, forces

    def __call__(self, state: Any) -> tuple[float, np.ndarray]:
        import openmm.unit as u

        t0 = time.perf_counter()
        pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(u.nanometer))
        self.step = int(state.getStepCount())
        self.phase_seconds["state_transfer"] += time.perf_counter() - t0
        try:
            return self.energy_forces(pos, box)
        except MDStopError:
            raise
        except Exception as e:
            self.stop_reason = f"QM/MM force failed: {type(e).__name__}: {e}"
            raise


def make_python_force(callback: QMMMCallback, group: int = 1) -> Any:
    """An ``openmm.PythonForce`` calling ``callback`` every force evaluation (periodic)."""
    import openmm

    f = openmm.PythonForce(callback)
    f.setUsesPeriodicBoundaryConditions(True)
    f.setForceGroup(group)
    return f

"""The QM/MM (or ML/MM) force inside OpenMM: an ``openmm.PythonForce`` around any engine.

Every step: positions and box from OpenMM -> embedding (whole molecules within the cutoff, nearest
image, optional smooth switching) -> engine (QM engine, model, or delta = baseline + model) ->
energy and forces on QM and embedded MM atoms (plus the switching term) back to OpenMM. The MM
force field supplies everything else (TIP3P with PME, QM-MM Lennard-Jones).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from qmlmm.engines.base import Engine
from qmlmm.environment import EmbeddingSettings, embedding_forces_to_frame, select_embedding
from qmlmm.md.system import MDSystem
from qmlmm.system import Frame

log = logging.getLogger(__name__)

__all__ = ["QMMMCallback", "MDStopError", "make_python_force"]


class MDStopError(RuntimeError):
    """Raised inside the force callback to stop a simulation (non-finite forces, high uncertainty)."""


class QMMMCallback:
    """Callable for ``openmm.PythonForce``: (State) -> (energy kJ/mol, forces (N, 3) kJ/mol/nm)."""

    def __init__(
        self, engine: Engine, system: MDSystem, embedding: EmbeddingSettings, max_uncertainty: float | None = None
    ) -> None:
        self.engine = engine
        self.sys = system
        self.embedding = embedding
        self.max_uncertainty = max_uncertainty
        self.calls = 0
        self.seconds = 0.0
        self.last_energy = float("nan")
        self.last_uncertainty = float("nan")
        self.last_n_mm = 0
        self.stop_reason: str | None = None
        self._frame = system.frame()
        self._frame.validate()

    def energy_forces(self, pos: np.ndarray, box: np.ndarray) -> tuple[float, np.ndarray]:
        """QM/MM energy and forces (N, 3) for positions (N, 3) nm and box (3, 3) nm."""
        t0 = time.perf_counter()
        fr: Frame = self._frame
        fr.positions = pos
        fr.box = box
        emb = select_embedding(fr, self.embedding)
        res = self.engine.compute_frame(fr, emb)
        forces = embedding_forces_to_frame(fr, emb, res.qm_forces, res.mm_forces, res.mm_potential)
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        self.last_energy = res.energy
        self.last_uncertainty = float(res.info.get("energy_std", float("nan")))  # type: ignore[arg-type]
        self.last_n_mm = emb.n_mm
        if not (np.isfinite(res.energy) and np.all(np.isfinite(forces))):
            self.stop_reason = "non-finite QM/MM energy or forces"
            raise MDStopError(self.stop_reason)
        if self.max_uncertainty is not None and self.last_uncertainty > self.max_uncertainty:
            self.stop_reason = (
                f"model uncertainty {self.last_uncertainty:.2f} kJ/mol exceeds the threshold "
                f"{self.max_uncertainty:.2f} kJ/mol"
            )
            raise MDStopError(self.stop_reason)
        return res.energy, forces

    def __call__(self, state: Any) -> tuple[float, np.ndarray]:
        import openmm.unit as u

        pos = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(u.nanometer)
        try:
            return self.energy_forces(np.asarray(pos), np.asarray(box))
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

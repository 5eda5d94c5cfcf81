"""The engine interface: QM/MM energy and forces with electrostatic embedding.

An engine takes the QM atoms (atomic numbers, positions) and the embedded MM point charges
(positions, charges) and returns the energy of the QM region in the field of the charges
(QM-MM electrostatics included, MM-MM excluded) with forces on the QM atoms and on every point
charge. All quantities cross this interface in qmlmm units (nm, e, kJ/mol, kJ/mol/nm); each
engine converts to its program's units inside.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field

import numpy as np

from qmlmm.elements import check_charge_multiplicity
from qmlmm.environment import Embedding, EmbeddingSettings, embedding_forces_to_frame, select_embedding
from qmlmm.system import Frame, Label

__all__ = ["Engine", "EngineResult", "QMMMInput", "label_frame"]


@dataclass
class EngineResult:
    """Output of one engine call.

    Attributes:
        energy: QM/MM energy, kJ/mol.
        qm_forces: (n, 3) forces on QM atoms, kJ/mol/nm.
        mm_forces: (m, 3) forces on the point charges, kJ/mol/nm.
        mm_potential: (m,) dE/dq_j in kJ/mol/e (the QM region's electrostatic potential at the
            charges, as the engine's Hamiltonian sees it), or None if not requested.
        info: engine-specific extras (SCF iterations, timings in s, QM atomic charges, ...).
    """

    energy: float
    qm_forces: np.ndarray
    mm_forces: np.ndarray
    mm_potential: np.ndarray | None = None
    info: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class QMMMInput:
    """What an engine computes on: the QM atoms in the field of the embedded point charges, checked and in
    qmlmm units (built by :meth:`Engine.compute`).

    Attributes:
        numbers (n,) atomic numbers and qm_positions (n, 3) nm of the QM atoms; mm_positions (m, 3) nm,
        mm_charges (m,) e and mm_numbers (m,) atomic numbers of the point charges (m = 0: vacuum);
        charge, mult: total charge and spin multiplicity of the QM region; need_potential: also return
        dE/dq at the charges.
    """

    numbers: np.ndarray
    qm_positions: np.ndarray
    mm_positions: np.ndarray
    mm_charges: np.ndarray
    mm_numbers: np.ndarray
    charge: int = 0
    mult: int = 1
    need_potential: bool = False


class Engine(abc.ABC):
    """A QM/MM engine. Subclasses implement :meth:`_compute`, :meth:`versions`, :meth:`settings`."""

    #: the full spec string, e.g. "dft:b3lyp/def2-svp"
    spec: str
    #: the family part of the spec (before the colon), the default level name
    family: str

    def compute(
        self,
        numbers: np.ndarray,
        qm_positions: np.ndarray,
        mm_positions: np.ndarray | None = None,
        mm_charges: np.ndarray | None = None,
        charge: int = 0,
        mult: int = 1,
        mm_numbers: np.ndarray | None = None,
        need_potential: bool = False,
    ) -> EngineResult:
        """Energy and forces of the QM atoms embedded in point charges.

        Args:
            numbers: (n,) atomic numbers of the QM atoms.
            qm_positions: (n, 3) nm.
            mm_positions: (m, 3) nm, or None for vacuum.
            mm_charges: (m,) e.
            charge, mult: total charge and spin multiplicity of the QM region.
            mm_numbers: (m,) atomic numbers of the MM atoms (used by engines that damp
                point charges by element, e.g. xtb); default oxygen.
            need_potential: also return dE/dq at the MM sites (needed by smooth embedding).
        """
        numbers = np.asarray(numbers, dtype=np.int64)
        qm_positions = np.asarray(qm_positions, dtype=np.float64).reshape(len(numbers), 3)
        if mm_positions is None or mm_charges is None:
            mm_positions, mm_charges = np.zeros((0, 3)), np.zeros(0)
        mm_positions = np.asarray(mm_positions, dtype=np.float64).reshape(-1, 3)
        mm_charges = np.asarray(mm_charges, dtype=np.float64).reshape(len(mm_positions))
        if mm_numbers is None:
            mm_numbers = np.full(len(mm_charges), 8, dtype=np.int64)
        check_charge_multiplicity(numbers, charge, mult)
        t0 = time.perf_counter()
        inp = QMMMInput(
            numbers,
            qm_positions,
            mm_positions,
            mm_charges,
            np.asarray(mm_numbers, dtype=np.int64),
            int(charge),
            int(mult),
            bool(need_potential),
        )
        res = self._compute(inp)
        res.info.setdefault("time_s", time.perf_counter() - t0)
        return res

    @abc.abstractmethod
    def _compute(self, inp: QMMMInput) -> EngineResult:
        """Engine-specific computation, inputs already checked and in qmlmm units."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Program name -> version string of everything that determines the numbers."""

    @abc.abstractmethod
    def settings(self) -> dict[str, object]:
        """Settings that determine the numbers (stored with the labels; compared on resume)."""

    def set_threads(self, n: int) -> None:  # noqa: B027 - optional hook
        """Set the number of threads the engine uses (default: does nothing)."""

    def compute_frame(self, frame: Frame, embedding: Embedding) -> EngineResult:
        """Run the engine on ``frame`` with a precomputed ``embedding``."""
        return self.compute(
            frame.numbers[embedding.qm_index],
            embedding.qm_positions,
            embedding.mm_positions,
            embedding.mm_charges,
            frame.qm_charge,
            frame.qm_mult,
            frame.numbers[embedding.mm_index],
            need_potential=len(embedding.switch_mm) > 0,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def label_frame(engine: Engine, frame: Frame, settings: EmbeddingSettings | None = None) -> tuple[Label, EngineResult]:
    """Label one frame: select its embedding, run ``engine``, return forces on all N atoms.

    Returns the :class:`~qmlmm.system.Label` (energy kJ/mol, forces (N, 3) kJ/mol/nm, zero on
    MM atoms outside the embedding) and the raw engine result.
    """
    frame.validate()
    emb = select_embedding(frame, settings)
    res = engine.compute_frame(frame, emb)
    forces = embedding_forces_to_frame(frame, emb, res.qm_forces, res.mm_forces, res.mm_potential)
    res.info["n_mm"] = emb.n_mm
    charges = None
    q = res.info.get("qm_charges")
    if q is not None:
        charges = np.full(len(frame.numbers), np.nan)
        charges[emb.qm_index] = np.asarray(q, dtype=np.float64)
    return Label(res.energy, forces, charges), res

"""ASE calculator for qmlmm models (and any qmlmm engine).

Atoms follow the exchange convention (docs/dataset.md): per-atom arrays ``qm``, ``mm_charge``,
``mol_id``; info ``qm_charge``, ``qm_mult``; cell and pbc. The calculator returns the QM/MM energy
(eV) and forces on all atoms (eV/Angstrom; zero on MM atoms outside the embedding). It does not add
MM-MM or Lennard-Jones terms.

    from qmlmm.models import load_model
    from qmlmm.models.ase_calculator import QMLMMCalculator
    atoms.calc = QMLMMCalculator(load_model("model.pt"))
    atoms.get_potential_energy(); atoms.get_forces(); atoms.calc.results["energy_std"]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from qmlmm.data.extxyz import atoms_to_frame
from qmlmm.engines.base import Engine, label_frame
from qmlmm.environment import EmbeddingSettings
from qmlmm.models.model import QMLMMModel
from qmlmm.units import EV_PER_KJMOL, KJMOLNM_PER_EVANGSTROM

__all__ = ["QMLMMCalculator"]


class QMLMMCalculator(Calculator):
    """ASE calculator from a :class:`QMLMMModel` (ensemble spread in ``results['energy_std']``, eV)
    or from an :class:`Engine` with embedding settings."""

    implemented_properties = ("energy", "forces", "free_energy")  # type: ignore[assignment]

    def __init__(
        self,
        model: QMLMMModel | Engine,
        embedding: EmbeddingSettings | None = None,
        force_spread: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.force_spread = force_spread
        if isinstance(model, QMLMMModel):
            self.embedding = model.embedding
        else:
            self.embedding = embedding or EmbeddingSettings()

    def calculate(self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        frame = atoms_to_frame(self.atoms, where="ASE atoms")
        if isinstance(self.model, QMLMMModel):
            p = self.model.predict_frames([frame], force_spread=self.force_spread, use_labels=False)[0]
            energy, forces, std = p.energy, p.forces, p.energy_std
            if p.forces_std is not None:
                self.results["forces_std"] = p.forces_std / KJMOLNM_PER_EVANGSTROM
        else:
            lab, _ = label_frame(self.model, frame, self.embedding)
            energy, forces, std = lab.energy, lab.forces, float("nan")
        self.results["energy"] = energy * EV_PER_KJMOL
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = np.asarray(forces) / KJMOLNM_PER_EVANGSTROM
        self.results["energy_std"] = std * EV_PER_KJMOL

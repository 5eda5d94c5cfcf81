"""Which MM atoms the QM region sees: electrostatic embedding by molecule-based cutoff.

Rule: every MM molecule with any atom within ``cutoff`` (default 1.4 nm) of any QM atom is
embedded, whole, at the periodic image nearest to the QM region; the QM region itself is made
whole across the box edge first.

Smooth embedding (DESIGN.md section 1): with ``switch_width`` w > 0, the charges of molecule J are
scaled by S(d_J), where d_J is the shortest distance between an atom of J and a QM atom and S
falls smoothly (quintic smoothstep, continuous up to the second derivative) from 1 at
``cutoff - w`` to 0 at ``cutoff``. The energy E(R, q * S(d(R))) then changes continuously when
a molecule enters or leaves. Its forces get the extra term
``-sum_J (sum_{j in J} dE/dq_j q0_j) dS_J/dR``, applied by :func:`embedding_forces_to_frame`
from the engine's ``dE/dq`` (the electrostatic potential of the QM region at the MM sites).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from qmlmm.errors import InputError
from qmlmm.system import Frame, minimum_image

__all__ = [
    "Embedding",
    "EmbeddingSettings",
    "embedding_forces_to_frame",
    "make_qm_whole",
    "select_embedding",
    "switch",
]


@dataclass(frozen=True)
class EmbeddingSettings:
    """How to choose and weight the embedded MM charges.

    Attributes:
        cutoff: molecule-based cutoff radius in nm.
        switch_width: width in nm of the region inside the cutoff over which charges are switched
            off smoothly; 0 means a sharp cutoff.
    """

    cutoff: float = 1.4
    switch_width: float = 0.0

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise InputError(f"embedding cutoff must be positive, got {self.cutoff} nm")
        if not 0 <= self.switch_width < self.cutoff:
            raise InputError(f"switch width must lie in [0, cutoff), got {self.switch_width} nm")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> EmbeddingSettings:
        return cls(cutoff=float(d["cutoff"]), switch_width=float(d.get("switch_width", 0.0)))


@dataclass
class Embedding:
    """The MM environment of one frame as the QM engine sees it.

    Attributes:
        qm_index: (n,) indices of QM atoms in the frame.
        qm_positions: (n, 3) nm, QM region made whole.
        mm_index: (m,) indices of the embedded MM atoms in the frame.
        mm_positions: (m, 3) nm, at the image nearest to the QM region, molecules whole.
        mm_charges: (m,) effective charges in e (raw charge times the switching weight).
        mm_weights: (m,) switching weight of each atom's molecule (1 well inside the cutoff).
        switch_mm: (k,) for each embedded molecule whose weight varies: the local MM index of its
            atom closest to the QM region.
        switch_qm: (k,) the QM index (local, 0..n-1) of the partner QM atom.
        switch_grad: (k, 3) dS/dr of the molecule's weight w.r.t. that MM atom's position, 1/nm
            (its gradient w.r.t. the QM partner is the negative).
        switch_group: (m,) for each MM atom the row in the switch_* arrays of its molecule, or -1.
    """

    qm_index: np.ndarray
    qm_positions: np.ndarray
    mm_index: np.ndarray
    mm_positions: np.ndarray
    mm_charges: np.ndarray
    mm_weights: np.ndarray
    switch_mm: np.ndarray
    switch_qm: np.ndarray
    switch_grad: np.ndarray
    switch_group: np.ndarray

    @property
    def n_mm(self) -> int:
        return len(self.mm_index)


def switch(d: np.ndarray, r_on: float, r_off: float) -> tuple[np.ndarray, np.ndarray]:
    """Quintic smoothstep S(d) (1 below ``r_on``, 0 above ``r_off``) and dS/dd, d in nm."""
    d = np.asarray(d, dtype=np.float64)
    if r_off <= r_on:
        s = (d < r_off).astype(np.float64)
        return s, np.zeros_like(d)
    x = np.clip((d - r_on) / (r_off - r_on), 0.0, 1.0)
    s = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)
    ds = -30.0 * x * x * (1.0 - x) ** 2 / (r_off - r_on)
    return s, ds


def make_qm_whole(positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """QM positions (n, 3) nm unwrapped relative to the first QM atom by minimum image.

    Raises InputError when the QM region spans more than half the box (then no unique whole
    image exists).
    """
    if box is None:
        return positions.copy()
    d = minimum_image(positions - positions[0], box)
    whole = positions[0] + d
    half_height = (
        0.5 * abs(np.linalg.det(box)) / np.max(np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1))
    )
    if np.max(np.linalg.norm(d, axis=1)) > half_height:
        raise InputError(
            f"QM region extends {np.max(np.linalg.norm(d, axis=1)):.2f} nm, more than half the box "
            f"height ({half_height:.2f} nm): enlarge the box"
        )
    return whole


def select_embedding(frame: Frame, settings: EmbeddingSettings | None = None, chunk: int = 8192) -> Embedding:
    """Embedded MM environment of ``frame`` (see module docstring for the rule).

    Cost is O(n_qm * n_mm), processed in chunks of ``chunk`` MM atoms to bound memory.
    """
    settings = settings or EmbeddingSettings()
    box = frame.box
    qm_index = frame.qm_indices
    mm_all = frame.mm_indices
    qm_pos = make_qm_whole(frame.positions[qm_index], box)
    rc = settings.cutoff
    if box is not None:
        heights = abs(np.linalg.det(box)) / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)
        if rc > 0.5 * heights.min():
            raise InputError(
                f"embedding cutoff {rc} nm exceeds half the box height ({0.5 * heights.min():.2f} nm): "
                "a molecule could be embedded twice"
            )

    # nearest QM atom and nearest image for every MM atom that can be within the cutoff: an atom
    # farther than cutoff + (QM radius) from the QM centre cannot (cheap pre-filter, then exact)
    m_all = len(mm_all)
    dmin = np.full(m_all, np.inf)
    near_qm = np.zeros(m_all, dtype=np.int64)
    image_pos = np.zeros((m_all, 3))
    centre = qm_pos.mean(0)
    radius = float(np.sqrt(((qm_pos - centre) ** 2).sum(1)).max())
    dc = minimum_image(frame.positions[mm_all] - centre, box)
    cand = np.flatnonzero((dc * dc).sum(1) < (rc + radius + 1e-9) ** 2)
    for s0 in range(0, len(cand), chunk):
        sl = cand[s0 : s0 + chunk]
        r_mm = frame.positions[mm_all[sl]]
        d = minimum_image(r_mm[:, None, :] - qm_pos[None, :, :], box)  # (c, n, 3)
        r2 = np.einsum("cnk,cnk->cn", d, d)
        i = np.argmin(r2, axis=1)
        rows = np.arange(len(i))
        near_qm[sl] = i
        dmin[sl] = np.sqrt(r2[rows, i])
        image_pos[sl] = qm_pos[i] + d[rows, i]

    # molecules: the atom of each molecule closest to the QM region decides and anchors
    mol = frame.mol_ids[mm_all]
    uniq, inv = np.unique(mol, return_inverse=True)
    order = np.lexsort((dmin, inv))
    first = np.ones(len(order), dtype=bool)
    first[1:] = inv[order[1:]] != inv[order[:-1]]
    anchor_of_mol = np.empty(len(uniq), dtype=np.int64)
    anchor_of_mol[inv[order[first]]] = order[first]
    d_mol = dmin[anchor_of_mol]
    selected_mol = d_mol < rc
    sel_atoms = np.flatnonzero(selected_mol[inv])  # positions within mm_all, source order kept

    anchor = anchor_of_mol[inv[sel_atoms]]
    rel = minimum_image(frame.positions[mm_all[sel_atoms]] - frame.positions[mm_all[anchor]], box)
    mm_pos = image_pos[anchor] + rel

    r_on = rc - settings.switch_width
    w_mol, dw_mol = switch(d_mol, r_on, rc)
    weights = w_mol[inv[sel_atoms]]
    charges = frame.charges[mm_all[sel_atoms]] * weights

    # switching-derivative bookkeeping for molecules with 0 < S < 1 region (dS != 0)
    sw_mols = np.flatnonzero(selected_mol & (dw_mol != 0.0))
    local_of = -np.ones(m_all, dtype=np.int64)
    local_of[sel_atoms] = np.arange(len(sel_atoms))
    sw_anchor = anchor_of_mol[sw_mols]
    sw_mm = local_of[sw_anchor]
    sw_qm = near_qm[sw_anchor]
    vec = mm_pos[sw_mm] - qm_pos[sw_qm]
    sw_grad = (dw_mol[sw_mols] / d_mol[sw_mols])[:, None] * vec
    row_of_mol = -np.ones(len(uniq), dtype=np.int64)
    row_of_mol[sw_mols] = np.arange(len(sw_mols))
    group = row_of_mol[inv[sel_atoms]]

    return Embedding(
        qm_index=qm_index,
        qm_positions=qm_pos,
        mm_index=mm_all[sel_atoms],
        mm_positions=mm_pos,
        mm_charges=charges,
        mm_weights=weights,
        switch_mm=sw_mm,
        switch_qm=sw_qm,
        switch_grad=sw_grad,
        switch_group=group,
    )


def embedding_forces_to_frame(
    frame: Frame,
    emb: Embedding,
    qm_forces: np.ndarray,
    mm_forces: np.ndarray,
    mm_potential: np.ndarray | None = None,
) -> np.ndarray:
    """Assemble forces (N, 3) kJ/mol/nm on all atoms of ``frame`` from engine output.

    Args:
        qm_forces: (n, 3) forces on QM atoms at fixed effective MM charges.
        mm_forces: (m, 3) forces on embedded MM atoms at fixed effective charges.
        mm_potential: (m,) dE/dq_j in kJ/mol/e at the embedded sites; required when any
            molecule lies in the switching region, where it adds the switching force.
    """
    forces = np.zeros((frame.n_atoms, 3))
    qf = np.array(qm_forces, dtype=np.float64, copy=True)
    mf = np.array(mm_forces, dtype=np.float64, copy=True)
    if len(emb.switch_mm):
        if mm_potential is None:
            raise InputError("smooth embedding needs the engine's dE/dq at the MM sites")
        raw_q = frame.charges[emb.mm_index]
        contrib = mm_potential * raw_q  # dE/dS per atom
        dE_dS = np.zeros(len(emb.switch_mm))
        grp = emb.switch_group
        np.add.at(dE_dS, grp[grp >= 0], contrib[grp >= 0])
        g = dE_dS[:, None] * emb.switch_grad
        np.add.at(mf, emb.switch_mm, -g)
        np.add.at(qf, emb.switch_qm, g)
    forces[emb.qm_index] = qf
    forces[emb.mm_index] = mf
    return forces

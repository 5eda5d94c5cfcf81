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

Unique periodic images (DESIGN.md section 1): a molecule must lie within the cutoff of the QM
region through one image only, or its embedded image can jump by a box vector as it moves by a
hair (a 0.01 nm move, a 4.3 nm jump and a 2.9 kJ/mol energy step were reproduced). That is
guaranteed when the shortest lattice vector L satisfies ``L >= 2 r_c + D_qm + d_mol`` (D_qm the
largest distance between two QM atoms, d_mol the largest embedded molecule): if atom j of a
molecule is within r_c of QM atom a and atom k of the same molecule, shifted by L, within r_c of QM
atom b, then |L| <= r_c + D_qm + r_c + d_mol. :func:`select_embedding` refuses a frame that
breaks it (:class:`PeriodicImageError`, naming the box it needs); ``r_c < L/2`` is not enough.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass

import numpy as np

from qmlmm.errors import InputError
from qmlmm.switching import switch_derivative, switch_value
from qmlmm.system import Frame, is_orthorhombic, minimum_image
from qmlmm.threads import numpy_blas_threads

__all__ = [
    "DEFAULT_CUTOFF",
    "DEFAULT_SWITCH_WIDTH",
    "Embedding",
    "EmbeddingSettings",
    "PeriodicImageError",
    "check_unique_images",
    "embedding_forces_to_frame",
    "largest_internal_distance",
    "make_qm_whole",
    "required_box_edge",
    "select_embedding",
    "shortest_lattice_vector",
    "switch",
    "trim_frame",
]

#: The embedding cutoff (nm) used by every command, the API, sampling, labelling, MD and the pipeline.
DEFAULT_CUTOFF: float = 1.4
#: The width (nm) of the smooth switching shell inside the cutoff, everywhere by default (docs/labelling.md).
DEFAULT_SWITCH_WIDTH: float = 0.2


class PeriodicImageError(InputError):
    """The box is too small for every embedded molecule to have a unique periodic image."""


@dataclass(frozen=True)
class EmbeddingSettings:
    """How to choose and weight the embedded MM charges.

    Attributes:
        cutoff: molecule-based cutoff radius in nm.
        switch_width: width in nm of the region inside the cutoff over which charges are switched
            off smoothly; 0 means a sharp cutoff.
    """

    cutoff: float = DEFAULT_CUTOFF
    switch_width: float = DEFAULT_SWITCH_WIDTH

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise InputError(f"embedding cutoff must be positive, got {self.cutoff} nm")
        if not 0 <= self.switch_width < self.cutoff:
            raise InputError(f"switch width must lie in [0, cutoff), got {self.switch_width} nm")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> EmbeddingSettings:
        """Settings as stored with labels and models; a record without ``switch_width`` predates smooth
        embedding and was sharp (0), not today's default."""
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
    """Switching weight S(d) and dS/dd of :mod:`qmlmm.switching` for distances d (nm)."""
    d = np.asarray(d, dtype=np.float64)
    return switch_value(d, r_on, r_off), switch_derivative(d, r_on, r_off)


_LATTICE_COMBOS = np.array([c for c in itertools.product((-1, 0, 1), repeat=3) if any(c)], dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _box_geometry(key: bytes) -> tuple[np.ndarray, float]:
    """Heights (3,) and shortest lattice vector (nm) of the box whose rows (3, 3) float64 are ``key``'s bytes
    (cached: a box is the same for every step of a constant-volume run, and these cost ~0.1 ms a step)."""
    box = np.frombuffer(key, dtype=np.float64).reshape(3, 3)
    heights = abs(np.linalg.det(box)) / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)
    heights.setflags(write=False)
    return heights, float(np.linalg.norm(_LATTICE_COMBOS @ box, axis=1).min())


def _box_key(box: np.ndarray) -> bytes:
    return np.ascontiguousarray(box, dtype=np.float64).reshape(3, 3).tobytes()


def box_heights(box: np.ndarray) -> np.ndarray:
    """(3,) heights (nm) of the cell with box rows (3, 3): the distances between opposite faces."""
    return _box_geometry(_box_key(box))[0].copy()


def shortest_lattice_vector(box: np.ndarray) -> float:
    """Length (nm) of the shortest nonzero lattice vector of box rows (3, 3) (exact for reduced boxes,
    as OpenMM's, whose shortest vector is a combination with coefficients in {-1, 0, 1})."""
    return _box_geometry(_box_key(box))[1]


def largest_internal_distance(positions: np.ndarray) -> float:
    """Largest distance (nm) between two of the points (n, 3) (0 for fewer than two)."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(p) < 2:
        return 0.0
    d2 = (p * p).sum(1)
    r2 = d2[:, None] + d2[None, :] - 2.0 * p @ p.T
    return float(np.sqrt(max(float(r2.max()), 0.0)))


def required_box_edge(cutoff: float, d_qm: float, d_mol: float) -> float:
    """Shortest lattice vector (nm) that gives every molecule a unique image: 2 r_c + D_qm + d_mol."""
    return 2.0 * cutoff + d_qm + d_mol


def check_unique_images(box: np.ndarray | None, cutoff: float, d_qm: float, d_mol: float) -> None:
    """Raise :class:`PeriodicImageError` naming the box needed when the box breaks
    ``L >= 2 r_c + D_qm + d_mol`` (module docstring); nothing for an isolated system."""
    if box is None:
        return
    L = shortest_lattice_vector(box)
    need = required_box_edge(cutoff, d_qm, d_mol)
    if need > L:
        raise PeriodicImageError(
            f"box too small for a unique periodic image of every embedded molecule: shortest box vector "
            f"{L:.3f} nm < 2 r_c + D_qm + d_mol = 2 x {cutoff:.3f} + {d_qm:.3f} + {d_mol:.3f} = {need:.3f} nm "
            f"(r_c the embedding cutoff, D_qm the QM region's largest internal distance, d_mol the largest "
            f"embedded molecule); build the system with a box edge of at least {need:.3f} nm (`qmlmm build "
            f"--cutoff {cutoff:g}` sizes the box for it) or use a smaller cutoff"
        )


def _largest_molecule(mm_pos: np.ndarray, mol_of_atom: np.ndarray) -> float:
    """Largest internal distance (nm) over the molecules of atoms at ``mm_pos`` (m, 3) (molecules whole),
    ``mol_of_atom`` (m,) their molecule numbers 0..G-1."""
    if len(mm_pos) == 0:
        return 0.0
    counts = np.bincount(mol_of_atom)
    if counts.max() < 2:
        return 0.0
    order = np.argsort(mol_of_atom, kind="stable")  # linear for atoms stored molecule by molecule
    start = np.cumsum(counts) - counts
    rank = np.empty(len(mol_of_atom), dtype=np.int64)
    rank[order] = np.arange(len(mol_of_atom)) - start[mol_of_atom[order]]
    padded = np.full((len(counts), int(counts.max()), 3), np.nan)
    padded[mol_of_atom, rank] = mm_pos
    d = padded[:, :, None, :] - padded[:, None, :, :]
    return float(np.sqrt(np.nanmax((d * d).sum(-1))))


def _first_minimum_per_group(group: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(G,) index of the smallest ``value`` within each group 0..G-1 of ``group`` (n,), the first in index
    order among equal values (as ``np.lexsort((value, group))`` would pick it; a stable sort by group is
    linear for atoms stored molecule by molecule, where lexsort sorts every atom)."""
    if len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(group, kind="stable")
    g, v = group[order], value[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    at_min = np.flatnonzero(v == np.minimum.reduceat(v, starts)[g])
    first = at_min[np.r_[True, g[at_min[1:]] != g[at_min[:-1]]]]
    return order[first]


def make_qm_whole(positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """QM positions (n, 3) nm unwrapped relative to the first QM atom by minimum image.

    Raises InputError when the QM region spans more than half the box (then no unique whole
    image exists).
    """
    if box is None:
        return positions.copy()
    d = minimum_image(positions - positions[0], box)
    whole = positions[0] + d
    half_height = 0.5 * float(box_heights(box).min())
    if np.max(np.linalg.norm(d, axis=1)) > half_height:
        raise InputError(
            f"QM region extends {np.max(np.linalg.norm(d, axis=1)):.2f} nm, more than half the box "
            f"height ({half_height:.2f} nm): enlarge the box"
        )
    return whole


@dataclass
class _Nearest:
    """Per MM atom of the frame (arrays over ``frame.mm_indices``): distance (nm) to its nearest QM atom
    and that atom's index in the QM region, and the position (nm) of the atom's image used. Filled for
    the candidates (``cand``, atoms that can be within the cutoff); inf / 0 elsewhere."""

    dmin: np.ndarray
    near_qm: np.ndarray
    image_pos: np.ndarray
    cand: np.ndarray


@dataclass
class _Molecules:
    """The embedded molecules: their ids (sorted), anchor atoms (index into ``mm_indices``) and anchor
    distances d_mol (nm); the embedded atoms (index into ``mm_indices``, source order) and each one's
    row in the molecule arrays."""

    ids: np.ndarray
    anchor: np.ndarray
    d_mol: np.ndarray
    atoms: np.ndarray
    row: np.ndarray


def select_embedding(
    frame: Frame,
    settings: EmbeddingSettings | None = None,
    chunk: int = 8192,
    check_images: bool = True,
    pairwise: bool = False,
) -> Embedding:
    """Embedded MM environment of ``frame`` (see module docstring for the rule).

    Cost is O(n_qm * n_candidates) distances, processed in chunks of ``chunk`` MM atoms to bound memory. Raises
    :class:`PeriodicImageError` when the box is too small for unique images (``check_images``; only
    callers that check it themselves for another cutoff, as :func:`qmlmm.workflows.sample.trim_frame`,
    turn it off). ``pairwise`` forces the per-pair minimum-image search (the reference for tests; the
    default takes the cheaper centre-image path wherever it gives the same result).
    """
    with numpy_blas_threads(1):  # small products: spinning BLAS threads would slow whatever runs next
        return _select_embedding(frame, settings or EmbeddingSettings(), chunk, check_images, pairwise)


def _select_embedding(
    frame: Frame, settings: EmbeddingSettings, chunk: int, check_images: bool, pairwise: bool
) -> Embedding:
    box, rc = frame.box, settings.cutoff
    mm_all = frame.mm_indices
    qm_pos = make_qm_whole(frame.positions[frame.qm_indices], box)
    _check_cutoff_within_half_box(rc, box)
    near = _nearest_qm_atoms(frame, qm_pos, rc, chunk, pairwise)
    mols = _embedded_molecules(frame.mol_ids[mm_all], near, rc)
    anchor = mols.anchor[mols.row]
    rel = minimum_image(frame.positions[mm_all[mols.atoms]] - frame.positions[mm_all[anchor]], box)
    mm_pos = near.image_pos[anchor] + rel  # each molecule whole, at its anchor's image
    if check_images and box is not None:
        _check_unique_images_of(box, rc, qm_pos, mm_pos, rel, mols.row)
    w_mol, dw_mol = switch(mols.d_mol, rc - settings.switch_width, rc)
    weights = w_mol[mols.row]
    sw_mols = np.flatnonzero(dw_mol != 0.0)  # molecules in the switching region (dS != 0)
    local_of = -np.ones(len(mm_all), dtype=np.int64)
    local_of[mols.atoms] = np.arange(len(mols.atoms))
    sw_anchor = mols.anchor[sw_mols]
    sw_mm, sw_qm = local_of[sw_anchor], near.near_qm[sw_anchor]
    sw_grad = (dw_mol[sw_mols] / mols.d_mol[sw_mols])[:, None] * (mm_pos[sw_mm] - qm_pos[sw_qm])
    row_of_mol = -np.ones(len(mols.ids), dtype=np.int64)
    row_of_mol[sw_mols] = np.arange(len(sw_mols))
    return Embedding(
        qm_index=frame.qm_indices,
        qm_positions=qm_pos,
        mm_index=mm_all[mols.atoms],
        mm_positions=mm_pos,
        mm_charges=frame.charges[mm_all[mols.atoms]] * weights,
        mm_weights=weights,
        switch_mm=sw_mm,
        switch_qm=sw_qm,
        switch_grad=sw_grad,
        switch_group=row_of_mol[mols.row],
    )


def _check_unique_images_of(
    box: np.ndarray, rc: float, qm_pos: np.ndarray, mm_pos: np.ndarray, rel: np.ndarray, row: np.ndarray
) -> None:
    """:func:`check_unique_images` for the embedded molecules at ``mm_pos`` (m, 3) nm (``row`` their
    molecule, ``rel`` each atom's offset from its molecule's anchor, nm). A molecule's largest internal
    distance is at most twice its largest anchor offset, so a box that passes with that bound passes
    the exact test, which runs only when the bound does not pass (same result, the exact pairwise
    sizes of all embedded molecules are not needed every MD step)."""
    d_qm = largest_internal_distance(qm_pos)
    d_mol_bound = 2.0 * float(np.sqrt((rel * rel).sum(1).max())) if len(rel) else 0.0
    if shortest_lattice_vector(box) < required_box_edge(rc, d_qm, d_mol_bound):
        check_unique_images(box, rc, d_qm, _largest_molecule(mm_pos, row))


def _check_cutoff_within_half_box(rc: float, box: np.ndarray | None) -> None:
    """Raise InputError when the cutoff (nm) exceeds half the smallest height of the box (3, 3) nm."""
    if box is None:
        return
    heights = box_heights(box)
    if rc > 0.5 * heights.min():
        raise InputError(
            f"embedding cutoff {rc} nm exceeds half the box height ({0.5 * heights.min():.2f} nm): "
            "a molecule could be embedded twice"
        )


def _nearest_qm_atoms(frame: Frame, qm_pos: np.ndarray, rc: float, chunk: int, pairwise: bool) -> _Nearest:
    """Nearest QM atom and nearest image of every MM atom that can be within ``rc`` (nm) of the QM
    region ``qm_pos`` (n_qm, 3) nm (whole): an atom farther than rc + (QM radius) from the QM centre
    cannot (cheap pre-filter, then exact distances in chunks of ``chunk`` atoms)."""
    box, mm_all = frame.box, frame.mm_indices
    m_all = len(mm_all)
    near = _Nearest(np.full(m_all, np.inf), np.zeros(m_all, dtype=np.int64), np.zeros((m_all, 3)), np.zeros(0, int))
    centre = qm_pos.mean(0)
    qm_rel = qm_pos - centre
    radius = float(np.sqrt(np.einsum("ij,ij->i", qm_rel, qm_rel).max()))
    centre_image = not pairwise and (box is None or shortest_lattice_vector(box) >= 2.0 * (rc + radius) + 1e-9)
    if centre_image and _selection_kernel():  # the same search in one compiled pass (every MD step)
        near.cand = _nearest_by_kernel(frame.positions, mm_all, centre, box, qm_rel, rc + radius + 1e-9, near)
        return near
    dc = minimum_image(_rows(frame.positions, mm_all) - centre, box)
    cand = np.flatnonzero(np.einsum("ij,ij->i", dc, dc) < (rc + radius + 1e-9) ** 2)
    near.cand = cand
    if centre_image:
        # When every box vector is at least 2 (r_c + radius) long, the image of an atom within the cutoff of
        # any QM atom is its image nearest the QM centre (|x - c| <= r_c + radius, every other image lies
        # >= L - r_c - radius >= r_c + radius away), so plain distances to that image decide: one (c, n)
        # distance matrix instead of a minimum image per QM-MM pair (2x faster for retinoic acid in 3559
        # waters). A box sized for unique images (2 r_c + D_qm + d_mol) does not always give this (the
        # centroid's radius can exceed D_qm / 2): then the per-pair minimum image below.
        # The nearest QM atom minimises |q|^2 - 2 p.q (|p|^2 is the same for all; positions from the QM
        # centre, so the terms stay small); its exact distance is then taken from the difference.
        qq = np.einsum("ij,ij->i", qm_rel, qm_rel)
        for s0 in range(0, len(cand), chunk):
            p = dc[cand[s0 : s0 + chunk]]
            i = np.argmin(p @ (-2.0 * qm_rel.T) + qq, axis=1)
            idx = cand[s0 : s0 + chunk]
            diff = p - qm_rel[i]
            near.near_qm[idx] = i
            near.dmin[idx] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            near.image_pos[idx] = p + centre
        return near
    for s0 in range(0, len(cand), chunk):  # the centre image may not be the one within rc: per-pair images
        sl = cand[s0 : s0 + chunk]
        d = minimum_image(frame.positions[mm_all[sl]][:, None, :] - qm_pos[None, :, :], box)  # (c, n, 3)
        r2 = np.einsum("cnk,cnk->cn", d, d)
        i = np.argmin(r2, axis=1)
        rows = np.arange(len(i))
        near.near_qm[sl] = i
        near.dmin[sl] = np.sqrt(r2[rows, i])
        near.image_pos[sl] = qm_pos[i] + d[rows, i]
    return near


#: the centre-image search by the compiled kernel (qmlmm/kernels/embedding.cpp) where it builds; False:
#: numpy's form always (the tests compare the two)
USE_SELECTION_KERNEL = True


def _selection_kernel() -> bool:
    """Whether the nearest-QM-atom search runs compiled: :data:`USE_SELECTION_KERNEL` and the kernels build
    (:mod:`qmlmm.compiled`; ``QMLMM_NATIVE=0`` turns them off)."""
    if not USE_SELECTION_KERNEL:
        return False
    from qmlmm.compiled import available

    return available()


def _nearest_by_kernel(
    positions: np.ndarray,
    mm: np.ndarray,
    centre: np.ndarray,
    box: np.ndarray | None,
    qm_rel: np.ndarray,
    radius: float,
    near: _Nearest,
) -> np.ndarray:
    """The centre-image search of :func:`_nearest_qm_atoms` by the compiled kernel, in one pass: positions
    (N, 3) nm, ``mm`` (M,) the MM atoms' indices into them, ``centre`` (3,) nm the QM centre, ``box`` (3, 3)
    rows nm or None, ``qm_rel`` (n, 3) nm the QM positions from the centre, ``radius`` nm the candidates'
    radius around the centre. Fills ``near``'s dmin, near_qm and image_pos for every candidate (|minimum
    image of x_m - centre| < radius); returns the candidates (C,) (indices into mm, ascending)."""
    import torch

    from qmlmm.compiled import module

    mod = module()
    assert mod is not None
    periodic = box is not None
    b = np.ascontiguousarray(box if periodic else np.eye(3), dtype=np.float64)
    ortho = is_orthorhombic(b)
    inv = np.linalg.inv(b) if periodic and not ortho else np.eye(3)
    cand = np.zeros(len(mm), dtype=np.uint8)
    t = torch.from_numpy
    mod.nearest_qm_atoms(
        t(np.ascontiguousarray(positions, dtype=np.float64)),
        t(np.ascontiguousarray(mm, dtype=np.int64)),
        t(np.ascontiguousarray(centre, dtype=np.float64)),
        t(b),
        t(np.ascontiguousarray(inv)),
        periodic,
        bool(ortho),
        t(np.ascontiguousarray(qm_rel, dtype=np.float64)),
        float(radius) ** 2,
        t(near.dmin),
        t(near.near_qm),
        t(near.image_pos),
        t(cand),
    )
    return np.flatnonzero(cand)


def _rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[idx]`` for sorted indices ``idx``; a view when they are one contiguous range (the MM atoms of a
    system built with its solute first)."""
    if len(idx) and int(idx[-1]) - int(idx[0]) + 1 == len(idx):
        return a[int(idx[0]) : int(idx[-1]) + 1]
    return a[idx]


def _embedded_molecules(mol: np.ndarray, near: _Nearest, rc: float) -> _Molecules:
    """The molecules (ids ``mol`` per MM atom) whose atom closest to the QM region lies within ``rc``
    nm; that atom decides and anchors. Only molecules with a candidate atom can be within the cutoff,
    so the sort runs over the candidates alone."""
    cand = near.cand
    cand_mols, cinv = np.unique(mol[cand], return_inverse=True)
    anchor_of_mol = cand[_first_minimum_per_group(cinv, near.dmin[cand])]  # molecule (sorted by id) -> atom
    keep = near.dmin[anchor_of_mol] < rc
    ids, anchor = cand_mols[keep], anchor_of_mol[keep]
    if len(ids) and int(mol.min()) >= 0 and int(mol.max()) < 8 * len(mol) + 64:
        # molecule ids of the usual size: a row table indexed by id (a gather; searchsorted is ~5x slower)
        table = np.full(int(mol.max()) + 1, -1, dtype=np.int64)
        table[ids] = np.arange(len(ids))
        row = table[mol]
        in_sel = row >= 0
    else:
        row = np.searchsorted(ids, mol).clip(max=max(len(ids) - 1, 0))
        in_sel = ids[row] == mol if len(ids) else np.zeros(len(mol), dtype=bool)
    atoms = np.flatnonzero(in_sel)  # positions within mm_indices, source order kept
    return _Molecules(ids, anchor, near.dmin[anchor], atoms, row[atoms])


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


def trim_frame(frame: Frame, cutoff: float, margin: float) -> Frame:
    """The QM region and the MM molecules within ``cutoff + margin`` of it, whole, near the QM region.

    The margin shrinks when the box is too small for it (at most half the shortest box height). The
    box must give unique images at ``cutoff`` (:class:`~qmlmm.environment.PeriodicImageError`
    otherwise); the molecules of the margin beyond it need not be (they are never embedded at
    ``cutoff``, and the frame keeps its box, so any later selection sees the same periodic system).
    """
    rc = cutoff + margin
    if frame.box is not None:
        rc = max(cutoff, min(rc, 0.5 * float(box_heights(frame.box).min()) - 1e-6))
    select_embedding(frame, EmbeddingSettings(cutoff=cutoff, switch_width=0.0))  # raises for ambiguous images
    emb = select_embedding(frame, EmbeddingSettings(cutoff=rc, switch_width=0.0), check_images=False)
    idx = np.concatenate([emb.qm_index, emb.mm_index])
    pos = np.concatenate([emb.qm_positions, emb.mm_positions])
    return Frame(
        numbers=frame.numbers[idx],
        positions=pos,
        is_qm=frame.is_qm[idx],
        charges=frame.charges[idx],
        mol_ids=frame.mol_ids[idx],
        box=frame.box,
        qm_charge=frame.qm_charge,
        qm_mult=frame.qm_mult,
        info=dict(frame.info),
    )

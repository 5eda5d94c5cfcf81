"""Environment selection: whole molecules, periodic images, cutoff edges, switching."""

from __future__ import annotations

import numpy as np
import pytest

from qmlmm.environment import EmbeddingSettings, embedding_forces_to_frame, select_embedding, switch
from qmlmm.errors import InputError
from qmlmm.system import Frame, minimum_image
from qmlmm.toy import solvated_frame


def _two_atom_frame(dist: float, box: float | None = 4.0) -> Frame:
    """QM atom (He... use H2) at the origin region and one water whose H sits at ``dist`` nm."""
    qm = np.array([[0.0, 0.0, 0.0], [0.074, 0.0, 0.0]])
    # water: H at (dist + 0.074, 0, 0) from origin along x -> distance to nearest QM atom = dist
    h1 = np.array([0.074 + dist, 0.0, 0.0])
    o = h1 + np.array([0.09572, 0.0, 0.0])
    h2 = o + 0.09572 * np.array([np.cos(np.deg2rad(75.48)), np.sin(np.deg2rad(75.48)), 0.0])
    pos = np.array([*qm, o, h1, h2]) + (0.0 if box is None else 0.5)
    return Frame(
        numbers=np.array([1, 1, 8, 1, 1]),
        positions=pos,
        is_qm=np.array([1, 1, 0, 0, 0]),
        charges=np.array([0, 0, -0.834, 0.417, 0.417]),
        mol_ids=np.array([0, 0, 1, 1, 1]),
        box=None if box is None else np.eye(3) * box,
    )


@pytest.mark.parametrize("box", [None, 4.0])
def test_cutoff_edge_any_atom_counts(box: float | None) -> None:
    s = EmbeddingSettings(cutoff=1.0)
    inside = select_embedding(_two_atom_frame(1.0 - 1e-7, box), s)
    outside = select_embedding(_two_atom_frame(1.0 + 1e-7, box), s)
    assert inside.n_mm == 3  # the whole water, although only its H is inside
    assert outside.n_mm == 0


def test_whole_molecules_only() -> None:
    fr = solvated_frame("methanol", box=3.0, seed=3)
    emb = select_embedding(fr, EmbeddingSettings(cutoff=1.0))
    sel = set(fr.mol_ids[emb.mm_index].tolist())
    for m in sel:
        assert np.sum(fr.mol_ids[emb.mm_index] == m) == np.sum(fr.mol_ids == m)
    # every embedded water is intact (O-H 0.09572 nm) after imaging
    pos = emb.mm_positions.reshape(-1, 3, 3)
    assert np.allclose(np.linalg.norm(pos[:, 1] - pos[:, 0], axis=1), 0.09572, atol=1e-9)
    # and no molecule outside was missed: brute force check with minimum image
    for m in set(fr.mol_ids[~fr.is_qm].tolist()) - sel:
        idx = np.flatnonzero(fr.mol_ids == m)
        d = minimum_image(fr.positions[idx][:, None] - fr.positions[fr.is_qm][None], fr.box)
        assert np.sqrt((d**2).sum(-1)).min() >= 1.0


def test_periodic_images_and_whole_qm_region() -> None:
    # solute centred on a box corner: it is split across all faces, its shell comes from images
    fr = solvated_frame("methanol", box=3.0, seed=5, center=(0.0, 0.0, 0.0))
    assert np.ptp(fr.positions[fr.is_qm], axis=0).max() > 2.0  # split in the file
    emb = select_embedding(fr, EmbeddingSettings(cutoff=1.0))
    assert np.ptp(emb.qm_positions, axis=0).max() < 0.3  # made whole
    d = emb.mm_positions[:, None] - emb.qm_positions[None]
    dmin = np.sqrt((d**2).sum(-1)).min(1)
    assert dmin.max() < 1.0 + 0.2  # every embedded atom near the QM region (a water spans < 0.2 nm)
    # the same as the solute in the centre of a translated copy of the system
    shift = np.array([1.5, 1.5, 1.5])
    moved = fr.copy()
    moved.positions = (fr.positions + shift) % 3.0
    emb2 = select_embedding(moved, EmbeddingSettings(cutoff=1.0))
    assert np.array_equal(emb.mm_index, emb2.mm_index)
    rel1 = emb.mm_positions - emb.qm_positions[0]
    rel2 = emb2.mm_positions - emb2.qm_positions[0]
    assert np.allclose(rel1, rel2, atol=1e-10)


def test_cutoff_larger_than_half_box_is_an_error() -> None:
    fr = solvated_frame("water", box=2.0)
    with pytest.raises(InputError, match="half the box"):
        select_embedding(fr, EmbeddingSettings(cutoff=1.4))


def test_bad_settings() -> None:
    with pytest.raises(InputError):
        EmbeddingSettings(cutoff=-1.0)
    with pytest.raises(InputError):
        EmbeddingSettings(cutoff=1.0, switch_width=1.5)


def test_switch_function_smooth() -> None:
    d = np.linspace(0.7, 1.1, 4001)
    s, ds = switch(d, 0.8, 1.0)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert np.all(np.diff(s) <= 1e-15)
    num = np.gradient(s, d)
    assert np.allclose(ds, num, atol=2e-3 * np.abs(ds).max())
    # continuous derivative at both ends
    assert abs(ds[np.searchsorted(d, 0.8)]) < 1e-4 and abs(ds[np.searchsorted(d, 1.0) - 1]) < 1e-3


def test_switching_gradient_matches_finite_difference() -> None:
    """Energy model E = sum_j phi_j q_j S_J: the switching forces from embedding_forces_to_frame
    equal -dE/dR by finite differences for atoms whose molecules are in the switching shell."""
    fr = solvated_frame("methanol", box=3.0, seed=7)
    s = EmbeddingSettings(cutoff=1.0, switch_width=0.3)
    phi = np.random.default_rng(0).normal(size=fr.n_atoms)  # fixed "potential" per atom

    def energy(pos: np.ndarray) -> float:
        f = fr.copy()
        f.positions = pos
        e = select_embedding(f, s)
        return float(np.sum(phi[e.mm_index] * e.mm_charges))

    emb = select_embedding(fr, s)
    assert len(emb.switch_mm) > 10
    forces = embedding_forces_to_frame(
        fr, emb, np.zeros((len(emb.qm_index), 3)), np.zeros((emb.n_mm, 3)), mm_potential=phi[emb.mm_index]
    )
    atoms = list(emb.mm_index[emb.switch_mm[:5]]) + list(fr.qm_indices[:2])
    h = 1e-6
    for a in atoms:
        for k in range(3):
            p = fr.positions.copy()
            p[a, k] += h
            ep = energy(p)
            p[a, k] -= 2 * h
            em = energy(p)
            assert -(ep - em) / (2 * h) == pytest.approx(forces[a, k], abs=1e-6)


def test_weight_vanishes_continuously_at_cutoff() -> None:
    s = EmbeddingSettings(cutoff=1.0, switch_width=0.2)
    w = [select_embedding(_two_atom_frame(1.0 - eps), s).mm_weights for eps in (1e-2, 1e-3)]
    assert all(len(x) == 3 and np.ptp(x) == 0 for x in w)  # one weight for the whole molecule
    # S = u^3 (10 - 15 u + 6 u^2), u = eps / width: continuous, with zero slope at the cutoff
    for x, eps in zip(w, (1e-2, 1e-3), strict=True):
        u = eps / 0.2
        assert x[0] == pytest.approx(u**3 * (10 - 15 * u + 6 * u * u), rel=1e-6)
    assert select_embedding(_two_atom_frame(1.0 + 1e-9), s).n_mm == 0

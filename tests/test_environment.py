"""Environment selection: whole molecules, periodic images, cutoff edges, switching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qmlmm.environment import EmbeddingSettings, embedding_forces_to_frame, select_embedding, switch
from qmlmm.errors import InputError
from qmlmm.system import Frame, minimum_image
from qmlmm.testing import solvated_frame


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


# ---- unique periodic images (issue: an embedded molecule must never jump by a box length) -----------
def _ammonium_water_frame(box: float, x_mm: float) -> Frame:
    """QM region: NH4+ at the origin and a water 1.7 nm along x; MM: one TIP3P water with its O at x_mm
    on the x axis (placed 0.2 nm off-axis, so it is near both QM molecules through different images when
    the box is small). The reproduction of the image-jump bug: 4.3 nm box, cutoff 1.4 nm."""
    nh4 = np.array([[0, 0, 0], [0.0589, 0.0589, 0.0589], [-0.0589, -0.0589, 0.0589], [-0.0589, 0.0589, -0.0589],
                    [0.0589, -0.0589, -0.0589]])  # fmt: skip
    w = np.array([[0.0, 0.0, 0.0], [0.0757, 0.0586, 0.0], [-0.0757, 0.0586, 0.0]])
    pos = np.concatenate([nh4, w + np.array([1.7, 0, 0]), w + np.array([x_mm, 0.2, 0])])
    return Frame(
        numbers=np.array([7, 1, 1, 1, 1, 8, 1, 1, 8, 1, 1]),
        positions=pos,
        is_qm=np.arange(11) < 8,
        charges=np.concatenate([np.zeros(8), [-0.834, 0.417, 0.417]]),
        mol_ids=np.array([0] * 8 + [1] * 3),
        box=np.eye(3) * box,
        qm_charge=1,
    )


def test_image_ambiguity_is_refused_with_the_box_needed() -> None:
    """The reproduced case (4.3 nm box, NH4+ and a water 1.7 nm apart, cutoff 1.4): every frame of the
    0.01 nm series is refused, naming the box it needs; before, the water's image jumped from x = 3.48 to
    -0.81 nm between two frames and the DFTB3/MM energy by 2.9 kJ/mol."""
    from qmlmm.environment import PeriodicImageError, largest_internal_distance, required_box_edge

    s = EmbeddingSettings(1.4, 0.2)
    need = required_box_edge(1.4, largest_internal_distance(_ammonium_water_frame(4.3, 3.0).positions[:8]), 0.1514)
    for x in np.arange(3.40, 3.60, 0.01):
        with pytest.raises(PeriodicImageError, match=f"at least {need:.3f} nm"):
            select_embedding(_ammonium_water_frame(4.3, float(x)), s)


def test_just_large_enough_box_gives_a_smooth_energy_without_image_jumps() -> None:
    """In a box 1e-3 nm above 2 r_c + D_qm + d_mol the same sweep is accepted: the water's embedded image
    moves by the 0.01 nm steps (never by a box length) and the DFTB3/MM energy has no step (its second
    differences stay at the level of the smooth curvature)."""
    from qmlmm.engines import label_frame, make_engine
    from qmlmm.environment import largest_internal_distance, required_box_edge

    fr0 = _ammonium_water_frame(10.0, 3.0)
    d_qm = largest_internal_distance(fr0.positions[:8])
    d_mol = largest_internal_distance(fr0.positions[8:])
    box = required_box_edge(1.4, d_qm, d_mol) + 1e-3
    s = EmbeddingSettings(1.4, 0.2)
    eng = make_engine("dftb3:3ob")
    xs = np.arange(box - 1.6, box - 1.2, 0.01)  # the water sweeps from near the water (via the image) outwards
    pos, energies = [], []
    for x in xs:
        fr = _ammonium_water_frame(box, float(x))
        emb = select_embedding(fr, s)
        pos.append(emb.mm_positions[0] if emb.n_mm else None)
        energies.append(label_frame(eng, fr, s)[0].energy)
    both = [(a, b) for a, b in itertools.pairwise(pos) if a is not None and b is not None]
    steps = np.array([np.linalg.norm(b - a) for a, b in both])
    assert len(both) > 5 and steps.max() < 0.011  # from frame to frame the image moves by the step only
    # it changes image (near the QM water, then near the NH4+ through the box edge) only after leaving
    # the embedding of both: unique images leave a gap between the two
    present = np.array([p_ is not None for p_ in pos])
    assert present[0] and present[-1] and not present.all()
    e = np.array(energies)
    assert np.ptp(e) > 0.01  # the water is felt
    assert np.abs(np.diff(e, 2)).max() < 0.2, np.diff(e, 2)


@pytest.mark.parametrize("margin", [-1e-3, 1e-3])
def test_elongated_qm_region_sets_the_box_needed(margin: float) -> None:
    """A 2 nm long QM chain (D_qm = 2.0 nm) with one water: the box must exceed 2 r_c + D_qm + d_mol whatever
    the water's position; 1e-3 nm below is refused, 1e-3 nm above accepted."""
    from qmlmm.environment import PeriodicImageError

    chain = np.stack([np.linspace(0, 2.0, 11), np.zeros(11), np.zeros(11)], axis=1)
    w = np.array([[0.0, 0.0, 0.0], [0.0757, 0.0586, 0.0], [-0.0757, 0.0586, 0.0]]) + np.array([1.0, 0.5, 0.0])
    d_mol = float(np.linalg.norm(w[1] - w[2]))
    box = 2 * 1.0 + 2.0 + d_mol + margin
    fr = Frame(
        numbers=np.array([6] * 11 + [8, 1, 1]),
        positions=np.concatenate([chain, w]),
        is_qm=np.arange(14) < 11,
        charges=np.concatenate([np.zeros(11), [-0.834, 0.417, 0.417]]),
        mol_ids=np.array([0] * 11 + [1] * 3),
        box=np.eye(3) * box,
        qm_mult=1,
    )
    if margin < 0:
        with pytest.raises(PeriodicImageError, match="box too small"):
            select_embedding(fr, EmbeddingSettings(1.0, 0.2))
    else:
        assert select_embedding(fr, EmbeddingSettings(1.0, 0.2)).n_mm == 3


def test_shortest_lattice_vector_of_a_triclinic_box() -> None:
    from qmlmm.environment import shortest_lattice_vector

    assert shortest_lattice_vector(np.eye(3) * 3.0) == pytest.approx(3.0)
    # rhombic dodecahedron (OpenMM's reduced form): all 12 shortest vectors have the edge length
    a = 4.0
    box = np.array([[a, 0, 0], [0, a, 0], [a / 2, a / 2, a / np.sqrt(2)]])
    assert shortest_lattice_vector(box) == pytest.approx(a)
    skew = np.array([[3.0, 0, 0], [2.5, 1.0, 0], [0, 0, 5.0]])  # b - a is shorter than a and b
    assert shortest_lattice_vector(skew) == pytest.approx(np.hypot(0.5, 1.0))


# ---- one embedding default, one switching function -----------------------------------------------------
def test_one_embedding_default_everywhere() -> None:
    """CLI (label, sample, md), API (EmbeddingSettings, label_dataset), sampling, the model config and the
    pipeline all default to the same cutoff and switching width."""
    import inspect

    from qmlmm import cli
    from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH
    from qmlmm.models.hdnnp import ModelConfig
    from qmlmm.workflows.pipeline import PipelineConfig
    from qmlmm.workflows.sample import SampleSettings

    assert (DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH) == (1.4, 0.2)
    want = (DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH)
    e = EmbeddingSettings()
    assert (e.cutoff, e.switch_width) == want
    assert (SampleSettings().cutoff, SampleSettings().switch_width) == want
    assert (ModelConfig().cutoff, ModelConfig().switch_width) == want
    p = PipelineConfig(name="x", solutes=["CO"])
    assert (p.cutoff, p.switch_width) == want
    for cmd in (cli.label, cli.sample):
        sig = inspect.signature(cmd)
        assert (sig.parameters["cutoff"].default, sig.parameters["switch_width"].default) == want, cmd
    # md: no value means the default (a model brings its own)
    _, emb = cli._engine_for_md(None, "dftb3:3ob", 1, None, None)
    assert (emb.cutoff, emb.switch_width) == want
    from qmlmm.workflows.label import label_dataset

    assert inspect.signature(label_dataset).parameters["embedding"].default is None  # -> EmbeddingSettings()


def test_labels_and_model_weight_every_mm_charge_identically() -> None:
    """The switching weights of the labels (environment, numpy) and of the model (hdnnp, torch) are the same
    numbers for every embedded MM atom of a frame with many molecules in the switching shell."""
    import torch

    from qmlmm.data.batch import collate, frame_tensors
    from qmlmm.models.hdnnp import switch_weights

    fr = solvated_frame("methanol", box=3.0, seed=11)
    s = EmbeddingSettings(cutoff=1.0, switch_width=0.3)
    emb = select_embedding(fr, s)
    assert len(emb.switch_mm) > 10 and (emb.mm_weights == 1).any()
    b = collate([frame_tensors(fr, s, emb=emb)], dtype=torch.float64)
    w = switch_weights(b, s.cutoff, s.switch_width).numpy()
    assert np.array_equal(emb.mm_weights, w) or np.allclose(emb.mm_weights, w, rtol=0, atol=1e-14)


def _brute_force_embedding(fr: Frame, rc: float) -> dict[int, np.ndarray]:
    """molecule id -> embedded positions (atoms, 3) by brute force: every one of the 27 images of every
    molecule (made whole), embedded at the image whose closest atom is nearest the whole QM region."""
    import itertools

    assert fr.box is not None
    L = np.diagonal(fr.box)
    qm = fr.positions[fr.qm_indices]
    qm = qm[0] % L + minimum_image(qm - qm[0], fr.box)  # whole, its first atom in the box
    out = {}
    for m in np.unique(fr.mol_ids[~fr.is_qm]):
        idx = np.flatnonzero(fr.mol_ids == m)
        whole = fr.positions[idx[0]] % L + minimum_image(fr.positions[idx] - fr.positions[idx[0]], fr.box)
        best = None
        for n in itertools.product((-1, 0, 1), repeat=3):
            p = whole + np.array(n) @ fr.box
            d = np.linalg.norm(p[:, None] - qm[None], axis=-1).min()
            if d < rc and (best is None or d < best[0]):
                best = (d, p)
        if best is not None:
            out[int(m)] = best[1]
    return out


@pytest.mark.parametrize("seed", [3, 8])
def test_fast_selection_equals_brute_force_on_wrapped_and_shifted_frames(seed: int) -> None:
    """The distance-to-the-centre-image selection (valid under unique images) embeds exactly the molecules,
    at exactly the images, that a brute-force search over all 27 images finds, for a frame wrapped into the
    box, shifted by arbitrary box vectors and with the solute across a corner; and equals the per-pair
    minimum-image path."""
    fr = solvated_frame("methanol", box=3.3, seed=seed, center=(0.1, 0.2, 3.2))  # split across the faces
    rng = np.random.default_rng(seed)
    shifted = fr.copy()
    shifted.positions = fr.positions + rng.integers(-2, 3, size=(fr.n_atoms, 1)) * 3.3 * rng.integers(0, 2, size=3)
    s = EmbeddingSettings(cutoff=1.4, switch_width=0.2)
    for f in (fr, shifted):
        fast = select_embedding(f, s)
        exact = select_embedding(f, s, pairwise=True)
        ref = _brute_force_embedding(f, 1.4)
        mols = f.mol_ids[fast.mm_index]
        assert sorted(set(mols.tolist())) == sorted(ref)
        # the same images relative to the QM region (qmlmm keeps the QM region where its first atom is; the
        # brute force puts that atom in the box: one box-vector translation of everything)
        t = fast.qm_positions[0] - fast.qm_positions[0] % 3.3
        for m in ref:
            assert np.allclose(fast.mm_positions[mols == m] - t, ref[m], atol=1e-9), m
        for a in ("mm_index", "mm_positions", "mm_weights", "switch_mm", "switch_qm", "switch_grad"):
            assert np.allclose(getattr(fast, a), getattr(exact, a), atol=1e-12, rtol=0), a


def test_compiled_nearest_atom_search_gives_numpys_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled nearest-QM-atom search (qmlmm/kernels/embedding.cpp, used by default) embeds
    the same atoms at the same positions, with the same weights and switching gradients, as numpy's form of
    the same search: in a cubic box (wrapped, and shifted by box vectors), in a triclinic box and without a
    box."""
    import qmlmm.environment as env
    from qmlmm.compiled import available

    if not available():
        pytest.skip("compiled kernels not available (QMLMM_NATIVE=0 or no compiler)")
    fr = solvated_frame("methanol", box=3.3, seed=6, center=(0.1, 0.2, 3.2))
    rng = np.random.default_rng(6)
    shifted = fr.copy()
    shifted.positions = fr.positions + rng.integers(-2, 3, size=(fr.n_atoms, 1)) * 3.3 * rng.integers(0, 2, size=3)
    triclinic = solvated_frame("methanol", box=3.3, seed=6)  # in a reduced triclinic cell (rows as OpenMM's)
    triclinic.box = np.array([[3.6, 0.0, 0.0], [1.2, 3.5, 0.0], [-1.0, 1.3, 3.4]])
    cluster = fr.copy()
    cluster.box = None
    s = EmbeddingSettings(cutoff=1.0, switch_width=0.2)
    for f in (fr, shifted, triclinic, cluster):
        got = select_embedding(f, s)
        monkeypatch.setattr(env, "USE_SELECTION_KERNEL", False)
        ref = select_embedding(f, s)
        monkeypatch.setattr(env, "USE_SELECTION_KERNEL", True)
        assert got.n_mm > 50 and np.array_equal(got.mm_index, ref.mm_index)
        for a in ("qm_positions", "mm_positions", "mm_charges", "mm_weights", "switch_grad"):
            np.testing.assert_allclose(getattr(got, a), getattr(ref, a), rtol=0, atol=1e-12, err_msg=a)
        assert np.array_equal(got.switch_mm, ref.switch_mm) and np.array_equal(got.switch_qm, ref.switch_qm)


def test_selection_does_not_depend_on_the_order_or_numbering_of_atoms_and_molecules() -> None:
    """Atoms stored in shuffled order with scattered molecule ids (not molecule by molecule) give the same
    embedding, atom for atom: the per-molecule anchor (first closest atom) and size do not assume sorted
    molecules."""
    fr = solvated_frame("methanol", box=3.3, seed=4, center=(0.1, 0.2, 3.2))
    s = EmbeddingSettings(cutoff=1.4, switch_width=0.2)
    ref = select_embedding(fr, s)
    rng = np.random.default_rng(0)
    perm = rng.permutation(fr.n_atoms)
    relabel = rng.permutation(int(fr.mol_ids.max()) + 1) * 7 + 3  # sparse, unordered ids
    sh = Frame(
        numbers=fr.numbers[perm],
        positions=fr.positions[perm],
        is_qm=fr.is_qm[perm],
        charges=fr.charges[perm],
        mol_ids=relabel[fr.mol_ids[perm]],
        box=fr.box,
    )
    got = select_embedding(sh, s)
    assert len(got.mm_index) == len(ref.mm_index)
    back = perm[got.mm_index]  # original atom index of every embedded atom
    order, ref_order = np.argsort(back), np.argsort(ref.mm_index)
    assert np.array_equal(back[order], ref.mm_index[ref_order])
    # the QM region is made whole about its first atom, which the shuffle changes: compare relative to it
    qm0_ref = ref.qm_positions[np.argsort(ref.qm_index)][0]
    qm0 = got.qm_positions[np.argsort(perm[got.qm_index])][0]
    np.testing.assert_allclose(got.mm_positions[order] - qm0, ref.mm_positions[ref_order] - qm0_ref, atol=1e-9)
    np.testing.assert_allclose(got.mm_weights[order], ref.mm_weights[ref_order], atol=1e-12)
    assert len(got.switch_mm) == len(ref.switch_mm)


def test_selection_holds_numpy_blas_to_one_thread_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection's small matrix products run with numpy's OpenBLAS at 1 thread (spinning BLAS workers
    made the model call after a selection 2.5-6x slower: 17 -> 44-110 ms on retinoic acid in water,
    benchmarks/model_speed.py); the count comes back after."""
    import qmlmm.environment as env
    from qmlmm.threads import _openblas

    fns = _openblas()
    if fns is None:
        pytest.skip("numpy has no OpenBLAS here")
    get, set_ = fns
    seen: list[int] = []
    inner = env._nearest_qm_atoms

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(get())
        return inner(*args, **kwargs)

    monkeypatch.setattr(env, "_nearest_qm_atoms", recording)
    before = get()
    set_(2)
    try:
        emb = select_embedding(solvated_frame(box=2.6), EmbeddingSettings(cutoff=0.8, switch_width=0.2))
        assert seen == [1] and get() == 2 and emb.n_mm > 0
    finally:
        set_(before)

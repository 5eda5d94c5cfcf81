"""The engine contract (tests/engine_contract.py) for every engine: PySCF DFT, GFN2-xTB, our DFTB3 and
DFTB2 (also with Fermi smearing), and the ML model engine."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import cluster_frame
from engine_contract import EngineContract, Tolerances
from qmlmm.engines import Engine, make_engine
from qmlmm.environment import EmbeddingSettings, select_embedding

HARTREE_PER_BOHR = 2625.4996394799 / 0.0529177210903  # kJ/mol/nm


class TestDFT(EngineContract):
    # the DFT grid breaks translation invariance slightly: a looser net-force bound
    tol = Tolerances(fd_step=1e-4, qm_force=0.5, net_force=0.5, potential=1e-3, dq=1e-4)

    @classmethod
    def make_engine(cls) -> Engine:
        return make_engine("dft:pbe/sto-3g,conv=1e-11")


class TestXTB(EngineContract):
    # dE/dq exact (qmlmm.engines.xtb_pcem: xtb's damped kernel, shell charges from its point-charge gradient)
    tol = Tolerances(fd_step=1e-4, qm_force=0.05, potential=1e-3, dq=1e-4)

    @classmethod
    def make_engine(cls) -> Engine:
        return make_engine("xtb:gfn2,acc=0.0001")


class TestDFTB3(EngineContract):
    tol = Tolerances(qm_force=1e-6 * HARTREE_PER_BOHR, mm_force_rel=1e-6 * HARTREE_PER_BOHR)

    @classmethod
    def make_engine(cls) -> Engine:
        return make_engine("dftb3:3ob,tol=1e-11")


class TestDFTB2(TestDFTB3):
    @classmethod
    def make_engine(cls) -> Engine:
        return make_engine("dftb2:mio,tol=1e-11")


class TestDFTB3Fermi(TestDFTB3):
    """etemp 30000 K: kT 0.095 Eh, fractional occupations of a few % (Mermin free energy and its forces)."""

    @classmethod
    def make_engine(cls) -> Engine:
        return make_engine("dftb3:3ob,tol=1e-11,etemp=30000")


class TestModel(EngineContract):
    """An untrained float64 ensemble of two with the electrostatic term and smooth embedding: exact
    autograd forces (so tight bounds), non-trivial numbers."""

    tol = Tolerances(qm_force=1e-4, mm_force_rel=1e-6, net_force=1e-8, potential=1e-6, energy=1e-8, force=1e-7)

    @classmethod
    def make_engine(cls) -> Engine:
        import torch

        from qmlmm.models import ModelMeta, QMLMMModel
        from qmlmm.models.ensemble import Ensemble
        from qmlmm.models.hdnnp import HDNNP, ModelConfig

        torch.manual_seed(0)
        ens = Ensemble(ModelConfig(cutoff=0.9, switch_width=0.2), 2)
        with torch.no_grad():
            for m in ens.members:
                assert isinstance(m, HDNNP)
                m.e_scale.fill_(10.0)
                for net in m.charge_nets:
                    net[-1].weight.normal_(0.0, 0.3)  # type: ignore[index]
                    net[-1].bias.normal_(0.0, 0.2)  # type: ignore[index]
        return QMLMMModel(ens, ModelMeta(target="r")).to(dtype=torch.float64).engine(1)

    def test_batch_equals_frames_one_by_one(self, engine: Engine, shell: tuple[np.ndarray, ...]) -> None:
        """The model on a batch of frames (raw charges, switched inside the model) equals the engine on
        each frame alone (switched charges from the embedding)."""
        from qmlmm.data.batch import frame_tensors

        model = engine.model  # type: ignore[attr-defined]
        s = model.embedding
        frames = [cluster_frame("water", n_waters=n, radius=0.35, seed=k) for k, n in ((1, 5), (2, 8), (3, 6))]
        batch = model.predict_tensors([frame_tensors(fr, s) for fr in frames], batch_size=3)
        for fr, b in zip(frames, batch, strict=True):
            one = engine.compute_frame(fr, select_embedding(fr, EmbeddingSettings(s.cutoff, s.switch_width)))
            assert b["energy"] == pytest.approx(one.energy, abs=1e-8)
            assert np.abs(b["qm_forces"] - one.qm_forces).max() < 1e-7
            # the engine's MM forces exclude the switching term (applied with dE/dq by the caller)
            assert b["mm_forces"].shape == one.mm_forces.shape


def _fd_dE_dq(
    eng: Engine, z: np.ndarray, p: np.ndarray, mm: np.ndarray, q: np.ndarray, zn: np.ndarray, j: int
) -> float:
    """Central difference of the energy in the charge q_j (kJ/mol/e), step 1e-4 e."""
    qp, qm = q.copy(), q.copy()
    qp[j] += 1e-4
    qm[j] -= 1e-4
    return (eng.compute(z, p, mm, qp, mm_numbers=zn).energy - eng.compute(z, p, mm, qm, mm_numbers=zn).energy) / 2e-4


def _with_far_water(dist: float) -> tuple[np.ndarray, ...]:
    """A water in three waters plus one more water ``dist`` nm from its centre (atoms 9-11)."""
    from conftest import water_shell

    z, p, mm, q, zn = water_shell("water", n_waters=3, radius=0.3, seed=4)
    w = mm[:3] - mm[:3].mean(0) + p.mean(0) + np.array([dist, 0.0, 0.0])
    return z, p, np.concatenate([mm, w]), np.concatenate([q, q[:3]]), np.concatenate([zn, zn[:3]])


def test_xtb_gfn2_dE_dq_is_exact_where_the_atomic_charge_potential_is_not() -> None:
    """GFN2-xTB dE/dq at a water 1.1 nm away (the switching region of a 1.4 nm cutoff) equals finite
    differences in its charges to 1e-3 relative, where the potential of xtb's atomic charges by 1/r
    (used before) is > 3 % off: xtb damps each shell-charge/point-charge pair by the pair's hardness,
    and for a neutral molecule that damping does not cancel between O and H."""
    from qmlmm.units import BOHR_PER_NM, KJMOL_PER_HARTREE

    z, p, mm, q, zn = _with_far_water(1.1)
    eng = make_engine("xtb:gfn2,acc=0.0001")
    res = eng.compute(z, p, mm, q, mm_numbers=zn, need_potential=True)
    assert res.mm_potential is not None
    qa = res.info["qm_charges"]
    for j in (0, 9, 10):
        fd = _fd_dE_dq(eng, z, p, mm, q, zn, j)
        assert res.mm_potential[j] == pytest.approx(fd, rel=1e-3), (j, res.mm_potential[j], fd)
        bare = float((qa / (np.linalg.norm(p - mm[j], axis=1) * BOHR_PER_NM)).sum()) * KJMOL_PER_HARTREE
        if j >= 9:
            assert abs(bare - fd) > 0.03 * abs(fd), (j, bare, fd)


def test_xtb_gfn2_dE_dq_with_sulfur_and_a_chloride() -> None:
    """Exact dE/dq also for a QM region with a third-row atom (S: s, p and d shells) and an MM chloride
    (its own hardness) beside the waters."""
    from conftest import water_shell

    z, p, mm, q, zn = water_shell("water", n_waters=3, radius=0.3, seed=4)
    z = np.array([16, 1, 1])  # H2S in place of the water (the geometry is only a probe)
    p = p.copy()
    p[1:] = p[0] + 1.4 * (p[1:] - p[0])
    mm = np.concatenate([mm, p.mean(0)[None] + np.array([[0.0, 0.45, 0.0]])])
    q, zn = np.concatenate([q, [-1.0]]), np.concatenate([zn, [17]])
    eng = make_engine("xtb:gfn2,acc=0.0001")
    res = eng.compute(z, p, mm, q, mm_numbers=zn, need_potential=True)
    assert res.mm_potential is not None
    for j in (0, 4, len(q) - 1):
        assert res.mm_potential[j] == pytest.approx(_fd_dE_dq(eng, z, p, mm, q, zn, j), rel=1e-3), j


def test_xtb_dE_dq_refuses_unknown_elements_and_a_gradient_it_cannot_explain() -> None:
    """No parameters for an element (Fe here): EngineError naming it, not a guessed dE/dq; a point-charge
    gradient that xtb's kernel does not reproduce (perturbed by 1 %): EngineError, not a fit."""
    from qmlmm.engines.xtb_pcem import gfn2_potential_at_charges
    from qmlmm.errors import EngineError

    rng = np.random.default_rng(0)
    qm_z, qm_x = np.array([8, 1, 1]), rng.normal(size=(3, 3))
    mm_z, mm_x, mm_q = np.array([8, 1, 1] * 4), rng.normal(size=(12, 3)) * 6.0, np.tile([-0.834, 0.417, 0.417], 4)
    # helium's s and p shells have one hardness (kappa_p = 0): merged, so a He atom is no rank problem
    he = gfn2_potential_at_charges(np.array([2]), qm_x[:1], mm_z, mm_x, mm_q, np.zeros((12, 3)), np.zeros(1))
    assert np.allclose(he, 0.0)
    with pytest.raises(EngineError, match=r"\[26\]"):
        gfn2_potential_at_charges(np.array([26, 1, 1]), qm_x, mm_z, mm_x, mm_q, np.zeros((12, 3)), np.zeros(3))
    # a gradient made by the kernel from known shell charges (O s, O p, H, H) is explained exactly ...
    sh_q = np.array([0.3, -0.9, 0.3, 0.3])
    from qmlmm.engines.xtb_pcem import _shells

    sh_atom, sh_eta = _shells(qm_z)
    eta_j = np.array([0.451896 if zz == 8 else 0.405771 for zz in mm_z])
    d = qm_x[sh_atom][None] - mm_x[:, None]
    k = ((d * d).sum(-1) + 1.0 / (0.5 * (sh_eta[None] + eta_j[:, None])) ** 2) ** -1.5
    grad = mm_q[:, None] * (d * k[..., None] * sh_q[None, :, None]).sum(1)
    qa = np.bincount(sh_atom, sh_q)
    phi = gfn2_potential_at_charges(qm_z, qm_x, mm_z, mm_x, mm_q, grad, qa)
    want = (((d * d).sum(-1) + 1.0 / (0.5 * (sh_eta[None] + eta_j[:, None])) ** 2) ** -0.5) @ sh_q
    assert np.allclose(phi, want, rtol=1e-10, atol=1e-14)
    # ... and one 1 % off is refused
    with pytest.raises(EngineError, match="not reproduced"):
        gfn2_potential_at_charges(qm_z, qm_x, mm_z, mm_x, mm_q, grad * 1.01, qa)


def test_xtb_gfn1_potential_at_the_charges_is_a_few_percent_off_dE_dq() -> None:
    """Records the size of GFN1's dE/dq approximation (the potential of its atomic charges by 1/r; no
    GFN1 kernel parameters here): within 10 % of finite differences at a water 1.1 nm away, not exact."""
    z, p, mm, q, zn = _with_far_water(1.1)
    eng = make_engine("xtb:gfn1,acc=0.0001")
    res = eng.compute(z, p, mm, q, mm_numbers=zn, need_potential=True)
    assert res.mm_potential is not None
    for j in (9, 10):
        fd = _fd_dE_dq(eng, z, p, mm, q, zn, j)
        assert abs(res.mm_potential[j] - fd) < 0.1 * abs(fd), (j, res.mm_potential[j], fd)

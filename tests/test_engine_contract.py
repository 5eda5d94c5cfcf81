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
    tol = Tolerances(fd_step=1e-4, qm_force=0.05, potential=1e-3, dq=1e-4)
    # xtb's dE/dq is approximated by the bare potential of its atomic charges (qmlmm.engines.xtb): measured
    # against finite differences in the charges it is 7 % off at 0.3 nm (-42.2 vs -39.4 kJ/mol/e) and 6-8 %
    # still at 1.1 nm (2.35 vs 2.20): not exact, so not held to the contract (test_xtb_potential_error)
    has_potential = False

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


def test_xtb_potential_at_the_charges_is_a_few_percent_off_dE_dq() -> None:
    """Records the size of xtb's dE/dq approximation (the switching force of xtb/MM with smooth embedding
    uses it): within 10 % of finite differences at a water 1.1 nm away, the switching region of a 1.4 nm
    cutoff, but not exact. Tightening the bound is the test for a better dE/dq."""
    from conftest import water_shell

    z, p, mm, q, zn = water_shell("water", n_waters=3, radius=0.3, seed=4)
    w = mm[:3] - mm[:3].mean(0) + p.mean(0) + np.array([1.1, 0.0, 0.0])
    mm, q, zn = np.concatenate([mm, w]), np.concatenate([q, q[:3]]), np.concatenate([zn, zn[:3]])
    eng = make_engine("xtb:gfn2,acc=0.0001")
    res = eng.compute(z, p, mm, q, mm_numbers=zn, need_potential=True)
    assert res.mm_potential is not None
    for j in (9, 10):
        qp, qm = q.copy(), q.copy()
        qp[j] += 1e-4
        qm[j] -= 1e-4
        fd = (eng.compute(z, p, mm, qp, mm_numbers=zn).energy - eng.compute(z, p, mm, qm, mm_numbers=zn).energy) / 2e-4
        assert abs(res.mm_potential[j] - fd) < 0.1 * abs(fd), (j, res.mm_potential[j], fd)

"""The contract every QM/MM engine keeps, as one test mixin (NequIP's model test mixins are the model).

A test class for an engine inherits :class:`EngineContract` and says how to make the engine and how tight
its numbers are (:class:`Tolerances`); the mixin's tests then check, on one water in three TIP3P waters:

- forces on QM atoms and on MM point charges equal minus central finite differences of the energy, and
  are not trivially small; the net force on QM + MM (Newton's third law) vanishes to the engine's bound;
- dE/dq at the charges (``need_potential``) equals finite differences in the charges;
- the energy and forces of a periodic frame do not change when everything is translated and wrapped
  into the box (molecules split across faces), through the embedding;
- where the engine evaluates batches (``compute_batch``), a batch equals its frames one by one.

Test classes: tests/test_engine_contract.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from conftest import central_difference, cluster_frame, water_shell
from qmlmm.engines import Engine, label_frame
from qmlmm.environment import EmbeddingSettings


@dataclass(frozen=True)
class Tolerances:
    """How tight an engine's numbers are.

    fd_step (nm); qm_force (kJ/mol/nm) for analytic vs finite-difference QM forces; mm_force_rel relative
    (to max(1, |F|)) for the MM forces; net_force (kJ/mol/nm) for the sum of all forces; potential
    (kJ/mol/e) and dq (e) for dE/dq; energy (kJ/mol) and force (kJ/mol/nm) for translation and wrapping.
    """

    fd_step: float = 1e-5
    qm_force: float = 0.05
    mm_force_rel: float = 2e-3
    net_force: float = 1e-6
    potential: float = 1e-5
    dq: float = 1e-5
    energy: float = 1e-4
    force: float = 2e-3


class EngineContract:
    """Mixin: subclasses define :meth:`make_engine` and ``tol``."""

    tol = Tolerances()
    has_potential = True

    @classmethod
    def make_engine(cls) -> Engine:  # pragma: no cover - defined by each engine's class
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls) -> Engine:
        return cls.make_engine()

    @pytest.fixture(scope="class")
    @classmethod
    def shell(cls) -> tuple[np.ndarray, ...]:
        return water_shell("water", n_waters=3, radius=0.3, seed=4)

    def test_forces_equal_minus_finite_differences(self, engine: Engine, shell: tuple[np.ndarray, ...]) -> None:
        z, p, mm, q, zn = shell
        t = self.tol
        res = engine.compute(z, p, mm, q, mm_numbers=zn)
        assert res.qm_forces.shape == p.shape and res.mm_forces.shape == mm.shape
        f_qm = -central_difference(lambda x: engine.compute(z, x, mm, q, mm_numbers=zn).energy, p, t.fd_step)
        sub = slice(0, 6)  # two waters: the rest take the same code path

        def e_mm(x: np.ndarray) -> float:
            full = mm.copy()
            full[sub] = x
            return engine.compute(z, p, full, q, mm_numbers=zn).energy

        f_mm = -central_difference(e_mm, mm[sub], t.fd_step)
        assert np.abs(f_qm - res.qm_forces).max() < t.qm_force, (f_qm, res.qm_forces)
        assert np.abs(f_mm - res.mm_forces[sub]).max() < t.mm_force_rel * max(1.0, np.abs(f_mm).max())
        assert np.abs(res.mm_forces).max() > 1.0  # the charges feel the solute: the test can fail
        net = res.qm_forces.sum(0) + res.mm_forces.sum(0)
        assert np.abs(net).max() < t.net_force

    def test_potential_at_the_charges_is_dE_dq(self, engine: Engine, shell: tuple[np.ndarray, ...]) -> None:
        if not self.has_potential:
            pytest.skip("engine gives no dE/dq")
        z, p, mm, q, zn = shell
        t = self.tol
        res = engine.compute(z, p, mm, q, mm_numbers=zn, need_potential=True)
        assert res.mm_potential is not None and res.mm_potential.shape == q.shape
        for j in (0, 4):
            qp, qm = q.copy(), q.copy()
            qp[j] += t.dq
            qm[j] -= t.dq
            e_p = engine.compute(z, p, mm, qp, mm_numbers=zn).energy
            e_m = engine.compute(z, p, mm, qm, mm_numbers=zn).energy
            assert res.mm_potential[j] == pytest.approx((e_p - e_m) / (2 * t.dq), abs=t.potential), j
        assert np.abs(res.mm_potential).max() > 1.0  # kJ/mol/e: a potential worth resolving

    def test_energy_and_forces_invariant_under_translation_and_wrapping(self, engine: Engine) -> None:
        fr = cluster_frame("water", n_waters=6, radius=0.35, seed=2, box=2.4)
        s = EmbeddingSettings(cutoff=0.9, switch_width=0.2)
        ref, _ = label_frame(engine, fr, s)
        moved = fr.copy()
        moved.positions = (fr.positions + np.array([1.15, 0.7, 2.3])) % 2.4  # molecules split across faces
        lab, _ = label_frame(engine, moved, s)
        assert lab.energy == pytest.approx(ref.energy, abs=self.tol.energy)
        assert np.abs(lab.forces - ref.forces).max() < self.tol.force

    def test_batch_equals_frames_one_by_one(self, engine: Engine, shell: tuple[np.ndarray, ...]) -> None:
        batch = getattr(engine, "compute_batch", None)
        if batch is None:
            pytest.skip("engine evaluates one frame at a time")
        z, p, mm, q, zn = shell
        rng = np.random.default_rng(0)
        frames = [p + rng.normal(scale=0.005, size=p.shape) for _ in range(3)]
        mms, qs = [mm[: 3 * (k + 1)] for k in range(3)], [q[: 3 * (k + 1)] for k in range(3)]  # ragged
        b = batch(z, np.stack(frames), mms, qs)
        for k in range(3):
            one = engine.compute(z, frames[k], mms[k], qs[k], mm_numbers=zn[: len(qs[k])])
            assert b.energy[k] == pytest.approx(one.energy, abs=1e-6)
            assert np.abs(b.qm_forces[k] - one.qm_forces).max() < 1e-5
            assert np.abs(b.mm_forces[k] - one.mm_forces).max() < 1e-5

"""Descriptors and model: gradcheck, forces vs finite differences, invariances, smooth cutoffs,
no leakage between frames of a batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import cluster_frame
from qmlmm.data.batch import FrameBatch, FrameTensors, collate, frame_tensors
from qmlmm.descriptors import ACSF, DescriptorConfig
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError
from qmlmm.models import HDNNP, ModelConfig, energy_and_forces

CFG = DescriptorConfig(
    elements=[1, 6, 8],
    qm_radial_cutoff=0.5,
    qm_angular_cutoff=0.35,
    mm_radial_cutoff=0.7,
    mm_angular_cutoff=0.5,
    long_range_cutoff=0.9,
)


def _item(seed: int = 1, n_waters: int = 6, radius: float = 0.36) -> FrameTensors:
    fr = cluster_frame("methanol", n_waters=n_waters, radius=radius, seed=seed)
    return frame_tensors(fr, EmbeddingSettings(cutoff=0.9))


def _model(switch: float = 0.0, seed: int = 0) -> HDNNP:
    torch.manual_seed(seed)
    m = HDNNP(ModelConfig(descriptor=CFG, hidden=[16, 16], cutoff=0.9, switch_width=switch)).double()
    with torch.no_grad():  # non-trivial scaling so that every term matters
        m.feat_std.fill_(0.5)
        m.e_scale.fill_(10.0)
    return m


def _batch(items: list[FrameTensors]) -> FrameBatch:
    return collate(items, dtype=torch.float64)


def test_gradcheck_descriptors_qm_and_mm() -> None:
    it = _item()
    acsf = ACSF(CFG).double()
    b = _batch([it])

    def f(qm: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        bb = _batch([it])
        bb.qm_pos, bb.mm_pos = qm, mm
        return acsf(bb)

    x = f(b.qm_pos, b.mm_pos)
    assert x.shape == (6, acsf.n_features) and torch.isfinite(x).all()
    assert (x.abs().sum(0) > 0).sum() > 0.8 * acsf.n_features  # most features are populated
    assert torch.autograd.gradcheck(
        f, (b.qm_pos.clone().requires_grad_(), b.mm_pos.clone().requires_grad_()), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("switch", [0.0, 0.3])
def test_gradcheck_model_energy(switch: float) -> None:
    it = _item()
    m = _model(switch)

    def f(qm: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        bb = _batch([it])
        bb.qm_pos, bb.mm_pos = qm, mm
        return m(bb)

    b = _batch([it])
    assert torch.autograd.gradcheck(
        f, (b.qm_pos.clone().requires_grad_(), b.mm_pos.clone().requires_grad_()), eps=1e-6, atol=1e-5
    )


def test_forces_equal_minus_finite_differences_and_net_force_zero() -> None:
    it = _item()
    m = _model()
    b = _batch([it])
    _, fq, fm, pot = energy_and_forces(m, b, potential=True)
    assert torch.abs(fq.sum(0) + fm.sum(0)).max() < 1e-9  # translation invariance
    h = 1e-6

    def energy(qm: np.ndarray, mm: np.ndarray, q: np.ndarray | None = None) -> float:
        bb = _batch([it])
        bb.qm_pos = torch.as_tensor(qm)
        bb.mm_pos = torch.as_tensor(mm)
        if q is not None:
            bb.mm_q = torch.as_tensor(q)
        return float(m(bb)[0])

    qm0, mm0 = it.qm_pos.copy(), it.mm_pos.copy()
    for a, k in [(0, 0), (2, 1), (5, 2)]:
        p, n = qm0.copy(), qm0.copy()
        p[a, k] += h
        n[a, k] -= h
        assert -(energy(p, mm0) - energy(n, mm0)) / (2 * h) == pytest.approx(float(fq[a, k]), abs=1e-5)
    for a, k in [(0, 0), (4, 1), (10, 2)]:
        p, n = mm0.copy(), mm0.copy()
        p[a, k] += h
        n[a, k] -= h
        assert -(energy(qm0, p) - energy(qm0, n)) / (2 * h) == pytest.approx(float(fm[a, k]), abs=1e-5)
    assert float(fm.abs().max()) > 1e-2  # MM atoms feel the model
    q0 = it.mm_q.copy()
    qp, qn = q0.copy(), q0.copy()
    qp[3] += h
    qn[3] -= h
    assert pot is not None
    assert (energy(qm0, mm0, qp) - energy(qm0, mm0, qn)) / (2 * h) == pytest.approx(float(pot[3]), abs=1e-5)


def test_switched_model_forces_include_switching_term() -> None:
    it = _item(radius=0.62)
    m = _model(switch=0.4)
    b = _batch([it])
    _, _, fm, _ = energy_and_forces(m, b)
    h = 1e-6
    # pick an MM atom whose molecule is in the switching region (0.5-0.9 nm from the QM region)
    d = np.linalg.norm(it.mm_pos[:, None] - it.qm_pos[None], axis=-1).min(1)
    a = int(np.flatnonzero((d > 0.55) & (d < 0.85))[0])
    for k in range(3):
        p, n = it.mm_pos.copy(), it.mm_pos.copy()
        p[a, k] += h
        n[a, k] -= h
        bp, bn = _batch([it]), _batch([it])
        bp.mm_pos, bn.mm_pos = torch.as_tensor(p), torch.as_tensor(n)
        fd = -(float(m(bp)[0]) - float(m(bn)[0])) / (2 * h)
        assert fd == pytest.approx(float(fm[a, k]), abs=1e-5)


def test_rotation_translation_invariance() -> None:
    it = _item()
    m = _model()
    e0 = float(m(_batch([it]))[0])
    R = Rotation.random(random_state=3).as_matrix()
    t = np.array([1.3, -0.7, 2.1])
    moved = FrameTensors(it.qm_z, it.qm_pos @ R.T + t, it.mm_pos @ R.T + t, it.mm_q, it.mm_mol)
    b = _batch([moved])
    assert float(m(b)[0]) == pytest.approx(e0, abs=1e-9)
    _, fq0, _, _ = energy_and_forces(m, _batch([it]))
    _, fq1, _, _ = energy_and_forces(m, b)
    assert torch.allclose(fq1, fq0 @ torch.as_tensor(R).T, atol=1e-9)  # forces rotate with the frame


def test_permutation_invariance() -> None:
    it = _item()
    m = _model()
    e0 = float(m(_batch([it]))[0])
    # permute MM molecules (whole waters) and the atoms inside the list
    n_mol = int(it.mm_mol.max()) + 1
    perm_mol = np.random.default_rng(0).permutation(n_mol)
    order = np.concatenate([np.flatnonzero(it.mm_mol == k) for k in perm_mol])
    pm = FrameTensors(it.qm_z, it.qm_pos, it.mm_pos[order], it.mm_q[order], it.mm_mol[order])
    assert float(m(_batch([pm]))[0]) == pytest.approx(e0, abs=1e-9)
    # swap two hydrogens of the QM region (methanol: atoms 2..5 are H)
    qperm = np.array([0, 1, 4, 3, 2, 5])
    pq = FrameTensors(it.qm_z[qperm], it.qm_pos[qperm], it.mm_pos, it.mm_q, it.mm_mol)
    assert float(m(_batch([pq]))[0]) == pytest.approx(e0, abs=1e-9)


def test_no_leakage_between_frames_of_a_batch() -> None:
    a, b_ = _item(seed=1), _item(seed=2)
    m = _model()
    ea = m(_batch([a]))
    eb = m(_batch([b_]))
    both = _batch([a, b_])
    e = m(both)
    assert torch.allclose(e, torch.cat([ea, eb]), atol=1e-10)
    _, fq, fm, _ = energy_and_forces(m, both)
    _, fqa, fma, _ = energy_and_forces(m, _batch([a]))
    assert torch.allclose(fq[: len(a.qm_z)], fqa, atol=1e-10)
    assert torch.allclose(fm[: len(a.mm_q)], fma, atol=1e-10)


@pytest.mark.parametrize("which", ["long_range", "mm_radial", "mm_angular", "qm_radial", "qm_angular"])
def test_energy_continuous_across_each_cutoff(which: str) -> None:
    """Move one atom radially through a cutoff: the energy changes smoothly (no jump, no kink)."""
    it = _item(n_waters=2)
    m = _model()
    rc = {
        "long_range": CFG.long_range_cutoff,
        "mm_radial": CFG.mm_radial_cutoff,
        "mm_angular": CFG.mm_angular_cutoff,
        "qm_radial": CFG.qm_radial_cutoff,
        "qm_angular": CFG.qm_angular_cutoff,
    }[which]
    centre = it.qm_pos[1]  # the oxygen
    direction = np.array([0.0, 0.6, 0.8])

    def energy_at(dist: float) -> float:
        if which.startswith("mm") or which == "long_range":
            # a lone charge placed at dist from the oxygen (far from everything else)
            mm_pos = np.concatenate([it.mm_pos, [centre + dist * direction]])
            x = FrameTensors(
                it.qm_z,
                it.qm_pos,
                mm_pos,
                np.concatenate([it.mm_q, [0.5]]),
                np.concatenate([it.mm_mol, [it.mm_mol.max() + 1]]),
            )
        else:
            # an extra hydrogen atom as a QM neighbour of the oxygen
            x = FrameTensors(
                np.concatenate([it.qm_z, [1]]),
                np.concatenate([it.qm_pos, [centre + dist * direction]]),
                it.mm_pos,
                it.mm_q,
                it.mm_mol,
            )
        return float(m(_batch([x]))[0])

    # second differences across the cutoff: ~eps^2 for a C1 function, ~eps for a kink, ~1 for a jump
    sd = [energy_at(rc + e) - 2 * energy_at(rc) + energy_at(rc - e) for e in (1e-3, 1e-4)]
    assert abs(sd[1]) < 0.03 * abs(sd[0]) + 1e-10
    # and the atom matters inside: the energy differs from the atom being far away
    assert abs(energy_at(rc - 0.2 * rc) - energy_at(rc + 0.1)) > 1e-4


def test_unknown_element_is_a_clear_error() -> None:
    it = _item()
    bad = FrameTensors(np.array([6, 8, 1, 1, 1, 16]), it.qm_pos, it.mm_pos, it.mm_q, it.mm_mol)
    with pytest.raises(InputError, match="not known to this model"):
        _model()(_batch([bad]))


def test_float32_model_keeps_total_energy_resolution_with_large_offsets() -> None:
    """Per-element offsets of real molecules sum to ~1e6 kJ/mol, where float32 steps are 0.06-0.5
    kJ/mol; the offsets and the totals are float64 in a float32 model (and targets stay float64)."""
    it = _item()
    m64 = _model()
    with torch.no_grad():
        m64.e_shift.copy_(torch.tensor([-1.6e4, -1.5e6, -2.5e6], dtype=torch.float64) * 1.000000123)
    m32 = _model().float()
    m32.load_state_dict(m64.state_dict())
    first = next(iter(m32.nets[0].parameters()))  # the first layer's weight
    assert m32.e_shift.dtype == torch.float64 and first.dtype == torch.float32
    e64 = m64(collate([it], dtype=torch.float64))
    b32 = collate([it], dtype=torch.float32)
    e32 = m32(b32)
    assert e32.dtype == torch.float64
    e_ref = float(e64[0])
    assert abs(e_ref - float(np.float32(e_ref))) > 0.01  # the float32 grid is coarse there
    assert abs(float(e32[0]) - e_ref) < 1e-2
    lab = dataclasses.replace(
        it, energy=-4123456.789, qm_forces=np.zeros((len(it.qm_z), 3)), mm_forces=np.zeros((len(it.mm_q), 3))
    )
    bt = collate([lab], dtype=torch.float32)
    assert bt.energy is not None and float(bt.energy[0]) == -4123456.789
    assert bt.to("cpu", torch.float32).energy.dtype == torch.float64  # type: ignore[union-attr]

"""Descriptors and model: gradcheck, forces vs finite differences, invariances, smooth cutoffs,
no leakage between frames of a batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import cluster_frame
from qmlmm.batch import FrameBatch
from qmlmm.data.batch import FrameTensors, collate, frame_tensors
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


def _model(
    switch: float = 0.0,
    seed: int = 0,
    elec: str = "charges",
    charge_sum: str = "total",
    hidden: list[int] | None = None,
) -> HDNNP:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        descriptor=CFG,
        hidden=[16, 16] if hidden is None else hidden,
        cutoff=0.9,
        switch_width=switch,
        electrostatics=elec,
        charge_sum=charge_sum,
    )
    m = HDNNP(cfg).double()
    with torch.no_grad():  # non-trivial scaling so that every term matters
        m.feat_std.fill_(0.5)
        m.e_scale.fill_(10.0)
        if elec != "none":  # charges that vary with the environment (training starts them even)
            for net in m.charge_nets:
                net[-1].weight.normal_(0.0, 0.3)  # type: ignore[index]
                net[-1].bias.normal_(0.0, 0.2)  # type: ignore[index]
        if elec == "charges+polarisability":  # polarisabilities of a few A^3 that vary (training starts them at 0)
            for net in m.pol_nets:
                net[-1].weight.normal_(0.0, 1.0)  # type: ignore[index]
                net[-1].bias.normal_(2.0, 0.5)  # type: ignore[index]
    return m


ELEC = pytest.mark.parametrize("elec", ["none", "charges", "charges+polarisability"])


def _batch(items: list[FrameTensors]) -> FrameBatch:
    return collate(items, dtype=torch.float64)


@pytest.mark.parametrize("channels", ["charge", "sign"])
def test_gradcheck_descriptors_qm_and_mm(channels: str) -> None:
    it = _item()
    acsf = ACSF(dataclasses.replace(CFG, mm_channels=channels)).double()
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


@ELEC
@pytest.mark.parametrize("switch", [0.0, 0.3])
def test_gradcheck_model_energy(switch: float, elec: str) -> None:
    it = _item()
    m = _model(switch, elec=elec)

    def f(qm: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        bb = _batch([it])
        bb.qm_pos, bb.mm_pos = qm, mm
        return m(bb)

    b = _batch([it])
    assert torch.autograd.gradcheck(
        f, (b.qm_pos.clone().requires_grad_(), b.mm_pos.clone().requires_grad_()), eps=1e-6, atol=1e-5
    )


@ELEC
def test_forces_equal_minus_finite_differences_and_net_force_zero(elec: str) -> None:
    it = _item()
    m = _model(elec=elec)
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


@ELEC
def test_switched_model_forces_include_switching_term(elec: str) -> None:
    it = _item(radius=0.62)
    m = _model(switch=0.4, elec=elec)
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


@ELEC
def test_rotation_translation_invariance(elec: str) -> None:
    it = _item()
    m = _model(elec=elec)
    e0 = float(m(_batch([it]))[0])
    R = Rotation.random(random_state=3).as_matrix()
    t = np.array([1.3, -0.7, 2.1])
    moved = FrameTensors(it.qm_z, it.qm_pos @ R.T + t, it.mm_pos @ R.T + t, it.mm_q, it.mm_mol)
    b = _batch([moved])
    assert float(m(b)[0]) == pytest.approx(e0, abs=1e-9)
    _, fq0, _, _ = energy_and_forces(m, _batch([it]))
    _, fq1, _, _ = energy_and_forces(m, b)
    assert torch.allclose(fq1, fq0 @ torch.as_tensor(R).T, atol=1e-9)  # forces rotate with the frame


@ELEC
def test_permutation_invariance(elec: str) -> None:
    it = _item()
    m = _model(elec=elec)
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


@ELEC
def test_no_leakage_between_frames_of_a_batch(elec: str) -> None:
    a, b_ = _item(seed=1), _item(seed=2)
    m = _model(elec=elec)
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


# ---- the electrostatic term: charges in the exact MM potential -----------------------------------------
def _charged_item(charge: int, seed: int = 1) -> FrameTensors:
    it = _item(seed=seed)
    return dataclasses.replace(it, qm_charge=charge)


@pytest.mark.parametrize("charge_sum", ["total", "zero"])
def test_predicted_charges_add_up_to_the_qm_charge_per_frame(charge_sum: str) -> None:
    """Frames of charge 0, +1 and -1 in one batch: each frame's predicted charges add up to its own QM
    charge (direct models) or to zero (delta models), and differ between atoms (not all Q/n)."""
    m = _model(charge_sum=charge_sum)
    b = _batch([_charged_item(0, 1), _charged_item(1, 2), _charged_item(-1, 3)])
    q = m.charges(b)
    tot = torch.zeros(3, dtype=q.dtype).index_add(0, b.qm_frame, q)
    want = torch.tensor([0.0, 1.0, -1.0], dtype=q.dtype) if charge_sum == "total" else torch.zeros(3, dtype=q.dtype)
    assert torch.allclose(tot, want, atol=1e-12)
    assert float(q.std()) > 0.05


def test_electrostatic_term_is_the_coulomb_energy_of_the_charges() -> None:
    """E(with the term) - E(same networks, without) = k_e sum_i q_i phi_i, phi_i = sum_J q_J / r_iJ over
    every embedded charge (no cutoff, no damping)."""
    from qmlmm.units import COULOMB_KJMOL_NM

    it = _charged_item(1)
    m = _model()
    b = _batch([it])
    q = m.charges(b).detach().numpy()
    d = np.linalg.norm(it.qm_pos[:, None] - it.mm_pos[None], axis=-1)
    e_coul = COULOMB_KJMOL_NM * float(q @ (it.mm_q[None, :] / d).sum(1))
    short = m._per_element(m.nets, m.inputs(b).features, m.acsf.species(b.qm_z), m.short_cols) * m.e_scale
    e_short = float(short.sum() + m.e_shift[m.acsf.species(b.qm_z)].sum())
    assert float(m(b)[0]) == pytest.approx(e_short + e_coul, abs=1e-9)
    assert abs(e_coul) > 1.0


def test_induction_term_is_the_energy_of_the_induced_dipoles() -> None:
    """E(charges+polarisability) - E(same networks, charges only) = -1/2 k_e sum_i alpha_i |E_i|^2 with E_i the
    exact field of every embedded charge; the polarisabilities vary between atoms."""
    from qmlmm.units import COULOMB_KJMOL_NM

    it = _charged_item(1)
    m = _model(elec="charges+polarisability")
    b = _batch([it])
    alpha = m.polarisabilities(b).detach().numpy()
    vec = it.qm_pos[:, None] - it.mm_pos[None]
    field = (vec * (it.mm_q / np.linalg.norm(vec, axis=-1) ** 3)[:, :, None]).sum(1)
    e_ind = -0.5 * COULOMB_KJMOL_NM * float((alpha * (field**2).sum(1)).sum())
    without = _model(elec="charges")
    without.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("pol_nets")})
    assert float(m(b)[0]) == pytest.approx(float(without(b)[0]) + e_ind, abs=1e-9)
    assert abs(e_ind) > 0.5 and float(np.std(alpha)) > 1e-4
    with pytest.raises(InputError, match="exact field"):
        damped = dataclasses.replace(CFG, long_range_damped=True)
        ModelConfig(descriptor=damped, electrostatics="charges+polarisability")


@pytest.mark.parametrize("charge", [0, 1])
@pytest.mark.parametrize("elec", ["charges", "charges+polarisability"])
def test_far_field_of_the_model_is_its_charges_and_dipole(charge: int, elec: str) -> None:
    """A single point charge q far away (R = 10-80 nm) interacts with the model as with its vacuum charges:
    E(R) - E(no charge) tends to k_e q (Q/R + mu . R_hat / R^2) (Q the QM charge, mu = sum_i q_i r_i from
    the model's own charges without the point charge); the short-range networks add nothing at range, and
    induced dipoles add only -1/2 k_e alpha q^2 / R^4."""
    from qmlmm.units import COULOMB_KJMOL_NM

    it = _charged_item(charge)
    m = _model(elec=elec)
    vac = FrameTensors(it.qm_z, it.qm_pos, np.zeros((0, 3)), np.zeros(0), np.zeros(0, dtype=np.int64), qm_charge=charge)
    bv = _batch([vac])
    e_vac = float(m(bv)[0])
    q_vac = m.charges(bv).detach().numpy()
    centre = it.qm_pos.mean(0)
    mu = (q_vac[:, None] * (it.qm_pos - centre)).sum(0)
    u = np.array([0.48, 0.6, 0.64])
    u /= np.linalg.norm(u)
    qj = 0.5
    rel, resid = [], []
    for R in (10.0, 20.0, 40.0, 80.0):
        pos = centre + R * u
        x = FrameTensors(it.qm_z, it.qm_pos, pos[None], np.array([qj]), np.zeros(1, dtype=np.int64), qm_charge=charge)
        e_int = float(m(_batch([x]))[0]) - e_vac
        expansion = COULOMB_KJMOL_NM * qj * (charge / R + float(mu @ u) / R**2)
        coulomb = COULOMB_KJMOL_NM * qj * float((q_vac / np.linalg.norm(pos - it.qm_pos, axis=1)).sum())
        rel.append(abs(e_int - expansion) / abs(expansion))
        resid.append(abs(e_int - coulomb) * R**2)  # what is not the vacuum charges' Coulomb energy, times R^2
    # measured: the remainder (the charges' response to the potential) falls as 1/R^3, so resid as 1/R; with
    # polarisabilities that depend on the field features it reaches that slope from R = 20 nm on (resid 0.72x
    # from 10 to 20 nm, then 0.56x and 0.52x per doubling)
    if elec == "charges":
        assert resid[-1] < 0.2 * resid[0], resid
    else:
        assert resid[-1] < 0.35 * resid[1], resid
    assert rel[-1] < 0.02, rel


def test_old_model_configs_load_as_they_were_made() -> None:
    """A model file's config from before the electrostatic term and the undamped long-range features
    loads with neither (the features those weights were trained on)."""
    old: dict[str, object] = {
        "descriptor": {k: v for k, v in CFG.to_dict().items() if k != "long_range_damped"},
        "hidden": [8],
    }
    cfg = ModelConfig.from_dict(old)
    assert cfg.electrostatics == "none" and cfg.descriptor.long_range_damped and cfg.switch_width == 0.0
    new = ModelConfig.from_dict(ModelConfig(descriptor=CFG).to_dict())
    assert new.electrostatics == "charges" and not new.descriptor.long_range_damped
    with pytest.raises(InputError, match="electrostatics"):
        ModelConfig(electrostatics="dipoles")


def _mm_angular_shifts(acsf: ACSF) -> list[float]:
    from qmlmm.descriptors.terms import MMAngular

    term = acsf.terms[-1]
    assert isinstance(term, MMAngular)
    return [float(x) for x in term.shifts]  # the module's (float32-rounded) shifts


def _mm_angular_by_loops(acsf: ACSF, b: FrameBatch) -> np.ndarray:
    """The QM-MM angular block (Nq, n_el * n_zl * n_shift) from its definition (module docstring of
    qmlmm.descriptors.acsf), by plain loops over centre i, QM neighbour j and MM atom K."""
    cfg = acsf.cfg
    qm, mm, q = b.qm_pos.numpy(), b.mm_pos.numpy(), b.mm_q.numpy()
    els = acsf.elements
    zl = [(z, lam) for z in cfg.angular_zetas for lam in (1.0, -1.0)]
    shifts = _mm_angular_shifts(acsf)
    ns = len(shifts)
    out = np.zeros((len(qm), len(els), len(zl), ns))

    def fc(r: float, rc: float) -> float:
        return 0.5 * (np.cos(np.pi * r / rc) + 1.0) if r < rc else 0.0

    for i in range(len(qm)):
        for j in range(len(qm)):
            rij = float(np.linalg.norm(qm[j] - qm[i]))
            if j == i or b.qm_frame[j] != b.qm_frame[i] or rij >= cfg.qm_angular_cutoff:
                continue
            e = els.index(int(b.qm_z[j]))
            for k in range(len(mm)):
                rik = float(np.linalg.norm(mm[k] - qm[i]))
                if b.mm_frame[k] != b.qm_frame[i] or rik >= cfg.mm_angular_cutoff:
                    continue
                cos = np.dot(qm[j] - qm[i], mm[k] - qm[i]) / (rij * rik)
                w = q[k] * fc(rij, cfg.qm_angular_cutoff) * fc(rik, cfg.mm_angular_cutoff)
                for a, (z, lam) in enumerate(zl):
                    for s, rs in enumerate(shifts):
                        g = np.exp(-(((rij + rik) / 2 - rs) ** 2) / (2 * cfg.mm_angular_width**2))
                        out[i, e, a, s] += w * 2 ** (1 - z) * max(0.0, 1 + lam * cos) ** z * g
    return out.reshape(len(qm), -1)


def test_qm_mm_angular_block_equals_its_definition_by_loops() -> None:
    """The padded per-centre evaluation (batched matrix products) gives the definition's sums, in a
    two-frame batch (no pair across frames) with a zeta that is not a whole number."""
    cfg = dataclasses.replace(CFG, angular_zetas=[1.0, 2.5, 4.0])
    acsf = ACSF(cfg).double()
    b = _batch([_item(seed=1, n_waters=8), _item(seed=5, n_waters=5, radius=0.3)])
    names = acsf.feature_names()
    cols = [k for k, n in enumerate(names) if n.startswith("MM G4")]
    got = acsf(b)[:, cols].detach().numpy()
    want = _mm_angular_by_loops(acsf, b)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_potential_and_field_float32_far_from_the_origin() -> None:
    """The field's matrix-product form (r_i sum w - sum w r_J) stays accurate in float32 when the frame
    sits far from the coordinate origin (positions taken from the QM centre), against float64 sums."""
    from qmlmm.descriptors.qm_mm import potential_and_field

    it = _item(seed=3, n_waters=12, radius=0.4)
    b64 = _batch([it])
    shift = torch.tensor([40.0, -25.0, 60.0], dtype=torch.float64)
    b32 = collate([it], dtype=torch.float32)
    b32.qm_pos, b32.mm_pos = (b32.qm_pos.double() + shift).float(), (b32.mm_pos.double() + shift).float()
    vec = b64.qm_pos[:, None, :] - b64.mm_pos[None, :, :]
    r = vec.norm(dim=-1)
    phi_ref = (b64.mm_q / r).sum(1)
    field_ref = (vec * (b64.mm_q / r**3)[:, :, None]).sum(1)
    phi, field = potential_and_field(b32, b32.mm_q)
    assert field_ref.norm(dim=1).min() > 1.0  # e/nm^2: a field worth resolving
    # float32 positions 60 nm from the origin carry ~4e-6 nm of rounding: the reference sees the same
    # rounded geometry only to that level, so the bound is set by it, not by the field's formula
    np.testing.assert_allclose(phi.double().numpy(), phi_ref.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(
        field.double().numpy(), field_ref.numpy(), rtol=2e-3, atol=5e-3 * float(field_ref.abs().max())
    )


@ELEC
def test_fused_ensemble_equals_its_members_one_by_one(elec: str) -> None:
    """Eval-mode ensembles run all members' networks as batched products (qmlmm.models.fused); energies
    and QM and MM forces equal those of each member run alone, with members that differ in weights,
    feature scaling, energy scale and offsets."""
    from qmlmm.models.ensemble import Ensemble

    members = [_model(switch=0.3, seed=s, elec=elec) for s in range(3)]
    with torch.no_grad():
        for s, m in enumerate(members):
            m.feat_mean.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(s))
            m.e_scale.fill_(5.0 + s)
            m.e_shift.copy_(torch.tensor([-1000.0, -2000.0, -3000.0], dtype=torch.float64) * (1 + s))
    ens = Ensemble(members[0].cfg, members).eval()
    b = _batch([_item(seed=1, n_waters=8), _item(seed=5, n_waters=5, radius=0.3)])
    pred = ens.predict(b, force_spread=True)
    alone = [energy_and_forces(m, b) for m in members]
    e = torch.stack([a[0] for a in alone])
    fq = torch.stack([a[1] for a in alone])
    fm = torch.stack([a[2] for a in alone])
    torch.testing.assert_close(pred.energy, e.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(pred.energy_std, e.std(0, unbiased=False), rtol=0, atol=1e-9)
    torch.testing.assert_close(pred.qm_forces, fq.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(pred.mm_forces, fm.mean(0), rtol=0, atol=1e-9)
    assert pred.qm_forces_std is not None
    torch.testing.assert_close(pred.qm_forces_std, fq.std(0, unbiased=False), rtol=0, atol=1e-9)
    assert float(e.std(0).min()) > 1.0  # the members differ: the comparison means something
    stacked = ens._stack_cache.stacked
    assert stacked is not None and ens.predict(b) is not None and ens._stack_cache.stacked is stacked  # reused
    with torch.no_grad():  # an in-place change (an optimiser step, load_state_dict) is seen: stacked again
        members[1].nets[0][0].weight.mul_(1.5)  # type: ignore[index]
        members[2].feat_std.fill_(0.7)
    e2 = torch.stack([energy_and_forces(m, b)[0] for m in members])
    assert float((e2 - e).abs().max()) > 1e-3
    torch.testing.assert_close(ens.predict(b).energy, e2.mean(0), rtol=0, atol=1e-9)
    ens.float().double()  # .to() replaces the tensors (rounded here): stacked again from the new ones
    e3 = torch.stack([energy_and_forces(m, b)[0] for m in members])
    assert float((e3 - e2).abs().max()) > 1e-9
    torch.testing.assert_close(ens.predict(b).energy, e3.mean(0), rtol=0, atol=1e-9)
    ens.train()
    torch.testing.assert_close(ens.member_energies(b), e3, rtol=0, atol=1e-9)  # the training path agrees


def test_fused_weights_follow_replaced_tensors_and_inference_mode() -> None:
    """The eval pass's stacked weights (qmlmm.models.fused.StackCache) are made again when a parameter, a buffer
    or a whole network is replaced rather than edited in place (``p.data = ...``, ``load_state_dict(assign=True)``,
    a new module), and a first call under ``torch.inference_mode`` leaves nothing that breaks later force calls.
    Networks without hidden layers run fused too."""
    from qmlmm.models.ensemble import Ensemble
    from qmlmm.models.hdnnp import _element_mlps

    b = _batch([_item(seed=1, n_waters=8), _item(seed=5, n_waters=5, radius=0.3)])
    members = [_model(seed=s) for s in range(2)]
    ens = Ensemble(members[0].cfg, members).eval()

    def agrees() -> None:
        e = torch.stack([energy_and_forces(m, b)[0] for m in members]).mean(0)
        torch.testing.assert_close(ens.predict(b).energy, e, rtol=0, atol=1e-9)

    with torch.inference_mode():
        ens.member_energies(b)
    agrees()  # forces after an inference-mode call
    w = members[0].nets[0][0].weight  # type: ignore[index]
    w.data = w.data * 1.3  # same object, new storage, version unchanged
    agrees()
    sd = {k: v * 0.9 if v.is_floating_point() else v for k, v in members[1].state_dict().items()}
    members[1].load_state_dict(sd, assign=True)  # new tensor objects
    agrees()
    cfg = members[0].cfg
    members[0].nets[2] = _element_mlps(1, len(members[0].short_cols), cfg.hidden, cfg.activation)[0].double()
    agrees()
    flat = [_model(seed=s, hidden=[], elec="none") for s in range(2)]  # one linear layer per network
    members, ens = flat, Ensemble(flat[0].cfg, flat).eval()
    agrees()


def test_a_model_predicts_in_eval_mode_made_or_loaded(tmp_path: Path) -> None:
    """QMLMMModel puts its ensemble in eval mode, made or loaded: the engine of ML/MM MD then runs the
    members' networks fused (a loaded model ran member by member in training mode, 16 -> 13 ms a call on
    retinoic acid in water), with the same numbers."""
    from qmlmm.models import QMLMMModel
    from qmlmm.models.ensemble import Ensemble
    from qmlmm.models.model import ModelMeta

    members = [_model(switch=0.3, seed=s) for s in range(2)]
    for m in members:
        m.train()
    model = QMLMMModel(Ensemble(members[0].cfg, members), ModelMeta(target="t", target_method="xtb:gfn2"))
    assert not any(m.training for m in model.ensemble.modules())
    loaded = QMLMMModel.load(model.save(tmp_path / "m.pt"), dtype=torch.float64)
    assert not any(m.training for m in loaded.ensemble.modules())
    it = _item(seed=2)
    res = loaded.engine().compute(
        np.asarray(it.qm_z), np.asarray(it.qm_pos), np.asarray(it.mm_pos), np.asarray(it.mm_q), need_potential=True
    )
    e, fq, fm = (
        torch.stack(x)
        for x in zip(*[energy_and_forces(m, _batch([it]))[:3] for m in loaded.ensemble.members], strict=True)
    )
    np.testing.assert_allclose(res.energy, float(e.mean(0)[0]), rtol=0, atol=1e-6)
    assert float(e.std(0)[0]) > 1e-3  # two different members
    np.testing.assert_allclose(res.qm_forces, fq.mean(0).detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.mm_forces, fm.mean(0).detach().numpy(), rtol=0, atol=1e-6)


def test_a_batch_without_mm_atoms_has_zero_mm_features_and_pairs_on_the_batch_device() -> None:
    """Gas-phase frames (no embedded charges): every MM column is 0 (|field| is its regulariser,
    field_epsilon) and the empty QM-MM pair list lives on the batch's device (it was created on the CPU,
    which breaks indexing on a CUDA model)."""
    from qmlmm.descriptors.qm_mm import pairs_from_blocks

    it = _item()
    vac = dataclasses.replace(it, mm_pos=it.mm_pos[:0], mm_q=it.mm_q[:0], mm_mol=it.mm_mol[:0])
    if it.mm_forces is not None:
        vac = dataclasses.replace(vac, mm_forces=it.mm_forces[:0])
    acsf = ACSF(CFG).double()
    x = acsf(_batch([vac]))
    names = acsf.feature_names()
    mm_cols = [k for k, n in enumerate(names) if n.startswith("MM") and n != "MM |field|"]
    assert torch.isfinite(x).all() and float(x[:, mm_cols].abs().max()) == 0.0
    assert torch.equal(x[:, names.index("MM |field|")], torch.full((len(x),), CFG.field_epsilon, dtype=x.dtype))
    assert float(x.abs().max()) > 0.1  # the QM columns are there
    i, j = pairs_from_blocks(None, 0.8, torch.device("meta"))
    assert i.device.type == "meta" and j.device.type == "meta" and len(i) == 0


def test_padded_qm_mm_block_equals_each_frame_alone() -> None:
    """One padded block for a batch (frames of unequal size, one without MM atoms) gives every frame the
    potential, field, shortest QM distance and short-range pair list it has alone, by the definitions."""
    from qmlmm.descriptors.qm_mm import pairs_from_blocks, potential_and_field, qm_mm_blocks, shortest_qm_distance

    a, c = _item(seed=1, n_waters=8), _item(seed=5, n_waters=3, radius=0.3)
    vac = dataclasses.replace(c, mm_pos=c.mm_pos[:0], mm_q=c.mm_q[:0], mm_mol=c.mm_mol[:0])
    items = [a, vac, c]
    b = _batch(items)
    blk = qm_mm_blocks(b)
    phi, field = potential_and_field(b, b.mm_q, blk)
    dmin = shortest_qm_distance(b, blk)
    pi, pj = pairs_from_blocks(blk, 0.5, b.qm_pos.device)
    q0 = m0 = 0
    for it in items:
        nq, nm = len(it.qm_z), len(it.mm_q)
        vec = it.qm_pos[:, None, :] - it.mm_pos[None, :, :]
        r = np.linalg.norm(vec, axis=-1)
        np.testing.assert_allclose(phi[q0 : q0 + nq].numpy(), (it.mm_q / r).sum(1), rtol=1e-12, atol=1e-12)
        want_field = (vec * (it.mm_q / r**3)[:, :, None]).sum(1)
        np.testing.assert_allclose(field[q0 : q0 + nq].numpy(), want_field, rtol=1e-10, atol=1e-10)
        if nm:
            np.testing.assert_allclose(dmin[m0 : m0 + nm].numpy(), r.min(0), rtol=1e-12)
        ii, jj = np.nonzero(r < 0.5)
        sel = (pi >= q0) & (pi < q0 + nq)
        assert sorted(zip((pi[sel] - q0).tolist(), (pj[sel] - m0).tolist(), strict=True)) == sorted(
            zip(ii.tolist(), jj.tolist(), strict=True)
        )
        q0, m0 = q0 + nq, m0 + nm
    assert bool(torch.all(pi[1:] >= pi[:-1]))  # sorted by QM atom, as the terms need


def test_padding_of_the_qm_mm_block_stays_finite_when_atoms_of_two_frames_coincide() -> None:
    """A padding slot points at atom 0 of the batch; an atom of another frame exactly there (a duplicated
    geometry) must not give 0/0: potential, field and their gradients stay finite and equal each frame alone
    (found by a review: the padded block gave a NaN potential and NaN forces)."""
    from qmlmm.descriptors.qm_mm import potential_and_field, qm_mm_blocks

    gen = torch.Generator().manual_seed(0)
    qpos = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    mpos = torch.rand(6, 3, generator=gen, dtype=torch.float64) + 1.0
    qpos[3] = mpos[0]  # QM atom of frame 1 on MM atom 0 (frame 0), which frame 1's padded MM slot points at
    mpos[5] = qpos[0]  # MM atom of frame 1 on QM atom 0 (frame 0), which frame 1's padded QM slot points at
    qpos.requires_grad_(True)
    mpos.requires_grad_(True)
    b = FrameBatch(qm_z=torch.ones(5, dtype=torch.long), qm_pos=qpos, qm_frame=torch.tensor([0, 0, 0, 1, 1]),
                   mm_pos=mpos, mm_q=torch.linspace(-0.8, 0.4, 6, dtype=torch.float64),
                   mm_frame=torch.tensor([0, 0, 0, 0, 1, 1]), mm_mol=torch.arange(6), n_frames=2)  # fmt: skip
    phi, field = potential_and_field(b, b.mm_q, qm_mm_blocks(b))
    g = torch.autograd.grad((phi**2).sum() + (field**2).sum(), [qpos, mpos], create_graph=True)
    gg = torch.autograd.grad((g[0] ** 2).sum() + (g[1] ** 2).sum(), [qpos, mpos])
    assert all(bool(torch.isfinite(t).all()) for t in (phi, field, *g, *gg))
    d = qpos[3:].detach()[:, None] - mpos[4:].detach()[None]
    torch.testing.assert_close(phi[3:].detach(), (b.mm_q[4:] / d.norm(dim=-1)).sum(1))


def test_sign_channels_add_up_to_the_charge_weighted_terms() -> None:
    """With ``mm_channels: sign`` the short-range MM terms come once over the positive and once over the
    negative charges; the two channels add up to the charge-weighted term, column by column, in a two-frame
    batch; the other blocks are unchanged. An unknown channel setting is refused."""
    b = _batch([_item(seed=1, n_waters=8), _item(seed=5, n_waters=5, radius=0.3)])
    one, two = ACSF(CFG).double(), ACSF(dataclasses.replace(CFG, mm_channels="sign")).double()
    x1, x2 = one(b), two(b)
    n1, n2 = one.feature_names(), two.feature_names()
    for name in n1:
        if name.startswith("MM G2") or name.startswith("MM G4"):
            plus, minus = x2[:, n2.index("MM+" + name[2:])], x2[:, n2.index("MM-" + name[2:])]
            torch.testing.assert_close(plus + minus, x1[:, n1.index(name)], rtol=1e-12, atol=1e-14)
            assert bool((plus >= 0).all()) and bool((minus <= 0).all())
        else:
            torch.testing.assert_close(x2[:, n2.index(name)], x1[:, n1.index(name)], rtol=0, atol=0)
    assert two.sizes["mm_radial"] == 2 * one.sizes["mm_radial"]
    assert two.sizes["mm_angular"] == 2 * one.sizes["mm_angular"]
    assert float(x2[:, [k for k, n in enumerate(n2) if n.startswith("MM+ G4")]].abs().max()) > 1e-3
    with pytest.raises(InputError, match="mm_channels"):
        dataclasses.replace(CFG, mm_channels="element")


@ELEC
def test_restandardised_model_computes_the_same_energies_charges_and_forces(elec: str) -> None:
    """Warm start moves a network onto new feature statistics through its first layers: the same function
    (energies, QM and MM forces, charges, polarisabilities), the new statistics in its buffers."""
    from qmlmm.training.warm_start import restandardise

    m = _model(elec=elec)
    b = _batch([_item(1), _item(2)])
    with torch.no_grad():
        m.feat_mean.normal_(0.0, 0.3)
    e0, fq0, fm0, _ = energy_and_forces(m, b)
    q0 = m.charges(b) if elec != "none" else None
    a0 = m.polarisabilities(b) if elec == "charges+polarisability" else None
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(m.feat_mean.shape, generator=g, dtype=torch.float64)
    std = 0.1 + torch.rand(m.feat_std.shape, generator=g, dtype=torch.float64) * 3
    restandardise(m, mean, std)
    assert torch.equal(m.feat_mean, mean) and torch.equal(m.feat_std, std)
    e1, fq1, fm1, _ = energy_and_forces(m, b)
    assert torch.allclose(e1, e0, rtol=0, atol=1e-9) and (e0 - e0.mean()).abs().max() > 1e-3
    assert torch.allclose(fq1, fq0, atol=1e-8) and torch.allclose(fm1, fm0, atol=1e-8)
    if q0 is not None:
        assert torch.allclose(m.charges(b), q0, atol=1e-12)
    if a0 is not None:
        assert torch.allclose(m.polarisabilities(b), a0, atol=1e-15)

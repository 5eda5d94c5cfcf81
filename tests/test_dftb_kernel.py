"""The compiled DFTB matrices and point-charge potential (kernels/dftb.cpp) against the torch forms they replace
on the CPU (DFTBCalculator._matrices_torch, _potential_torch), and their backward passes against finite
differences (gradcheck). The end-to-end physics (Sparrow's energies and forces, finite-difference forces on QM
and MM atoms) is tested in test_dftb.py and test_engine_contract.py, which run the compiled forms by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import water_shell
from qmlmm.compiled import available
from qmlmm.engines import make_engine
from qmlmm.engines.dftb import compiled_terms
from qmlmm.engines.dftb.calculator import DFTBCalculator
from qmlmm.engines.dftb.tensors import TAIL_BOHR, DFTBParameters, load_parameters
from qmlmm.testing import solute_from_smiles
from qmlmm.units import BOHR_PER_NM

pytestmark = pytest.mark.skipif(not available(), reason="the compiled kernels do not build here")

# sulfur and phosphorus have d shells in 3ob (and sulfur in mio); charged molecules; hydrogen pairs (damped
# gamma), equal and unequal Hubbard parameters
MOLECULES = {"3ob": ["CS(=O)C", "C[S+](C)C", "COP(=O)(O)O", "C[NH3+]"], "mio": ["CS(=O)C", "C[NH3+]", "CO"]}


def _params(name: str) -> DFTBParameters:
    p = load_parameters(name)
    if name == "mio":  # as DFTBEngine sets DFTB2
        p.third_order, p.zeta = False, None
    return p


def _frames(smiles: str, params: str = "3ob") -> tuple[list[int], int, torch.Tensor]:
    """Four geometries (4, n, 3) Bohr: the molecule, squeezed to 0.55 of its size (pairs below the first
    repulsive knot), stretched to 2.5 (pairs beyond the integrals' tails and the repulsive cutoffs) and
    stretched so that its first two atoms are half-way into their integrals' tail (in ``params``), each
    slightly distorted."""
    z, pos, q = solute_from_smiles(smiles, seed=0)
    a, b = sorted(z[:2])
    tab = _params(params).pair(int(a), int(b))
    tail = (tab.r_max + 0.5 * TAIL_BOHR) / (np.linalg.norm(pos[1] - pos[0]) * BOHR_PER_NM)
    rng = np.random.default_rng(0)
    frames = [s * pos + rng.normal(scale=0.001, size=pos.shape) for s in (1.0, 0.55, 2.5, tail)]
    return list(z), q, torch.tensor(np.stack(frames) * BOHR_PER_NM)


def _both(calc: DFTBCalculator, R: torch.Tensor, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The matrices and the gradient of a random weighted sum of them, by torch (False) and compiled (True)."""
    gen = torch.Generator().manual_seed(1)
    B, n, N = R.shape[0], calc.n, calc.n_orb
    w = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((B, N, N), (B, N, N), (B, n, n), (B, n, n), (B,))]
    out = {}
    for use in (False, True):
        monkeypatch.setattr(compiled_terms, "USE_KERNEL", use)
        x = R.clone().requires_grad_(True)
        H0, S, gam, G3, e_rep = calc._matrices(x)
        loss = (H0 * w[0]).sum() + (S * w[1]).sum() + (gam * w[2]).sum() + (e_rep * w[4]).sum()
        if G3 is not None:
            loss = loss + (G3 * w[3]).sum()
        (g,) = torch.autograd.grad(loss, x)
        out[use] = [H0, S, gam, G3, e_rep, g]
    return out[False], out[True]


@pytest.mark.parametrize(("name", "smiles"), [(k, s) for k, v in MOLECULES.items() for s in v])
def test_matrices_equal_torch(name: str, smiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    z, charge, R = _frames(smiles, name)
    calc = DFTBCalculator(_params(name), z, charge=charge)
    ref, new = _both(calc, R, monkeypatch)
    # gamma's unequal-U formula cancels at short range: at r ~ 1 Bohr (the squeezed frame) both forms are
    # ~1e-11 Hartree from a 50-digit evaluation of it (checked with mpmath for N-H in CH3NH3+)
    atol = {"H0": 1e-13, "S": 1e-13, "gamma": 1e-11, "Gamma": 1e-10, "E_rep": 1e-13, "gradient": 1e-10}
    for label, a, b in zip(atol, ref, new, strict=True):
        if a is None:
            assert b is None and name == "mio", label
            continue
        assert b.shape == a.shape, label
        assert torch.allclose(b.detach(), a.detach(), rtol=0, atol=atol[label]), (label, float((a - b).abs().max()))
    # the frames reach every branch: the exponential below the first repulsive knot, the splines, the
    # integrals' tails and zero beyond them, pairs beyond the repulsive cutoff
    r = torch.linalg.norm(R[:, calc.pj] - R[:, calc.pi], dim=-1)
    t = calc.tables_ab
    assert bool((r < t.rep_knots[:, 0]).any()) and bool(((r >= t.rep_knots[:, 0]) & (r < t.rep_cutoff)).any())
    assert bool((r > t.rep_cutoff).any())
    assert bool(((r > t.r_max) & (r < t.r_max + TAIL_BOHR)).any()) and bool((r > t.r_max + TAIL_BOHR).any())


def test_potential_equals_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _, pos, mm, q, _ = water_shell("methanol", n_waters=6, seed=3)
    R = torch.tensor(np.stack([pos, pos + 0.01]) * BOHR_PER_NM)
    Rm = torch.tensor(np.stack([mm, mm[::-1]]) * BOHR_PER_NM)
    Q = torch.tensor(np.stack([q, q[::-1] * 0.5]))
    w = torch.randn(R.shape[:2], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {}
    for use in (False, True):
        monkeypatch.setattr(compiled_terms, "USE_KERNEL", use)
        xs = [t.clone().requires_grad_(True) for t in (R, Rm, Q)]
        phi = DFTBCalculator._potential(*xs)
        out[use] = [phi, *torch.autograd.grad((phi * w).sum(), xs)]
    for label, a, b in zip(["phi", "dR", "dRm", "dQ"], out[False], out[True], strict=True):
        assert torch.allclose(b, a, rtol=1e-12, atol=1e-13), (label, float((a - b).abs().max()))


def test_backward_gradcheck() -> None:
    """The compiled backward passes against central differences of the compiled forward passes."""
    z, charge, R = _frames("CS(=O)C")
    calc = DFTBCalculator(_params("3ob"), z, charge=charge)
    args = calc._kernel_args()
    x = R[[0, 3]].clone().requires_grad_(True)

    def matrices(y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m for m in compiled_terms.compiled_matrices(y, args) if m is not None)

    assert torch.autograd.gradcheck(matrices, (x,), eps=1e-6, atol=1e-6)
    _, pos, mm, q, _ = water_shell("methanol", n_waters=2, seed=3)
    xs = [torch.tensor(t[None] * f).requires_grad_(True) for t, f in ((pos, BOHR_PER_NM), (mm, BOHR_PER_NM), (q, 1))]
    assert torch.autograd.gradcheck(compiled_terms.compiled_potential, tuple(xs), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", ["dftb3:3ob", "dftb2:mio"])
def test_engine_results_equal_torch(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Energy, QM and MM forces, the potential at the charges and the charges of a QM/MM call, by either form."""
    z, pos, mm, q, _ = water_shell("methanethiol", n_waters=8, seed=4)
    res = {}
    for use in (False, True):
        monkeypatch.setattr(compiled_terms, "USE_KERNEL", use)
        res[use] = make_engine(f"{spec},tol=1e-11,reuse=no").compute(z, pos, mm, q, need_potential=True)
    a, b = res[False], res[True]
    assert b.energy == pytest.approx(a.energy, abs=1e-8)
    assert np.allclose(b.qm_forces, a.qm_forces, atol=1e-7)
    assert np.allclose(b.mm_forces, a.mm_forces, atol=1e-7)
    assert a.mm_potential is not None and b.mm_potential is not None
    assert np.allclose(b.mm_potential, a.mm_potential, atol=1e-8)


def test_lone_atom_and_no_charges(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pairs (one atom: its onsite energies) and no point charges: the compiled forms give what torch's do."""
    p = _params("3ob")
    # an oxygen atom; CH+ (a pair, no charges)
    for z, charge, pos in (([8], 0, np.zeros((1, 3))), ([6, 1], 1, np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.109]]))):
        calc = DFTBCalculator(p, z, charge=charge)
        R = torch.tensor(pos[None] * BOHR_PER_NM)
        res = {}
        for use in (False, True):
            monkeypatch.setattr(compiled_terms, "USE_KERNEL", use)
            res[use] = calc(R)
        assert torch.allclose(res[True].energy, res[False].energy, atol=1e-12)
        g_new, g_ref = res[True].gradient, res[False].gradient
        assert g_new is not None and g_ref is not None
        assert torch.allclose(g_new, g_ref, atol=1e-12)


def test_thread_count_gives_same_bits() -> None:
    z, charge, R = _frames("COP(=O)(O)O")
    calc = DFTBCalculator(_params("3ob"), z, charge=charge)
    args = calc._kernel_args()
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = R.clone().requires_grad_(True)
            mats = compiled_terms.compiled_matrices(x, args)
            loss = torch.stack([(m * m).sum() for m in mats if m is not None]).sum()
            out.append([*(m for m in mats if m is not None), *torch.autograd.grad(loss, x)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*out, strict=True))


def test_bad_shapes_and_second_derivatives_are_refused() -> None:
    """The kernels refuse arrays that would take them outside their buffers, and a second derivative (which
    they do not have) is an error, not a silently wrong number."""
    z, charge, R = _frames("CS(=O)C")
    calc = DFTBCalculator(_params("3ob"), z, charge=charge)
    args = calc._kernel_args()
    with pytest.raises(RuntimeError, match="atoms"):
        compiled_terms.compiled_matrices(R[:, :-1], args)
    with pytest.raises(RuntimeError, match="float64"):
        compiled_terms.compiled_matrices(R.float(), args)
    Rm, Q = torch.zeros(1, 3, 3, dtype=torch.float64) + 5.0, torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="charges"):
        compiled_terms.compiled_potential(R[:1], Rm, Q)
    x = R[:1].clone().requires_grad_(True)
    H0 = compiled_terms.compiled_matrices(x, args)[0]
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad((H0 * H0).sum() + (x**3).sum(), x, create_graph=True)
    Rm, Q = (torch.rand(1, 3, 3, dtype=torch.float64) * 10).requires_grad_(True), torch.ones(1, 3, dtype=torch.float64)
    phi = compiled_terms.compiled_potential(x, Rm, Q)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(phi.sum(), Rm, create_graph=True)

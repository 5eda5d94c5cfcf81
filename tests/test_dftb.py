"""qmlmm's PyTorch DFTB2/DFTB3 against SCINE Sparrow (vacuum) and finite differences (QM/MM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import water_shell
from qmlmm.engines import make_engine
from qmlmm.engines.dftb.calculator import DFTBCalculator, SCCOptions
from qmlmm.engines.dftb.tensors import load_parameters
from qmlmm.errors import InputError, MissingParametersError, SCFNotConvergedError
from qmlmm.testing import solute_from_smiles
from qmlmm.units import BOHR_PER_ANGSTROM

sparrow = pytest.importorskip("scine_sparrow")
su = pytest.importorskip("scine_utilities")

# six+ molecules, with sulfur and charged ones (trimethylsulfonium is SAM's sulfonium centre)
DFTB3_SET = {
    "water": ("O", 0),
    "methanol": ("CO", 0),
    "dimethyl sulfide": ("CSC", 0),
    "dimethyl disulfide": ("CSSC", 0),
    "dimethyl sulfoxide": ("CS(=O)C", 0),
    "methanethiolate": ("C[S-]", -1),
    "trimethylsulfonium": ("C[S+](C)C", 1),
    "methylammonium": ("C[NH3+]", 1),
    "glycine zwitterion": ("[NH3+]CC(=O)[O-]", 0),
    "methyl phosphate": ("COP(=O)(O)O", 0),
    "acetate": ("CC(=O)[O-]", -1),
    "fluoromethane": ("CF", 0),  # 3ob-3-1's fluorine files hold one line of integrals less than their header says
}
# DFTB2/mio: small molecules whose atom pairs all lie inside the mio tables (< 10 Bohr)
DFTB2_SET = {"H2O": "O", "CH4": "C", "NH3": "N", "HCN": "C#N", "C2H6": "CC", "CH3OH": "CO", "H2S": "S"}


def _sparrow(z: np.ndarray, pos_nm: np.ndarray, method: str, params: str, charge: int = 0) -> tuple[float, np.ndarray]:
    calc = su.core.ModuleManager.get_instance().get("calculator", method)
    calc.log = su.core.Log.silent()
    calc.settings["method_parameters"] = params
    calc.settings["molecular_charge"] = charge
    calc.settings["self_consistence_criterion"] = 1e-10
    calc.settings["max_scf_iterations"] = 500
    elems = [getattr(su.ElementType, _SYM[int(x)]) for x in z]
    calc.structure = su.AtomCollection(elems, pos_nm * 10.0 * BOHR_PER_ANGSTROM)
    calc.set_required_properties([su.Property.Energy, su.Property.Gradients])
    res = calc.calculate()
    return float(res.energy), np.asarray(res.gradients)


_SYM = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F", 15: "P", 16: "S"}


@pytest.fixture(scope="module")
def p3ob() -> object:
    return load_parameters("3ob")


@pytest.fixture(scope="module")
def pmio() -> object:
    return load_parameters("mio")


@pytest.mark.parametrize("name", sorted(DFTB3_SET))
def test_dftb3_vacuum_energy_equals_sparrow(name: str, p3ob: object) -> None:
    smiles, charge = DFTB3_SET[name]
    z, pos, q = solute_from_smiles(smiles, seed=1)
    assert q == charge
    calc = DFTBCalculator(p3ob, z, charge=charge, options=SCCOptions(tol=1e-10))  # type: ignore[arg-type]
    e = float(calc(torch.as_tensor(pos * 10.0 * BOHR_PER_ANGSTROM), forces=False).energy[0])
    e_ref, _ = _sparrow(z, pos, "DFTB3", "3ob-3-1", charge)
    assert e == pytest.approx(e_ref, abs=1e-6)


@pytest.mark.parametrize("name", sorted(DFTB2_SET))
def test_dftb2_vacuum_energy_and_forces_equal_sparrow(name: str, pmio: object) -> None:
    z, pos, _ = solute_from_smiles(DFTB2_SET[name], seed=1)
    R = pos * 10.0 * BOHR_PER_ANGSTROM
    assert np.max(np.linalg.norm(R[:, None] - R[None], axis=-1)) < 10.0  # inside the mio tables
    calc = DFTBCalculator(pmio, z, options=SCCOptions(tol=1e-10))  # type: ignore[arg-type]
    res = calc(torch.as_tensor(R))
    e_ref, g_ref = _sparrow(z, pos, "DFTB2", "mio-1-1")
    assert float(res.energy[0]) == pytest.approx(e_ref, abs=1e-6)
    assert res.gradient is not None
    # Sparrow's DFTB2 gradients deviate from finite differences of its own energy by ~5e-7
    assert np.abs(res.gradient[0].numpy() - g_ref).max() < 2e-6


@pytest.fixture(scope="module")
def qmmm_system() -> tuple[np.ndarray, ...]:
    # methanethiol in 60 waters (180 charges) arranged as real molecules, 0.35-0.9 nm away
    z, p, _, _, _ = water_shell("methanethiol", n_waters=1, radius=0.4, seed=0)
    rng = np.random.default_rng(5)
    mm: list[np.ndarray] = []
    q: list[np.ndarray] = []
    from qmlmm.testing import TIP3P_CHARGES, tip3p_water

    while len(mm) < 60:
        c = rng.uniform(-0.9, 0.9, size=3)
        w = tip3p_water(rng) + c
        if np.linalg.norm(w[:, None] - p[None], axis=-1).min() < 0.3:
            continue
        if mm and np.linalg.norm(np.concatenate(mm)[:, None] - w[None], axis=-1).min() < 0.25:
            continue
        mm.append(w)
        q.append(TIP3P_CHARGES)
    return z, p, np.concatenate(mm), np.concatenate(q)


def test_electronic_temperature(qmmm_system: tuple[np.ndarray, ...]) -> None:
    """Fermi occupations: a vanishing temperature gives the aufbau result, a high one lowers the
    (free) energy, with fractional occupations."""
    z, p, mm, q = qmmm_system
    e0 = make_engine("dftb3:3ob,tol=1e-11").compute(z, p, mm, q).energy
    e1 = make_engine("dftb3:3ob,tol=1e-11,etemp=1").compute(z, p, mm, q).energy
    eng = make_engine("dftb3:3ob,tol=1e-11,etemp=30000")
    e_hot = eng.compute(z, p, mm, q).energy
    assert e1 == pytest.approx(e0, abs=1e-7)
    assert e_hot < e0 - 1.0  # kJ/mol: -TS and the relaxed density both lower the free energy
    calc = eng.calculator(z, 0)  # type: ignore[attr-defined]
    eps = torch.linspace(-1.0, 1.0, calc.n_orb, dtype=torch.float64)[None]
    f = calc._fermi(eps)
    assert float(f.sum()) == pytest.approx(2 * calc.n_occ, abs=1e-10) and 0 < float(f[0, calc.n_occ]) < 2
    with pytest.raises(InputError, match="etemp"):
        make_engine("dftb3:3ob,etemp=-5")


def test_charged_molecule_in_water(qmmm_system: tuple[np.ndarray, ...]) -> None:
    _, _, mm, q = qmmm_system
    z, p, chg = solute_from_smiles("C[S+](C)C", seed=1)
    res = make_engine("dftb3:3ob").compute(z, p, mm, q, charge=chg)
    assert np.sum(np.asarray(res.info["qm_charges"])) == pytest.approx(1.0, abs=1e-8)


def test_errors(qmmm_system: tuple[np.ndarray, ...]) -> None:
    z, p, mm, q = qmmm_system
    with pytest.raises(SCFNotConvergedError, match="not converged"):
        make_engine("dftb3:3ob,maxiter=3").compute(z, p, mm, q)
    with pytest.raises(InputError, match="closed-shell"):
        make_engine("dftb3:3ob").compute(z, p, mm, q, charge=1, mult=2)
    with pytest.raises(MissingParametersError, match="not in the mio-1-1"):
        make_engine("dftb2:mio").compute(np.array([17, 1]), np.array([[0, 0, 0], [0.13, 0.01, 0.02]]))
    with pytest.raises(InputError, match="unsupported DFTB"):
        make_engine("dftb3:mio")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(qmmm_system: tuple[np.ndarray, ...]) -> None:
    z, p, mm, q = qmmm_system
    cpu = make_engine("dftb3:3ob").compute(z, p, mm, q)
    gpu = make_engine("dftb3:3ob,device=cuda").compute(z, p, mm, q)
    assert gpu.energy == pytest.approx(cpu.energy, abs=1e-7)
    assert np.allclose(gpu.qm_forces, cpu.qm_forces, atol=1e-6)
    assert np.allclose(gpu.mm_forces, cpu.mm_forces, atol=1e-6)


def _residual(calc: DFTBCalculator, R: torch.Tensor, Rm: torch.Tensor, Q: torch.Tensor):  # type: ignore[no-untyped-def]
    """f(dq) = dq_out(dq) - dq of the SCC at positions R (1, n, 3) Bohr, and what the Jacobian needs."""
    H0, S, gam, G3, _ = calc._matrices(R)
    phi = calc._potential(R, Rm, Q)
    L = torch.linalg.cholesky(S)
    Linv = torch.linalg.inv(L)
    H0p = Linv @ H0 @ Linv.transpose(-1, -2)

    def f(dq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eps, _, pop, Cp = calc._solve(H0p, L, Linv, calc._shifts(dq, gam, G3, phi))
        return calc._charges(pop) - dq, eps, Linv.transpose(-1, -2) @ Cp

    return f, S, gam, G3


@pytest.mark.parametrize("family", ["dftb3", "dftb2"])
def test_newton_jacobian_equals_finite_differences(family: str, qmmm_system: tuple[np.ndarray, ...]) -> None:
    """The linear-response Jacobian of the SCC residual (Mulliken transition charges, gamma and the DFTB3
    term) equals central differences of the residual, at charges away from self-consistency."""
    z, p, mm, q = qmmm_system
    params = load_parameters("3ob" if family == "dftb3" else "mio")
    if family == "dftb2":
        params.third_order, params.zeta = False, None
    calc = DFTBCalculator(params, [int(x) for x in z], options=SCCOptions(tol=1e-10))
    R = torch.as_tensor(p * 10.0 * BOHR_PER_ANGSTROM)[None]
    Rm, Q = torch.as_tensor(mm * 10.0 * BOHR_PER_ANGSTROM)[None], torch.as_tensor(q)[None]
    f, S, gam, G3 = _residual(calc, R, Rm, Q)
    dq = torch.as_tensor(np.random.default_rng(3).normal(scale=0.05, size=(1, len(z))))
    _, eps, C = f(dq)
    J = calc._residual_jacobian(eps, C, S, gam, G3, dq)[0]
    h = 1e-6
    fd = torch.stack([(f(dq + h * e)[0] - f(dq - h * e)[0])[0] / (2 * h) for e in torch.eye(len(z), dtype=dq.dtype)], 1)
    assert torch.allclose(J, fd, atol=1e-7, rtol=1e-5), float((J - fd).abs().max())
    assert float((J + torch.eye(len(z), dtype=J.dtype)).abs().max()) > 1e-2  # not trivially linear mixing


def test_newton_mixer_same_result_fewer_iterations(qmmm_system: tuple[np.ndarray, ...]) -> None:
    """The newton mixer converges to Anderson's energy, forces and charges; along a sequence of MD-like
    geometries, each started from the last one's charges, it needs less than half Anderson's iterations;
    from neutral atoms fewer too."""
    z, p, mm, q = qmmm_system
    rng = np.random.default_rng(0)
    frames = [p + np.cumsum(rng.normal(scale=3e-4, size=(6, *p.shape)), axis=0)[k] for k in range(6)]
    runs = {}
    for mixer in ("anderson", "newton"):
        eng = make_engine(f"dftb3:3ob,tol=1e-10,mixer={mixer}")
        runs[mixer] = [eng.compute(z, x, mm, q) for x in frames]
    for a, b in zip(runs["anderson"], runs["newton"], strict=True):
        assert b.energy == pytest.approx(a.energy, abs=1e-8)
        assert np.allclose(b.qm_forces, a.qm_forces, atol=1e-6) and np.allclose(b.mm_forces, a.mm_forces, atol=1e-6)
        assert np.allclose(np.asarray(b.info["qm_charges"]), np.asarray(a.info["qm_charges"]), atol=1e-9)
    its = {m: [int(r.info["scc_iterations"]) for r in rs] for m, rs in runs.items()}  # type: ignore[call-overload]
    assert its["newton"][0] < its["anderson"][0]
    assert sum(its["newton"][1:]) < 0.5 * sum(its["anderson"][1:]), its


def test_newton_mixer_falls_back_where_linear_response_fails(p3ob: object) -> None:
    """Bonds stretched to 1.6x (small gap): the first quasi-Newton step grows the residual, and the SCC goes
    on with Anderson from the point before it, converging to Anderson's energy in one more iteration."""
    z, pos, _ = solute_from_smiles("Nc1cc[nH]c(=O)n1", seed=1)
    R = torch.as_tensor((pos.mean(0) + 1.6 * (pos - pos.mean(0))) * 10.0 * BOHR_PER_ANGSTROM)[None]
    out = {}
    for mixer in ("anderson", "newton"):
        calc = DFTBCalculator(p3ob, z, options=SCCOptions(tol=1e-9, mixer=mixer))  # type: ignore[arg-type]
        out[mixer] = calc(R, forces=False)
    assert float(out["newton"].energy[0]) == pytest.approx(float(out["anderson"].energy[0]), abs=1e-10)
    assert out["newton"].iterations == out["anderson"].iterations + 1


def test_mixer_options() -> None:
    assert make_engine("dftb3:3ob").calculator([8, 1, 1], 0).opts.mixer == "newton"  # type: ignore[attr-defined]
    assert make_engine("dftb3:3ob,etemp=300").calculator([8, 1, 1], 0).opts.mixer == "anderson"  # type: ignore[attr-defined]
    for bad in ("simple", "broyden"):
        with pytest.raises(InputError, match="mixer"):
            make_engine(f"dftb3:3ob,mixer={bad}")
    with pytest.raises(InputError, match="integer occupations"):  # refused with the spec, not at the first frame
        make_engine("dftb3:3ob,etemp=300,mixer=newton")
    with pytest.raises(InputError, match="integer occupations"):
        DFTBCalculator(load_parameters("3ob"), [8, 1, 1], options=SCCOptions(kt=1e-3, mixer="newton"))


def test_single_atom_is_its_onsite_energies(p3ob: object) -> None:
    """A lone carbon atom (no pairs, no tables): closed-shell aufbau fills s and one p orbital, its
    Mulliken charge is neutral, so the energy is 2 e_s + 2 e_p of the 3ob tables."""
    sp = p3ob.species(6)  # type: ignore[attr-defined]
    calc = DFTBCalculator(p3ob, [6], options=SCCOptions(tol=1e-10))  # type: ignore[arg-type]
    res = calc(torch.zeros(1, 3, dtype=torch.float64))
    assert float(res.energy[0]) == pytest.approx(2 * sp.onsite[0] + 2 * sp.onsite[1], abs=1e-12)
    assert res.gradient is not None and float(res.gradient.abs().max()) == 0.0


def _ref_short_range(r: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor, equal: torch.Tensor) -> torch.Tensor:
    """S(r; U_A, U_B), the formula as written before the analytic derivatives (the reference here)."""
    ta, tb = 3.2 * ua, 3.2 * ub
    t = 0.5 * (ta + tb)
    s_eq = torch.exp(-t * r) * (1.0 / r + 11.0 / 16.0 * t + 3.0 / 16.0 * t * t * r + t**3 * r * r / 48.0)
    d2 = torch.where(equal, torch.ones_like(ta), ta * ta - tb * tb)

    def part(a: torch.Tensor, b: torch.Tensor, sgn: float) -> torch.Tensor:
        dd = sgn * d2  # a^2 - b^2
        return torch.exp(-a * r) * (b**4 * a / (2.0 * dd * dd) - (b**6 - 3.0 * b**4 * a * a) / (dd**3 * r))

    return torch.where(equal, s_eq, part(ta, tb, 1.0) + part(tb, ta, -1.0))


def _ref_kernels(r, ua, ub, uda, hpair, zeta):  # type: ignore[no-untyped-def]
    """gamma_AB and Gamma_AB = U^d_A dgamma_AB/dU_A with the U derivative by central differences (step
    1e-5 Hartree; along U_A = U_B for equal U, as DFTB+), the code before the analytic derivatives."""
    from qmlmm.engines.dftb.gamma import EQUAL_U, _damping

    du = 1e-5
    equal = (ua - ub).abs() < EQUAL_U
    ub_p, ub_m = torch.where(equal, ub + du, ub), torch.where(equal, ub - du, ub)
    ds = (_ref_short_range(r, ua + du, ub_p, equal) - _ref_short_range(r, ua - du, ub_m, equal)) / (2.0 * du)
    h, dh = _damping(r, ua, ub, hpair, zeta)
    s = _ref_short_range(r, ua, ub, equal)
    return 1.0 / r - s * h, uda * (-ds * h - s * dh)


def test_charge_kernels_analytic_u_derivatives() -> None:
    """gamma and the third-order Gamma from the analytic U derivatives equal autograd's derivative of the
    short-range term (unequal and equal U, with and without the H damping) and the central differences of
    the code before them (within their step error)."""
    from qmlmm.engines.dftb.gamma import EQUAL_U, charge_kernels

    r = torch.linspace(0.8, 30.0, 300, dtype=torch.float64)
    for a, b, hp in [(0.4195, 0.4954, True), (0.3647, 0.4954, False), (0.4954, 0.4954, False), (0.4195, 0.4309, True)]:
        ua, ub = torch.full_like(r, a), torch.full_like(r, b)
        uda, udb = torch.full_like(r, -0.15), torch.full_like(r, -0.11)
        hpair = torch.full(r.shape, hp)
        g, gij, gji = charge_kernels(r, ua, ub, uda, udb, hpair, 4.0, True)
        assert gij is not None and gji is not None
        g_ref, gij_ref = _ref_kernels(r, ua, ub, uda, hpair, 4.0)
        assert torch.allclose(g, g_ref, atol=1e-11, rtol=0)  # H-N: cancellation
        assert torch.allclose(gij, gij_ref, atol=1e-8, rtol=0)
        assert torch.allclose(gji, _ref_kernels(r, ub, ua, udb, hpair, 4.0)[1], atol=1e-8, rtol=0)
        # no damping, U^d = 1: Gamma_AB = -dS/dU_A, against autograd (along U_A = U_B where equal)
        x = ua.clone().requires_grad_(True)
        eq = (x - ub).abs() < EQUAL_U
        S = _ref_short_range(r, x, x if a == b else ub, eq)
        (dS,) = torch.autograd.grad(S.sum(), x)
        one, no = torch.ones_like(r), torch.zeros(r.shape, dtype=torch.bool)
        _, gij1, _ = charge_kernels(r, ua, ub, one, one, no, None, True)
        assert gij1 is not None and torch.allclose(-gij1, dS, atol=1e-9, rtol=0)


def test_linear_start_guess(qmmm_system: tuple[np.ndarray, ...]) -> None:
    """The SCC's start from the last two calls' charges: extrapolated along consecutive steps (fewer
    iterations, the same converged results), the last call's alone for a frame that jumped."""
    z, p, mm, q = qmmm_system
    # a smooth path: every QM atom moves on a straight line by 2e-4 nm a step
    direction = np.random.default_rng(3).normal(size=p.shape)
    path = [p + 2e-4 * k * direction / np.linalg.norm(direction, axis=1, keepdims=True) for k in range(8)]
    runs: dict[str, tuple[list[int], list[float]]] = {}
    for guess in ("linear", "previous"):
        eng = make_engine(f"dftb3:3ob,guess={guess}")
        res = [eng.compute(z, x, mm, q) for x in path]
        its = [r.info["scc_iterations"] for r in res]
        runs[guess] = ([int(k) for k in its if isinstance(k, int)], [r.energy for r in res])
        assert len(runs[guess][0]) == len(path)
    (it_lin, e_lin), (it_prev, e_prev) = runs["linear"], runs["previous"]
    assert it_lin[:2] == it_prev[:2]  # no history yet
    assert sum(it_lin[2:]) < sum(it_prev[2:]), (it_lin, it_prev)
    assert np.allclose(e_lin, e_prev, atol=1e-6)
    calc = make_engine("dftb3:3ob").calculator(z, 0)  # type: ignore[attr-defined]
    last = torch.tensor([[0.10, -0.10], [0.30, -0.30]], dtype=torch.float64)
    before = torch.tensor([[0.11, -0.11], [0.00, 0.00]], dtype=torch.float64)  # frame 1 jumped by 0.3 e
    start = calc._start_charges(last, before)
    assert torch.allclose(start[0], torch.tensor([0.09, -0.09], dtype=torch.float64))
    assert torch.equal(start[1], last[1])
    assert torch.equal(calc._start_charges(last, None), last)
    with pytest.raises(InputError, match="guess"):
        make_engine("dftb3:3ob,guess=quadratic")
    with pytest.raises(InputError, match="linear or previous"):
        SCCOptions(guess="quadratic")

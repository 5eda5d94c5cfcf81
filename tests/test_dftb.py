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


_SYM = {1: "H", 6: "C", 7: "N", 8: "O", 15: "P", 16: "S"}


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

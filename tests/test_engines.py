"""QM/MM engines (PySCF DFT, GFN2-xTB): SCF failures, input errors, open shells, density fitting, smooth
embedding, QM charges. Forces, dE/dq, translation and batching of every engine: tests/test_engine_contract.py."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import cluster_frame, water_shell
from qmlmm.engines import label_frame, make_engine, parse_spec
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError, SCFNotConvergedError

# tight settings so that finite differences resolve the analytic forces
SPECS = {
    "dft": ("dft:pbe/sto-3g,conv=1e-11", 1e-4, 0.5),  # spec, FD step (nm), QM-force tolerance (kJ/mol/nm)
    "xtb": ("xtb:gfn2,acc=0.0001", 1e-4, 0.05),
}


@pytest.fixture(scope="module")
def shell() -> tuple[np.ndarray, ...]:
    return water_shell("water", n_waters=3, radius=0.3, seed=4)


@pytest.mark.parametrize(("name", "h", "tol"), [("dft", 1e-4, 0.5), ("xtb", 2e-5, 0.02)])
def test_smooth_embedding_forces(name: str, h: float, tol: float) -> None:
    """With switched charges the frame forces include the switching term (dE/dq times the charges'
    switching gradient): still -dE/dR on the atoms of molecules in the switching shell. xtb's dE/dq is
    exact (qmlmm.engines.xtb_pcem; measured: within 0.002 kJ/mol/nm of FD); the potential of its atomic
    charges by 1/r, used before, missed here by up to 2.8 kJ/mol/nm."""
    eng = make_engine(SPECS[name][0])
    fr = cluster_frame("water", n_waters=5, radius=0.45, seed=3)
    s = EmbeddingSettings(cutoff=0.55, switch_width=0.3)
    lab, _ = label_frame(eng, fr, s)
    from qmlmm.environment import select_embedding

    emb = select_embedding(fr, s)
    assert len(emb.switch_mm) >= 2  # molecules in the switching shell
    atoms = [int(emb.mm_index[emb.switch_mm[0]]), int(emb.mm_index[emb.switch_mm[1]]), 0]
    for a in atoms:
        for k in range(3):
            pos = fr.positions.copy()
            pos[a, k] += h
            fp = fr.copy()
            fp.positions = pos
            ep = label_frame(eng, fp, s)[0].energy
            pos[a, k] -= 2 * h
            fm = fr.copy()
            fm.positions = pos
            em = label_frame(eng, fm, s)[0].energy
            assert -(ep - em) / (2 * h) == pytest.approx(lab.forces[a, k], abs=tol), (a, k)


def test_scf_not_converged_raises(shell: tuple[np.ndarray, ...]) -> None:
    z, p, mm, q, zn = shell
    with pytest.raises(SCFNotConvergedError):
        make_engine("dft:pbe/sto-3g,maxcycle=2,reuse=no").compute(z, p, mm, q)
    with pytest.raises(SCFNotConvergedError):
        make_engine("xtb:gfn2,maxiter=2").compute(z, p, mm, q, mm_numbers=zn)


def test_dft_second_order_fallback_gives_the_converged_answer(shell: tuple[np.ndarray, ...]) -> None:
    """When DIIS runs out of cycles, second-order SCF from where it stopped reaches the same state: energy
    and forces on QM and MM atoms equal a normally converged run (measured: 6e-11 kJ/mol, 7e-4 and 2e-5
    kJ/mol/nm). Without the fallback the same settings fail. (A SAM + cytosine tiny run lost 2 of 6
    PBE/STO-3G labels to DIIS; second-order SCF converged one of them.)"""
    z, p, mm, q, _ = shell
    ref = make_engine("dft:pbe/sto-3g,conv=1e-10,reuse=no").compute(z, p, mm, q)
    assert ref.info["scf_fallback"] is None
    res = make_engine("dft:pbe/sto-3g,conv=1e-10,maxcycle=3,reuse=no").compute(z, p, mm, q)
    assert res.info["scf_fallback"] == "newton"
    assert res.energy == pytest.approx(ref.energy, abs=1e-5)
    assert np.abs(res.qm_forces - ref.qm_forces).max() < 0.01
    assert np.abs(res.mm_forces - ref.mm_forces).max() < 0.01
    with pytest.raises(SCFNotConvergedError, match=r"in 3 cycles \(conv_tol 1e-10 Eh\)$"):
        make_engine("dft:pbe/sto-3g,conv=1e-10,maxcycle=3,reuse=no,soscf=no").compute(z, p, mm, q)


def test_bad_input_errors(shell: tuple[np.ndarray, ...]) -> None:
    z, p, mm, q, _ = shell
    with pytest.raises(InputError, match="impossible"):
        make_engine("xtb:gfn2").compute(z, p, mm, q, charge=0, mult=2)
    with pytest.raises(InputError, match="unknown engine family"):
        parse_spec("mp2:cc-pvdz")
    with pytest.raises(InputError, match="functional/basis"):
        make_engine("dft:b3lyp")
    with pytest.raises(InputError, match="unknown DFT functional"):
        make_engine("dft:notafunctional/sto-3g")
    with pytest.raises(InputError, match="unknown xtb option"):
        make_engine("xtb:gfn2,foo=1")
    with pytest.raises(InputError, match="basis"):
        make_engine("dft:pbe/no-such-basis").compute(z, p)
    # a choice has one spelling, so the spec's text (an MD restart's engine identity) does not depend on case
    assert parse_spec("DFTB3:3OB, Mixer=NEWTON").text == parse_spec("dftb3:3ob,mixer=newton").text
    assert parse_spec("dft:pbe/sto-3g,df=YES").options["df"] == "yes"
    with pytest.raises(InputError, match="must be one of"):
        parse_spec("dftb3:3ob,mixer=broyden")


def test_open_shell_dft_runs() -> None:
    # OH radical: doublet, UKS
    z = np.array([8, 1])
    p = np.array([[0.0, 0.0, 0.0], [0.0571, 0.0571, 0.0571]])
    res = make_engine("dft:pbe/sto-3g").compute(z, p, charge=0, mult=2)
    assert np.isfinite(res.energy) and res.qm_forces.shape == (2, 3)


def test_dft_density_fitting_in_memory_equals_direct_j(shell: tuple[np.ndarray, ...]) -> None:
    """The 3-centre tensor kept in memory (default) and PySCF's direct J build (dfmem=0) are the same
    approximation; a different auxiliary basis (aux=weigend) is a different one and is recorded."""
    z, p, mm, q, zn = shell
    a = make_engine("dft:pbe/6-31g,conv=1e-10,reuse=no")
    b = make_engine("dft:pbe/6-31g,conv=1e-10,reuse=no,dfmem=0")
    c = make_engine("dft:pbe/6-31g,conv=1e-10,reuse=no,aux=weigend")
    ra, rb, rc = (e.compute(z, p, mm, q, mm_numbers=zn) for e in (a, b, c))
    assert ra.energy == pytest.approx(rb.energy, abs=1e-5)
    assert np.allclose(ra.qm_forces, rb.qm_forces, atol=1e-3) and np.allclose(ra.mm_forces, rb.mm_forces, atol=1e-4)
    assert abs(rc.energy - ra.energy) > 1e-4  # the auxiliary basis matters, so it is part of the level's settings
    assert "auxbasis" not in a.settings() and c.settings()["auxbasis"] == "weigend"
    with pytest.raises(InputError, match="auxiliary basis"):
        make_engine("dft:pbe/sto-3g,aux=no-such-aux").compute(z, p)


@pytest.mark.parametrize("spec", ["dft:pbe/sto-3g", "xtb:gfn2", "dftb3:3ob"])
def test_engines_report_qm_charges_that_add_up_to_the_qm_charge(spec: str, shell: tuple[np.ndarray, ...]) -> None:
    """Each engine's QM atomic charges (DFT meta-Lowdin, xtb's, DFTB Mulliken; the model's electrostatic
    term is trained against them) add up to the QM region's charge, with the water's O negative and its
    H positive; label_frame puts them on the QM atoms of the frame and NaN on the MM atoms."""
    z, p, mm, q, zn = shell
    res = make_engine(spec).compute(z, p, mm, q, mm_numbers=zn)
    qc = np.asarray(res.info["qm_charges"])
    assert qc.shape == (3,) and abs(qc.sum()) < 1e-6, qc
    assert qc[0] < -0.2 and np.all(qc[1:] > 0.1), qc  # O, H, H
    fr = cluster_frame("water", n_waters=4, radius=0.35, seed=1, box=2.4)
    lab, r = label_frame(make_engine(spec), fr, EmbeddingSettings(cutoff=1.0))
    assert lab.charges is not None and lab.charges.shape == (len(fr.numbers),)
    assert np.allclose(lab.charges[fr.is_qm], np.asarray(r.info["qm_charges"]))
    assert np.all(np.isnan(lab.charges[~fr.is_qm]))


def test_xtb_library_handles_load_in_a_fresh_process() -> None:
    """The ctypes handle on libxtb (for the point-charge gradient) loads before any xtb calculator exists:
    libxtb's bundled OpenBLAS is loaded first (without it: 'libopenblasp-... cannot open shared object')."""
    import subprocess
    import sys

    code = "from qmlmm.engines.xtb import _xtb_libs; print(_xtb_libs()['xtb'] is not None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr[-1000:]


def _gomp_spin_counts(code: str, env: dict[str, str]) -> list[list[str]]:
    """GOMP_SPINCOUNT as each libgomp that ``code`` loads read it (OMP_DISPLAY_ENV, at load), grouped by
    the parts of stderr between lines MARK that ``code`` writes."""
    import re
    import subprocess
    import sys

    env = {**env, "OMP_DISPLAY_ENV": "VERBOSE"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-1000:]
    return [re.findall(r"GOMP_SPINCOUNT = '(\d+)'", part) for part in res.stderr.split("MARK\n")]


def test_torch_threads_spin_briefly_and_xtb_threads_sleep_at_once() -> None:
    """qmlmm gives torch's OpenMP runtime a short spin before its threads sleep (2-thread training steps
    2.3x faster, benchmarks/results/omp_spin.md) and loads xtb's bundled runtime fully passive (spin count 0;
    xtb runs on it where torch is not loaded) when the engine is made, in either import order and in a
    child process that inherited qmlmm's setting; a GOMP_SPINCOUNT of the user's reaches both runtimes
    unchanged."""
    import os

    import qmlmm

    mark = "sys.stderr.write('MARK\\n'); sys.stderr.flush(); "
    make = "from qmlmm.engines import make_engine; make_engine('xtb:gfn2'); "
    torch_first = "import sys, qmlmm, torch; " + mark + make
    xtb_first = "import sys, qmlmm; " + make + mark + "import torch"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "QMLMM_GOMP_SPINCOUNT")}
    spin = qmlmm.TORCH_SPIN_COUNT
    assert _gomp_spin_counts(torch_first, env) == [[spin], ["0"]]
    counts = _gomp_spin_counts(xtb_first, env)
    assert "0" in counts[0] and sorted(counts[0] + counts[1]) == sorted(["0", spin])
    child = {**env, "GOMP_SPINCOUNT": spin, "QMLMM_GOMP_SPINCOUNT": spin}  # as a child of a qmlmm process
    assert _gomp_spin_counts(torch_first, child) == [[spin], ["0"]]
    assert _gomp_spin_counts(torch_first, {**env, "GOMP_SPINCOUNT": "77"}) == [["77"], ["77"]]


def test_xtb_thread_count_reaches_the_openmp_runtime_xtb_runs_on() -> None:
    """libxtb's OpenMP calls bind to the first runtime in the global scope, torch's libgomp once torch is
    imported, not to its bundled one: the engine's thread count is set on every runtime it can run on
    for the call, and each is restored after it (before this, xtb ran with torch's thread count)."""
    import subprocess
    import sys

    code = (
        "import ctypes, re, sys, qmlmm, torch\n"
        "torch.set_num_threads(2)\n"
        "from qmlmm.engines import make_engine\n"
        "from qmlmm.engines.xtb import _omp_threads\n"
        "e = make_engine('xtb:gfn2', threads=1)\n"
        "import numpy as np\n"
        "e.compute(np.array([8, 1, 1]), np.array([[0.0, 0, 0], [0.0957, 0.001, 0], [-0.024, 0.0927, 0.002]]),"
        " np.zeros((0, 3)), np.zeros(0))\n"
        "sys.stderr.flush()\n"
        "print('AFTER', torch.get_num_threads())\n"
        "with _omp_threads(1):\n"
        "    print('INSIDE', ctypes.CDLL(sys.argv[1]).omp_get_max_threads() if len(sys.argv) > 1 else -1)\n"
    )
    env = {**__import__("os").environ, "LD_DEBUG": "bindings"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    bound = re.findall(r"binding file \S*libxtb\S* \[0\] to (\S+) \[0\]: normal symbol `GOMP_parallel", res.stderr)
    assert bound, "libxtb's GOMP_parallel binding not found"
    assert "AFTER 2" in res.stdout  # torch's own count restored after the xtb call
    res = subprocess.run([sys.executable, "-c", code, bound[0]], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "INSIDE 1" in res.stdout  # the runtime xtb runs on has the engine's count during its calls

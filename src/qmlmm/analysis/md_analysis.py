"""Observables from MD runs: radial distribution functions, dihedral distributions, energy drift and
umbrella-sampling free-energy profiles (MBAR with pymbar).

Trajectories are read, and RDFs and dihedrals computed, by mdtraj (its DCD reader, ``compute_rdf`` and
``compute_dihedrals``, minimum image in orthorhombic boxes); this module keeps qmlmm's array interface
(positions (F, N, 3) nm, box lengths (F, 3) nm) so callers need no mdtraj topology.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qmlmm.errors import AnalysisError, InputError, SchemaError
from qmlmm.units import KB_KJMOL_PER_K

if TYPE_CHECKING:
    import mdtraj

__all__ = [
    "rdf",
    "dihedrals",
    "dihedral_stats",
    "conjugated_chain_dihedrals",
    "free_energy_profile",
    "barrier",
    "barrier_uncertainty",
    "decorrelate",
    "forward_barrier",
    "load_run",
    "read_dcd",
]

KB = KB_KJMOL_PER_K  # kJ/mol/K


def read_dcd(path: str | Path, stride: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (F, N, 3) in nm (float64) and orthorhombic box lengths (F, 3) in nm (or None, when the
    file has no unit cell) of a DCD file, every ``stride``-th frame, read by mdtraj.

    A partially written last frame (a run killed while writing) is left out. Raises SchemaError for a
    file that is not a DCD trajectory or whose cell is not orthorhombic.
    """
    import mdtraj

    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such trajectory file")
    try:
        with mdtraj.formats.DCDTrajectoryFile(str(path)) as fh:
            xyz, lengths, angles = fh.read(stride=stride)
    except OSError as e:
        raise SchemaError(f"{path} is not a readable DCD file ({e})") from e
    pos = np.asarray(xyz, dtype=np.float64) / 10.0  # Angstrom -> nm
    if lengths is None or not np.any(lengths):
        return pos, None
    if not np.allclose(angles, 90.0, atol=1e-3):
        raise SchemaError(
            f"{path}: the unit cell is not orthorhombic (angles {angles[0]}); qmlmm writes rectangular boxes"
        )
    return pos, np.asarray(lengths, dtype=np.float64) / 10.0


def load_run(run_dir: str | Path, stride: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (F, N, 3) nm and box lengths (F, 3) nm (or None) of a ``qmlmm md`` run folder's traj.dcd."""
    return read_dcd(Path(run_dir) / "traj.dcd", stride=stride)


def _trajectory(positions: np.ndarray, boxes: np.ndarray | None) -> mdtraj.Trajectory:
    """An mdtraj Trajectory of positions (F, N, 3) nm with orthorhombic box lengths (F, 3) nm (or no
    cell), on a topology of N unnamed atoms (distances and angles need no more)."""
    import mdtraj

    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 3 or pos.shape[-1] != 3:
        raise InputError(f"positions must have shape (frames, atoms, 3), got {pos.shape}")
    top = mdtraj.Topology()
    res = top.add_residue("X", top.add_chain())
    for _ in range(pos.shape[1]):
        top.add_atom("X", mdtraj.element.virtual, res)
    if boxes is None:
        return mdtraj.Trajectory(pos, top)
    lengths = np.broadcast_to(np.asarray(boxes, dtype=np.float64), (len(pos), 3))
    return mdtraj.Trajectory(pos, top, unitcell_lengths=lengths, unitcell_angles=np.full((len(pos), 3), 90.0))


def rdf(
    positions: np.ndarray, boxes: np.ndarray, a: Sequence[int], b: Sequence[int], r_max: float = 0.8, n_bins: int = 80
) -> tuple[np.ndarray, np.ndarray]:
    """Radial distribution function g(r) between atom sets a and b (minimum image, orthorhombic), by
    mdtraj's ``compute_rdf``.

    positions (F, N, 3) nm, boxes (F, 3) nm. Pairs of an atom with itself are left out, and g is
    normalised by the number of pairs counted and the mean inverse box volume (so g -> 1 for
    uncorrelated sets, also when a and b overlap). Returns bin centres (n_bins,) nm and g (n_bins,).
    """
    import mdtraj

    a_idx, b_idx = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    pairs = np.stack(np.meshgrid(a_idx, b_idx, indexing="ij"), axis=-1).reshape(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if len(pairs) == 0:
        raise InputError("rdf needs at least one pair of distinct atoms in a and b")
    traj = _trajectory(positions, boxes)
    r, g = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, r_max), n_bins=n_bins, periodic=True)
    return np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)


def dihedrals(positions: np.ndarray, quads: Sequence[Sequence[int]], boxes: np.ndarray | None = None) -> np.ndarray:
    """Dihedral angles (F, Q) in degrees in (-180, 180] (IUPAC sign) for atom quadruples (Q, 4), by
    mdtraj's ``compute_dihedrals``; bond vectors by minimum image when orthorhombic box lengths (F, 3)
    nm are given."""
    import mdtraj

    q = np.asarray(quads, dtype=np.int64)
    if q.size == 0:
        return np.zeros((len(positions), 0))
    if q.ndim != 2 or q.shape[1] != 4:
        raise InputError(f"dihedral quadruples must have shape (Q, 4), got {q.shape}")
    traj = _trajectory(positions, boxes)
    ang = mdtraj.compute_dihedrals(traj, q, periodic=boxes is not None)
    return np.degrees(np.asarray(ang, dtype=np.float64))


def dihedral_stats(angles: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dihedral statistics of angles (F, Q) in degrees, each over its F samples.

    Returns (Q,) arrays: ``mean_deg`` the circular mean in (-180, 180], ``std_deg`` the circular
    standard deviation sqrt(-2 ln R) in degrees (R: mean resultant length), ``frac_trans`` the
    fraction with |angle| > 90 deg.
    """
    a = np.radians(np.asarray(angles, dtype=float))
    if a.ndim != 2 or a.shape[0] == 0:
        raise InputError(f"dihedral_stats needs angles of shape (frames > 0, Q), got {a.shape}")
    c, s = np.cos(a).mean(0), np.sin(a).mean(0)
    r = np.clip(np.hypot(c, s), 1e-300, 1.0)
    return {
        "mean_deg": np.degrees(np.arctan2(s, c)),
        "std_deg": np.degrees(np.sqrt(-2.0 * np.log(r))),
        "frac_trans": (np.abs(np.asarray(angles)) > 90.0).mean(0),
    }


def conjugated_chain_dihedrals(smiles: str, offset: int = 0) -> list[tuple[int, int, int, int, str]]:
    """Heavy-atom dihedrals around acyclic conjugated C-C bonds (a polyene chain), from SMILES.

    Atom indices follow RDKit's order with hydrogens added (as ``qmlmm build`` numbers the solute),
    shifted by ``offset``. Each entry: (i, j, k, l, "single"|"double").
    """
    from rdkit import Chem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    out = []
    for bond in mol.GetBonds():
        a, b = bond.GetBeginAtom(), bond.GetEndAtom()
        if bond.IsInRing() or a.GetSymbol() != "C" or b.GetSymbol() != "C" or not bond.GetIsConjugated():
            continue
        if a.GetHybridization() != Chem.HybridizationType.SP2 or b.GetHybridization() != Chem.HybridizationType.SP2:
            continue
        na = [n.GetIdx() for n in a.GetNeighbors() if n.GetIdx() != b.GetIdx() and n.GetAtomicNum() > 1]
        nb = [n.GetIdx() for n in b.GetNeighbors() if n.GetIdx() != a.GetIdx() and n.GetAtomicNum() > 1]
        if not na or not nb:
            continue
        kind = "double" if bond.GetBondType() == Chem.BondType.DOUBLE else "single"

        # the chain neighbour: prefer a non-methyl heavy atom (more heavy neighbours)
        def key(i: int) -> int:
            return -sum(1 for n in mol.GetAtomWithIdx(i).GetNeighbors() if n.GetAtomicNum() > 1)

        i = sorted(na, key=key)[0]
        l = sorted(nb, key=key)[0]
        out.append((i + offset, a.GetIdx() + offset, b.GetIdx() + offset, l + offset, kind))
    return out


def decorrelate(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(indices of uncorrelated samples, statistical inefficiency g) of a time series ``x`` (pymbar's
    timeseries: g = 1 + 2 tau in sample intervals; every ceil(g)-th sample is kept)."""
    from pymbar import timeseries

    x = np.asarray(x, dtype=float)
    if len(x) < 4 or np.ptp(x) == 0:
        return np.arange(len(x)), 1.0
    g = float(timeseries.statistical_inefficiency(x))
    idx = np.asarray(timeseries.subsample_correlated_data(x, g=g), dtype=np.int64)
    return idx, g


def free_energy_profile(
    windows: Sequence[dict[str, Any]], temperature: float = 300.0, n_bins: int = 30, decorrelated: bool = True
) -> dict[str, np.ndarray]:
    """Free energy along a restrained coordinate from umbrella windows, by MBAR (pymbar).

    Args:
        windows: each {"r0": centre (nm), "k": force constant (kJ/mol/nm^2), "x": samples (nm) in time
            order}, optionally "u_common" (kJ/mol per sample): a bias applied alike in every window (a
            restraint that keeps the reactants together), and "dt_ps": the time between samples.
        decorrelated: MBAR on each window's uncorrelated samples (statistical inefficiency g of its x,
            pymbar's timeseries), so the error bars count independent samples only; False uses all samples.
    Returns {"x": bin centres, "f": free energy (kJ/mol, minimum 0) in the ensemble with the common bias
    (e.g. the reactants held together) but without the umbrellas, "df": its uncertainty, "counts"
    (samples per bin, all samples), "g" (K,) statistical inefficiency per window, "tau_ps" (K,) correlation
    time (g - 1) / 2 * dt (NaN without dt_ps), "n_used" (K,) samples MBAR used, "overlap_scalar": one minus
    the second-largest eigenvalue of MBAR's overlap matrix (0: windows in disconnected groups),
    "cut_overlap" (K-1,): with the windows ordered by their sample means and cut in two after each of the
    first K-1, the overlap between the two sides (sum of MBAR's overlap matrix over window pairs across the
    cut, symmetrised; ~0 is a gap the profile cannot bridge), "cut_nm" (K-1,): where each cut lies}; with
    "u_common" in every window also "f_unbiased", "df_unbiased" (the common bias removed by reweighting,
    in bins that have samples) and "ess_unbiased" (Kish's effective number of samples of that
    reweighting: few means the unbiased profile rests on few samples).

    Raises AnalysisError when MBAR finds no consistent free energies (windows that do not overlap).
    """
    from pymbar import FES
    from pymbar.utils import ParameterError

    if len(windows) < 2:
        raise InputError("a free-energy profile needs at least two umbrella windows")
    if any(len(w["x"]) == 0 for w in windows):
        raise InputError("an umbrella window has no samples")
    beta = 1.0 / (KB * temperature)
    picks, gs = [], []
    for w in windows:
        idx, g = decorrelate(np.asarray(w["x"], dtype=float)) if decorrelated else (np.arange(len(w["x"])), 1.0)
        picks.append(idx)
        gs.append(g)
    x_all = np.concatenate([np.asarray(w["x"], dtype=float) for w in windows])
    x_n = np.concatenate([np.asarray(w["x"], dtype=float)[i] for w, i in zip(windows, picks, strict=True)])
    common = all("u_common" in w for w in windows)
    u_c = (
        np.concatenate([np.asarray(w["u_common"], dtype=float)[i] for w, i in zip(windows, picks, strict=True)])
        if common
        else np.zeros_like(x_n)
    )
    N_k = np.array([len(i) for i in picks])
    K = len(windows)
    r0 = np.array([w["r0"] for w in windows])[:, None]
    kk = np.array([w["k"] for w in windows])[:, None]
    u_kn = beta * (0.5 * kk * (x_n[None, :] - r0) ** 2 + u_c[None, :])
    edges = np.linspace(x_all.min(), x_all.max() + 1e-9, n_bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    counts = np.histogram(x_all, bins=edges)[0]
    used = np.histogram(x_n, bins=edges)[0]
    keep = used > 0
    hist = {"bin_edges": [edges]}
    try:
        fes = FES(u_kn, N_k, verbose=False)
        # target: the common bias kept, the umbrellas removed
        fes.generate_fes(beta * u_c, x_n, fes_type="histogram", histogram_parameters=hist)
        res = fes.get_fes(centres[keep], reference_point="from-lowest", uncertainty_method="analytical")
        ov = fes.mbar.compute_overlap()
        unb = None
        if common:
            fes_u = FES(u_kn, N_k, verbose=False)
            fes_u.generate_fes(np.zeros_like(x_n), x_n, fes_type="histogram", histogram_parameters=hist)
            unb = fes_u.get_fes(centres[keep], reference_point="from-lowest", uncertainty_method="analytical")
            log_w = _log_weights(u_kn, N_k, np.asarray(fes_u.mbar.f_k), np.zeros_like(x_n))
    except ParameterError as e:
        raise AnalysisError(
            f"MBAR found no consistent free energies for these {len(windows)} umbrella windows (centres "
            f"{', '.join(f'{float(c):.3f}' for c in r0[:, 0])} nm): neighbouring windows probably do not "
            f"overlap; add windows or stiffen the restraints where they slide apart ({e})"
        ) from e
    f = np.asarray(res["f_i"]) / beta
    df = np.asarray(res.get("df_i", np.full_like(f, np.nan))) / beta
    means = np.array([float(np.mean(w["x"])) for w in windows])
    order = np.argsort(means)
    m = np.asarray(ov["matrix"])
    cut = np.array(
        [0.5 * (m[np.ix_(order[:c], order[c:])].sum() + m[np.ix_(order[c:], order[:c])].sum()) for c in range(1, K)]
    )
    dts = np.array([float(w.get("dt_ps", np.nan)) for w in windows])
    out = {
        "x": centres[keep],
        "f": f - f.min(),
        "df": df,
        "counts": counts[keep],
        "g": np.array(gs),
        "tau_ps": 0.5 * (np.array(gs) - 1.0) * dts,
        "n_used": N_k,
        "overlap_scalar": np.asarray(float(ov["scalar"])),
        "cut_overlap": cut,
        "cut_nm": 0.5 * (means[order[:-1]] + means[order[1:]]),
    }
    if unb is not None:
        fu = np.asarray(unb["f_i"]) / beta
        out["f_unbiased"] = fu - np.nanmin(fu)
        out["df_unbiased"] = np.asarray(unb.get("df_i", np.full_like(fu, np.nan))) / beta
        w = np.exp(log_w - log_w.max())
        out["ess_unbiased"] = np.asarray(float(w.sum() ** 2 / (w * w).sum()))
    return out


def _log_weights(u_kn: np.ndarray, N_k: np.ndarray, f_k: np.ndarray, u_n: np.ndarray) -> np.ndarray:
    """MBAR log weights (unnormalised) of every sample in the state of reduced potential ``u_n``."""
    from scipy.special import logsumexp

    with np.errstate(divide="ignore"):
        log_n = np.log(N_k.astype(float))
    return -u_n - logsumexp(f_k[:, None] - u_kn + log_n[:, None], axis=0)


def barrier_uncertainty(profile: dict[str, np.ndarray], key: str = "f") -> float:
    """Uncertainty (kJ/mol) of :func:`forward_barrier`: MBAR's errors of the top and of the reactant-side
    minimum, added in quadrature (each is relative to the profile's lowest bin); NaN below 3 points."""
    f = np.asarray(profile[key])
    df = np.nan_to_num(np.asarray(profile["d" + key]), nan=0.0)
    if len(f) < 3:
        return float("nan")
    k = _top_index(f)
    j = int(np.argmin(f[: k + 1]))
    return float(np.hypot(df[k], df[j]))


def forward_barrier(profile: dict[str, np.ndarray], key: str = "f") -> tuple[float, float]:
    """(height in kJ/mol, position in nm) of the highest interior point of ``profile[key]`` above the
    minimum on its low-x side (the reactant side of a coordinate that grows along the reaction); NaNs
    below 3 points."""
    f, x = np.asarray(profile[key]), np.asarray(profile["x"])
    if len(f) < 3:
        return float("nan"), float("nan")
    k = _top_index(f)
    return float(f[k] - f[: k + 1].min()), float(x[k])


def _top_index(f: np.ndarray) -> int:
    """Index of the highest interior point of a profile (at least 3 points)."""
    return int(np.argmax(f[1:-1])) + 1


def barrier(profile: dict[str, np.ndarray]) -> float:
    """Height (kJ/mol) of the highest interior point of ``profile["f"]`` above the higher of the
    minima on its two sides (the smaller of the forward and backward barriers); NaN below 3 points."""
    f = profile["f"]
    if len(f) < 3:
        return float("nan")
    k = _top_index(f)
    return float(f[k] - max(f[:k].min(), f[k + 1 :].min()))

"""Validation observables of a peptide in water: backbone phi/psi, Ramachandran populations and
histograms, solute-water RDFs and hydrogen bonds, per run, and their comparison between MD drivers.

Statistics treat MD runs as the unit: every observable is computed per run, its error bar is the
standard error over runs, and "within noise" is decided by a permutation test over runs. Runs may be
grouped in strata (runs started from the same conformation); the test then only exchanges the two
drivers' labels within a stratum, so that a shared start cannot make two drivers look alike. The
p-value is the fraction of the relabellings whose statistic is at least the observed one (the
observed one included). Frames within one run are correlated; runs with different seeds are not,
but runs from the same start share its memory for as long as the start is not forgotten, which is
why the strata exist.

Angles in degrees, lengths nm.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qmlmm.errors import InputError
from qmlmm.system import minimum_image

__all__ = [
    "REGIONS",
    "PeptideSites",
    "RunObservables",
    "compare_drivers",
    "driver_statistics",
    "hbond_counts",
    "jensen_shannon_bits",
    "peptide_sites",
    "permutation_p_value",
    "smallest_p",
    "ramachandran_histogram",
    "region_of",
    "region_populations",
    "run_observables",
    "water_donors",
]

#: Ramachandran regions (deg), a partition of the plane; phi in [-180, 180), psi in [-180, 180).
#: alpha_R: phi < 0, -120 <= psi < 50; C7eq: phi < 0, 50 <= psi < 120; beta/PII: phi < 0 and
#: psi >= 120 or psi < -120; alpha_L/other: phi >= 0.
REGIONS: tuple[str, ...] = ("C7eq", "beta_PII", "alpha_R", "alpha_L_other")


@dataclass(frozen=True)
class PeptideSites:
    """System atom indices of one residue's backbone dihedrals and its solute-water H-bond sites."""

    phi: tuple[int, int, int, int]  # C'(i-1) - N - CA - C'
    psi: tuple[int, int, int, int]  # N - CA - C' - N(i+1)
    carbonyl_o: tuple[int, ...]  # every O double-bonded to a C
    amide_h: tuple[int, ...]  # every H on an amide N
    donors: tuple[tuple[int, int], ...]  # (N, H) of every N-H


def peptide_sites(smiles: str, offset: int = 0) -> PeptideSites:
    """phi/psi of the one residue flanked by two peptide bonds (e.g. Ace-Ala-Nme), and the carbonyl O
    and amide N-H atoms, as system indices (RDKit order with hydrogens, as ``qmlmm build`` numbers a
    solute, shifted by ``offset``). Raises InputError unless exactly one such residue is found."""
    from rdkit import Chem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    patt = Chem.MolFromSmarts("[CX3](=O)[NX3][CX4][CX3](=O)[NX3]")
    hits = mol.GetSubstructMatches(patt)
    if len(hits) != 1:
        raise InputError(
            f"{smiles}: validation needs exactly one residue between two peptide bonds "
            f"(C(=O)-N-CA-C(=O)-N), found {len(hits)}"
        )
    c0, _, n1, ca, c1, _, n2 = (int(i) + offset for i in hits[0])
    o = tuple(
        a.GetIdx() + offset
        for a in mol.GetAtoms()
        if a.GetSymbol() == "O"
        and any(b.GetBondType() == Chem.BondType.DOUBLE and b.GetOtherAtom(a).GetSymbol() == "C" for b in a.GetBonds())
    )
    donors = tuple(
        (a.GetIdx() + offset, h.GetIdx() + offset)
        for a in mol.GetAtoms()
        if a.GetSymbol() == "N" and any(_is_carbonyl_c(n) for n in a.GetNeighbors())
        for h in a.GetNeighbors()
        if h.GetSymbol() == "H"
    )
    return PeptideSites((c0, n1, ca, c1), (n1, ca, c1, n2), o, tuple(h for _, h in donors), donors)


def _is_carbonyl_c(atom: Any) -> bool:
    from rdkit import Chem

    return atom.GetSymbol() == "C" and any(
        b.GetBondType() == Chem.BondType.DOUBLE and b.GetOtherAtom(atom).GetSymbol() == "O" for b in atom.GetBonds()
    )


def region_of(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Index into :data:`REGIONS` of every (phi, psi) pair (deg, any shape; angles are wrapped into
    [-180, 180))."""
    phi = (np.asarray(phi, dtype=float) + 180.0) % 360.0 - 180.0
    psi = (np.asarray(psi, dtype=float) + 180.0) % 360.0 - 180.0
    out = np.full(phi.shape, 3, dtype=np.int64)
    left = phi < 0
    out[left & (psi >= -120) & (psi < 50)] = 2
    out[left & (psi >= 50) & (psi < 120)] = 0
    out[left & ((psi >= 120) | (psi < -120))] = 1
    return out


def region_populations(phi: np.ndarray, psi: np.ndarray) -> dict[str, float]:
    """Fraction of frames in each of :data:`REGIONS` (sums to 1); phi, psi (T,) deg, T >= 1."""
    r = region_of(phi, psi)
    if r.size == 0:
        raise InputError("region populations need at least one frame")
    return {name: float(np.mean(r == k)) for k, name in enumerate(REGIONS)}


def ramachandran_histogram(phi: np.ndarray, psi: np.ndarray, n_bins: int = 18) -> np.ndarray:
    """Counts (n_bins, n_bins) of (phi, psi) on [-180, 180)^2 (rows phi, columns psi)."""
    phi = (np.asarray(phi, dtype=float) + 180.0) % 360.0 - 180.0
    psi = (np.asarray(psi, dtype=float) + 180.0) % 360.0 - 180.0
    edges = np.linspace(-180.0, 180.0, n_bins + 1)
    h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges])
    return h


def jensen_shannon_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) between two histograms of the same bins (counts or
    probabilities, any shape; each normalised here). Raises InputError for an empty histogram."""
    p = np.asarray(p, dtype=float).ravel()
    q = np.asarray(q, dtype=float).ravel()
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise InputError("Jensen-Shannon divergence needs two non-empty histograms of the same bins")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def water_donors(numbers: np.ndarray, mol_ids: np.ndarray, is_qm: np.ndarray) -> np.ndarray:
    """(n, 2) (O, H) index pairs of every water O-H (MM molecules of one O and two H)."""
    out: list[tuple[int, int]] = []
    mm = np.flatnonzero(~is_qm)
    ids, start = np.unique(mol_ids[mm], return_index=True)
    bounds = np.append(start, len(mm))
    for k in range(len(ids)):
        atoms = mm[bounds[k] : bounds[k + 1]]
        z = numbers[atoms]
        if len(atoms) == 3 and (z == 8).sum() == 1 and (z == 1).sum() == 2:
            o = atoms[z == 8][0]
            out.extend((o, h) for h in atoms[z == 1])
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def hbond_counts(
    positions: np.ndarray,
    boxes: np.ndarray | None,
    donors: np.ndarray | Sequence[Sequence[int]],
    acceptors: np.ndarray | Sequence[int],
    r_max: float = 0.35,
    angle_max_deg: float = 30.0,
) -> np.ndarray:
    """Hydrogen bonds per frame by the geometric criterion: donor-acceptor distance < ``r_max`` (nm) and
    angle between D->H and D->A < ``angle_max_deg`` (Luzar-Chandler). positions (T, N, 3) nm, boxes
    (T, 3) nm or None, donors (n_d, 2) (D, H), acceptors (n_a,). Pairs with D == A are skipped.
    Returns (T,) counts."""
    pos = np.asarray(positions, dtype=float)
    pos = pos[None] if pos.ndim == 2 else pos
    don = np.asarray(donors, dtype=np.int64).reshape(-1, 2)
    acc = np.asarray(acceptors, dtype=np.int64).ravel()
    out = np.zeros(len(pos), dtype=np.int64)
    if not len(don) or not len(acc):
        return out
    cos_min = np.cos(np.radians(angle_max_deg))
    bx = None if boxes is None else np.broadcast_to(np.asarray(boxes, dtype=float), (len(pos), 3))
    distinct = don[:, 0][:, None] != acc[None, :]
    for t, p in enumerate(pos):
        box = None if bx is None else np.diag(bx[t])
        da = minimum_image(p[acc][None, :, :] - p[don[:, 0]][:, None, :], box)  # (n_d, n_a, 3)
        dh = minimum_image(p[don[:, 1]] - p[don[:, 0]], box)  # (n_d, 3)
        r = np.linalg.norm(da, axis=-1)
        close = (r < r_max) & distinct
        if not close.any():
            continue
        cos = np.einsum("dak,dk->da", da, dh) / (np.maximum(r, 1e-12) * np.linalg.norm(dh, axis=-1)[:, None])
        out[t] = int(np.sum(close & (cos > cos_min)))
    return out


@dataclass
class RunObservables:
    """One MD run's observables after its first ``skip_ps``: phi, psi (T,) deg; region populations;
    region changes between consecutive frames; RDF curves {pair: (r nm, g)}; mean solute-water H-bond
    counts {"solute_donor", "solute_acceptor", "total"}; speed (ns/day); steps whose forces came from an
    uncertainty guard's fallback engine."""

    n_frames: int
    phi: np.ndarray
    psi: np.ndarray
    populations: dict[str, float]
    region_changes: int
    rdf: dict[str, tuple[np.ndarray, np.ndarray]]
    hbonds: dict[str, float]
    ns_per_day: float | None = None
    fallback_steps: int = 0
    stratum: int = 0  # the run's start: statistics weight every start equally


def run_observables(
    positions: np.ndarray,
    boxes: np.ndarray,
    sites: PeptideSites,
    water_o: np.ndarray,
    water_h: np.ndarray,
    water_oh: np.ndarray,
    r_max: float = 0.8,
    n_bins: int = 80,
) -> RunObservables:
    """Observables of one trajectory (positions (T, N, 3) nm, boxes (T, 3) nm, T >= 1): phi/psi and
    populations, the RDFs carbonyl O - water H ("O=C-HW") and amide H - water O ("HN-OW"), and the
    H-bonds N-H...OW ("solute_donor") and OW-HW...O=C ("solute_acceptor")."""
    from qmlmm.analysis.md_analysis import dihedrals, rdf

    if len(positions) == 0:
        raise InputError("run observables need at least one frame")
    if r_max > 0.5 * float(np.min(boxes)):
        raise InputError(f"RDF range {r_max} nm exceeds half the smallest box edge ({float(np.min(boxes)):.3f} nm)")
    ang = dihedrals(positions, [sites.phi, sites.psi], boxes)
    phi, psi = ang[:, 0], ang[:, 1]
    reg = region_of(phi, psi)
    curves = {
        "O=C-HW": rdf(positions, boxes, list(sites.carbonyl_o), list(water_h), r_max=r_max, n_bins=n_bins),
        "HN-OW": rdf(positions, boxes, list(sites.amide_h), list(water_o), r_max=r_max, n_bins=n_bins),
    }
    don = hbond_counts(positions, boxes, sites.donors, water_o)
    acc = hbond_counts(positions, boxes, water_oh, sites.carbonyl_o)
    return RunObservables(
        n_frames=len(phi),
        phi=phi,
        psi=psi,
        populations=region_populations(phi, psi),
        region_changes=int(np.sum(reg[1:] != reg[:-1])),
        rdf=curves,
        hbonds={
            "solute_donor": float(don.mean()),
            "solute_acceptor": float(acc.mean()),
            "total": float((don + acc).mean()),
        },
    )


#: the H-bond peak of an RDF to water H or O is looked for below this distance (nm): the maximum over the
#: whole curve can jump to the second shell from one run to the next
FIRST_PEAK_MAX_NM = 0.26


def _first_peak(r: np.ndarray, g: np.ndarray) -> int:
    """Index of the largest g at r < FIRST_PEAK_MAX_NM (the first, hydrogen-bonded shell)."""
    inside = np.flatnonzero(r < FIRST_PEAK_MAX_NM)
    return int(inside[np.argmax(g[inside])]) if len(inside) else int(np.argmax(g))


def _mean_se(x: Sequence[float]) -> dict[str, float]:
    a = np.asarray(x, dtype=float)
    se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "se": se}


def stratum_weights(runs: Sequence[RunObservables]) -> np.ndarray:
    """(R,) weights summing to 1 that give every stratum (start) of ``runs`` the same total weight, split
    equally among its runs. Runs too short to forget their start carry it: a driver that lost the runs of
    one start (stopped early) would otherwise be averaged over another mix of starts than the reference."""
    st = np.array([r.stratum for r in runs])
    counts = {k: int((st == k).sum()) for k in set(st.tolist())}
    return np.array([1.0 / (len(counts) * counts[k]) for k in st.tolist()])


def _wmean_se(x: Sequence[float], runs: Sequence[RunObservables]) -> dict[str, float]:
    """Stratum-balanced mean sum w_i x_i (:func:`stratum_weights`) and its standard error
    sqrt(s_w^2 sum w_i^2), s_w^2 the variance of the runs about their own start's mean pooled over starts
    (n - H degrees of freedom, H starts): the differences between starts are fixed by the design, not
    noise. The usual s / sqrt(n) for one start; NaN without a start of two runs (n <= H)."""
    a, w = np.asarray(x, dtype=float), stratum_weights(runs)
    st = np.array([r.stratum for r in runs])
    m = float((w * a).sum())
    groups = sorted(set(st.tolist()))
    dof = len(a) - len(groups)
    if dof < 1:
        return {"mean": m, "se": float("nan")}
    ss = sum(float(((a[st == g] - a[st == g].mean()) ** 2).sum()) for g in groups)
    return {"mean": m, "se": float(np.sqrt(ss / dof * (w * w).sum()))}


def run_halves(
    runs: Sequence[RunObservables], starts: set[int] | None = None
) -> tuple[list[RunObservables], list[RunObservables]]:
    """Two halves of ``runs`` with the same starts: each start's runs (of ``starts``; default every start)
    go alternately to one half and the other; a start with fewer than two runs is left out. Halves split
    by position would differ in their mix of starts once a run is missing, and measure that mix."""
    a: list[RunObservables] = []
    b: list[RunObservables] = []
    for st in sorted({r.stratum for r in runs}):
        rs = [r for r in runs if r.stratum == st]
        if len(rs) >= 2 and (starts is None or st in starts):
            a += rs[0::2]
            b += rs[1::2]
    return a, b


def _pooled_histogram(runs: Sequence[RunObservables], n_bins: int) -> np.ndarray:
    """The runs' Ramachandran histograms, each normalised and stratum-weighted, scaled to the total count
    (the plain sum of counts when every start has as many runs of as many frames)."""
    hs = [ramachandran_histogram(r.phi, r.psi, n_bins) for r in runs]
    total = sum(float(h.sum()) for h in hs)
    w = stratum_weights(runs)
    return total * sum((wi * h / max(h.sum(), 1.0) for wi, h in zip(w, hs, strict=True)), np.zeros((n_bins, n_bins)))


def mean_curve(runs: Sequence[RunObservables], pair: str) -> np.ndarray:
    return np.asarray(np.tensordot(stratum_weights(runs), np.array([r.rdf[pair][1] for r in runs]), axes=1))


def driver_statistics(runs: Sequence[RunObservables], n_bins: int = 18) -> dict[str, Any]:
    """Mean and standard error over runs (every start weighted equally, :func:`stratum_weights`) of a
    driver's populations, H-bond counts and RDF first peaks (position and height of the largest g), the
    pooled Ramachandran histogram (counts), the region changes per run, and the Jensen-Shannon divergence
    between the histograms of its two run halves (its own run-to-run noise)."""
    if not runs:
        raise InputError("driver statistics need at least one run")
    out: dict[str, Any] = {
        "n_runs": len(runs),
        "frames_per_run": [r.n_frames for r in runs],
        "region_changes_per_run": [r.region_changes for r in runs],
        "fallback_steps_per_run": [r.fallback_steps for r in runs],
        "starts": sorted({r.stratum for r in runs}),
        "populations": {k: _wmean_se([r.populations[k] for r in runs], runs) for k in REGIONS},
        "hbonds": {k: _wmean_se([r.hbonds[k] for r in runs], runs) for k in runs[0].hbonds},
        "rdf_peak": {},
        "histogram": _pooled_histogram(runs, n_bins).tolist(),
        "ns_per_day": _mean_se([r.ns_per_day for r in runs if r.ns_per_day is not None] or [float("nan")]),
    }
    for pair in runs[0].rdf:
        k = [_first_peak(*r.rdf[pair]) for r in runs]
        out["rdf_peak"][pair] = {
            "r_nm": _wmean_se([r.rdf[pair][0][i] for r, i in zip(runs, k, strict=True)], runs),
            "g": _wmean_se([r.rdf[pair][1][i] for r, i in zip(runs, k, strict=True)], runs),
        }
    ha, hb = run_halves(runs)
    if ha and hb:
        out["js_halves_bits"] = jensen_shannon_bits(_pooled_histogram(ha, n_bins), _pooled_histogram(hb, n_bins))
    return out


def _relabellings(strata_a: Sequence[int], strata_b: Sequence[int]) -> list[list[tuple[int, ...]]]:
    """Per stratum, every choice of which of its pooled runs (indices into a + b) carry label a, keeping
    the stratum's count of a."""
    pooled = list(strata_a) + list(strata_b)
    out = []
    for st in sorted(set(pooled)):
        members = [i for i, x in enumerate(pooled) if x == st]
        n_a = sum(1 for x in strata_a if x == st)
        out.append(list(itertools.combinations(members, n_a)))
    return out


def smallest_p(strata_a: Sequence[int], strata_b: Sequence[int]) -> float:
    """The smallest p-value :func:`permutation_p_value` can give for these strata: the observed labelling
    and its mirror image (when that keeps the counts) count as at least as extreme. A difference of means
    reaches it when every other relabelling gives a smaller difference; a divergence between pooled
    histograms may not (a relabelling that swaps a whole stratum can keep it as large)."""
    n = int(np.prod([len(c) for c in _relabellings(strata_a, strata_b)]))
    mirror = sorted(strata_a) == sorted(strata_b)
    return (2 if mirror else 1) / n


def permutation_p_value(
    a: Sequence[RunObservables],
    b: Sequence[RunObservables],
    statistic: Callable[[Sequence[Any], Sequence[Any]], float],
    strata_a: Sequence[int] | None = None,
    strata_b: Sequence[int] | None = None,
    max_relabellings: int = 20000,
    seed: int = 0,
) -> float:
    """Fraction of the relabellings of the pooled runs a + b whose ``statistic`` is at least that of the
    observed labelling (which is counted, so p > 0). Labels are exchanged only within strata (runs with
    equal ``strata_*`` entries, e.g. the same start; default one stratum), keeping each stratum's counts.
    Exact over all relabellings (C(8, 4) = 70 for 4 + 4 runs in one stratum) up to ``max_relabellings``;
    above it, that many random relabellings plus the observed one."""
    sa = [0] * len(a) if strata_a is None else list(strata_a)
    sb = [0] * len(b) if strata_b is None else list(strata_b)
    if len(sa) != len(a) or len(sb) != len(b):
        raise InputError("permutation test: one stratum per run")
    pooled = list(a) + list(b)
    observed = statistic(a, b)
    choices = _relabellings(sa, sb)
    n_total = int(np.prod([len(c) for c in choices]))

    def stat_of(pick: Sequence[tuple[int, ...]]) -> float:
        in_a = {i for c in pick for i in c}
        return statistic([pooled[i] for i in sorted(in_a)], [pooled[i] for i in range(len(pooled)) if i not in in_a])

    if n_total <= max_relabellings:
        picks: Any = itertools.product(*choices)
        hits = sum(stat_of(p) >= observed - 1e-12 for p in picks)
        return hits / n_total
    rng = np.random.default_rng(seed)
    hits = 1 + sum(
        stat_of([c[rng.integers(len(c))] for c in choices]) >= observed - 1e-12 for _ in range(max_relabellings)
    )
    return hits / (max_relabellings + 1)


def compare_drivers(
    ref: Sequence[RunObservables],
    other: Sequence[RunObservables],
    n_bins: int = 18,
    strata_ref: Sequence[int] | None = None,
    strata_other: Sequence[int] | None = None,
) -> dict[str, Any]:
    """How a driver's runs differ from the reference runs, each difference beside run-to-run noise.

    - populations: difference of means with the combined standard error, and a permutation p-value over
      runs of the largest absolute population difference;
    - Ramachandran: Jensen-Shannon divergence (bits) of the pooled histograms and its permutation p-value;
      and, like for like, the mean divergence between a half of one driver's runs and the other half of
      the other's (``ramachandran_js_cross_halves_bits``) beside the divergence between the reference's
      own halves (:func:`run_halves`, on the starts where both have two runs or more);
    - RDFs: root-mean-square difference of the run-averaged g(r) and its permutation p-value;
    - H-bonds: difference of mean total counts with combined SE and permutation p-value.

    ``strata_*``: per run its start (default: each run's ``stratum``). Only starts both drivers have runs
    from are compared (``common_starts``), every start weighted equally (:func:`stratum_weights`): a
    driver that lost a start's runs is not compared with the reference's runs from it. Runs from the same
    start are only exchanged with each other. ``agree`` per observable: p >= 0.05, or None where no
    relabelling could give p < 0.05 (too few runs or strata of single pairs; ``smallest_p`` says how
    small p could get)."""

    def pop(x: Sequence[RunObservables], k: str) -> float:
        return float(np.dot(stratum_weights(x), [r.populations[k] for r in x]))

    def pops_stat(x: Sequence[RunObservables], y: Sequence[RunObservables]) -> float:
        return max(abs(pop(x, k) - pop(y, k)) for k in REGIONS)

    def js_stat(x: Sequence[RunObservables], y: Sequence[RunObservables]) -> float:
        return jensen_shannon_bits(_pooled_histogram(x, n_bins), _pooled_histogram(y, n_bins))

    def hb_stat(x: Sequence[RunObservables], y: Sequence[RunObservables]) -> float:
        hx = np.dot(stratum_weights(x), [r.hbonds["total"] for r in x])
        return float(abs(hx - np.dot(stratum_weights(y), [r.hbonds["total"] for r in y])))

    def rdf_stat(pair: str) -> Callable[[Sequence[RunObservables], Sequence[RunObservables]], float]:
        return lambda x, y: float(np.sqrt(np.mean((mean_curve(x, pair) - mean_curve(y, pair)) ** 2)))

    so = [r.stratum for r in other] if strata_other is None else list(strata_other)
    sr = [r.stratum for r in ref] if strata_ref is None else list(strata_ref)
    if len(so) != len(other) or len(sr) != len(ref):
        raise InputError("compare_drivers: one stratum per run")
    common = sorted(set(so) & set(sr))
    if not common:
        raise InputError(f"compare_drivers: no start in common (reference {sorted(set(sr))}, other {sorted(set(so))})")
    other = [replace(r, stratum=k) for r, k in zip(other, so, strict=True) if k in common]
    ref = [replace(r, stratum=k) for r, k in zip(ref, sr, strict=True) if k in common]
    so, sr = [r.stratum for r in other], [r.stratum for r in ref]

    def p_of(stat: Callable[[Sequence[Any], Sequence[Any]], float]) -> float:
        return permutation_p_value(other, ref, stat, so, sr)

    res: dict[str, Any] = {
        "populations": {},
        "rdf": {},
        "smallest_p": smallest_p(so, sr),
        "common_starts": common,
        "runs_compared": {"reference": len(ref), "other": len(other)},
    }
    for k in REGIONS:
        a, b = _wmean_se([r.populations[k] for r in other], other), _wmean_se([r.populations[k] for r in ref], ref)
        res["populations"][k] = {"difference": a["mean"] - b["mean"], "se": float(np.hypot(a["se"], b["se"]))}
    res["populations_max_abs_difference"] = pops_stat(other, ref)
    res["populations_p"] = p_of(pops_stat)
    res["ramachandran_js_bits"] = js_stat(other, ref)
    res["ramachandran_p"] = p_of(js_stat)
    twice = {k for k in common if so.count(k) >= 2 and sr.count(k) >= 2}  # halves need two runs of a start
    (oa, ob), (ra, rb) = run_halves(other, twice), run_halves(ref, twice)
    if oa and ra:
        res["ramachandran_js_cross_halves_bits"] = 0.5 * (js_stat(oa, rb) + js_stat(ob, ra))
        res["ramachandran_js_reference_halves_bits"] = js_stat(ra, rb)
        res["halves_starts"] = sorted(twice)
    for pair in ref[0].rdf:
        res["rdf"][pair] = {"rms_g_difference": rdf_stat(pair)(other, ref), "p": p_of(rdf_stat(pair))}
    a, b = _wmean_se([r.hbonds["total"] for r in other], other), _wmean_se([r.hbonds["total"] for r in ref], ref)
    res["hbonds_total"] = {
        "difference": a["mean"] - b["mean"],
        "se": float(np.hypot(a["se"], b["se"])),
        "p": p_of(hb_stat),
    }
    decidable = res["smallest_p"] < 0.05

    def verdict(p: float) -> bool | None:
        return bool(p >= 0.05) if decidable else None

    res["agree"] = {
        "populations": verdict(res["populations_p"]),
        "ramachandran": verdict(res["ramachandran_p"]),
        **{f"rdf {pair}": verdict(v["p"]) for pair, v in res["rdf"].items()},
        "hbonds": verdict(res["hbonds_total"]["p"]),
    }
    return res

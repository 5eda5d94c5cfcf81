"""One TIP3P water hydrogen-bonded to the solute, scanned along the H-bond, with each engine's QM/MM
embedding: does GFN2-xTB/MM bind water as DFT/MM does?

Why: in the alanine-dipeptide validation (issue 20) the GFN2-xTB/MM reference's solute-water g(O=C-HW)
has no H-bond peak and ~2.7 solute-water H-bonds, DFTB3/MM ~6.6. libxtb damps every point charge with
the hardness of its element (``qmlmm.engines.xtb_pcem``: kernel (r^2 + 1/x^2)^(-1/2), x the mean
hardness, 1/x ~ 2.3 Bohr for a water H at a carbonyl O), DFT/MM (PySCF) and DFTB3/MM couple bare 1/r.

For each H-bond site of the solute (every carbonyl O as acceptor, every amide N-H as donor) one rigid
TIP3P water is placed on the bond's axis (acceptor: a water H on the C=O axis, the water's O-H along it;
donor: the water O on the N-H axis, its lone-pair bisector along it) at H...O distances ``--distances``.
Per engine M and distance d:

- QM/MM interaction: E_M(solute in the water's 3 TIP3P charges) - E_M(solute alone) + E_LJ(solute-water),
  the LJ of the MD system (the solute's GAFF types from the system's meta.json, TIP3P O; TIP3P H has no LJ).
  Only the QM engine differs between the rows: this isolates the embedding.
- Supermolecule (context, not the QM/MM target): E_M(solute + water, all QM) - E_M(solute) - E_M(water),
  each method on its own (B3LYP without dispersion or counterpoise correction; the water at TIP3P geometry).

With ``--xtb-charge-element Z`` also GFN2-xTB/MM with every point charge passed as element Z (a harder
element damps less): how much of the difference the damping makes.

The solute is the system's built structure (``--system``, built here when missing). Results:
benchmarks/results/hbond_embedding.{json,md,png}.

Run (the recorded results; each engine's scan is kept in --work and not redone):
    .venv/bin/python benchmarks/hbond_embedding.py --system runs/ad_small/system --engines xtb:gfn2 dftb3:3ob
    .venv/bin/python benchmarks/hbond_embedding.py --system runs/ad_small/system --engines dft:b3lyp/def2-svp \
        --sites O2=C1 N8-H18 --no-supermolecule --distances 0.17 0.18 0.19 0.20 0.22 0.25
    .venv/bin/python benchmarks/hbond_embedding.py --system runs/ad_small/system --engines xtb:gfn2 \
        --xtb-charge-element 10
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _results import RESULTS, machine, save_json, save_markdown

SMILES = "CC(=O)N[C@@H](C)C(=O)NC"
#: TIP3P (Jorgensen 1983): geometry nm, deg; charges e; O Lennard-Jones (sigma nm, epsilon kJ/mol)
TIP3P_ROH, TIP3P_HOH = 0.09572, 104.52
TIP3P_Q = np.array([-0.834, 0.417, 0.417])
TIP3P_O_LJ = (0.315061, 0.636386)
WATER_Z = np.array([8, 1, 1])
DEFAULT_ENGINES = ("dft:b3lyp/def2-svp", "xtb:gfn2", "dftb3:3ob")
DISTANCES = [0.15, 0.16, 0.17, 0.18, 0.19, 0.20, 0.215, 0.23, 0.26, 0.30, 0.40]


@dataclass(frozen=True)
class Site:
    """An H-bond site: ``kind`` "acceptor" (carbonyl O) or "donor" (amide H); ``atom`` the solute atom the
    water binds to, ``partner`` the atom bonded to it (C of C=O, N of N-H); solute indices from 0."""

    name: str
    kind: str
    atom: int
    partner: int


def solute_sites(smiles: str) -> list[Site]:
    """Every carbonyl O (acceptor) and amide N-H (donor) of ``smiles``, in RDKit order with hydrogens."""
    from rdkit import Chem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    sites = []
    for c, o in mol.GetSubstructMatches(Chem.MolFromSmarts("[CX3]=[OX1]")):
        sites.append(Site(f"O{o}=C{c} (acceptor)", "acceptor", o, c))
    for n, h in mol.GetSubstructMatches(Chem.MolFromSmarts("[NX3;$(N-C=O)]-[H]")):
        sites.append(Site(f"N{n}-H{h} (donor)", "donor", h, n))
    return sites


def _perpendicular(u: np.ndarray) -> np.ndarray:
    a = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    v = np.cross(u, a)
    return np.asarray(v / np.linalg.norm(v))


def water_at(solute: np.ndarray, site: Site, d_nm: float) -> np.ndarray:
    """(3, 3) nm positions O, H, H of a rigid TIP3P water on ``site``'s axis, the H...O distance ``d_nm``."""
    u = solute[site.atom] - solute[site.partner]
    u /= np.linalg.norm(u)
    v = _perpendicular(u)
    half = np.deg2rad(TIP3P_HOH / 2)
    if site.kind == "acceptor":  # H on the C=O axis, its O-H bond along it
        h1 = solute[site.atom] + d_nm * u
        o = h1 + TIP3P_ROH * u
        b = -u  # O->H1 direction is -u; the second H at the HOH angle from it
        h2 = o + TIP3P_ROH * (np.cos(2 * half) * b + np.sin(2 * half) * v)
        return np.array([o, h1, h2])
    o = solute[site.atom] + d_nm * u  # donor: water O on the N-H axis, the HOH bisector pointing away
    h1 = o + TIP3P_ROH * (np.cos(half) * u + np.sin(half) * v)
    h2 = o + TIP3P_ROH * (np.cos(half) * u - np.sin(half) * v)
    return np.array([o, h1, h2])


def lj_energy(solute: np.ndarray, lj: np.ndarray, water: np.ndarray) -> float:
    """Lennard-Jones energy (kJ/mol) of the solute (n, 3) nm with per-atom (sigma nm, epsilon kJ/mol) ``lj``
    (n, 2) against the water's O (Lorentz-Berthelot, as OpenMM's NonbondedForce)."""
    r = np.linalg.norm(solute - water[0], axis=1)
    sig = 0.5 * (lj[:, 0] + TIP3P_O_LJ[0])
    eps = np.sqrt(lj[:, 1] * TIP3P_O_LJ[1])
    sr6 = (sig / r) ** 6
    return float((4 * eps * (sr6 * sr6 - sr6)).sum())


def _system(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers (n,), positions (n, 3) nm, LJ (n, 2)) of the first solute of the system in ``path``."""
    from qmlmm.md.system import MDSystem

    if not (path / "meta.json").exists():
        from qmlmm.md.build import BuildSettings, SoluteSpec, build_system

        build_system([SoluteSpec(smiles=SMILES)], path, BuildSettings(cutoff=1.4))
    msys = MDSystem.load(path)
    meta = json.loads((path / "meta.json").read_text())
    off, n = int(meta["solute_offsets"][0]), int(meta["solutes"][0]["n_atoms"])
    idx = np.arange(off, off + n)
    types = list(meta["lj_types"].values())[:n]
    lj = np.array([[meta["lj_table"][t]["sigma_nm"], meta["lj_table"][t]["epsilon_kjmol"]] for t in types])
    return np.asarray(msys.numbers)[idx], np.asarray(msys.positions)[idx], lj


def scan(
    spec: str,
    numbers: np.ndarray,
    solute: np.ndarray,
    lj: np.ndarray,
    sites: list[Site],
    distances: list[float],
    supermolecule: bool = True,
    charge_numbers: np.ndarray = WATER_Z,
    name: str | None = None,
) -> dict[str, Any]:
    """Per site the QM/MM (and, with ``supermolecule``, the supermolecular; else None) interaction energies
    (kJ/mol) of ``spec`` at ``distances`` (nm), and the seconds it took."""
    from qmlmm.engines import make_engine

    eng = make_engine(spec, threads=2)
    t0 = time.time()
    e_solute = eng.compute(numbers, solute).energy
    e_water = eng.compute(WATER_Z, water_at(solute, sites[0], 0.3)).energy if supermolecule else 0.0
    out: dict[str, Any] = {"sites": {}}
    for site in sites:
        qmmm, sup = [], []
        for d in distances:
            w = water_at(solute, site, d)
            e = eng.compute(numbers, solute, w, TIP3P_Q, mm_numbers=charge_numbers).energy
            qmmm.append(e - e_solute + lj_energy(solute, lj, w))
            if supermolecule:
                e2 = eng.compute(np.concatenate([numbers, WATER_Z]), np.concatenate([solute, w])).energy
                sup.append(e2 - e_solute - e_water)
        out["sites"][site.name] = {"qmmm_kjmol": qmmm, "supermolecule_kjmol": sup or None}
        x, y = _minimum(distances, qmmm)
        print(f"  {name or spec:22s} {site.name:22s} QM/MM minimum {y:7.2f} kJ/mol at {x:.3f} nm", flush=True)
    out["seconds"] = time.time() - t0
    out["distances_nm"] = list(distances)
    out["spec"] = name or spec
    return out


def _minimum(d: list[float], e: list[float]) -> tuple[float, float]:
    """(distance nm, energy kJ/mol) of the scan's minimum, refined by a parabola through its neighbours."""
    i = int(np.argmin(e))
    if 0 < i < len(e) - 1:
        c = np.polyfit(d[i - 1 : i + 2], e[i - 1 : i + 2], 2)
        if c[0] > 0:
            x = -c[1] / (2 * c[0])
            return float(x), float(np.polyval(c, x))
    return float(d[i]), float(e[i])


def _cell(res: dict[str, Any], site: str, kind: str) -> str:
    r = res["sites"].get(site)
    if r is None or r.get(kind) is None:
        return "-"
    x, y = _minimum(res["distances_nm"], r[kind])
    return f"{y:.1f} ({x:.3f})"


def markdown(rec: dict[str, Any]) -> list[str]:
    engines, sites = list(rec["results"]), rec["sites"]
    lines = [
        "# One TIP3P water H-bonded to alanine dipeptide: each engine's QM/MM interaction",
        "",
        f"Machine: {rec['machine']}. Solute: the built structure of `{rec['system']}`; water on each site's "
        "axis (benchmarks/hbond_embedding.py). QM/MM: E(solute in the water's TIP3P charges) - E(solute) + "
        "LJ (the MD system's GAFF-TIP3P terms). Supermolecule: both molecules QM (B3LYP without dispersion "
        "or counterpoise correction), for context. -: not computed (DFT/MM costs ~1 min a point here).",
        "",
        "Minimum of each scan (parabola through the lowest three points): depth kJ/mol (H...O distance nm):",
        "",
        "| site | "
        + " | ".join(f"{e} QM/MM" for e in engines)
        + " | "
        + " | ".join(f"{e} supermolecule" for e in engines)
        + " |",
        "|---|" + "---:|" * (2 * len(engines)),
    ]
    for s in sites:
        row = [_cell(rec["results"][e], s, "qmmm_kjmol") for e in engines]
        row += [_cell(rec["results"][e], s, "supermolecule_kjmol") for e in engines]
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines += ["", "QM/MM interaction (kJ/mol) against the H...O distance:", ""]
    for e in engines:
        res = rec["results"][e]
        lines += [f"{e} ({res['seconds']:.0f} s):", ""]
        lines.append("| site | " + " | ".join(f"{x:.3f}" for x in res["distances_nm"]) + " |")
        lines.append("|---|" + "---:|" * len(res["distances_nm"]))
        for s, r in res["sites"].items():
            lines.append(f"| {s} | " + " | ".join(f"{v:.2f}" for v in r["qmmm_kjmol"]) + " |")
        lines.append("")
    return lines


def plot(rec: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = rec["sites"]
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.4), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sites, strict=True):
        for i, (e, res) in enumerate(rec["results"].items()):  # one colour per engine in every panel
            r = res["sites"].get(s)
            if r is None:
                continue
            ax.plot(res["distances_nm"], r["qmmm_kjmol"], "o-", ms=3, color=f"C{i}", label=f"{e} QM/MM")
            if r.get("supermolecule_kjmol"):
                ax.plot(res["distances_nm"], r["supermolecule_kjmol"], "--", color=f"C{i}", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(s, fontsize=8)
        ax.set_xlabel("H...O (nm)")
        ax.set_ylim(-45, 25)
    axes[0][0].set_ylabel("interaction (kJ/mol); dashed: supermolecule")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--system", type=Path, default=Path("runs/hbond_embedding/system"))
    ap.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES))
    ap.add_argument("--distances", nargs="+", type=float, default=DISTANCES)
    ap.add_argument("--sites", nargs="+", default=None, help="site names to scan (default: every site)")
    ap.add_argument("--no-supermolecule", action="store_true", help="QM/MM only (DFT: halves the cost)")
    ap.add_argument("--work", type=Path, default=Path("runs/hbond_embedding"), help="per-engine results kept here")
    ap.add_argument(
        "--xtb-charge-element",
        type=int,
        default=None,
        help="also scan xtb:gfn2 with every point charge passed as this element (its hardness damps them: "
        "10, Ne, the hardest of H-Ne, 0.85 Eh): how much of xtb/MM's binding the damping decides",
    )
    args = ap.parse_args()
    numbers, solute, lj = _system(args.system)
    sites = [s for s in solute_sites(SMILES) if args.sites is None or s.name.split()[0] in args.sites]
    args.work.mkdir(parents=True, exist_ok=True)
    for spec in args.engines:  # each engine's scan kept in --work: a later call adds engines, reruns none
        path = args.work / f"scan_{spec.replace(':', '_').replace('/', '_')}.json"
        if not path.exists():
            res = scan(spec, numbers, solute, lj, sites, args.distances, not args.no_supermolecule)
            path.write_text(json.dumps(res, indent=1))
    if args.xtb_charge_element:
        z = int(args.xtb_charge_element)
        path = args.work / f"scan_xtb_gfn2_charges_as_{z}.json"
        if not path.exists():
            name = f"xtb:gfn2, charges as Z={z}"
            zs = np.full(3, z)
            res = scan("xtb:gfn2", numbers, solute, lj, sites, args.distances, False, zs, name)
            path.write_text(json.dumps(res, indent=1))
    results = {}
    for path in sorted(args.work.glob("scan_*.json")):
        res = json.loads(path.read_text())
        results[res["spec"]] = res
    order = sorted(results, key=lambda k: (not k.startswith("dft"), k))
    rec: dict[str, Any] = {
        "machine": machine(),
        "system": str(args.system),
        "sites": [s.name for s in solute_sites(SMILES)],
        "results": {k: results[k] for k in order},
    }
    save_json("hbond_embedding", rec)
    lines = markdown(rec)
    save_markdown("hbond_embedding", lines)
    plot(rec, RESULTS / "hbond_embedding.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

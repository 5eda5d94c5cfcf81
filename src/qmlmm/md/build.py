"""``qmlmm build``: solutes (QM region) in a box of TIP3P water, as an OpenMM system.

The solutes come from SMILES (RDKit: ETKDG embedding, MMFF94 relaxation when parameters exist) or
from files (.sdf, .mol, .mol2, .pdb, .xyz). Several solutes are placed side by side along x with a
chosen gap. OpenMM's Modeller adds TIP3P water (amber14/tip3p.xml). The QM atoms get no bonded
terms and no charges in the MM system: only Lennard-Jones parameters from a per-type table
(:data:`LJ_TABLE`, GAFF values; hydrogen typed by its bonded partner), all QM-QM nonbonded pairs
excluded. Water is rigid; MM-MM electrostatics by PME.

The MM-only stages (the NPT equilibration here, the water relaxation before sampling and MD) have no
QM engine, so there the QM atoms carry fixed point charges (:func:`qm_fixed_charges`: MMFF94 where
it types the molecule with its formal charge, else Gasteiger; stored in ``meta.json`` as
``qm_mm_charges``) and the water forms its hydrogen-bonded shell before the QM/MM dynamics starts.

Output folder: ``system.xml`` (the OpenMM System), ``system.pdb`` (topology, positions and box),
``meta.json`` (QM atoms, total QM charge and multiplicity, solutes, LJ table, build settings).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm import __version__
from qmlmm.elements import check_charge_multiplicity
from qmlmm.environment import DEFAULT_CUTOFF, largest_internal_distance, required_box_edge, shortest_lattice_vector
from qmlmm.errors import InputError
from qmlmm.system import Frame

log = logging.getLogger(__name__)

__all__ = [
    "SoluteSpec",
    "BuildSettings",
    "WATER_EXTENT_NM",
    "box_edge",
    "build_system",
    "required_edge",
    "LJ_TABLE",
    "lj_type",
    "qm_fixed_charges",
    "with_qm_charges",
    "QM_CHARGE_MODELS",
]

#: charge models for the QM atoms in MM-only stages
QM_CHARGE_MODELS = ("mmff", "gasteiger", "none")

# GAFF Lennard-Jones parameters: (sigma nm, epsilon kJ/mol), sigma = 2 r0 / 2^(1/6)
_R0_TO_SIGMA = 2.0 / 2.0 ** (1.0 / 6.0) / 10.0
_KCAL = 4.184
#: per-type LJ of QM atoms: type -> (sigma nm, epsilon kJ/mol); source GAFF (Wang et al. 2004)
LJ_TABLE: dict[str, tuple[float, float]] = {
    "H_C": (1.4870 * _R0_TO_SIGMA, 0.0157 * _KCAL),  # GAFF hc: H on carbon
    "H_polar": (0.6000 * _R0_TO_SIGMA, 0.0157 * _KCAL),  # GAFF hn: H on N, O, S (small, nonzero: no collapse)
    "H": (1.4870 * _R0_TO_SIGMA, 0.0157 * _KCAL),
    "C": (1.9080 * _R0_TO_SIGMA, 0.1094 * _KCAL),  # GAFF c3
    "N": (1.8240 * _R0_TO_SIGMA, 0.1700 * _KCAL),  # GAFF n
    "O": (1.6612 * _R0_TO_SIGMA, 0.2100 * _KCAL),  # GAFF o
    "S": (2.0000 * _R0_TO_SIGMA, 0.2500 * _KCAL),  # GAFF s
    "P": (2.1000 * _R0_TO_SIGMA, 0.2000 * _KCAL),  # GAFF p5
    "F": (1.7500 * _R0_TO_SIGMA, 0.0610 * _KCAL),
    "Cl": (1.9480 * _R0_TO_SIGMA, 0.2650 * _KCAL),
    "Br": (2.2200 * _R0_TO_SIGMA, 0.3200 * _KCAL),
    "I": (2.3500 * _R0_TO_SIGMA, 0.4000 * _KCAL),
}


def lj_type(symbol: str, neighbours: list[str]) -> str:
    """LJ type of an atom: its element, hydrogen split into H_C (on carbon) and H_polar."""
    if symbol == "H":
        return "H_C" if (not neighbours or neighbours[0] == "C") else "H_polar"
    if symbol not in LJ_TABLE:
        raise InputError(f"no Lennard-Jones parameters for element {symbol} in the QM-MM table (qmlmm.md.build)")
    return symbol


@dataclass
class SoluteSpec:
    """One solute: SMILES or a structure file; ``charge`` overrides the formal charge.

    ``anchor`` = (p, c, s, d) places this solute (instead of side by side) so that its atom p lies
    d nm from atom c of the first solute, on the line from that solute's atom s through c (e.g. a
    nucleophile's N on the back side of a methyl carbon C bonded to a leaving S), turned to keep
    clear of the first solute. Atom indices follow RDKit's order with hydrogens added.
    """

    smiles: str | None = None
    path: str | None = None
    charge: int | None = None
    name: str = ""
    anchor: tuple[int, int, int, float] | None = None


#: Largest internal distance of a TIP3P water (nm): H-H, 2 x 0.09572 sin(104.52 deg / 2).
WATER_EXTENT_NM: float = 0.1514
#: Extra box edge (nm) beyond the built solute's needs, so that unique images survive the NPT box
#: fluctuation and a solute that stretches in MD (see :func:`required_edge`).
BOX_MARGIN_NM: float = 0.25


@dataclass
class BuildSettings:
    """How to build (lengths in nm).

    The cubic box edge is ``D_qm + 2 padding`` (D_qm the solutes' largest internal distance). By
    default the padding is derived from the embedding ``cutoff`` the system is built for, so that every
    box vector satisfies ``L >= 2 cutoff + D_qm + d_water + margin`` (:mod:`qmlmm.environment`: a
    unique periodic image of every embedded molecule); a ``padding`` or ``box`` smaller than that is
    refused with the size it needs.
    """

    padding: float | None = None  # nm of water between the solutes and the box faces (None: from the cutoff)
    box: float | None = None  # cubic box edge in nm (overrides padding)
    cutoff: float = DEFAULT_CUTOFF  # embedding cutoff (nm) the box must serve
    margin: float = BOX_MARGIN_NM  # extra edge (nm) for NPT fluctuation and solute flexibility
    gap: float = 0.35  # nm between the closest atoms of neighbouring solutes
    multiplicity: int = 1
    seed: int = 0
    water_model: str = "tip3p"
    pme_cutoff: float = 0.9
    equilibrate_ps: float = 10.0  # MM NPT (1 bar, 300 K) of the water around the restrained solute
    qm_charges: str = "mmff"  # fixed QM charges in MM-only stages: mmff (else gasteiger), gasteiger, none
    threads: int = 2  # OpenMM CPU threads of the NPT equilibration (1: the same build every time, bit for bit)


@dataclass
class BuiltSystem:
    folder: Path
    n_atoms: int
    n_waters: int
    qm_indices: list[int]
    qm_charge: int
    formula: str
    box_nm: list[float]
    density_g_cm3: float
    meta: dict[str, Any] = field(default_factory=dict)


def required_edge(d_qm: float, s: BuildSettings) -> float:
    """Smallest cubic box edge (nm) for solutes of largest internal distance ``d_qm`` (nm):
    ``2 cutoff + d_qm + d_water + margin``."""
    return required_box_edge(s.cutoff, d_qm, WATER_EXTENT_NM) + s.margin


def box_edge(d_qm: float, s: BuildSettings) -> float:
    """The cubic box edge (nm) to build for solutes of largest internal distance ``d_qm`` (nm): ``s.box``,
    else ``d_qm + 2 padding`` (water between the solutes and each face; Modeller's own padding measures
    between periodic copies and switches rules for small solutes, so the box is set here), the padding
    derived from the cutoff when not given. Raises InputError for a box or padding that is not positive,
    or too small for unique periodic images at ``s.cutoff``, naming the size it needs."""
    need = required_edge(d_qm, s)
    if s.box is not None:
        if not s.box > 0:
            raise InputError(f"box edge must be positive, got {s.box} nm")
        if s.box < need:
            raise InputError(
                f"box edge {s.box} nm is too small for a {s.cutoff} nm embedding of this solute (largest "
                f"internal distance {d_qm:.3f} nm): it needs at least {need:.3f} nm (2 x cutoff + solute + "
                f"water {WATER_EXTENT_NM} + margin {s.margin}); use --box {np.ceil(need * 100) / 100:.2f} or "
                "leave --box and --padding out"
            )
        return float(s.box)
    pad_need = 0.5 * (need - d_qm)
    if s.padding is None:  # also above twice the PME cutoff (with 2 % for the NPT box fluctuation)
        return max(need, 2.04 * s.pme_cutoff)
    if not s.padding > 0:
        raise InputError(f"padding must be positive, got {s.padding} nm (leave it out to derive it from the cutoff)")
    if s.padding < pad_need - 1e-9:
        raise InputError(
            f"padding {s.padding} nm is too small for a {s.cutoff} nm embedding: the box edge (solute "
            f"{d_qm:.3f} nm + 2 x padding) must be at least {need:.3f} nm for unique periodic images, i.e. "
            f"padding >= {pad_need:.3f} nm; use --padding {np.ceil(pad_need * 100) / 100:.2f}, leave it out, "
            "or build for a smaller --cutoff"
        )
    return d_qm + 2.0 * float(s.padding)


def _load_solute(spec: SoluteSpec, seed: int) -> Any:
    from rdkit import Chem
    from rdkit.Chem import AllChem, rdDetermineBonds

    if spec.smiles:
        mol = Chem.MolFromSmiles(spec.smiles)
        if mol is None:
            raise InputError(f"RDKit cannot parse SMILES {spec.smiles!r}")
        mol = Chem.AddHs(mol)
        if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:  # type: ignore[attr-defined]
            raise InputError(f"RDKit could not build 3D coordinates for {spec.smiles!r}")
        if AllChem.MMFFHasAllMoleculeParams(mol):  # type: ignore[attr-defined]
            AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)  # type: ignore[attr-defined]
        return mol
    if not spec.path:
        raise InputError("a solute needs --smiles or --solute FILE")
    p = Path(spec.path)
    if not p.exists():
        raise FileNotFoundError(f"solute file {p} does not exist")
    suf = p.suffix.lower()
    if suf in (".sdf", ".mol"):
        mol = Chem.MolFromMolFile(str(p), removeHs=False)
    elif suf == ".mol2":
        mol = Chem.MolFromMol2File(str(p), removeHs=False)
    elif suf == ".pdb":
        mol = Chem.MolFromPDBFile(str(p), removeHs=False)
    elif suf == ".xyz":
        mol = Chem.MolFromXYZFile(str(p))
        if mol is not None:
            rdDetermineBonds.DetermineBonds(mol, charge=spec.charge or 0)
    else:
        raise InputError(f"unsupported solute file type {suf}; use .sdf .mol .mol2 .pdb .xyz or --smiles")
    if mol is None:
        raise InputError(f"RDKit could not read {p}")
    if mol.GetNumConformers() == 0:
        raise InputError(f"{p} has no 3D coordinates")
    return mol


def qm_fixed_charges(mol: Any, charge: int, model: str = "mmff") -> tuple[np.ndarray, str]:
    """Fixed point charges (n_atoms,) e of a solute for the MM-only stages, and the model used.

    ``mmff``: MMFF94 partial charges when RDKit types every atom and they add up to the solute's
    ``charge`` (RDKit's MMFF, for example, treats a sulfonium S+ as neutral: then Gasteiger);
    ``gasteiger``: Gasteiger-Marsili charges; ``none``: zeros. The charges are shifted evenly to sum
    to ``charge`` exactly.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    if model not in QM_CHARGE_MODELS:
        raise InputError(f"unknown QM charge model {model!r}; use one of {', '.join(QM_CHARGE_MODELS)}")
    n = mol.GetNumAtoms()
    if model == "none" or n == 0:
        return np.zeros(n), "none"
    if model == "mmff":
        props = AllChem.MMFFGetMoleculeProperties(mol)  # type: ignore[attr-defined]
        if props is not None:
            q = np.array([props.GetMMFFPartialCharge(i) for i in range(n)], dtype=float)
            if np.all(np.isfinite(q)) and abs(q.sum() - charge) < 1e-3:
                return q + (charge - q.sum()) / n, "mmff"
        log.info("MMFF94 charges unavailable or not summing to %+d for this solute: Gasteiger charges", charge)
    m = Chem.Mol(mol)
    AllChem.ComputeGasteigerCharges(m)  # type: ignore[attr-defined]
    q = np.array([a.GetDoubleProp("_GasteigerCharge") for a in m.GetAtoms()], dtype=float)
    if not np.all(np.isfinite(q)):
        log.warning("no Gasteiger charges for this solute: the MM-only stages see it uncharged")
        return np.zeros(n), "none"
    return q + (charge - q.sum()) / n, "gasteiger"


def with_qm_charges(system: Any, charges: np.ndarray | list[float] | None) -> Any:
    """A copy of an OpenMM system whose first len(charges) particles (the QM atoms) carry ``charges`` (e).

    All QM-QM pairs are exceptions, so only QM-MM (and QM-image) Coulomb terms appear. None: a copy.
    """
    import openmm

    out = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    if charges is None:
        return out
    nb = next(f for f in out.getForces() if isinstance(f, openmm.NonbondedForce))
    for i, q in enumerate(np.asarray(charges, dtype=float)):
        _, sig, eps = nb.getParticleParameters(i)
        nb.setParticleParameters(i, float(q), sig, eps)
    return out


def _ffxml(residues: list[tuple[str, Any]]) -> str:
    """An OpenMM force field XML for the solute residues: LJ-only atom types, charge 0."""
    from xml.sax.saxutils import quoteattr

    types, res_xml, nb = [], [], []
    for rname, mol in residues:
        atoms = []
        for a in mol.GetAtoms():
            sym = a.GetSymbol()
            nbrs = [n.GetSymbol() for n in a.GetNeighbors()]
            t = lj_type(sym, nbrs)
            tname = f"{rname}-{a.GetIdx()}"
            mass = a.GetMass()
            types.append(
                f'  <Type name={quoteattr(tname)} class={quoteattr(tname)} element="{sym}" mass="{mass:.4f}"/>'
            )
            sig, eps = LJ_TABLE[t]
            nb.append(f'  <Atom type={quoteattr(tname)} charge="0" sigma="{sig:.6f}" epsilon="{eps:.6f}"/>')
            atoms.append(f'   <Atom name="{sym}{a.GetIdx() + 1}" type={quoteattr(tname)}/>')
        bonds = [
            f'   <Bond atomName1="{b.GetBeginAtom().GetSymbol()}{b.GetBeginAtomIdx() + 1}" '
            f'atomName2="{b.GetEndAtom().GetSymbol()}{b.GetEndAtomIdx() + 1}"/>'
            for b in mol.GetBonds()
        ]
        res_xml.append(f'  <Residue name="{rname}">\n' + "\n".join(atoms + bonds) + "\n  </Residue>")
    return (
        "<ForceField>\n <AtomTypes>\n"
        + "\n".join(types)
        + "\n </AtomTypes>\n <Residues>\n"
        + "\n".join(res_xml)
        + '\n </Residues>\n <NonbondedForce coulomb14scale="0.8333333333333334" '
        'lj14scale="0.5">\n' + "\n".join(nb) + "\n </NonbondedForce>\n</ForceField>\n"
    )


def _equilibrate_npt(
    system: Any, topology: Any, positions: Any, n_qm: int, s: BuildSettings, qm_charges: np.ndarray | None = None
) -> tuple[Any, Any]:
    """Relax the water density: MM minimisation and NPT MD (Monte Carlo barostat, 1 bar, 300 K, 2 fs)
    with the solute atoms held by stiff harmonic restraints and carrying the fixed ``qm_charges`` (e).
    Returns positions and box vectors."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    from qmlmm.md.system import cpu_properties, openmm_seed

    sys_eq = with_qm_charges(system, qm_charges)
    hold = openmm.CustomExternalForce("0.5*k_hold*periodicdistance(x, y, z, x0, y0, z0)^2")
    hold.addGlobalParameter("k_hold", 1.0e5)
    for name in ("x0", "y0", "z0"):
        hold.addPerParticleParameter(name)
    pos_nm = positions.value_in_unit(u.nanometer)
    for i in range(n_qm):
        hold.addParticle(i, list(pos_nm[i]))
    sys_eq.addForce(hold)
    barostat = openmm.MonteCarloBarostat(1.0 * u.bar, 300.0 * u.kelvin, 25)
    barostat.setRandomNumberSeed(openmm_seed(s.seed))  # its default, 0, draws a new seed every build
    sys_eq.addForce(barostat)
    integ = openmm.LangevinMiddleIntegrator(300.0 * u.kelvin, 1.0 / u.picosecond, 2.0 * u.femtoseconds)
    integ.setRandomNumberSeed(openmm_seed(s.seed))
    sim = app.Simulation(topology, sys_eq, integ, openmm.Platform.getPlatformByName("CPU"), cpu_properties(s.threads))
    sim.context.setPositions(positions)
    sim.minimizeEnergy(maxIterations=500)
    sim.context.setVelocitiesToTemperature(300.0 * u.kelvin, openmm_seed(s.seed))
    sim.step(round(s.equilibrate_ps * 500))
    st = sim.context.getState(getPositions=True, enforcePeriodicBox=False)
    box_vecs = st.getPeriodicBoxVectors()
    pos = np.asarray(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
    # wrap each water (by residue) into the box around the solutes' centre; solutes stay whole
    lengths = np.array([box_vecs[k][k].value_in_unit(u.nanometer) for k in range(3)])
    centre = pos[:n_qm].mean(0)
    for res in topology.residues():
        idx = [a.index for a in res.atoms()]
        if idx[0] < n_qm:
            continue
        shift = lengths * np.round((pos[idx[0]] - centre) / lengths)
        pos[idx] -= shift
    pos += lengths / 2 - centre
    return pos * u.nanometer, box_vecs


def _place_at_anchor(
    p: np.ndarray, ref: np.ndarray, anchor: tuple[int, int, int, float], rng: np.random.Generator, tries: int = 400
) -> np.ndarray:
    """Positions p (n, 3) moved so that p[a] sits d from ref[c] on the line ref[s] -> ref[c], rotated
    to the orientation (of ``tries`` random ones) farthest from the reference solute."""
    from scipy.spatial.transform import Rotation

    a, c, s_, d = int(anchor[0]), int(anchor[1]), int(anchor[2]), float(anchor[3])
    if not (0 <= a < len(p) and 0 <= c < len(ref) and 0 <= s_ < len(ref)):
        raise InputError(f"anchor {anchor} names an atom outside the solutes")
    axis = ref[c] - ref[s_]
    axis /= np.linalg.norm(axis)
    target = ref[c] + d * axis
    best, best_score = p, -np.inf
    for rot in Rotation.random(tries, random_state=rng):
        q = rot.apply(p - p[a]) + target
        dist = np.linalg.norm(q[:, None] - ref[None], axis=-1)
        dist[a, c] = np.inf
        score = dist.min()
        if score > best_score:
            best, best_score = q, score
    if best_score < 0.15:
        raise InputError(f"cannot place the solute at anchor {anchor} without clashes ({best_score:.2f} nm)")
    return best


@dataclass
class _FixedCharges:
    """The QM atoms' fixed point charges for the MM-only stages (see :func:`qm_fixed_charges`)."""

    values: np.ndarray  # (n_qm,) e, the solutes' charges one after the other
    models: list[str]  # the charge model each solute got: mmff, gasteiger or none


@dataclass
class _Embedding:
    """What the final box offers the embedding (nm)."""

    shortest_nm: float  # shortest lattice vector of the box
    qm_extent_nm: float  # largest internal distance of the solutes as built


@dataclass
class _BoxSummary:
    """The final box and its contents."""

    box_nm: list[float]  # edge lengths (the box vectors' diagonal)
    n_waters: int
    density_g_cm3: float


def _residue_name(k: int) -> str:
    """The residue name of solute ``k``: Q00, Q01, ..."""
    return f"Q{k:02d}"


def _place_solutes(solutes: list[SoluteSpec], mols: list[Any], s: BuildSettings) -> np.ndarray:
    """Positions (n_qm, 3) nm of all solute atoms, side by side along x or at their anchor, centred on 0."""
    coords: list[np.ndarray] = []
    x_edge = None
    for k, mol in enumerate(mols):
        p = mol.GetConformer().GetPositions() * 0.1
        p = p - p.mean(0)
        anchor = solutes[k].anchor
        if anchor is not None and k > 0:
            p = _place_at_anchor(p, coords[0], anchor, np.random.default_rng(s.seed + k))
        elif x_edge is not None:  # a gap of s.gap between the closest atoms of neighbours
            p[:, 0] += x_edge + s.gap - p[:, 0].min()
        x_edge = max(x_edge if x_edge is not None else -np.inf, p[:, 0].max())
        coords.append(p)
    allpos = np.concatenate(coords)
    allpos -= allpos.mean(0)
    return allpos


def _solute_topology(mols: list[Any]) -> Any:
    """An OpenMM Topology of the solutes: one residue (Q00, Q01, ...) per solute with its atoms and bonds."""
    import openmm.app as app

    top = app.Topology()
    chain = top.addChain()
    for k, mol in enumerate(mols):
        res = top.addResidue(_residue_name(k), chain)
        atoms = []
        for a in mol.GetAtoms():
            atoms.append(top.addAtom(f"{a.GetSymbol()}{a.GetIdx() + 1}", app.Element.getBySymbol(a.GetSymbol()), res))
        for b in mol.GetBonds():
            top.addBond(atoms[b.GetBeginAtomIdx()], atoms[b.GetEndAtomIdx()])
    return top


def _solute_charges(solutes: list[SoluteSpec], mols: list[Any]) -> list[int]:
    """Each solute's charge (e): its ``charge`` when given, else RDKit's formal charge."""
    from rdkit import Chem

    charges = []
    for sp, mol in zip(solutes, mols, strict=True):
        q = sp.charge if sp.charge is not None else Chem.GetFormalCharge(mol)
        charges.append(int(q))
    return charges


def _mm_stage_charges(mols: list[Any], charges: list[int], model: str) -> _FixedCharges:
    """The QM atoms' fixed charges (e) for the MM-only stages and each solute's charge model."""
    fixed = [qm_fixed_charges(mol, charges[k], model) for k, mol in enumerate(mols)]
    return _FixedCharges(np.concatenate([q for q, _ in fixed]), [m for _, m in fixed])


def _total_qm_charge(mols: list[Any], charges: list[int], total_charge: int | None, mult: int) -> int:
    """The QM region's charge (e): ``total_charge``, else the solutes' sum; refused if impossible with ``mult``."""
    qm_charge = int(total_charge) if total_charge is not None else int(sum(charges))
    check_charge_multiplicity([a.GetAtomicNum() for mol in mols for a in mol.GetAtoms()], qm_charge, mult)
    return qm_charge


def _solute_force_field(mols: list[Any], folder: Path) -> Any:
    """The OpenMM ForceField: amber14 TIP3P and the solutes' LJ-only types, written to ``folder/solutes.ffxml``."""
    import openmm.app as app

    ff_path = folder / "solutes.ffxml"
    ff_path.write_text(_ffxml([(_residue_name(k), mol) for k, mol in enumerate(mols)]))
    return app.ForceField("amber14/tip3p.xml", str(ff_path))


def _choose_box_edge(qm_pos: np.ndarray, s: BuildSettings) -> float:
    """The cubic box edge (nm) for solutes at ``qm_pos`` (nm): :func:`box_edge`, at least twice the PME cutoff."""
    edge = box_edge(largest_internal_distance(qm_pos), s)
    if edge < 2.0 * s.pme_cutoff:
        raise InputError(f"box edge {edge:.2f} nm is below twice the PME cutoff ({2 * s.pme_cutoff} nm)")
    n_est = int(100.3 * edge**3)  # ~33.4 waters/nm^3, 3 atoms each
    if n_est > 300_000:
        log.warning("box edge %.1f nm: about %d atoms; MM-only steps alone will be slow", edge, n_est)
    return edge


def _solvate(topology: Any, qm_pos: np.ndarray, ff: Any, edge: float, s: BuildSettings) -> Any:
    """An OpenMM Modeller: the solutes at ``qm_pos`` (nm) in a cubic box of ``edge`` nm filled with water."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    modeller = app.Modeller(topology, qm_pos * u.nanometer)
    box = openmm.Vec3(edge, edge, edge) * u.nanometer
    modeller.addSolvent(ff, model=s.water_model, neutralize=False, boxSize=box)
    if not any(r.name == "HOH" for r in modeller.topology.residues()):
        raise InputError(f"no water fits in the {edge:.2f} nm box around the solutes; enlarge the box")
    return modeller


def _mm_system(ff: Any, topology: Any, n_qm: int, s: BuildSettings) -> Any:
    """The OpenMM System: PME, rigid water, the first ``n_qm`` (QM) atoms LJ-only with all QM-QM pairs excluded."""
    import openmm
    import openmm.app as app
    import openmm.unit as u

    system = ff.createSystem(
        topology,
        nonbondedMethod=app.PME,
        nonbondedCutoff=s.pme_cutoff * u.nanometer,
        constraints=None,
        rigidWater=True,
    )
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    for i in range(n_qm):
        for j in range(i + 1, n_qm):
            nb.addException(i, j, 0.0, 1.0, 0.0, replace=True)
    return system


def _equilibrated_positions(system: Any, modeller: Any, n_qm: int, s: BuildSettings, qm_charges: np.ndarray) -> Any:
    """Positions (nm) after the NPT equilibration, which also sets ``modeller``'s box; as solvated for 0 ps."""
    positions = modeller.positions
    if s.equilibrate_ps > 0:
        positions, box_vecs = _equilibrate_npt(system, modeller.topology, positions, n_qm, s, qm_charges)
        modeller.topology.setPeriodicBoxVectors(box_vecs)
    return positions


def _check_embedding(topology: Any, positions: Any, n_qm: int, s: BuildSettings) -> _Embedding:
    """The final box's shortest lattice vector and the solutes' extent (nm); raises if they leave no unique images."""
    import openmm.unit as u

    box_rows = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(u.nanometer))
    L = shortest_lattice_vector(box_rows)
    d_qm = largest_internal_distance(np.asarray(positions.value_in_unit(u.nanometer))[:n_qm])
    need = required_box_edge(s.cutoff, d_qm, WATER_EXTENT_NM)
    if need > L:  # the NPT box shrank by more than the margin
        raise InputError(
            f"after the NPT equilibration the box ({L:.3f} nm) is below the {need:.3f} nm that a {s.cutoff} nm "
            "embedding needs for this solute; rebuild with a larger margin (BuildSettings.margin) or padding"
        )
    return _Embedding(L, d_qm)


def _write_system(folder: Path, system: Any, topology: Any, positions: Any) -> None:
    """Writes ``system.xml`` (the OpenMM System) and ``system.pdb`` (topology, positions, box) to ``folder``."""
    import openmm
    import openmm.app as app

    (folder / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    with open(folder / "system.pdb", "w") as fh:
        app.PDBFile.writeFile(topology, positions, fh, keepIds=True)


def _box_summary(system: Any, topology: Any) -> _BoxSummary:
    """The final box edges (nm), its number of waters and the density (g/cm^3) of the system."""
    import openmm.unit as u

    box = topology.getPeriodicBoxVectors().value_in_unit(u.nanometer)
    box_nm = [float(box[0][0]), float(box[1][1]), float(box[2][2])]
    n_waters = sum(1 for r in topology.residues() if r.name == "HOH")
    mass = sum(system.getParticleMass(i).value_in_unit(u.dalton) for i in range(system.getNumParticles()))
    vol_cm3 = box_nm[0] * box_nm[1] * box_nm[2] * 1e-21
    return _BoxSummary(box_nm, n_waters, mass / 6.02214076e23 / vol_cm3)


def _qm_formula(mols: list[Any]) -> str:
    """Hill formula of the QM region (all solute atoms), e.g. 'CH4O'."""
    zq = [a.GetAtomicNum() for mol in mols for a in mol.GetAtoms()]
    n_qm = len(zq)
    return Frame(
        numbers=zq,  # type: ignore[arg-type]
        positions=np.zeros((n_qm, 3)),
        is_qm=[True] * n_qm,  # type: ignore[arg-type]
        charges=np.zeros(n_qm),
        mol_ids=np.zeros(n_qm, dtype=int),
    ).qm_formula


def _meta(
    solutes: list[SoluteSpec],
    mols: list[Any],
    charges: list[int],
    fixed: _FixedCharges,
    qm_charge: int,
    formula: str,
    embedding: _Embedding,
    box: _BoxSummary,
    s: BuildSettings,
) -> dict[str, Any]:
    """The contents of ``meta.json``: QM atoms, charge and multiplicity, solutes, LJ table, box, build settings."""
    from rdkit import Chem

    offsets = [int(x) for x in np.cumsum([0] + [m.GetNumAtoms() for m in mols])]
    return {
        "qmlmm_version": __version__,
        "qm_indices": list(range(offsets[-1])),
        "qm_charge": qm_charge,
        "qm_mult": s.multiplicity,
        "qm_formula": formula,
        "solutes": [
            {
                "name": sp.name or (sp.smiles or Path(sp.path or "").stem),
                "smiles": sp.smiles,
                "file": sp.path,
                "charge": charges[k],
                "n_atoms": mols[k].GetNumAtoms(),
                "smiles_canonical": Chem.MolToSmiles(Chem.RemoveHs(mols[k])),
            }
            for k, sp in enumerate(solutes)
        ],
        "solute_offsets": offsets,
        "lj_types": {
            f"{a.GetSymbol()}{a.GetIdx() + 1}@{_residue_name(k)}": lj_type(
                a.GetSymbol(), [n.GetSymbol() for n in a.GetNeighbors()]
            )
            for k, m in enumerate(mols)
            for a in m.GetAtoms()
        },
        "lj_table": {k: {"sigma_nm": v[0], "epsilon_kjmol": v[1]} for k, v in LJ_TABLE.items()},
        # fixed QM charges (e) used only in the MM-only stages (equilibration, water relaxation)
        "qm_mm_charges": [round(float(x), 6) for x in fixed.values],
        "qm_mm_charge_models": fixed.models,
        # the embedding this box serves: unique images hold while the QM region's largest internal distance
        # stays below max_qm_extent_nm (labelling and MD refuse frames beyond it)
        "embedding_cutoff_nm": s.cutoff,
        "max_qm_extent_nm": embedding.shortest_nm - 2.0 * s.cutoff - WATER_EXTENT_NM,
        "qm_extent_built_nm": embedding.qm_extent_nm,
        "water_model": s.water_model,
        "n_waters": box.n_waters,
        "box_nm": box.box_nm,
        "density_g_cm3": box.density_g_cm3,
        "build": asdict(s),
    }


def build_system(
    solutes: list[SoluteSpec], out: str | Path, settings: BuildSettings | None = None, total_charge: int | None = None
) -> BuiltSystem:
    """Build the solvated QM/MM system and write it to the folder ``out``."""
    s = settings or BuildSettings()
    if not solutes:
        raise InputError("give at least one solute (--smiles or --solute)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the QM region: load the solutes, place them, charge them
    mols = [_load_solute(sp, s.seed + k) for k, sp in enumerate(solutes)]
    qm_pos = _place_solutes(solutes, mols, s)
    n_qm = len(qm_pos)
    topology = _solute_topology(mols)
    charges = _solute_charges(solutes, mols)
    fixed = _mm_stage_charges(mols, charges, s.qm_charges)
    qm_charge = _total_qm_charge(mols, charges, total_charge, s.multiplicity)
    # the MM system: force field, box, water, NPT equilibration with the solutes held
    ff = _solute_force_field(mols, out)
    edge = _choose_box_edge(qm_pos, s)
    modeller = _solvate(topology, qm_pos, ff, edge, s)
    system = _mm_system(ff, modeller.topology, n_qm, s)
    positions = _equilibrated_positions(system, modeller, n_qm, s, fixed.values)
    embedding = _check_embedding(modeller.topology, positions, n_qm, s)
    # the output folder
    _write_system(out, system, modeller.topology, positions)
    box = _box_summary(system, modeller.topology)
    formula = _qm_formula(mols)
    meta = _meta(solutes, mols, charges, fixed, qm_charge, formula, embedding, box, s)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "built %s: %s (charge %d) + %d waters, box %.2f nm, %.3f g/cm3",
        out,
        formula,
        qm_charge,
        box.n_waters,
        box.box_nm[0],
        box.density_g_cm3,
    )
    return BuiltSystem(
        out,
        system.getNumParticles(),
        box.n_waters,
        list(range(n_qm)),
        qm_charge,
        formula,
        box.box_nm,
        box.density_g_cm3,
        meta,
    )

"""The validation observables (qmlmm.analysis.validation) and settings: backbone dihedrals against
geometries set by RDKit, Ramachandran regions, Jensen-Shannon divergence against scipy, hydrogen bonds
on constructed geometries (across a periodic boundary too), and the permutation test over runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from qmlmm.analysis.md_analysis import dihedrals
from qmlmm.analysis.validation import (
    REGIONS,
    RunObservables,
    compare_drivers,
    driver_statistics,
    hbond_counts,
    jensen_shannon_bits,
    peptide_sites,
    permutation_p_value,
    ramachandran_histogram,
    region_of,
    region_populations,
    smallest_p,
    water_donors,
)
from qmlmm.errors import InputError
from qmlmm.workflows.pipeline.validation import ValidationSettings, start_positions

ALA2 = "CC(=O)N[C@@H](C)C(=O)NC"


def test_peptide_sites_of_alanine_dipeptide() -> None:
    s = peptide_sites(ALA2)
    assert s.phi == (1, 3, 4, 6) and s.psi == (3, 4, 6, 8)  # C' N CA C' and N CA C' N in RDKit order
    assert s.carbonyl_o == (2, 7)
    assert [d for d, _ in s.donors] == [3, 8] and len(s.amide_h) == 2
    s5 = peptide_sites(ALA2, offset=5)
    assert s5.phi == (6, 8, 9, 11) and s5.donors[0] == (8, s.donors[0][1] + 5)
    with pytest.raises(InputError, match="exactly one residue"):
        peptide_sites("CCO")
    with pytest.raises(InputError, match="found 2"):
        peptide_sites("CC(=O)NC(C)C(=O)NC(C)C(=O)NC")


@pytest.mark.parametrize(("phi", "psi"), [(-80.0, 70.0), (-150.0, 155.0), (-65.0, -40.0), (60.0, 40.0), (-75.0, 145.0)])
def test_backbone_dihedrals_match_geometry_set_by_rdkit(phi: float, psi: float) -> None:
    """phi/psi read from positions by the sites' quadruples equal the angles RDKit set on a conformer
    (same IUPAC sign convention), also with the molecule split across a periodic boundary."""
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom, rdMolTransforms

    mol = Chem.AddHs(Chem.MolFromSmiles(ALA2))
    rdDistGeom.EmbedMolecule(mol, randomSeed=7)
    s = peptide_sites(ALA2)
    conf = mol.GetConformer()
    rdMolTransforms.SetDihedralDeg(conf, *s.phi, phi)
    rdMolTransforms.SetDihedralDeg(conf, *s.psi, psi)
    pos = conf.GetPositions() / 10.0  # nm
    box = np.array([2.0, 2.0, 2.0])
    wrapped = pos - pos[4] + np.array([1.99, 1.0, 1.0])  # CA next to the x face: the backbone crosses it
    wrapped = wrapped % box
    for p, b in ((pos, None), (wrapped, box[None])):
        ang = dihedrals(p[None], [s.phi, s.psi], b)[0]
        assert ang[0] == pytest.approx(phi, abs=1e-3) and ang[1] == pytest.approx(psi, abs=1e-3)


def test_regions_partition_the_plane() -> None:
    pts = {(-80, 70): "C7eq", (-75, 145): "beta_PII", (-150, 155): "beta_PII", (-150, -170): "beta_PII"}
    pts |= {(-65, -40): "alpha_R", (60, 40): "alpha_L_other", (70, -160): "alpha_L_other", (280, 70): "C7eq"}
    for (f, y), name in pts.items():
        assert REGIONS[int(region_of(np.array(f), np.array(y)))] == name, (f, y)
    g = np.linspace(-180, 179, 97)
    phi, psi = np.meshgrid(g, g)
    pops = region_populations(phi.ravel(), psi.ravel())
    assert sum(pops.values()) == pytest.approx(1.0)
    assert pops["alpha_L_other"] == pytest.approx(0.5, abs=0.01)  # phi >= 0 is half the plane
    # the phi < 0 half: alpha_R 170 deg of psi, C7eq 70, beta/PII 120
    assert pops["alpha_R"] == pytest.approx(0.5 * 170 / 360, abs=0.01)
    assert pops["C7eq"] == pytest.approx(0.5 * 70 / 360, abs=0.01)
    h = ramachandran_histogram(phi.ravel(), psi.ravel(), 18)
    assert h.shape == (18, 18) and h.sum() == phi.size


def test_jensen_shannon_against_scipy() -> None:
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(0)
    p, q = rng.random((6, 6)), rng.random((6, 6))
    q[0] = 0.0  # empty bins in one histogram only
    assert jensen_shannon_bits(p, q) == pytest.approx(jensenshannon(p.ravel(), q.ravel(), base=2) ** 2, rel=1e-10)
    assert jensen_shannon_bits(p, q) == pytest.approx(jensen_shannon_bits(q, p))
    assert jensen_shannon_bits(p, 3 * p) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon_bits(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    with pytest.raises(InputError):
        jensen_shannon_bits(np.array([0, 0]), np.array([1, 0]))


def _water(o: np.ndarray, toward: np.ndarray, angle_deg: float) -> np.ndarray:
    """A water (O, H1, H2) at ``o`` whose H1 points from O at ``angle_deg`` off the O->``toward`` line."""
    u = (toward - o) / np.linalg.norm(toward - o)
    perp = np.cross(u, [0.0, 0.0, 1.0])
    perp /= np.linalg.norm(perp)
    a = np.radians(angle_deg)
    h1 = o + 0.09572 * (np.cos(a) * u + np.sin(a) * perp)
    b = a + np.radians(104.52)
    h2 = o + 0.09572 * (np.cos(b) * u + np.sin(b) * perp)
    return np.stack([o, h1, h2])


def test_hydrogen_bond_criterion_on_constructed_geometries() -> None:
    acc = np.array([1.0, 1.0, 1.0])
    box = np.array([3.0, 3.0, 3.0])

    def count(o: np.ndarray, angle: float) -> int:
        pos = np.vstack([acc[None], _water(o, acc, angle)])
        return int(hbond_counts(pos, box, [(1, 2), (1, 3)], [0])[0])

    assert count(acc + np.array([0.28, 0, 0]), 0.0) == 1  # linear, 0.28 nm
    assert count(acc + np.array([0.28, 0, 0]), 25.0) == 1  # bent inside 30 deg
    assert count(acc + np.array([0.28, 0, 0]), 40.0) == 0  # bent outside
    assert count(acc + np.array([0.36, 0, 0]), 0.0) == 0  # too far
    assert count(acc + np.array([0.0, 0.2, 0.2]), 10.0) == 1  # another direction
    # across the periodic boundary: acceptor at x = 0.1, donor O at x = 2.92 (0.18 nm away through the face)
    a2 = np.array([0.1, 1.0, 1.0])
    o2 = np.array([2.92, 1.0, 1.0])
    w = _water(o2, np.array([3.1, 1.0, 1.0]), 0.0)  # H points toward +x, i.e. at the acceptor's image
    pos = np.vstack([a2[None], w])
    assert hbond_counts(pos, box, [(1, 2), (1, 3)], [0])[0] == 1
    assert hbond_counts(pos, None, [(1, 2), (1, 3)], [0])[0] == 0  # without the box it is 2.8 nm away
    assert hbond_counts(np.stack([pos, pos]), np.stack([box, box]), [(1, 2)], [0]).tolist() == [1, 1]


def test_water_donors_pairs_every_water_oh() -> None:
    numbers = np.array([6, 1, 8, 1, 1, 8, 1, 1, 11])  # a QM C-H, two waters, an ion
    mol_ids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3])
    is_qm = np.array([True, True] + [False] * 7)
    assert water_donors(numbers, mol_ids, is_qm).tolist() == [[2, 3], [2, 4], [5, 6], [5, 7]]


def test_start_positions_set_the_backbone_and_keep_the_rest() -> None:
    """The start of a validation run: phi and psi as asked, bond lengths kept, other atoms untouched."""
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom

    mol = Chem.AddHs(Chem.MolFromSmiles(ALA2))
    rdDistGeom.EmbedMolecule(mol, randomSeed=3)
    solute = mol.GetConformer().GetPositions() / 10.0
    rng = np.random.default_rng(0)
    pos = np.vstack([rng.random((5, 3)), solute + 1.0, rng.random((4, 3))])  # solute at offset 5
    s = peptide_sites(ALA2, offset=5)
    for phi, psi in [(-70.0, -40.0), (-150.0, 155.0), (60.0, 40.0)]:
        new = start_positions(pos, ALA2, 5, phi, psi)
        ang = dihedrals(new[None], [s.phi, s.psi])[0]
        assert ang == pytest.approx([phi, psi], abs=1e-4)
        np.testing.assert_array_equal(new[:5], pos[:5])
        np.testing.assert_array_equal(new[-4:], pos[-4:])
        for b in mol.GetBonds():
            i, j = b.GetBeginAtomIdx() + 5, b.GetEndAtomIdx() + 5
            assert np.linalg.norm(new[i] - new[j]) == pytest.approx(np.linalg.norm(pos[i] - pos[j]), abs=1e-6)


def _fake_run(
    rng: np.random.Generator, psi0: float, hb: float, g_shift: float = 0.0, phi0: float = -70.0
) -> RunObservables:
    phi = rng.normal(phi0, 15.0, 200)
    psi = rng.normal(psi0, 25.0, 200)
    r = np.linspace(0.005, 0.795, 80)
    g = 1 + np.exp(-(((r - 0.19 - g_shift) / 0.02) ** 2)) + rng.normal(0, 0.02, 80)
    reg = region_of(phi, psi)
    return RunObservables(
        len(phi), phi, psi, region_populations(phi, psi), int(np.sum(reg[1:] != reg[:-1])),
        {"O=C-HW": (r, g)}, {"solute_donor": hb / 2, "solute_acceptor": hb / 2, "total": hb + rng.normal(0, 0.05)},
        ns_per_day=1.0,
    )  # fmt: skip


def test_permutation_test_separates_different_drivers_and_accepts_equal_ones() -> None:
    rng = np.random.default_rng(1)
    ref = [_fake_run(rng, 140.0, 3.0) for _ in range(4)]
    same = [_fake_run(rng, 140.0, 3.0) for _ in range(4)]
    other = [_fake_run(rng, 100.0, 4.0, g_shift=0.03) for _ in range(4)]
    c_same, c_other = compare_drivers(ref, same), compare_drivers(ref, other)
    assert all(c_same["agree"].values()), c_same["agree"]
    assert not any(c_other["agree"].values()), c_other["agree"]
    # 4 + 4 runs: 70 splits, the observed one and its mirror are the most extreme: p = 2/70
    assert c_other["ramachandran_p"] == pytest.approx(2 / 70)
    assert c_other["ramachandran_js_bits"] > 10 * c_same["ramachandran_js_bits"]
    assert c_other["hbonds_total"]["difference"] == pytest.approx(1.0, abs=0.2)
    assert permutation_p_value(ref, ref, lambda x, y: 0.0) == 1.0
    st = driver_statistics(ref)
    assert st["n_runs"] == 4 and st["rdf_peak"]["O=C-HW"]["r_nm"]["mean"] == pytest.approx(0.19, abs=0.011)
    assert sum(st["populations"][k]["mean"] for k in REGIONS) == pytest.approx(1.0)
    assert 0 <= st["js_halves_bits"] < c_other["ramachandran_js_bits"]


def test_strata_limit_the_relabellings() -> None:
    """Runs exchanged only within a start: 4 starts x (1 + 1) runs give 16 relabellings (p >= 2/16, never
    below 0.05: undecidable), 4 starts x (2 + 2) give 6^4; a difference carried by the starts alone is not
    a difference between the drivers."""
    rng = np.random.default_rng(2)
    assert smallest_p([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(2 / 16)
    assert smallest_p([0, 1, 2, 3] * 2, [0, 1, 2, 3] * 2) == pytest.approx(2 / 6**4)
    # the runs' psi depends on their start only: both drivers alike, starts far apart
    starts = [0, 1, 2, 3] * 2
    ref = [_fake_run(rng, [140.0, -40.0, 80.0, 170.0][k], 3.0) for k in starts]
    same = [_fake_run(rng, [140.0, -40.0, 80.0, 170.0][k], 3.0) for k in starts]
    c = compare_drivers(ref, same, strata_ref=starts, strata_other=starts)
    assert all(c["agree"].values()) and c["smallest_p"] < 0.05
    small = compare_drivers(ref[:4], same[:4], strata_ref=starts[:4], strata_other=starts[:4])
    assert all(v is None for v in small["agree"].values())  # 4 single pairs cannot decide
    # a driver whose runs all sit at phi -140 instead of -70, from the same starts: found
    other = [_fake_run(rng, [140.0, -40.0, 80.0, 170.0][k], 4.0, phi0=-140.0) for k in starts]
    c2 = compare_drivers(ref, other, strata_ref=starts, strata_other=starts)
    assert c2["ramachandran_p"] < 0.05 and not c2["agree"]["ramachandran"]
    assert c2["ramachandran_js_cross_halves_bits"] > 3 * c2["ramachandran_js_reference_halves_bits"]

    # above the cap, random relabellings: the same verdict
    def hb(x: Sequence[RunObservables], y: Sequence[RunObservables]) -> float:
        return float(abs(np.mean([r.hbonds["total"] for r in x]) - np.mean([r.hbonds["total"] for r in y])))

    p_mc = permutation_p_value(other, ref, hb, starts, starts, max_relabellings=200)
    assert p_mc < 0.05


def test_a_driver_that_lost_a_starts_runs_is_compared_on_the_starts_it_has() -> None:
    """Runs too short to forget their start carry it. A driver as good as the reference whose runs from
    one start all stopped (left out) must not differ from it just because the reference's mean still
    holds that start: the comparison keeps the starts both have, each weighted equally; with unequal
    numbers of runs per start, every start still counts once."""
    from qmlmm.analysis.validation import stratum_weights

    rng = np.random.default_rng(5)
    psi0 = [140.0, 150.0, 130.0, -40.0]  # start 3 in alpha_R, the others in beta/PII
    hb0 = [3.0, 3.0, 3.0, 6.0]
    starts = [0, 1, 2, 3] * 2
    ref = [replace(_fake_run(rng, psi0[k], hb0[k]), stratum=k) for k in starts]
    kept = [0, 1, 2, 0, 1, 2, 0]  # every start-3 run stopped; start 0 has three runs, the others two
    same = [replace(_fake_run(rng, psi0[k], hb0[k]), stratum=k) for k in kept]
    c = compare_drivers(ref, same)
    assert c["common_starts"] == [0, 1, 2] and c["runs_compared"] == {"reference": 6, "other": 7}
    assert c["populations"]["alpha_R"]["difference"] == pytest.approx(0.0, abs=0.02)
    assert c["hbonds_total"]["difference"] == pytest.approx(0.0, abs=0.1)
    assert c["agree"]["hbonds"] and c["agree"]["populations"]
    w = [{0: 1 / 9, 1: 1 / 6, 2: 1 / 6}[k] for k in kept]  # each start a third, shared by its runs
    np.testing.assert_allclose(stratum_weights(same), w, rtol=1e-12, atol=0)
    # over every run, the reference's mean holds start 3's alpha_R: what comparing all runs would have seen
    st = driver_statistics(ref)
    assert st["populations"]["alpha_R"]["mean"] > 0.2 and st["starts"] == [0, 1, 2, 3]
    with pytest.raises(InputError, match="no start in common"):
        compare_drivers(ref[3:4], same[:1] + same[3:4])


def test_standard_errors_and_halves_respect_the_starts() -> None:
    """The SE of a start-weighted mean comes from the spread within starts (the differences between
    starts are fixed by the design); halves keep the same starts when a run is missing; a guarded run made
    with another threshold is refused."""
    from qmlmm.analysis.validation import _wmean_se, run_halves
    from qmlmm.workflows.pipeline.validation import _check_same_guard

    rng = np.random.default_rng(6)
    starts = [0, 1, 2, 3] * 2
    runs = [replace(_fake_run(rng, 140.0, 3.0), stratum=k) for k in starts]
    x = np.array([10.0 * k for k in starts]) + np.array([1, 1, 1, 1, -1, -1, -1, -1])  # starts 10 apart
    se = _wmean_se(list(x), runs)
    # within-start variance (1 - 0)^2 + (-1 - 0)^2 per start, 4 dof: s_w^2 = 8 / 4; sum w^2 = 8 / 64
    assert se["mean"] == pytest.approx(15.0) and se["se"] == pytest.approx(np.sqrt(2.0 / 8.0))
    one = [replace(r, stratum=0) for r in runs]
    assert _wmean_se(list(x), one)["se"] == pytest.approx(np.std(x, ddof=1) / np.sqrt(8))  # the usual SE
    assert np.isnan(_wmean_se([1.0, 2.0], runs[:2])["se"])  # one run per start: no within-start spread
    a, b = run_halves(runs[:6] + runs[7:])  # start 2 lost a run: left out of both halves
    assert sorted(r.stratum for r in a) == [0, 1, 3] and sorted(r.stratum for r in b) == [0, 1, 3]
    rec = {"settings": {"max_uncertainty": 15.0, "fallback": "reference"}}
    _check_same_guard(Path("run0"), rec, {"max_uncertainty": 15.0, "fallback": "reference"})
    with pytest.raises(InputError, match="uncertainty guard"):
        _check_same_guard(Path("run0"), rec, {"max_uncertainty": 10.0, "fallback": "reference"})
    with pytest.raises(InputError, match="uncertainty guard"):
        _check_same_guard(Path("run0"), {"settings": {"max_uncertainty": None, "fallback": "stop"}}, rec["settings"])


def test_rdf_first_peak_is_the_hydrogen_bonded_shell() -> None:
    rng = np.random.default_rng(3)
    runs = [_fake_run(rng, 140.0, 3.0) for _ in range(3)]
    for r in runs:  # a second shell at 0.33 nm higher than the first at 0.19
        rr, g = r.rdf["O=C-HW"]
        r.rdf["O=C-HW"] = (rr, g + 2.0 * np.exp(-(((rr - 0.33) / 0.03) ** 2)))
    assert driver_statistics(runs)["rdf_peak"]["O=C-HW"]["r_nm"]["mean"] == pytest.approx(0.19, abs=0.011)


def test_validation_settings_refuse_bad_values() -> None:
    ValidationSettings.from_dict({"runs": 4, "steps": 2500})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"runs": 1}, "at least 2"),
        ({"drivers": ["delta"]}, "include 'reference'"),
        ({"drivers": ["reference", "dft"]}, "among"),
        ({"steps": 100, "skip_ps": 0.2}, "shorter than a run"),
        ({"steps": 1000, "every": 300}, "fewer than 2 frames"),
        ({"runz": 4}, "unknown validation setting"),
        ({"runs": "4"}, "runs"),
        ({"dt_fs": 0.0}, "dt_fs"),
        ({"temperature": -5.0}, "temperature"),
        ({"solute": -1}, "solute"),
        ({"starts": [[-70.0]]}, "starts"),
        ({"max_uncertainty": 0.0}, "max_uncertainty"),
        ({"fallback": "stop"}, "fallback"),
        ({"fallback": "baseline", "drivers": ["reference", "direct_guarded"]}, "direct_guarded needs"),
    ]
    for bad, msg in cases:
        with pytest.raises(InputError, match=msg):
            ValidationSettings.from_dict(bad)


def test_validation_md_settings_give_each_run_its_seed_and_a_guarded_run_its_twins(tmp_path: Path) -> None:
    import yaml

    from qmlmm.workflows.pipeline import load_pipeline_config
    from qmlmm.workflows.pipeline.validation import validation_md_settings

    val = {"runs": 3, "steps": 300, "every": 5, "skip_ps": 0.1, "max_uncertainty": 12.0}
    cfg_d = {"name": "x", "solutes": [ALA2], "reference": "xtb:gfn2", "sizes": {"s": {"validation": val}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_pipeline_config(tmp_path / "c.yaml", "s")
    vs = ValidationSettings.from_dict(val)
    runs = {(d, k): validation_md_settings(cfg, vs, d, k) for d in ("reference", "direct", "direct_guarded")
            for k in range(3)}  # fmt: skip
    plain = [s.seed for (d, _), s in runs.items() if d != "direct_guarded"]
    assert len(set(plain)) == len(plain)  # independent noise in every unguarded run
    for k in range(3):
        twin, guarded = runs["direct", k], runs["direct_guarded", k]
        assert guarded.seed == twin.seed and guarded.steps == twin.steps == 300
        assert (twin.max_uncertainty, guarded.max_uncertainty) == (None, 12.0)
        assert guarded.fallback == "reference" and guarded.reference == "xtb:gfn2"
        assert twin.report_every == twin.dcd_every == 5 and twin.dt_fs == vs.dt_fs and twin.hmr_amu == vs.hmr_amu


def test_validation_solute_checked_when_the_config_loads(tmp_path: Path) -> None:
    import yaml

    from qmlmm.workflows.pipeline import load_pipeline_config

    for solutes, validation, msg in [
        (["CCO"], {}, "exactly one residue"),
        ([ALA2], {"solute": 1}, "1 solute"),
    ]:
        cfg = {"name": "x", "solutes": solutes, "sizes": {"s": {"validation": validation}}}
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(cfg))
        with pytest.raises(InputError, match=msg):
            load_pipeline_config(p, "s")


def test_waters_in_the_way_of_a_new_conformation_are_moved_whole() -> None:
    """A water whose H sits inside a QM atom (nothing in MM pushes it out: TIP3P H has no LJ, QM atoms
    no MM charges) is moved, rigid, to free space; waters clear of the solute stay where they were."""
    from qmlmm.workflows.pipeline.validation import relocate_clashing_waters

    box = np.diag([2.0, 2.0, 2.0])
    qm = np.array([[1.0, 1.0, 1.0], [1.15, 1.0, 1.0]])
    w_in = np.array([[1.05, 1.08, 1.0], [1.0, 1.02, 1.0], [1.1, 1.15, 1.0]])  # its H 0.02 nm from a QM atom
    w_far = np.array([[0.2, 0.2, 0.2], [0.29, 0.2, 0.2], [0.18, 0.29, 0.2]])
    w_edge = np.array([[1.95, 1.0, 1.0], [2.04, 1.0, 1.0], [1.93, 1.09, 1.0]])  # clear through the box face
    pos = np.vstack([qm, w_in, w_far, w_edge])
    is_qm = np.array([True, True] + [False] * 9)
    mol_ids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    new = relocate_clashing_waters(pos, is_qm, mol_ids, box, seed=1)
    np.testing.assert_array_equal(new[:2], pos[:2])
    np.testing.assert_array_equal(new[5:], pos[5:])
    moved = new[2:5]
    assert np.allclose(moved - moved.mean(0), w_in - w_in.mean(0))  # rigid translation
    from qmlmm.system import minimum_image

    d = minimum_image(moved[:, None] - np.delete(new, [2, 3, 4], axis=0)[None], box)
    assert np.sqrt((d * d).sum(-1)).min() >= 0.22


def test_stopped_runs_are_left_out_and_finished_runs_are_not_rerun(tmp_path: Path, monkeypatch: Any) -> None:
    """The statistics use finished runs only (a stopped run's last frames can be of a molecule coming
    apart; it is listed instead); a rerun of the step with every run finished or stopped runs nothing and
    builds no start structure (that search takes seconds per start)."""
    import json

    import mdtraj

    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
    from qmlmm.md.system import MDSystem
    from qmlmm.workflows.pipeline import validation as pv

    system = tmp_path / "system"
    build_system([SoluteSpec(smiles=ALA2)], system, BuildSettings(cutoff=0.6, equilibrate_ps=0.2, threads=1))
    msys = MDSystem.load(system)
    vs = ValidationSettings(runs=2, steps=40, every=10, skip_ps=0.0, drivers=["reference", "baseline"], starts=None)

    cfg = SimpleNamespace(
        solutes=[ALA2],
        total_threads=1,
        seed=0,
        cutoff=0.6,
        switch_width=0.1,
        reference="xtb:gfn2",
        baseline="dftb3:3ob",
    )

    lengths = np.diag(msys.box)
    for driver in vs.drivers:
        for k in range(vs.runs):
            rdir = tmp_path / "validation" / driver / f"run{k}"
            rdir.mkdir(parents=True)
            frames = np.repeat(msys.positions[None], 4, axis=0).astype(np.float32)
            with mdtraj.formats.DCDTrajectoryFile(str(rdir / "traj.dcd"), "w") as f:
                f.write(10.0 * frames, cell_lengths=np.tile(10.0 * lengths, (4, 1)), cell_angles=np.full((4, 3), 90.0))
            why = "QM/MM force failed: atoms overlap" if (driver, k) == ("baseline", 1) else None
            rec = {"steps_done": 20 if why else 40, "stopped": why, "ns_per_day": 1.0}
            (rdir / "run.json").write_text(json.dumps(rec))
    obs, strata, stopped = pv._observables(cfg, vs, tmp_path, system)  # type: ignore[arg-type]
    assert [len(obs[d]) for d in vs.drivers] == [2, 1] and strata["baseline"] == [0]
    assert list(stopped) == ["baseline"] and "step 20: QM/MM force failed" in stopped["baseline"]["run1"]

    def fail(*a: Any, **k: Any) -> None:
        raise AssertionError("nothing should run or be built")

    monkeypatch.setattr(pv, "validation_start", fail)
    monkeypatch.setattr("qmlmm.md.runner.run_md", fail)
    pv._run_all(cfg, vs, tmp_path, system, tmp_path / "models", progress=False)  # type: ignore[arg-type]

    # analysis only: runs made by another engine than their driver names now are refused, not analysed
    from qmlmm.engines import make_engine
    from qmlmm.errors import InputError
    from qmlmm.md.runner import engine_identity

    pv._check_engines(cfg, vs, tmp_path, tmp_path / "models")  # type: ignore[arg-type]  # nothing recorded
    made_by = tmp_path / "validation" / "baseline" / "run0" / "run_settings.json"
    made_by.write_text(json.dumps({"engine": engine_identity(make_engine("dftb3:3ob"))}))
    pv._check_engines(cfg, vs, tmp_path, tmp_path / "models")  # type: ignore[arg-type]  # the same engine
    made_by.write_text(json.dumps({"engine": engine_identity(make_engine("dftb3:3ob,tol=1e-6"))}))
    with pytest.raises(InputError, match=r"baseline/run0 was run with another engine or model.*delete .*baseline"):
        pv._check_engines(cfg, vs, tmp_path, tmp_path / "models")  # type: ignore[arg-type]

"""MD observables against cases with known answers: RDF of an ideal gas, dihedrals of constructed
geometries (sign convention, periodic images), circular statistics, the polyene-chain dihedral finder,
and MBAR free-energy profiles from exactly sampled umbrella windows on a known potential."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qmlmm.analysis.md_analysis import (
    KB,
    barrier,
    conjugated_chain_dihedrals,
    dihedral_stats,
    dihedrals,
    free_energy_profile,
    rdf,
)
from qmlmm.errors import InputError


def test_rdf_of_ideal_gas_is_one() -> None:
    """Uncorrelated uniform points in a periodic box: g(r) = 1 at every r (to sampling noise)."""
    rng = np.random.default_rng(0)
    box = np.array([3.0, 3.2, 3.4])
    frames = 20
    pos = rng.uniform(0, 1, size=(frames, 600, 3)) * box
    boxes = np.tile(box, (frames, 1))
    r, g = rdf(pos, boxes, range(0, 100), range(100, 600), r_max=1.2, n_bins=12)
    assert r[0] == pytest.approx(0.05) and r[-1] == pytest.approx(1.15)
    # expected counts per bin >= ~900 beyond 0.3 nm: 5 % is > 1.5 sigma at the smallest of them
    assert np.all(np.abs(g[3:] - 1.0) < 0.05), g
    # the same set as a and b: self-distances excluded, still g = 1
    _, g_same = rdf(pos[:, :300], boxes, range(300), range(300), r_max=1.2, n_bins=12)
    assert np.all(np.abs(g_same[3:] - 1.0) < 0.08), g_same


def test_rdf_sees_a_fixed_distance_across_the_boundary() -> None:
    """One pair 0.25 nm apart through the periodic boundary: all counts in the bin holding 0.25 nm."""
    box = np.array([2.0, 2.0, 2.0])
    pos = np.array([[[0.1, 1.0, 1.0], [1.85, 1.0, 1.0]]])
    r, g = rdf(pos, box[None], [0], [1], r_max=0.5, n_bins=10)
    assert np.count_nonzero(g) == 1 and r[np.argmax(g)] == pytest.approx(0.275)


def _quad(phi_deg: float) -> np.ndarray:
    """Four atoms (4, 3) nm whose dihedral 1-2-3-4 is phi: 1 on +x, 2-3 along +z, 4 rotated by phi about z."""
    p = np.radians(phi_deg)
    return 0.15 * np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [np.cos(p), np.sin(p), 1.0]])


@pytest.mark.parametrize("phi", [-179.0, -120.0, -60.0, 0.0, 35.0, 90.0, 150.0, 180.0])
def test_dihedral_values_and_sign(phi: float) -> None:
    """IUPAC sign: positive when, looking from atom 2 to atom 3, the front bond turns clockwise onto the back one.
    mdtraj computes in float32: angles to 1e-4 deg."""
    pos = _quad(phi)[None]
    got = dihedrals(pos, [[0, 1, 2, 3]])[0, 0]
    assert abs(np.degrees(np.angle(np.exp(1j * np.radians(got - phi))))) < 1e-4
    # invariant under rotation and translation; mirror image flips the sign
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    moved = pos @ q.T + np.array([0.3, -1.0, 2.0])
    assert np.cos(np.radians(dihedrals(moved, [[0, 1, 2, 3]])[0, 0] - got)) == pytest.approx(1.0, abs=1e-10)
    mirrored = pos * np.array([1.0, -1.0, 1.0])
    assert np.sin(np.radians(dihedrals(mirrored, [[0, 1, 2, 3]])[0, 0])) == pytest.approx(
        -np.sin(np.radians(phi)), abs=2e-6
    )


def test_dihedral_across_periodic_boundary() -> None:
    """Atoms wrapped into the box by whole box lengths: minimum-image bond vectors give the same angle."""
    box = np.array([1.0, 1.1, 1.2])
    pos = _quad(-70.0) + np.array([0.95, 0.5, 0.5])
    wrapped = pos % box
    assert not np.allclose(wrapped, pos)  # really split across the boundary
    got = dihedrals(wrapped[None], [[0, 1, 2, 3]], boxes=box[None])[0, 0]
    assert got == pytest.approx(-70.0, abs=1e-4)  # float32 in mdtraj


def test_dihedral_stats_circular() -> None:
    """Circular mean across +-180 (not 0), von Mises-like spread recovered, s-trans fraction counted."""
    rng = np.random.default_rng(2)
    sigma = 12.0
    a = 180.0 + rng.normal(0.0, sigma, size=20000)  # around 180, wraps to -180
    a = (a + 180.0) % 360.0 - 180.0
    b = rng.normal(30.0, 5.0, size=20000)
    st = dihedral_stats(np.stack([a, b], axis=1))
    assert abs(abs(st["mean_deg"][0]) - 180.0) < 0.5 and st["mean_deg"][1] == pytest.approx(30.0, abs=0.2)
    assert st["std_deg"][0] == pytest.approx(sigma, rel=0.03) and st["std_deg"][1] == pytest.approx(5.0, rel=0.03)
    assert st["frac_trans"][0] == pytest.approx(1.0) and st["frac_trans"][1] == pytest.approx(0.0)
    with pytest.raises(InputError, match="frames"):
        dihedral_stats(np.zeros((0, 2)))


def test_conjugated_chain_dihedrals_of_polyenes() -> None:
    # hexatriene C1=C2-C3=C4-C5=C6: heavy-atom dihedrals about C2-C3, C3=C4, C4-C5 (terminal C=C have no
    # heavy neighbour beyond them)
    q = conjugated_chain_dihedrals("C=CC=CC=C", offset=10)
    assert sorted(x[4] for x in q) == ["double", "single", "single"]
    assert {tuple(x[1:3]) for x in q} == {(11, 12), (12, 13), (13, 14)}
    assert all(min(x[:4]) >= 10 for x in q)
    # retinoic acid: the chain from the ring (atom 2) to the carboxyl C (atom 17), none inside the ring:
    # 5 single bonds (ring-chain 2-9 ... 16-17 to the acid) and the 4 chain C=C
    ra = conjugated_chain_dihedrals("CC1=C(C(CCC1)(C)C)/C=C/C(=C/C=C/C(=C/C(=O)O)/C)/C")
    kinds = [x[4] for x in ra]
    assert kinds.count("single") == 5 and kinds.count("double") == 4, ra
    assert (2, 9) in {tuple(x[1:3]) for x in ra} and (16, 17) in {tuple(x[1:3]) for x in ra}
    assert not any(x[1] in range(1, 7) and x[2] in range(1, 7) for x in ra)  # no ring bond


def _exact_windows(
    kspring: float, k0: float, centres: np.ndarray, n: int, temperature: float, seed: int
) -> list[dict[str, object]]:
    """Samples of x under U(x) = k0/2 x^2 plus a harmonic bias k/2 (x - r0)^2: a Gaussian per window."""
    rng = np.random.default_rng(seed)
    beta = 1.0 / (KB * temperature)
    out = []
    for r0 in centres:
        prec = beta * (k0 + kspring)
        mean = kspring * r0 / (k0 + kspring)
        out.append({"r0": float(r0), "k": kspring, "x": rng.normal(mean, 1.0 / np.sqrt(prec), size=n)})
    return out


def test_mbar_profile_recovers_a_known_potential() -> None:
    """Umbrella windows sampled exactly on U(x) = k0/2 x^2: MBAR gives back U (kJ/mol) where sampled."""
    k0, T = 3000.0, 300.0
    wins = _exact_windows(15000.0, k0, np.linspace(-0.15, 0.15, 13), 4000, T, seed=3)
    prof = free_energy_profile(wins, temperature=T, n_bins=30)
    x, f = prof["x"], prof["f"]
    dense = prof["counts"] > 200
    assert dense.sum() >= 20
    exact = 0.5 * k0 * x**2
    shift = np.mean((f - exact)[dense])
    assert np.max(np.abs(f - exact - shift)[dense]) < 0.6, np.c_[x, f, exact + shift][dense]
    assert np.all(np.isfinite(prof["df"][dense]))
    with pytest.raises(InputError, match="two"):
        free_energy_profile(wins[:1])


def test_mbar_profile_of_a_double_well_and_its_barrier() -> None:
    """A double well U = h (1 - (x/a)^2)^2 sampled by Metropolis MC per window: barrier h from MBAR."""
    h, a, T = 20.0, 0.1, 300.0
    beta = 1.0 / (KB * T)
    rng = np.random.default_rng(4)
    k = 20000.0
    centres = np.linspace(-0.16, 0.16, 17)

    def u(x: np.ndarray) -> np.ndarray:
        return h * (1.0 - (x / a) ** 2) ** 2

    wins = []
    for r0 in centres:  # many independent chains per window, vectorised, after burn-in
        x = np.full(400, r0)
        samples = []
        for step in range(600):
            trial = x + rng.normal(0.0, 0.01, size=x.shape)
            du = u(trial) + 0.5 * k * (trial - r0) ** 2 - u(x) - 0.5 * k * (x - r0) ** 2
            acc = rng.random(x.shape) < np.exp(-beta * np.clip(du, -50, 50))
            x = np.where(acc, trial, x)
            if step >= 200 and step % 20 == 0:
                samples.append(x.copy())
        wins.append({"r0": float(r0), "k": k, "x": np.concatenate(samples)})
    prof = free_energy_profile(wins, temperature=T, n_bins=32)
    assert barrier(prof) == pytest.approx(h, abs=2.0)
    assert abs(prof["x"][int(np.argmax(prof["f"][3:-3])) + 3]) < 0.02  # the top at x = 0
    assert barrier({"f": np.array([0.0, 1.0])}) != barrier({"f": np.array([0.0, 1.0])})  # NaN below 3 points
    # the smaller of the two barriers: 10 above the right minimum, 15 above the left one
    assert barrier({"f": np.array([0.0, 15.0, 5.0])}) == pytest.approx(10.0)


def test_structure_observables_of_a_constructed_trajectory() -> None:
    """The shared per-run analysis: a solute O with one water O at 0.28 nm in every frame (RDF peak
    there), N-OW left out for a solute without N, and two dihedrals held at 180 and 60 deg."""
    from qmlmm.analysis.report import rdf_pair_atoms, structure_observables

    box = np.array([3.0, 3.0, 3.0])
    frames = 10
    rng = np.random.default_rng(3)
    chain1, chain2 = _quad(180.0) + 1.0, _quad(60.0) + 2.0
    o = np.array([0.5, 0.5, 0.5])
    numbers = np.array([6, 6, 6, 6, 6, 6, 6, 6, 8] + [8] * 40)
    is_qm = np.array([True] * 9 + [False] * 40)
    pos = np.empty((frames, len(numbers), 3))
    for t in range(frames):
        pos[t, :4], pos[t, 4:8], pos[t, 8] = chain1, chain2, o
        pos[t, 9:] = rng.uniform(0, 1, size=(40, 3)) * box
        pos[t, 9] = o + 0.28 * np.array([0.0, 0.6, 0.8])
    pairs = rdf_pair_atoms([["O", "OW"], ["N", "OW"]], numbers, is_qm)
    assert list(pairs) == ["O-OW"] and pairs["O-OW"][0] == [8] and len(pairs["O-OW"][1]) == 40
    quads = [(0, 1, 2, 3, "single"), (4, 5, 6, 7, "double")]
    summary, curves, ang = structure_observables(pos, np.tile(box, (frames, 1)), pairs, quads, r_max=0.8, n_bins=16)
    r, g = curves["O-OW"]
    assert summary["rdf_peak"]["O-OW"]["r_nm"] == pytest.approx(0.275) == r[int(np.argmax(g))]
    assert 0.0 < summary["nearest_nm"]["O-OW"] <= 0.28 + 1e-12  # the placed water, or a random one closer
    assert ang is not None and ang.shape == (frames, 2)
    d = summary["dihedrals"]
    assert d["n_dihedrals"] == 2 and d["n_frames"] == frames
    assert d["mean_abs_single_deg"] == pytest.approx(180.0) and d["frac_s_trans"] == 1.0  # single bonds only
    per = {p["atoms"]: p for p in d["per_dihedral"]}
    assert per["4-5-6-7 (double)"]["mean_deg"] == pytest.approx(60.0) and per["4-5-6-7 (double)"]["frac_trans"] == 0.0
    with pytest.raises(InputError, match="rdf_pairs"):
        rdf_pair_atoms([["O", "XW"]], numbers, is_qm)


def test_nearest_distances_minimum_image_against_all_images() -> None:
    """Shortest solute-water distance per frame: through the periodic boundary (0.15 nm, not 2.75 nm),
    and equal to a brute-force minimum over all 27 neighbouring images of random configurations."""
    from itertools import product

    from qmlmm.analysis.report import nearest_distances

    box = np.array([3.0, 2.5, 2.0])
    pos = np.array([[0.05, 0.5, 0.5], [2.9, 0.5, 0.5], [1.5, 1.2, 1.0]])
    assert nearest_distances(pos, box, [0], [1, 2]) == pytest.approx([0.15])
    assert nearest_distances(pos, None, [0], [1, 2])[0] == pytest.approx(np.linalg.norm(pos[2] - pos[0]))
    assert np.isnan(nearest_distances(pos, box, [], [1])).all()
    rng = np.random.default_rng(1)
    traj = rng.uniform(0.0, 1.0, size=(5, 30, 3)) * box
    boxes = np.tile(box, (5, 1))
    a, b = [0, 1, 2], list(range(3, 30))
    got = nearest_distances(traj, boxes, a, b)
    shifts = np.array(list(product((-1, 0, 1), repeat=3))) * box
    for t in range(5):
        r = traj[t, b][None, :, None] + shifts[None, None] - traj[t, a][:, None, None]
        assert got[t] == pytest.approx(np.linalg.norm(r, axis=-1).min())


def test_pipeline_summary_table_has_the_structure_observables(tmp_path: Path) -> None:
    """summary.md lists per MD run the RDF maximum and the nearest solute-water distance; a summary
    written before the nearest distances existed (no ``nearest_nm``) still renders."""
    from qmlmm.workflows.pipeline import summary_markdown

    err = {"energy": {"mae": 1.0}, "qm_forces": {"mae": 20.0}, "mm_forces": {"mae": 0.5}}
    s = {
        "name": "x",
        "n_frames": 4,
        "total_s": 10.0,
        "evaluation": {"delta": {"model": err}},
        "md": {"delta_ml": {"steps_done": 10, "ns_per_day": 0.2, "stopped": None}},
        "analysis": {
            "rdf_peak": {"delta_ml": {"O-OW": {"r_nm": 0.275, "g": 3.1}}},
            "nearest_nm": {"delta_ml": {"O-OW": 0.2612}},
            "dihedrals": {},
        },
        "timings_s": {"md": 5.0},
    }
    row = [ln for ln in summary_markdown(s, tmp_path).splitlines() if ln.startswith("| delta_ml |") and "O-OW" in ln]
    assert row == ["| delta_ml | O-OW 0.275, 3.10 | O-OW 0.261 | - |"]
    del s["analysis"]["nearest_nm"]  # type: ignore[attr-defined]
    assert "| delta_ml | O-OW 0.275, 3.10 | - | - |" in summary_markdown(s, tmp_path)


def test_step_times_summed_over_invocations(tmp_path: Path) -> None:
    """A resumed pipeline's summary says what each step cost over all runs on the folder, not only the
    last one (where reused steps take ~0 s); a line cut by a kill is skipped."""
    import json

    from qmlmm.workflows.pipeline import step_seconds_all, summary_markdown

    assert step_seconds_all(tmp_path) == {}
    recs = [("label", 6900.0), ("train", 830.0), ("label", 2.5), ("reaction", 820.0), ("reaction", 1500.0)]
    text = "".join(json.dumps({"step": k, "seconds": v, "at": "2026-12-02T16:00:00"}) + "\n" for k, v in recs)
    (tmp_path / "timings.jsonl").write_text(text + '{"step": "md", "sec')
    total = step_seconds_all(tmp_path)
    assert total == {"label": 6902.5, "train": 830.0, "reaction": 2320.0}
    s = {
        "name": "x",
        "n_frames": 4,
        "total_s": 1500.0,
        "evaluation": {},
        "md": {},
        "timings_s": {"label": 2.5, "reaction": 1500.0},
        "timings_all_s": total,
    }
    md = summary_markdown(s, tmp_path)
    assert "| label | 2 | 6902 |" in md and "| reaction | 1500 | 2320 |" in md


def test_forward_barrier_from_the_reactant_side() -> None:
    from qmlmm.analysis.md_analysis import barrier, forward_barrier

    x = np.linspace(-0.1, 0.1, 9)
    f = np.array([5.0, 2.0, 0.5, 10.0, 30.0, 20.0, 8.0, -10.0, -12.0])  # product lower than reactant
    prof = {"x": x, "f": f - f.min()}
    h, xt = forward_barrier(prof)
    assert h == pytest.approx(29.5) and xt == pytest.approx(0.0)
    assert barrier(prof) == pytest.approx(29.5)  # the higher end minimum is the reactant one here
    assert np.isnan(forward_barrier({"x": x[:2], "f": f[:2]})[0])


def test_mbar_overlap_tells_connected_windows_from_a_gap() -> None:
    """Windows sampled exactly on a harmonic U overlap across every cut along the coordinate; two groups
    of windows with nothing between them give a zero overlap at the gap (MBAR's profile across it is
    undetermined), and only there."""
    T = 300.0
    good = _exact_windows(15000.0, 3000.0, np.linspace(-0.15, 0.15, 13), 400, T, seed=4)
    prof = free_energy_profile(good, temperature=T, n_bins=30)
    assert prof["cut_overlap"].shape == (12,) and prof["cut_nm"].shape == (12,)
    assert prof["cut_overlap"].min() > 0.03 and float(prof["overlap_scalar"]) > 0.01
    assert np.all(np.diff(prof["cut_nm"]) > 0)
    gapped = good[:4] + good[-4:]  # nothing between about -0.1 and 0.1 nm
    prof = free_energy_profile(gapped, temperature=T, n_bins=30)
    k = int(np.argmin(prof["cut_overlap"]))
    assert k == 3 and prof["cut_overlap"][k] < 1e-6 and float(prof["overlap_scalar"]) < 1e-6
    assert abs(prof["cut_nm"][k]) < 0.02  # midway between the two groups
    assert np.delete(prof["cut_overlap"], k).min() > 0.03


def test_mbar_on_decorrelated_samples_widens_the_error_bars_by_sqrt_g() -> None:
    """Windows on U = k0/2 x^2 sampled as AR(1) series (correlation phi per sample, exact stationary
    distribution): the statistical inefficiency per window is g = (1 + phi)/(1 - phi) = 9, MBAR runs on
    every ~g-th sample and its error bars grow by about sqrt(g) = 3 over treating all samples as
    independent; the profile still recovers U."""
    k0, ks, T, phi, n = 3000.0, 15000.0, 300.0, 0.8, 3000
    beta = 1.0 / (KB * T)
    rng = np.random.default_rng(8)
    wins = []
    for r0 in np.linspace(-0.15, 0.15, 13):
        mean, sd = ks * r0 / (k0 + ks), 1.0 / np.sqrt(beta * (k0 + ks))
        x = np.empty(n)
        x[0] = rng.normal(mean, sd)
        for t in range(1, n):
            x[t] = mean + phi * (x[t - 1] - mean) + np.sqrt(1 - phi**2) * sd * rng.normal()
        wins.append({"r0": float(r0), "k": ks, "x": x, "dt_ps": 0.0025})
    dec = free_energy_profile(wins, temperature=T, n_bins=24)
    allp = free_energy_profile(wins, temperature=T, n_bins=24, decorrelated=False)
    g_exact = (1 + phi) / (1 - phi)
    # the estimate per window scatters (measured here 7.6-13.5 over 13 windows of 3000 samples)
    assert abs(np.median(dec["g"]) / g_exact - 1) < 0.15 and np.all(np.abs(dec["g"] / g_exact - 1) < 0.6), dec["g"]
    assert np.allclose(dec["tau_ps"], 0.5 * (dec["g"] - 1) * 0.0025)
    assert np.all(dec["n_used"] < n / 6) and np.all(allp["n_used"] == n)
    both = (dec["counts"] > 300) & (allp["counts"] > 300)
    common = np.isin(allp["x"], dec["x"][both])
    ratio = np.median(dec["df"][both][1:] / allp["df"][common][1:])
    assert 2.0 < ratio < 4.5, ratio
    exact = 0.5 * k0 * dec["x"][both] ** 2
    err = dec["f"][both] - exact
    assert np.max(np.abs(err - err.mean())) < 1.5


def test_mbar_removes_a_bias_common_to_all_windows() -> None:
    """A keep-together restraint: every window also carries U_c = kc/2 (y - y0)^2 on a second coordinate
    y that follows x (U = kxy/2 (y - c x)^2, flat in x). The profile in the restrained ensemble is the
    harmonic kc kxy/(kc + kxy) c^2/2 (x - y0/c)^2; with the common bias removed by reweighting it is flat.
    Samples drawn exactly (x from its biased marginal, then y given x)."""
    T, ks, kxy, kc, c, y0 = 300.0, 15000.0, 20000.0, 2000.0, 1.0, 0.05
    beta = 1.0 / (KB * T)
    keff = kc * kxy / (kc + kxy) * c**2
    rng = np.random.default_rng(5)
    wins = []
    for r0 in np.linspace(-0.15, 0.15, 13):
        prec = ks + keff
        mean = (ks * r0 + keff * y0 / c) / prec
        x = rng.normal(mean, 1.0 / np.sqrt(beta * prec), size=3000)
        y = rng.normal((kxy * c * x + kc * y0) / (kxy + kc), 1.0 / np.sqrt(beta * (kxy + kc)))
        wins.append({"r0": float(r0), "k": ks, "x": x, "u_common": 0.5 * kc * (y - y0) ** 2})
    prof = free_energy_profile(wins, temperature=T, n_bins=24)
    dense = prof["counts"] > 400
    xs = prof["x"][dense]
    restrained = 0.5 * keff * (xs - y0 / c) ** 2
    err = prof["f"][dense] - restrained
    assert np.max(np.abs(err - err.mean())) < 0.6
    flat = prof["f_unbiased"][dense]
    assert np.ptp(flat) < 1.5 < np.ptp(restrained), (np.ptp(flat), np.ptp(restrained))
    assert 100 < float(prof["ess_unbiased"]) < dense.sum() * 3000
    without = free_energy_profile([{k: v for k, v in w.items() if k != "u_common"} for w in wins], T, 24)
    assert "f_unbiased" not in without and np.allclose(without["f"], prof["f"], atol=1e-6)


def test_mdtraj_observables_equal_the_former_numpy_ones_on_a_stored_trajectory() -> None:
    """Reading, RDFs and dihedrals (now mdtraj) against the numpy implementations they replaced, on a
    stored methanol-in-water trajectory (10 frames, 366 atoms; tests/data/make_methanol_water_reference.py
    made both files). The RDF pairs are disjoint sets, so both normalisations count the same pairs."""
    import json

    from qmlmm.analysis.md_analysis import read_dcd

    data = Path(__file__).parent / "data"
    ref = json.loads((data / "methanol_water_reference.json").read_text())
    pos, boxes = read_dcd(data / "methanol_water.dcd")
    assert pos.shape == (ref["n_frames"], ref["n_atoms"], 3) and boxes is not None and boxes.shape == (10, 3)
    assert np.abs(pos[0, :6] - np.array(ref["positions_frame0_nm"])).max() < 1e-7  # nm, float32 stored
    assert pos[::3].shape[0] == read_dcd(data / "methanol_water.dcd", stride=3)[0].shape[0] == 4
    for name, want in ref["rdf"].items():
        r, g = rdf(pos, boxes, want["a"], want["b"], r_max=ref["r_max"], n_bins=ref["n_bins"])
        assert np.allclose(r, want["r_nm"], atol=1e-12), name
        assert np.allclose(g, want["g"], rtol=1e-5, atol=1e-9), name  # mdtraj: float32 distances
        assert np.max(want["g"]) > 1.0  # a real first shell, not an empty histogram
    ang = dihedrals(pos, ref["quads"], boxes)
    diff = (ang - np.array(ref["dihedrals_deg"]) + 180.0) % 360.0 - 180.0
    assert np.abs(diff).max() < 1e-3  # degrees


def test_read_dcd_drops_a_partial_last_frame_and_names_a_bad_file(tmp_path: Path) -> None:
    """A run killed while writing leaves a partial frame: it is left out; a file that is not a DCD
    trajectory raises SchemaError naming it."""
    from qmlmm.analysis.md_analysis import read_dcd
    from qmlmm.errors import SchemaError

    raw = (Path(__file__).parent / "data" / "methanol_water.dcd").read_bytes()
    cut = tmp_path / "cut.dcd"
    cut.write_bytes(raw[:-1000])
    pos, boxes = read_dcd(cut)
    full, _ = read_dcd(Path(__file__).parent / "data" / "methanol_water.dcd")
    assert pos.shape[0] == 9 and boxes is not None and np.array_equal(pos, full[:9])
    bad = tmp_path / "bad.dcd"
    bad.write_text("not a trajectory\n")
    with pytest.raises(SchemaError, match=r"bad\.dcd"):
        read_dcd(bad)
    with pytest.raises(SchemaError, match="no such trajectory"):
        read_dcd(tmp_path / "missing.dcd")


def test_learning_curve_table_rows_with_the_baseline_beside_them() -> None:
    """One row per (model, size) in the order given, errors at their precision, extra columns after
    the errors, and the baseline's own errors as the last row (dashes under the extra columns)."""
    from qmlmm.analysis.tables import learning_curve_table

    pt = {"n_train": 20, "energy_mae": 1.23456, "qm_forces_mae": 45.678, "mm_forces_mae": 0.98765, "k": 7}
    curves = {"direct": [pt], "delta": [{**pt, "n_train": 40}]}
    base = {"energy": {"mae": 5.2}, "qm_forces": {"mae": 255.0}, "mm_forces": {"mae": 1.79}}
    lines = learning_curve_table(curves, base, {"k": lambda p: str(p["k"])}, "DFTB3 alone")
    assert lines[0] == "| model | train frames | E MAE (kJ/mol) | QM F MAE (kJ/mol/nm) | MM F MAE (kJ/mol/nm) | k |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2:] == [
        "| direct | 20 | 1.235 | 45.68 | 0.988 | 7 |",
        "| delta | 40 | 1.235 | 45.68 | 0.988 | 7 |",
        "| DFTB3 alone | - | 5.200 | 255.00 | 1.790 | - |",
    ]
    assert len(learning_curve_table(curves)) == 4  # no baseline row without a baseline

"""Make the stored trajectory and reference observables of tests/test_analysis.py's mdtraj check.

Builds methanol in TIP3P water (``qmlmm build``, cutoff 0.8 nm, 2 ps equilibration, seed 0), runs 50
MM-only steps of ``qmlmm md`` (0.5 fs, a frame every 5 steps: 10 frames), keeps methanol and the 120
water molecules nearest to its O in the first frame, and writes

- ``methanol_water.dcd``: those atoms' frames (mdtraj's DCD writer, Angstrom, orthorhombic cell);
- ``methanol_water_reference.json``: RDFs (C-OW, O-OW, O-HW; 0-0.8 nm, 40 bins) and the three
  H-C-O-H dihedrals, computed by the numpy implementations qmlmm used before mdtraj (copied below
  unchanged: minimum image, histogram normalised by n_a * n_b and the mean density 1/V).

Run from the repository root: ``.venv/bin/python tests/data/make_methanol_water_reference.py``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_WATERS = 120
PAIRS = {"C-OW": ("C", "OW"), "O-OW": ("O", "OW"), "O-HW": ("O", "HW")}
QUADS = [[2, 0, 1, 5], [3, 0, 1, 5], [4, 0, 1, 5]]  # H-C-O-H of CH3OH in RDKit's order with H added


def old_rdf(positions, boxes, a, b, r_max=0.8, n_bins=80):  # type: ignore[no-untyped-def]
    """qmlmm's rdf before mdtraj (commit a6ad66f), unchanged."""
    a_idx, b_idx = np.asarray(a), np.asarray(b)
    edges = np.linspace(0.0, r_max, n_bins + 1)
    hist = np.zeros(n_bins)
    rho = 0.0
    for pos, box in zip(positions, boxes, strict=True):
        d = pos[b_idx][None, :, :] - pos[a_idx][:, None, :]
        d -= box * np.round(d / box)
        r = np.sqrt((d * d).sum(-1)).ravel()
        r = r[r > 1e-9]
        hist += np.histogram(r, bins=edges)[0]
        rho += len(b_idx) / np.prod(box)
    n_frames = len(positions)
    rho /= max(n_frames, 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = hist / (max(n_frames, 1) * len(a_idx) * rho * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g


def old_dihedrals(positions, quads: Sequence[Sequence[int]], boxes=None):  # type: ignore[no-untyped-def]
    """qmlmm's dihedrals before mdtraj (commit a6ad66f), unchanged."""
    q = np.asarray(quads)
    p = positions[:, q]

    def mi(v):  # type: ignore[no-untyped-def]
        if boxes is None:
            return v
        L = boxes[:, None, :]
        return v - L * np.round(v / L)

    b0 = mi(p[:, :, 0] - p[:, :, 1])
    b1 = mi(p[:, :, 2] - p[:, :, 1])
    b2 = mi(p[:, :, 3] - p[:, :, 2])
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    x = (v * w).sum(-1)
    y = (np.cross(b1n, v) * w).sum(-1)
    return np.degrees(np.arctan2(y, x))


def main() -> None:
    import mdtraj

    from qmlmm.analysis.md_analysis import load_run
    from qmlmm.md.build import BuildSettings, SoluteSpec, build_system
    from qmlmm.md.runner import MDSettings, run_md
    from qmlmm.md.system import MDSystem

    with tempfile.TemporaryDirectory() as tmp:
        sys_dir = Path(tmp) / "methanol"
        build_system(
            [SoluteSpec(smiles="CO")], sys_dir, BuildSettings(cutoff=0.8, equilibrate_ps=2.0, threads=1, seed=0)
        )
        run_md(
            sys_dir,
            None,
            Path(tmp) / "md",
            MDSettings(steps=50, report_every=5, dcd_every=5, threads=1, seed=0),
            progress=False,
        )
        msys = MDSystem.load(sys_dir)
        pos, boxes = load_run(Path(tmp) / "md")
    assert boxes is not None
    numbers = msys.numbers
    first_water = 6  # methanol's 6 atoms come first, then O H H per water
    ow = np.arange(first_water, len(numbers), 3)
    d = pos[0, ow] - pos[0, 1]
    d -= boxes[0] * np.round(d / boxes[0])
    keep_w = ow[np.argsort(np.linalg.norm(d, axis=1))[:N_WATERS]]
    keep = np.concatenate([np.arange(6), np.sort(np.concatenate([keep_w, keep_w + 1, keep_w + 2]))])
    sub = pos[:, keep]
    with mdtraj.formats.DCDTrajectoryFile(str(HERE / "methanol_water.dcd"), "w", force_overwrite=True) as fh:
        fh.write((sub * 10.0).astype(np.float32), cell_lengths=boxes * 10.0, cell_angles=np.full_like(boxes, 90.0))
    sub32, boxes32 = sub.astype(np.float32).astype(np.float64), boxes.astype(np.float32).astype(np.float64)
    sites = {"C": [0], "O": [1], "OW": list(range(6, len(keep), 3))}
    sites["HW"] = [i + k for i in sites["OW"] for k in (1, 2)]
    ref: dict = {"n_frames": len(sub), "n_atoms": len(keep), "r_max": 0.8, "n_bins": 40, "rdf": {}, "quads": QUADS}
    for name, (sa, sb) in PAIRS.items():
        r, g = old_rdf(sub32, boxes32, sites[sa], sites[sb], r_max=0.8, n_bins=40)
        ref["rdf"][name] = {"a": sites[sa], "b": sites[sb], "r_nm": r.tolist(), "g": g.tolist()}
    ref["dihedrals_deg"] = old_dihedrals(sub32, QUADS, boxes32).tolist()
    ref["positions_frame0_nm"] = sub32[0, :6].tolist()
    (HERE / "methanol_water_reference.json").write_text(json.dumps(ref, indent=1))
    print(f"wrote {len(sub)} frames of {len(keep)} atoms")


if __name__ == "__main__":
    main()

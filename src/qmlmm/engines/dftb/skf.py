"""Reading Slater-Koster files (.skf, the DFTB+ "simple" format).

A file ``A-B.skf`` holds, on a uniform grid r_k = k * dr (k = 1..n, Bohr), ten Hamiltonian and ten
overlap integrals between the valence orbitals of A and B in the bond frame, and the repulsive
pair potential as a spline. The homonuclear file ``A-A.skf`` also holds the on-site energies,
Hubbard parameters and occupations of A. Units: Bohr and Hartree.

Column order of the integral table (both H and S): dd-sigma, dd-pi, dd-delta, pd-sigma, pd-pi,
pp-sigma, pp-pi, sd-sigma, sp-sigma, ss-sigma.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.interpolate import CubicSpline

from qmlmm.errors import SchemaError

__all__ = ["COLUMN", "SKTable", "read_skf"]

#: (l1, l2, |m|) with l1 <= l2 -> column of the Hamiltonian table (overlap: + 10)
COLUMN: dict[tuple[int, int, int], int] = {
    (2, 2, 0): 0,
    (2, 2, 1): 1,
    (2, 2, 2): 2,
    (1, 2, 0): 3,
    (1, 2, 1): 4,
    (1, 1, 0): 5,
    (1, 1, 1): 6,
    (0, 2, 0): 7,
    (0, 1, 0): 8,
    (0, 0, 0): 9,
}


def _numbers(line: str) -> list[float]:
    """Numbers of an SKF line: commas or blanks as separators, ``n*value`` repeats."""
    out: list[float] = []
    for tok in re.split(r"[,\s]+", line.strip()):
        if not tok:
            continue
        if "*" in tok:
            n, v = tok.split("*")
            out += [float(v)] * int(n)
        else:
            out.append(float(tok))
    return out


@dataclass
class SKTable:
    """Contents of one .skf file (atomic units).

    Attributes:
        dr: grid spacing (Bohr); grid points r_k = k dr, k = 1..n.
        table: (n, 20) integrals, columns as in the module docstring (H then S).
        spline_coef: (n-1, 4, 20) cubic-spline coefficients per interval [r_k, r_{k+1}],
            value = c0 x^3 + c1 x^2 + c2 x + c3 with x = r - r_k.
        end_value, end_d1, end_d2: (20,) value and first two derivatives at the last grid point,
            for the smooth 1-Bohr tail beyond the table (as DFTB+).
        onsite: (E_s, E_p, E_d) Hartree (homonuclear files only).
        hubbard: (U_s, U_p, U_d) Hartree (homonuclear files only).
        occupation: (f_s, f_p, f_d) free-atom occupations (homonuclear files only).
        rep_exp: (a1, a2, a3) of exp(-a1 r + a2) + a3 below the first spline knot.
        rep_knots: (nseg + 1,) spline knots (Bohr); the last one is the cutoff.
        rep_coef: (nseg, 6) polynomial coefficients c0..c5 of each segment in x = r - knot.
    """

    path: str
    dr: float
    table: np.ndarray
    spline_coef: np.ndarray
    end_value: np.ndarray
    end_d1: np.ndarray
    end_d2: np.ndarray
    onsite: tuple[float, float, float] | None
    hubbard: tuple[float, float, float] | None
    occupation: tuple[float, float, float] | None
    rep_exp: tuple[float, float, float]
    rep_knots: np.ndarray
    rep_coef: np.ndarray

    @property
    def n_grid(self) -> int:
        return int(self.table.shape[0])

    @property
    def r_max(self) -> float:
        """Last grid point (Bohr)."""
        return self.dr * self.n_grid

    @property
    def rep_cutoff(self) -> float:
        return float(self.rep_knots[-1])


def read_skf(path: str | Path, homonuclear: bool) -> SKTable:
    """Parse an .skf (or .skf.gz) file; SchemaError with the file name on malformed content."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        raise SchemaError(f"cannot read Slater-Koster file {path}: {e}") from e
    try:
        if lines[0].lstrip().startswith("@"):
            raise SchemaError(f"{path}: the extended (f-orbital) SKF format is not supported")
        head = _numbers(lines[0])
        dr, n = float(head[0]), int(head[1])
        i = 1
        onsite = hubbard = occ = None
        if homonuclear:
            v = _numbers(lines[1])
            onsite = (v[2], v[1], v[0])
            hubbard = (v[6], v[5], v[4])
            occ = (v[9], v[8], v[7])
            i = 2
        i += 1  # mass / polynomial repulsive line (qmlmm uses the spline)
        j = next(k for k in range(i, len(lines)) if lines[k].strip().startswith("Spline"))
        # DFTB+ reads n - 1 lines of integrals (oldskdata: nGrid = nGrid - 1); most files hold n, of which
        # qmlmm has always used all n, but some (3ob-3-1's fluorine pairs) hold only n - 1
        n = n if j - i >= n else n - 1
        table = np.array([_numbers(lines[i + k])[:20] for k in range(n)], dtype=np.float64)
        if table.shape != (n, 20):
            raise SchemaError(f"{path}: integral table has shape {table.shape}, expected ({n}, 20)")
        nint_cut = _numbers(lines[j + 1])
        nint = int(nint_cut[0])
        a1, a2, a3 = _numbers(lines[j + 2])[:3]
        segs = [_numbers(lines[j + 3 + k]) for k in range(nint)]
    except (IndexError, ValueError, StopIteration) as e:
        raise SchemaError(f"{path} is not a valid Slater-Koster file: {e}") from e
    r = dr * np.arange(1, n + 1)
    spl = CubicSpline(r, table, axis=0)
    coef = np.ascontiguousarray(np.transpose(spl.c, (1, 0, 2)))  # (n-1, 4, 20)
    knots = np.array([s[0] for s in segs] + [segs[-1][1]])
    rep = np.zeros((nint, 6))
    for k, s in enumerate(segs):
        c = s[2:]
        rep[k, : len(c)] = c
    return SKTable(
        path=path,
        dr=dr,
        table=table,
        spline_coef=coef,
        end_value=spl(r[-1]),
        end_d1=spl(r[-1], 1),
        end_d2=spl(r[-1], 2),
        onsite=onsite,
        hubbard=hubbard,
        occupation=occ,
        rep_exp=(a1, a2, a3),
        rep_knots=knots,
        rep_coef=rep,
    )

"""DFTB parameter sets (3ob-3-1 for DFTB3, mio-1-1 for DFTB2) as PyTorch tensors.

Integrals are interpolated by cubic splines on the SKF grid and, beyond the last grid point, by
DFTB+'s smooth tail that brings value, slope and curvature to zero over 1 Bohr. Repulsive
energies follow the spline block of each file. Everything is in atomic units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qmlmm.elements import symbol
from qmlmm.engines.dftb.skf import SKTable, read_skf
from qmlmm.engines.dftb.slako_files import parameter_dir
from qmlmm.errors import MissingParametersError

log = logging.getLogger(__name__)

__all__ = ["TAIL_BOHR", "DFTBParameters", "PairTables", "TorchPair", "load_parameters"]

#: length of the smooth tail beyond an SK table's last point (Bohr), as DFTB+'s distFudge
TAIL_BOHR = 1.0

# Hubbard derivatives (Hartree) and maximal angular momenta of 3ob-3-1, from its README
_HUBBARD_DERIV_3OB = {
    35: -0.0573,
    6: -0.1492,
    20: -0.0340,
    17: -0.0697,
    9: -0.1623,
    1: -0.1857,
    53: -0.0433,
    19: -0.0339,
    12: -0.02,
    7: -0.1535,
    11: -0.0454,
    8: -0.1575,
    15: -0.14,
    16: -0.11,
    30: -0.03,
}
_LMAX_3OB = {35: 2, 6: 1, 20: 1, 17: 2, 9: 1, 1: 0, 53: 2, 19: 1, 12: 1, 7: 1, 11: 1, 8: 1, 15: 2, 16: 2, 30: 2}
_LMAX_MIO = {1: 0, 6: 1, 7: 1, 8: 1, 15: 2, 16: 2}


@dataclass
class Species:
    """Per-element constants: on-site energies per shell, Hubbard U, valence electrons."""

    z: int
    lmax: int
    onsite: tuple[float, ...]  # per shell s, p, d up to lmax
    hubbard: float  # U of the s shell, used for all shells (not orbital-resolved, as DFTB+ default)
    hubbard_deriv: float
    n_valence: float

    @property
    def n_orb(self) -> int:
        return (self.lmax + 1) ** 2


class TorchPair:
    """Integral and repulsive tables of one ordered element pair as tensors (evaluated by
    :class:`PairTables`): cubic splines of the integrals on the SKF grid and, beyond its last point r_max,
    DFTB+'s tail (1 - t/L)^3 (a + b t + c t^2), t = r - r_max, L = TAIL_BOHR, whose ``tail`` (3, 20) =
    (a, b, c) brings value, slope and curvature at r_max to zero at r_max + L; repulsive splines, with
    exp(-a1 r + a2) + a3 below their first knot and zero beyond their last (the cutoff)."""

    def __init__(self, tab: SKTable, device: torch.device, dtype: torch.dtype) -> None:
        self.dr = tab.dr
        self.n = tab.n_grid
        self.r_max = tab.r_max
        self.coef = torch.as_tensor(tab.spline_coef, device=device, dtype=dtype)  # (n-1, 4, 20)
        ends = np.stack([tab.end_value, tab.end_d1, tab.end_d2])
        a, f1, f2 = torch.as_tensor(ends, device=device, dtype=dtype)  # value, slope, curvature at r_max
        L = TAIL_BOHR
        b = f1 + 3.0 * a / L
        self.tail = torch.stack([a, b, 0.5 * (f2 + 6.0 * b / L - 6.0 * a / L**2)])  # (3, 20)
        self.rep_exp = tab.rep_exp
        self.rep_knots = torch.as_tensor(tab.rep_knots, device=device, dtype=dtype)
        self.rep_coef = torch.as_tensor(tab.rep_coef, device=device, dtype=dtype)
        self.rep_cutoff = tab.rep_cutoff


class PairTables:
    """The integral and repulsive tables of a list of atom pairs, pair p from table ``tables[table[p]]``,
    stacked so that every pair comes from one evaluation (the splines and tails of :class:`TorchPair`),
    with the per-pair constants gathered once."""

    @staticmethod
    def _stacked(parts: list[torch.Tensor], table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables' ``parts`` concatenated along their first axis, and each pair's offset into it (P,)."""
        sizes = torch.tensor([len(x) for x in parts], device=parts[0].device)
        base = torch.cat([torch.zeros(1, dtype=torch.long, device=sizes.device), torch.cumsum(sizes, 0)[:-1]])
        return torch.cat(parts), base[table]

    def __init__(self, tables: list[TorchPair], table: torch.Tensor) -> None:
        table = table.to(tables[0].coef.device)
        self.coef, self.base = self._stacked([t.coef for t in tables], table)  # (sum of n_t - 1, 4, 20), (P,)
        dev, dt = self.coef.device, self.coef.dtype
        self.dr = torch.tensor([t.dr for t in tables], dtype=dt, device=dev)[table]
        self.k_max = torch.tensor([t.n - 2 for t in tables], device=dev)[table]
        self.r_max = torch.tensor([t.r_max for t in tables], dtype=dt, device=dev)[table]
        self.tail = torch.stack([t.tail for t in tables])[table].transpose(0, 1)  # (3, P, 20)
        # repulsive splines: each pair's knots padded with +inf (K = most knots of a table)
        K = max(len(t.rep_knots) for t in tables)
        knots = torch.full((len(tables), K), float("inf"), dtype=dt, device=dev)
        for i, t in enumerate(tables):
            knots[i, : len(t.rep_knots)] = t.rep_knots
        self.rep_knots = knots[table]  # (P, K)
        self.rep_kmax = torch.tensor([len(t.rep_knots) - 2 for t in tables], device=dev)[table]
        self.rep_coef, self.rep_base = self._stacked([t.rep_coef for t in tables], table)
        self.rep_exp = torch.tensor([t.rep_exp for t in tables], dtype=dt, device=dev)[table].T  # (3, P)
        self.rep_cutoff = torch.tensor([t.rep_cutoff for t in tables], dtype=dt, device=dev)[table]

    def repulsive(self, r: torch.Tensor) -> torch.Tensor:
        """Repulsive energy (…,) in Hartree, summed over the pairs at distances r (…, P) Bohr (each pair's
        splines, short-range exponential and cutoff, :class:`TorchPair`)."""
        k = torch.clamp((r.detach().unsqueeze(-1) >= self.rep_knots).sum(-1) - 1, min=0)
        k = torch.minimum(k, self.rep_kmax)
        x = r - torch.gather(self.rep_knots.expand(*r.shape, -1), -1, k.unsqueeze(-1)).squeeze(-1)
        c = self.rep_coef[self.rep_base + k]  # (…, P, 6)
        poly = c[..., 5]
        for i in range(4, -1, -1):
            poly = poly * x + c[..., i]
        a1, a2, a3 = self.rep_exp
        e = torch.where(r < self.rep_knots[:, 0], torch.exp(-a1 * r + a2) + a3, poly)
        return torch.where(r < self.rep_cutoff, e, torch.zeros_like(e)).sum(-1)

    def integrals(self, r: torch.Tensor) -> torch.Tensor:
        """(…, P, 20) Hamiltonian (first 10) and overlap (last 10) integrals at distances r (…, P) Bohr."""
        k = torch.minimum(torch.clamp(torch.floor(r / self.dr).long() - 1, min=0), self.k_max)
        x = (r - (k + 1).to(r.dtype) * self.dr).unsqueeze(-1)
        c = self.coef[self.base + k]  # (…, P, 4, 20)
        inside = ((c[..., 0, :] * x + c[..., 1, :]) * x + c[..., 2, :]) * x + c[..., 3, :]
        tt = (r - self.r_max).clamp(min=0.0, max=TAIL_BOHR).unsqueeze(-1)
        a, b, cc = self.tail
        tail = (1.0 - tt / TAIL_BOHR) ** 3 * (a + tt * (b + cc * tt))
        return torch.where((r <= self.r_max).unsqueeze(-1), inside, tail)


@dataclass
class DFTBParameters:
    """A parameter set: species constants and pair tables, created lazily per element."""

    name: str
    directory: Path
    third_order: bool
    zeta: float | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64
    _species: dict[int, Species] = field(default_factory=dict, repr=False)
    _pairs: dict[tuple[int, int], TorchPair] = field(default_factory=dict, repr=False)
    _raw: dict[tuple[int, int], SKTable] = field(default_factory=dict, repr=False)

    def _lmax(self, z: int) -> int:
        table = _LMAX_3OB if self.name.startswith("3ob") else _LMAX_MIO
        if z not in table:
            raise MissingParametersError(
                f"element {symbol(z)} is not in the {self.name} parameter set "
                f"(elements: {', '.join(symbol(k) for k in sorted(table))})"
            )
        return table[z]

    def raw(self, za: int, zb: int) -> SKTable:
        key = (za, zb)
        if key not in self._raw:
            path = self.directory / f"{symbol(za)}-{symbol(zb)}.skf"
            if not path.exists() and Path(str(path) + ".gz").exists():
                path = Path(str(path) + ".gz")
            if not path.exists():
                raise MissingParametersError(
                    f"no Slater-Koster file {path.name} in {self.directory}: the pair "
                    f"{symbol(za)}-{symbol(zb)} is not covered by {self.name}"
                )
            self._raw[key] = read_skf(path, homonuclear=za == zb)
        return self._raw[key]

    def species(self, z: int) -> Species:
        if z not in self._species:
            lmax = self._lmax(z)
            tab = self.raw(z, z)
            assert tab.onsite is not None and tab.hubbard is not None and tab.occupation is not None
            ud = _HUBBARD_DERIV_3OB.get(z, 0.0) if self.third_order else 0.0
            self._species[z] = Species(
                z=z,
                lmax=lmax,
                onsite=tab.onsite[: lmax + 1],
                hubbard=tab.hubbard[0],
                hubbard_deriv=ud,
                n_valence=float(sum(tab.occupation[: lmax + 1])),
            )
        return self._species[z]

    def pair(self, za: int, zb: int) -> TorchPair:
        key = (za, zb)
        if key not in self._pairs:
            self._pairs[key] = TorchPair(self.raw(za, zb), self.device, self.dtype)
        return self._pairs[key]

    def check_elements(self, numbers: list[int]) -> None:
        """Raise MissingParametersError unless every element and element pair is covered."""
        zs = sorted(set(numbers))
        for za in zs:
            self._lmax(za)
        for za in zs:
            self.species(za)
            for zb in zs:
                self.raw(za, zb)


def load_parameters(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
) -> DFTBParameters:
    """Parameter set "3ob" (DFTB3: third order, zeta = 4.0) or "mio" (DFTB2)."""
    d = parameter_dir(name)
    if name == "3ob":
        return DFTBParameters("3ob-3-1", d, third_order=True, zeta=4.0, device=torch.device(device), dtype=dtype)
    return DFTBParameters("mio-1-1", d, third_order=False, zeta=None, device=torch.device(device), dtype=dtype)

"""Second- and third-order charge kernels of SCC-DFTB (atomic units).

gamma_AB(r) = 1/r - S(r; U_A, U_B) h_AB(r): the Coulomb interaction of two exponential charge
densities whose widths follow the Hubbard parameters (tau = 16/5 U). For DFTB3 (3ob) pairs with a
hydrogen atom, h = exp(-((U_A + U_B)/2)^zeta r^2) (gamma^h); otherwise h = 1. gamma_AA = U_A.

Gamma_AB = U^d_A dgamma_AB/dU_A (third order), following DFTB+ ``thirdorder.F90``: for two atoms
of one element (U_A = U_B) the derivative of the equal-U formula is taken along U_A = U_B, and
the H-damping contributes its own U derivative. Gamma_AA = U^d_A / 2. The U derivatives are taken
by central differences (step 1e-5 Hartree), accurate to ~1e-10 and differentiable in r.
"""

from __future__ import annotations

import torch

__all__ = ["EQUAL_U", "gamma_offdiag", "short_range", "third_order_offdiag"]

#: two Hubbard parameters closer than this (Hartree) use the equal-U formula (as DFTB+)
EQUAL_U = 0.3125e-5
_DU = 1e-5


def short_range(r: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor, equal: torch.Tensor) -> torch.Tensor:
    """S(r; U_A, U_B) for r > 0 (…); ``equal`` (…) bool selects the equal-U formula."""
    ta, tb = 3.2 * ua, 3.2 * ub
    t = 0.5 * (ta + tb)
    s_eq = torch.exp(-t * r) * (1.0 / r + 11.0 / 16.0 * t + 3.0 / 16.0 * t * t * r + t**3 * r * r / 48.0)
    # unequal formula; guard the denominators of equal pairs (their value is discarded)
    d2 = torch.where(equal, torch.ones_like(ta), ta * ta - tb * tb)

    def part(a: torch.Tensor, b: torch.Tensor, sgn: float) -> torch.Tensor:
        dd = sgn * d2  # a^2 - b^2
        return torch.exp(-a * r) * (b**4 * a / (2.0 * dd * dd) - (b**6 - 3.0 * b**4 * a * a) / (dd**3 * r))

    s_ne = part(ta, tb, 1.0) + part(tb, ta, -1.0)
    return torch.where(equal, s_eq, s_ne)


def _damping(
    r: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor, hpair: torch.Tensor, zeta: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_AB(r) and dh/dU_A (…)."""
    if zeta is None:
        one = torch.ones_like(r)
        return one, torch.zeros_like(r)
    u = 0.5 * (ua + ub)
    h = torch.exp(-(u**zeta) * r * r)
    dh = -0.5 * zeta * r * r * u ** (zeta - 1.0) * h
    return torch.where(hpair, h, torch.ones_like(h)), torch.where(hpair, dh, torch.zeros_like(dh))


def gamma_offdiag(
    r: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor, hpair: torch.Tensor, zeta: float | None
) -> torch.Tensor:
    """gamma_AB for distinct atoms at distance r > 0 (…)."""
    equal = (ua - ub).abs() < EQUAL_U
    h, _ = _damping(r, ua, ub, hpair, zeta)
    return 1.0 / r - short_range(r, ua, ub, equal) * h


def third_order_offdiag(
    r: torch.Tensor, ua: torch.Tensor, ub: torch.Tensor, uda: torch.Tensor, hpair: torch.Tensor, zeta: float | None
) -> torch.Tensor:
    """Gamma_AB = U^d_A dgamma_AB/dU_A for distinct atoms (…); not symmetric in A, B."""
    equal = (ua - ub).abs() < EQUAL_U
    ub_p = torch.where(equal, ub + _DU, ub)
    ub_m = torch.where(equal, ub - _DU, ub)
    ds = (short_range(r, ua + _DU, ub_p, equal) - short_range(r, ua - _DU, ub_m, equal)) / (2.0 * _DU)
    h, dh = _damping(r, ua, ub, hpair, zeta)
    return uda * (-ds * h - short_range(r, ua, ub, equal) * dh)

"""Second- and third-order charge kernels of SCC-DFTB (atomic units).

gamma_AB(r) = 1/r - S(r; U_A, U_B) h_AB(r): the Coulomb interaction of two exponential charge
densities whose widths follow the Hubbard parameters (tau = 16/5 U). For DFTB3 (3ob) pairs with a
hydrogen atom, h = exp(-((U_A + U_B)/2)^zeta r^2) (gamma^h); otherwise h = 1. gamma_AA = U_A.

Gamma_AB = U^d_A dgamma_AB/dU_A (third order), following DFTB+ ``thirdorder.F90``: for two atoms
of one element (U_A = U_B) the derivative of the equal-U formula is taken along U_A = U_B, and
the H-damping contributes its own U derivative. Gamma_AA = U^d_A / 2. The U derivatives are
analytic (tests/test_dftb.py checks them against autograd and against central differences).
"""

from __future__ import annotations

import torch

__all__ = ["EQUAL_U", "charge_kernels"]

#: two Hubbard parameters closer than this (Hartree) use the equal-U formula (as DFTB+)
EQUAL_U = 0.3125e-5


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


def _unequal_part(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """f(a, b) = exp(-a r) (b^4 a / (2 D^2) - (b^6 - 3 b^4 a^2) / (D^3 r)), D = a^2 - b^2 (one half of the
    unequal-U short-range term, S = f(ta, tb) + f(tb, ta)), and its derivatives df/da, df/db."""
    D = a * a - b * b
    e = torch.exp(-a * r)
    b2 = b * b
    b4 = b2 * b2
    num = b4 * b2 - 3.0 * b4 * a * a
    D2 = D * D
    D3 = D2 * D
    D4 = D2 * D2
    f = e * (b4 * a / (2.0 * D2) - num / (D3 * r))
    g1a = 0.5 * b4 * (1.0 / D2 - 4.0 * a * a / D3)
    g2a = (-6.0 * b4 * a / D3 - 6.0 * a * num / D4) / r
    g1b = 2.0 * a * b2 * b / D2 + 2.0 * a * b4 * b / D3
    g2b = ((6.0 * b4 * b - 12.0 * b2 * b * a * a) / D3 + 6.0 * b * num / D4) / r
    return f, e * (g1a - g2a) - r * f, e * (g1b - g2b)


def charge_kernels(
    r: torch.Tensor,
    ua: torch.Tensor,
    ub: torch.Tensor,
    uda: torch.Tensor,
    udb: torch.Tensor,
    hpair: torch.Tensor,
    zeta: float | None,
    third_order: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """gamma_AB, Gamma_AB and Gamma_BA (…) for distinct atoms at distance r > 0 from one evaluation of the
    short-range term S(r; U_A, U_B) and its analytic U derivatives. Gammas are None without ``third_order``.

    Equal U (|U_A - U_B| < EQUAL_U): S(t), t = 3.2 (U_A + U_B) / 2, differentiated along U_A = U_B as
    DFTB+ does, dS/dU = 3.2 dS/dt with dS/dt = -r S + exp(-t r) (11/16 + 3/8 t r + t^2 r^2 / 16).
    """
    equal = (ua - ub).abs() < EQUAL_U
    ta, tb = 3.2 * ua, 3.2 * ub
    t = 0.5 * (ta + tb)
    et = torch.exp(-t * r)
    s_eq = et * (1.0 / r + 11.0 / 16.0 * t + 3.0 / 16.0 * t * t * r + t**3 * r * r / 48.0)
    # unequal formula; equal pairs get a harmless stand-in (their values are discarded)
    tb_safe = torch.where(equal, 0.5 * ta, tb)
    f_ab, fa_ab, fb_ab = _unequal_part(r, ta, tb_safe)
    f_ba, fa_ba, fb_ba = _unequal_part(r, tb_safe, ta)
    S = torch.where(equal, s_eq, f_ab + f_ba)
    h, dh = _damping(r, ua, ub, hpair, zeta)
    g = 1.0 / r - S * h
    if not third_order:
        return g, None, None
    ds_eq = 3.2 * (-r * s_eq + et * (11.0 / 16.0 + 3.0 / 8.0 * t * r + t * t * r * r / 16.0))
    dsa = torch.where(equal, ds_eq, 3.2 * (fa_ab + fb_ba))
    dsb = torch.where(equal, ds_eq, 3.2 * (fb_ab + fa_ba))
    return g, uda * (-dsa * h - S * dh), udb * (-dsb * h - S * dh)

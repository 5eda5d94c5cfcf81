"""Slater-Koster transformation: two-centre blocks in the molecular frame from bond-frame integrals.

Real spherical harmonics in DFTB+ order, m = -l..l: s; p = (y, z, x); d = (xy, yz,
(3z^2 - r^2) / (2 sqrt 3), xz, (x^2 - y^2) / 2). In the bond frame (bond along z) orbitals of the
same signed m couple, with the sigma (|m| = 0), pi (1) and delta (2) integrals of the tables.
A rotation R with R e_z = u (bond direction) gives Y_l(R^T r) = D^l Y_l(r); the block in the
molecular frame is (D^l1)^T L D^l2, with L the bond-frame block. The result does not depend on the
rotation about u, so the frame is built from whichever helper axis is less parallel to u; it is
smooth wherever it is used, and so are its derivatives (autograd gives exact forces).
"""

from __future__ import annotations

import math

import torch

__all__ = ["real_sh_rotations", "rotation_to_bond", "sk_blocks"]

_PERM = [1, 2, 0]  # (x, y, z) -> (y, z, x)


def _d_basis(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(5, 3, 3) symmetric matrices M_k with Y_2k(r) = r^T M_k r on the unit sphere."""
    s3 = 1.0 / (2.0 * math.sqrt(3.0))
    m = torch.zeros(5, 3, 3, dtype=dtype, device=device)
    m[0, 0, 1] = m[0, 1, 0] = 0.5  # xy
    m[1, 1, 2] = m[1, 2, 1] = 0.5  # yz
    m[2] = torch.diag(torch.tensor([-s3, -s3, 2 * s3], dtype=dtype, device=device))  # (3z^2 - r^2)/(2 sqrt 3)
    m[3, 0, 2] = m[3, 2, 0] = 0.5  # xz
    m[4, 0, 0], m[4, 1, 1] = 0.5, -0.5  # (x^2 - y^2)/2
    return m


def rotation_to_bond(u: torch.Tensor) -> torch.Tensor:
    """(…, 3, 3) rotation matrices R (columns e1, e2, u) with R e_z = u, for unit vectors u (…, 3)."""
    ez = torch.zeros_like(u)
    ez[..., 2] = 1.0
    ex = torch.zeros_like(u)
    ex[..., 0] = 1.0
    helper = torch.where((u[..., 2].abs() < 0.9).unsqueeze(-1), ez, ex)
    e1 = torch.linalg.cross(helper, u, dim=-1)
    e1 = e1 / torch.linalg.norm(e1, dim=-1, keepdim=True)
    e2 = torch.linalg.cross(u, e1, dim=-1)
    return torch.stack([e1, e2, u], dim=-1)


def real_sh_rotations(u: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """[D^0 (…,1,1), D^1 (…,3,3), D^2 (…,5,5)] up to ``lmax`` for bond directions u (…, 3)."""
    shape = u.shape[:-1]
    out = [torch.ones(*shape, 1, 1, dtype=u.dtype, device=u.device)]
    if lmax == 0:
        return out
    R = rotation_to_bond(u)
    Rt = R.transpose(-1, -2)
    out.append(Rt[..., _PERM, :][..., :, _PERM])
    if lmax >= 2:
        M = _d_basis(u.dtype, u.device)
        RMRt = torch.einsum("...ij,kjl,...ml->...kim", R, M, R)  # R M_k R^T
        out.append(2.0 * torch.einsum("...kij,aij->...ka", RMRt, M))
    return out


def sk_blocks(l1: int, l2: int, D: list[torch.Tensor], v_ab: torch.Tensor, v_ba: torch.Tensor) -> torch.Tensor:
    """Hamiltonian and overlap blocks (…, 2, 2l1+1, 2l2+1) between shell l1 of atom A and shell l2 of atom B
    (index 0 of the third-last axis: Hamiltonian; 1: overlap).

    Args:
        D: rotation matrices from :func:`real_sh_rotations` for the direction A -> B.
        v_ab: (…, 20) integrals of table A-B; v_ba: (…, 20) of table B-A (same distances).
    """
    from qmlmm.engines.dftb.skf import COLUMN

    lo = min(l1, l2)
    if l1 <= l2:
        cols, v, sign = [COLUMN[(l1, l2, abs(m))] for m in range(-lo, lo + 1)], v_ab, 1.0
    else:
        cols, v, sign = [COLUMN[(l2, l1, abs(m))] for m in range(-lo, lo + 1)], v_ba, (-1.0) ** (l1 + l2)
    V = v[..., cols + [c + 10 for c in cols]].unflatten(-1, (2, 2 * lo + 1))  # (…, 2, 2lo+1)
    if sign != 1.0:
        V = sign * V
    A = D[l1][..., [m + l1 for m in range(-lo, lo + 1)], :]  # (…, 2lo+1, 2l1+1)
    B = D[l2][..., [m + l2 for m in range(-lo, lo + 1)], :]  # (…, 2lo+1, 2l2+1)
    return torch.einsum("...ma,...hm,...mb->...hab", A, V, B)

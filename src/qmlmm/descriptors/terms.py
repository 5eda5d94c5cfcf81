"""The descriptor's terms, one small module each: QM radial, QM angular, MM radial, long range, MM angular.

A term maps the batch's shared neighbour lists (:class:`Neighbours`, built once by
:class:`qmlmm.descriptors.acsf.ACSF`) to its block of features (Nq, size) and names its columns. The
equations are in each class's docstring; distances in nm, charges in e, f_c the cosine cutoff
(:func:`qmlmm.descriptors.cutoffs.cosine_cutoff`). Every term is invariant to rotation, translation and
permutation of like atoms, and each MM atom enters only through its charge and position.

To add a term: a subclass of :class:`Term` here (its settings in ``DescriptorConfig``), appended to the
list in ``ACSF.__init__`` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.descriptors.cutoffs import cosine_cutoff
from qmlmm.descriptors.neighbors import padded_slots, triples_from_pairs
from qmlmm.descriptors.qm_mm import QMMMBlock, potential_and_field

__all__ = [
    "MM_CHANNELS",
    "LongRange",
    "MMAngular",
    "MMRadial",
    "Neighbours",
    "QMAngular",
    "QMRadial",
    "Term",
    "charge_channels",
]


@dataclass
class Neighbours:
    """What the terms of one batch share (built once by ``ACSF``).

    Attributes:
        b: the batch; sp (Nq,) element index 0..E-1 of every QM atom; q (Nm,) the (switched) MM charges, e.
        i, j (P,), dvec (P, 3) = r_j - r_i, r (P,): QM pairs within the QM radial cutoff, sorted by i;
            fc (P,) f_c(r) with that cutoff.
        ai, aj, ad, ar: the subset within the QM angular cutoff.
        mi, mj (M,), mvec (M, 3) = r_i - r_J, mr (M,): QM-MM pairs within the longest short-range MM cutoff.
        blocks: the batch's padded QM-MM distances (:mod:`qmlmm.descriptors.qm_mm`), or None where nothing
            made them (the pair lists by the compiled kernel; a term that needs them makes them).
        potential, field: set by :class:`LongRange` (undamped): the exact potential (Nq,) in e/nm and field
            (Nq, 3) in e/nm^2 of the charges at the QM atoms, which the model's electrostatic terms reuse.
    """

    b: FrameBatch
    sp: torch.Tensor
    q: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    dvec: torch.Tensor
    r: torch.Tensor
    fc: torch.Tensor
    ai: torch.Tensor
    aj: torch.Tensor
    ad: torch.Tensor
    ar: torch.Tensor
    mi: torch.Tensor
    mj: torch.Tensor
    mvec: torch.Tensor
    mr: torch.Tensor
    blocks: QMMMBlock | None
    potential: torch.Tensor | None = None
    field: torch.Tensor | None = None

    @property
    def nq(self) -> int:
        return len(self.sp)

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.b.qm_pos.dtype, device=self.b.qm_pos.device)


def _zeta_lambda(zetas: list[float]) -> list[tuple[float, float]]:
    """The (zeta, lambda) pairs of the angular terms, lambda = +1 and -1 for each zeta."""
    return [(float(z), lam) for z in zetas for lam in (1.0, -1.0)]


def _power(x: torch.Tensor, z: float) -> torch.Tensor:
    """x**z for x >= 0: by repeated squaring for a whole z up to 16 (cheaper than pow, forward and
    backward, and exact to rounding), else torch's pow."""
    if z != int(z) or not 1 <= z <= 16:
        return x**z
    n, out, sq = int(z), None, x
    while n:
        if n & 1:
            out = sq if out is None else out * sq
        n >>= 1
        if n:
            sq = sq * sq
    assert out is not None
    return out


def use_native(term: nn.Module, zl: list[tuple[float, float]], device: torch.device) -> bool:
    """Whether a term (or the descriptor, for its pair lists) takes its compiled kernel
    (:mod:`qmlmm.descriptors.native`): in eval mode on the CPU (``device``: the batch's), with the module's
    ``native`` on (the default), zetas >= 1 and sizes within the kernels' limits, where the kernels build.
    Training keeps torch's form, whose second derivatives the force loss needs."""
    if term.training or not getattr(term, "native", False) or device.type != "cpu":
        return False
    shifts = getattr(term, "shifts", None)
    n_shifts = 0 if shifts is None else len(shifts)
    if min((z for z, _ in zl), default=1.0) < 1 or len(zl) > 16 or n_shifts > 32:  # angular.cpp's limits
        return False
    from qmlmm.descriptors.native import native_available

    return native_available()


class Term(nn.Module):
    """A block of features: ``size`` columns named by ``feature_names``."""

    name: str = ""
    size: int = 0
    shifts: torch.Tensor

    def _set_shifts(self, shifts: list[float]) -> None:
        """The radial shifts R_s (nm) as a buffer, and as the configured numbers for the feature names
        (not their float32 roundings)."""
        self.register_buffer("shifts", torch.tensor(shifts), persistent=False)
        self.shift_values = [float(x) for x in shifts]

    def forward(self, nb: Neighbours) -> torch.Tensor:  # pragma: no cover - interface
        """(Nq, size) features of every QM atom."""
        raise NotImplementedError

    def feature_names(self, symbols: list[str]) -> list[str]:  # pragma: no cover - interface
        """Names of the ``size`` columns (``symbols``: the element symbols, in element-index order)."""
        raise NotImplementedError


class QMRadial(Term):
    """Per neighbour element e: G2 = sum_{j in e} exp(-(r_ij - R_s)^2 / (2 w^2)) f_c(r_ij), r_c ~0.6 nm."""

    name = "qm_radial"

    def __init__(self, shifts: list[float], width: float, n_el: int) -> None:
        super().__init__()
        self._set_shifts(shifts)
        self.width, self.n_el = width, n_el
        self.size = n_el * len(shifts)

    def forward(self, nb: Neighbours) -> torch.Tensor:
        g = torch.exp(-((nb.r[:, None] - self.shifts) ** 2) / (2 * self.width**2)) * nb.fc[:, None]
        rad = nb.zeros(nb.nq, self.n_el, len(self.shifts)).index_put((nb.i, nb.sp[nb.j]), g, accumulate=True)
        return rad.reshape(nb.nq, -1)

    def feature_names(self, symbols: list[str]) -> list[str]:
        return [f"G2[{e}] Rs={x:.2f}" for e in symbols for x in self.shift_values]


class QMAngular(Term):
    """Per unordered element pair (e1, e2): Behler G4 with a radial shift, r_c ~0.4 nm,
    sum_{j<k} 2^(1-zeta) (1 + lambda cos theta_jik)^zeta exp(-((r_ij + r_ik)/2 - R_s)^2 / (2 w^2))
    f_c(r_ij) f_c(r_ik)."""

    name = "qm_angular"
    pair_index: torch.Tensor

    def __init__(self, shifts: list[float], width: float, cutoff: float, zetas: list[float], n_el: int) -> None:
        super().__init__()
        zl = _zeta_lambda(zetas)
        self._set_shifts(shifts)
        self.pairs = [(a, b) for a in range(n_el) for b in range(a, n_el)]
        pidx = torch.full((n_el, n_el), -1, dtype=torch.long)
        for k, (a, b) in enumerate(self.pairs):
            pidx[a, b] = pidx[b, a] = k
        self.register_buffer("pair_index", pidx, persistent=False)
        self.width, self.cutoff, self.zl = width, cutoff, zl
        self.n_ang = len(zl) * len(shifts)
        self.size = len(self.pairs) * self.n_ang
        self.native = True  # the compiled kernel where it can run (use_native); False: torch's form always

    def forward(self, nb: Neighbours) -> torch.Tensor:
        ai, aj, ad, ar = nb.ai, nb.aj, nb.ad, nb.ar
        if use_native(self, self.zl, nb.b.qm_pos.device):
            from qmlmm.descriptors.native import qm_angular

            if len(ai) == 0:
                return nb.zeros(nb.nq, self.size)
            n_pairs = len(self.pairs)
            out = qm_angular(
                ai, nb.sp[aj], ad, self.pair_index, n_pairs, nb.nq, self.shifts, self.zl, self.width, self.cutoff
            )
            return out.reshape(nb.nq, -1)
        p, s = triples_from_pairs(ai, aj)
        if len(p) == 0:
            return nb.zeros(nb.nq, self.size)
        u, fc = ad / ar[:, None], cosine_cutoff(ar, self.cutoff)  # per pair, then read per triple
        cos_t = (u[p] * u[s]).sum(-1)
        norm = [2.0 ** (1.0 - z) for z, _ in self.zl]
        base = {lam: (1.0 + lam * cos_t).clamp(min=0.0) for lam in (1.0, -1.0)}
        a = torch.stack([c * _power(base[lam], z) for c, (z, lam) in zip(norm, self.zl, strict=True)], -1)
        x = (0.5 * (ar[p] + ar[s]))[:, None] - self.shifts
        rad = torch.exp(x * x * (-0.5 / self.width**2)) * (fc[p] * fc[s])[:, None]  # (T, ns)
        t = (a[:, :, None] * rad[:, None, :]).reshape(len(p), -1)  # (T, nzl ns)
        row = ai[p] * len(self.pairs) + self.pair_index[nb.sp[aj[p]], nb.sp[aj[s]]]
        return nb.zeros(nb.nq * len(self.pairs), self.n_ang).index_add(0, row, t).reshape(nb.nq, -1)

    def feature_names(self, symbols: list[str]) -> list[str]:
        return [
            f"G4[{symbols[a]}{symbols[b]}] z={z:g} l={int(lam):+d} Rs={x:.2f}"
            for a, b in self.pairs
            for z, lam in self.zl
            for x in self.shift_values
        ]


#: how the short-range MM terms weight the MM atoms: by their charge (one channel), or by their positive and
#: their negative charges separately (two channels: for water, the H and the O atoms)
MM_CHANNELS = ("charge", "sign")


def charge_channels(q: torch.Tensor, channels: str) -> torch.Tensor:
    """(..., C) weights of MM atoms with charges ``q`` (...): C = 1, q itself ("charge"), or C = 2, its
    positive and its negative part ("sign"; they add up to q)."""
    if channels == "sign":
        return torch.stack([q.clamp(min=0.0), q.clamp(max=0.0)], dim=-1)
    return q[..., None]


def _channel_names(channels: str) -> list[str]:
    return ["MM+", "MM-"] if channels == "sign" else ["MM"]


class MMRadial(Term):
    """Charge-weighted near field: sum_J q_J exp(-(r_iJ - R_s)^2 / (2 w^2)) f_c(r_iJ), r_c ~0.8 nm (the
    first solvation shells: hydrogen bonds, close contacts); with ``channels`` "sign" once over the
    positive and once over the negative charges (:func:`charge_channels`), so that opposite charges of one
    molecule do not cancel."""

    name = "mm_radial"

    def __init__(self, shifts: list[float], width: float, cutoff: float, channels: str = "charge") -> None:
        super().__init__()
        self._set_shifts(shifts)
        self.width, self.cutoff, self.channels = width, cutoff, channels
        self.n_ch = len(_channel_names(channels))
        self.size = self.n_ch * len(shifts)
        self.native = True  # the compiled kernel where it can run (use_native); False: torch's form always

    def forward(self, nb: Neighbours) -> torch.Tensor:
        if use_native(self, [], nb.b.qm_pos.device):
            from qmlmm.descriptors.native import mm_radial

            w = charge_channels(nb.q[nb.mj], self.channels)
            return mm_radial(nb.mi, nb.mr, w, nb.nq, self.shifts, self.width, self.cutoff)
        k = nb.mr < self.cutoff
        rr = nb.mr[k]
        w = cosine_cutoff(rr, self.cutoff)[:, None] * charge_channels(nb.q[nb.mj[k]], self.channels)  # (P, C)
        g = torch.exp(-((rr[:, None] - self.shifts) ** 2) / (2 * self.width**2))[:, None, :] * w[:, :, None]
        return nb.zeros(nb.nq, self.size).index_add(0, nb.mi[k], g.reshape(len(rr), self.size))

    def feature_names(self, symbols: list[str]) -> list[str]:
        return [f"{c} G2 Rs={x:.2f}" for c in _channel_names(self.channels) for x in self.shift_values]


class LongRange(Term):
    """Every embedded charge: the potential phi_i = sum_J q_J / r_iJ, the field magnitude |E_i| (with
    E_i = sum_J q_J (r_i - r_J) / r_iJ^3, made differentiable at E = 0 by ``epsilon``) and the field
    projected on the molecule, per element e: sum_{j in e} (E_i . u_ij) f_c(r_ij) (u_ij the unit vector
    i -> j, QM radial cutoff).

    The charges are the embedding's switched ones, so these are the exact potential and field the labels'
    QM region feels (the labels couple to every embedded charge by 1/r). Beyond the first shells the
    environment acts through these multipole couplings, which cost a few operations per pair instead of
    one Gaussian per shift. ``damped`` (models made before): both damped by a cosine cutoff from r = 0
    (weight 0.39 at 0.8 nm, 0.05 at 1.2 nm of a 1.4 nm cutoff), which could not represent the 1/r
    coupling."""

    name = "long_range"

    def __init__(self, n_el: int, epsilon: float, damped: bool, damped_cutoff: float) -> None:
        super().__init__()
        self.n_el, self.epsilon = n_el, epsilon
        self.damped, self.damped_cutoff = damped, damped_cutoff
        self.size = 2 + n_el
        self.native = True  # the exact potential and field by the compiled kernel where it can run (use_native)

    def forward(self, nb: Neighbours) -> torch.Tensor:
        if self.damped:
            w = cosine_cutoff(nb.mr, self.damped_cutoff) * nb.q[nb.mj]
            phi = nb.zeros(nb.nq).index_add(0, nb.mi, w / nb.mr)
            field = nb.zeros(nb.nq, 3).index_add(0, nb.mi, nb.mvec * (w / nb.mr**3)[:, None])
        elif use_native(self, [], nb.b.qm_pos.device):
            from qmlmm.descriptors import native

            b = nb.b
            phi, field = native.potential_and_field(b.qm_pos, b.qm_frame, b.mm_pos, b.mm_frame, nb.q, b.n_frames)
            nb.potential, nb.field = phi, field
        else:
            phi, field = potential_and_field(nb.b, nb.q, nb.blocks)
            nb.potential, nb.field = phi, field
        emag = torch.sqrt((field * field).sum(-1) + self.epsilon**2)
        proj = (field[nb.i] * nb.dvec).sum(-1) / nb.r * nb.fc  # E_i . u_ij f_c (QM radial cutoff)
        eproj = nb.zeros(nb.nq, self.n_el).index_put((nb.i, nb.sp[nb.j]), proj, accumulate=True)
        return torch.cat([phi[:, None], emag[:, None], eproj], dim=1)

    def feature_names(self, symbols: list[str]) -> list[str]:
        return ["MM potential", "MM |field|"] + [f"MM field . u[{e}]" for e in symbols]


class MMAngular(Term):
    """Charge-weighted, short range, per element e of a QM neighbour j (QM angular cutoff) and MM atoms K
    (~0.6 nm): sum_{j in e, K} q_K 2^(1-zeta) (1 + lambda cos theta_jiK)^zeta
    exp(-((r_ij + r_iK)/2 - R_s)^2 / (2 w^2)) f_c(r_ij) f_c(r_iK).

    Evaluated per QM pair (i, j) as dense blocks: each centre's MM neighbours are laid out in padded slots
    (nq, K), read once per pair (P, K), so the angles of all K of a pair are one batched matrix product
    and the sum over K one more (nzl, K) x (K, C n_shift) product per pair: no (j, K) triple list, whose
    gathers and scatters cost ~20 ms of a 45 ms model call on retinoic acid in water (50 QM atoms, 48000
    triples), and no padding of each centre's QM neighbours j (a per-centre (nq, J, K) block, J the
    largest count, had ~2x the entries: retinoic acid's centres have 15 such neighbours on average, 28 at
    most). Padded slots carry zero weight, so they add exactly nothing. With ``channels`` "sign",
    once over the positive and once over the negative charges q_K (:func:`charge_channels`)."""

    name = "mm_angular"
    zetas: torch.Tensor

    def __init__(
        self,
        shifts: list[float],
        width: float,
        cutoff: float,
        qm_cutoff: float,
        zetas: list[float],
        n_el: int,
        channels: str = "charge",
    ) -> None:
        super().__init__()
        self.zl = _zeta_lambda(zetas)
        self._set_shifts(shifts)
        self.register_buffer("zetas", torch.tensor([z for z, _ in self.zl]), persistent=False)
        self.width, self.cutoff, self.qm_cutoff, self.n_el = width, cutoff, qm_cutoff, n_el
        self.channels, self.n_ch = channels, len(_channel_names(channels))
        self.size = n_el * len(self.zl) * self.n_ch * len(shifts)
        self.native = True  # the compiled kernel where it can run (use_native); False: torch's form always

    def forward(self, nb: Neighbours) -> torch.Tensor:
        nq = nb.nq
        km = nb.mr < self.cutoff
        ci, cvec, cr, cq = nb.mi[km], -nb.mvec[km], nb.mr[km], nb.q[nb.mj[km]]  # vectors i -> K
        ai, ar = nb.ai, nb.ar
        if len(ai) == 0 or len(ci) == 0:
            return nb.zeros(nq, self.size)
        if use_native(self, self.zl, nb.b.qm_pos.device):
            from qmlmm.descriptors.native import mm_angular

            out = mm_angular(
                ai,
                ai * self.n_el + nb.sp[nb.aj],
                nb.ad,
                ci,
                cvec,
                charge_channels(cq, self.channels),
                nq,
                nq * self.n_el,
                self.shifts,
                self.zl,
                self.width,
                self.cutoff,
                self.qm_cutoff,
            )
            return out.reshape(nq, -1)
        # each centre's MM neighbours K in padded slots (nq, K), then read once per QM pair (i, j): (P, K)
        sk, nk = padded_slots(ci, nq)
        uk = nb.zeros(nq, nk, 3).index_put((ci, sk), cvec / cr[:, None])[ai]  # (P, K, 3)
        rk = nb.zeros(nq, nk).index_put((ci, sk), cr)[ai]  # (P, K)
        wc = cosine_cutoff(cr, self.cutoff)[:, None] * charge_channels(cq, self.channels)  # (pairs, C)
        wk = nb.zeros(nq, nk, self.n_ch).index_put((ci, sk), wc)[ai]  # (P, K, C); padding slots 0
        uj = nb.ad / ar[:, None]
        # cos theta_jiK component by component (a batched (K, 3) x (3, 1) product per pair is slower)
        cos_t = (uk[..., 0] * uj[:, 0, None] + uk[..., 1] * uj[:, 1, None] + uk[..., 2] * uj[:, 2, None]).clamp(
            -1.0, 1.0
        )
        base = {1.0: 1.0 + cos_t, -1.0: 1.0 - cos_t}
        ang = torch.stack([_power(base[lam], z) for z, lam in self.zl], dim=1)  # (P, nzl, K)
        x = (0.5 * (ar[:, None] + rk))[..., None] - self.shifts  # (P, K, ns)
        rad = torch.exp(x * x * (-0.5 / self.width**2))[:, :, None, :] * wk[..., None]  # (P, K, C, ns)
        # sum over K: (P, nzl, K) x (P, K, C ns); then the 2^(1 - zeta) normalisation and f_c(r_ij)
        per_p = torch.bmm(ang, rad.reshape(len(ai), nk, -1))  # (P, nzl, C ns)
        scale = 2.0 ** (1.0 - self.zetas[None, :, None]) * cosine_cutoff(ar, self.qm_cutoff)[:, None, None]
        per_p = (per_p * scale).reshape(len(ai), -1)
        # sum over the pairs of each centre, by the element of j
        row = ai * self.n_el + nb.sp[nb.aj]
        return nb.zeros(nq * self.n_el, per_p.shape[1]).index_add(0, row, per_p).reshape(nq, -1)

    def feature_names(self, symbols: list[str]) -> list[str]:
        return [
            f"{c} G4[{e}] z={z:g} l={int(lam):+d} Rs={x:.2f}"
            for e in symbols
            for z, lam in self.zl
            for c in _channel_names(self.channels)
            for x in self.shift_values
        ]

"""Atom-centred symmetry functions of QM atoms, with MM charges as one extra element.

Terms for QM atom i (all smooth: cosine cutoffs with zero slope at every cutoff):

- **QM radial** (per neighbour element e): sum_{j in e} exp(-eta (r_ij - R_s)^2) f_c(r_ij), r_c ~0.6 nm.
- **QM angular** (per unordered element pair (e1, e2)): sum_{j<k} 2^(1-zeta) (1 + lambda cos theta_jik)^zeta
  exp(-eta ((r_ij + r_ik)/2 - R_s)^2) f_c(r_ij) f_c(r_ik) (Behler G4 with a radial shift), r_c ~0.4 nm.
- **MM radial** (charge-weighted, near field): sum_J q_J exp(-eta (r_iJ - R_s)^2) f_c(r_iJ), r_c ~0.8 nm
  (the first solvation shells: hydrogen bonds, close contacts).
- **Long range** (every embedded charge): the potential phi_i = sum_J q_J / r_iJ, the field magnitude
  |E_i| with E_i = sum_J q_J (r_i - r_J) / r_iJ^3, and the field projected on the molecule: per element
  e, sum_{j in e} (E_i . u_ij) f_c(r_ij) (u_ij unit vector i -> j, QM radial cutoff). The charges q_J
  are the embedding's switched ones, so these are the exact potential and field the labels' QM region
  feels (no further damping: the labels couple to every embedded charge by 1/r). Beyond the first
  shells the environment acts through these multipole couplings (charge-potential, dipole-field),
  which cost a few operations per pair instead of one Gaussian per shift. Models made before this
  (``long_range_damped``) damped both with a cosine cutoff from r = 0 (weight 0.39 at 0.8 nm, 0.05 at
  1.2 nm of a 1.4 nm cutoff), so they could not represent the 1/r coupling.
- **MM angular** (charge-weighted, short range): per element e of a QM neighbour j,
  sum_{j in e, K} q_K 2^(1-zeta) (1 + lambda cos theta_jiK)^zeta exp(-eta ((r_ij + r_iK)/2 - R_s)^2)
  f_c(r_ij) f_c(r_iK), with the QM angular cutoff for j and ~0.6 nm for K.

Distances in nm. All terms are invariant to rotation, translation and permutation of like atoms,
and each MM atom enters only through its charge and position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.descriptors.cutoffs import cosine_cutoff
from qmlmm.descriptors.neighbors import padded_slots, pairs_within, triples_from_pairs
from qmlmm.descriptors.qm_mm import QMMMBlock, pairs_from_blocks, potential_and_field, qm_mm_blocks

__all__ = ["DescriptorConfig", "ACSF", "potential_and_field"]


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


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * k / max(1, n - 1) for k in range(n)]


@dataclass
class DescriptorConfig:
    """Descriptor parameters (nm). Defaults are justified in docs/model.md."""

    elements: list[int] = field(default_factory=lambda: [1, 6, 7, 8, 16])
    qm_radial_cutoff: float = 0.6
    qm_radial_shifts: list[float] = field(default_factory=lambda: _linspace(0.08, 0.56, 12))
    qm_radial_width: float = 0.045
    qm_angular_cutoff: float = 0.4
    qm_angular_shifts: list[float] = field(default_factory=lambda: [0.1, 0.18, 0.26, 0.34])
    qm_angular_width: float = 0.06
    angular_zetas: list[float] = field(default_factory=lambda: [1.0, 4.0])
    mm_radial_cutoff: float = 0.8
    mm_radial_shifts: list[float] = field(default_factory=lambda: _linspace(0.15, 0.75, 10))
    mm_radial_width: float = 0.07
    long_range: bool = True
    long_range_cutoff: float = 1.4  # used only by long_range_damped descriptors
    long_range_damped: bool = False  # True: the old cosine-damped potential/field (model files from before)
    mm_angular_cutoff: float = 0.6
    mm_angular_shifts: list[float] = field(default_factory=lambda: [0.2, 0.35, 0.5])
    mm_angular_width: float = 0.1
    field_epsilon: float = 1e-3  # e/nm^2, keeps |E| differentiable at E = 0

    def __post_init__(self) -> None:
        from qmlmm.errors import InputError

        for name in ("qm_radial_cutoff", "qm_angular_cutoff", "mm_radial_cutoff", "long_range_cutoff",
                     "mm_angular_cutoff", "qm_radial_width", "qm_angular_width", "mm_radial_width"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                raise InputError(f"descriptor {name} must be a positive number (nm), got {v!r}")
        for name in ("qm_radial_shifts", "qm_angular_shifts", "mm_radial_shifts", "mm_angular_shifts",
                     "angular_zetas", "elements"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, list | tuple) or not v:
                raise InputError(f"descriptor {name} must be a non-empty list, got {v!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> DescriptorConfig:
        """A config from a mapping; an unknown key (a typo in a training YAML) is an error, not dropped."""
        from qmlmm.errors import InputError

        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown descriptor setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)  # type: ignore[arg-type]


class ACSF(nn.Module):
    """Descriptor module: FrameBatch -> (Nq, n_features) features of every QM atom."""

    zmap: torch.Tensor
    pair_index: torch.Tensor
    rs_qm: torch.Tensor
    rs_ang: torch.Tensor
    rs_mm: torch.Tensor
    rs_mma: torch.Tensor
    zetas: torch.Tensor
    lambdas: torch.Tensor

    def __init__(self, cfg: DescriptorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        els = sorted(int(z) for z in cfg.elements)
        self.elements = els
        zmap = torch.full((max(els) + 1,), -1, dtype=torch.long)
        zmap[torch.tensor(els)] = torch.arange(len(els))
        self.register_buffer("zmap", zmap, persistent=False)
        ne = len(els)
        self.n_el = ne
        pairs = [(a, b) for a in range(ne) for b in range(a, ne)]
        pidx = torch.full((ne, ne), -1, dtype=torch.long)
        for k, (a, b) in enumerate(pairs):
            pidx[a, b] = pidx[b, a] = k
        self.register_buffer("pair_index", pidx, persistent=False)
        self.n_pairs = len(pairs)
        self.register_buffer("rs_qm", torch.tensor(cfg.qm_radial_shifts), persistent=False)
        self.register_buffer("rs_ang", torch.tensor(cfg.qm_angular_shifts), persistent=False)
        self.register_buffer("rs_mm", torch.tensor(cfg.mm_radial_shifts), persistent=False)
        self.register_buffer("rs_mma", torch.tensor(cfg.mm_angular_shifts), persistent=False)
        zl = [(z, lam) for z in cfg.angular_zetas for lam in (1.0, -1.0)]
        self.register_buffer("zetas", torch.tensor([z for z, _ in zl]), persistent=False)
        self.register_buffer("lambdas", torch.tensor([lam for _, lam in zl]), persistent=False)
        self.zeta_lambda = [(float(z), float(lam)) for z, lam in zl]
        self.n_rad = len(cfg.qm_radial_shifts)
        self.n_ang = len(zl) * len(cfg.qm_angular_shifts)
        self.n_mm_rad = len(cfg.mm_radial_shifts)
        self.n_mm_ang = len(zl) * len(cfg.mm_angular_shifts)
        self.n_long = (2 + ne) if cfg.long_range else 0
        self.sizes = {
            "qm_radial": ne * self.n_rad,
            "qm_angular": self.n_pairs * self.n_ang,
            "mm_radial": self.n_mm_rad,
            "long_range": self.n_long,
            "mm_angular": ne * self.n_mm_ang,
        }
        self.n_features = sum(self.sizes.values())

    # ---- helpers -------------------------------------------------------------------------------
    def species(self, z: torch.Tensor) -> torch.Tensor:
        """Element index 0..n_el-1 of atomic numbers z; raises for elements the model does not know."""
        if len(z) and (int(z.max()) >= len(self.zmap) or bool((self.zmap[z.clamp(max=len(self.zmap) - 1)] < 0).any())):
            bad = sorted({int(v) for v in z.tolist() if v >= len(self.zmap) or int(self.zmap[v]) < 0})
            from qmlmm.errors import InputError

            raise InputError(f"element(s) {bad} not known to this model (elements {self.elements})")
        return self.zmap[z]

    def _angular(
        self, cos_t: torch.Tensor, rmean: torch.Tensor, fcut: torch.Tensor, shifts: torch.Tensor, width: float
    ) -> torch.Tensor:
        """(T, n_zl * n_shift) angular terms for triples."""
        zet, lam = self.zetas, self.lambdas
        ang = 2.0 ** (1.0 - zet) * (1.0 + lam * cos_t[:, None]).clamp(min=0.0) ** zet  # (T, nzl)
        rad = torch.exp(-((rmean[:, None] - shifts) ** 2) / (2 * width**2))  # (T, ns)
        return (ang[:, :, None] * rad[:, None, :]).reshape(len(cos_t), -1) * fcut[:, None]

    def _mm_angular(
        self,
        nq: int,
        sp: torch.Tensor,
        ai: torch.Tensor,
        aj: torch.Tensor,
        ad: torch.Tensor,
        ar: torch.Tensor,
        cvec: torch.Tensor,
        cr: torch.Tensor,
        ci: torch.Tensor,
        cq: torch.Tensor,
    ) -> torch.Tensor:
        """(nq, n_el * n_mm_ang) QM-MM angular terms (module docstring), per centre as dense blocks.

        QM pairs (ai, aj) with vectors ad (P, 3) and lengths ar (P,) within the angular cutoff, and MM
        pairs (ci, K) with vectors i -> K cvec (M, 3), lengths cr (M,) and switched charges cq (M,), both
        sorted by centre. Each centre's QM and MM neighbours are laid out as padded slots (nq, J, 3) and
        (nq, K, 3), so the angles of all (j, K) of a centre are one batched matrix product and the sum
        over K one more (nq * J, K) x (K, n_shift) product per (zeta, lambda): no (j, K) triple list, whose
        gathers and scatters cost ~20 ms of a 45 ms model call on retinoic acid in water (50 QM atoms,
        48000 triples). Padded slots carry zero weight, so they add exactly nothing.
        """
        cfg = self.cfg
        dt, dev = ar.dtype, ar.device
        out = torch.zeros(nq, self.n_el, len(self.zetas), len(self.rs_mma), dtype=dt, device=dev)
        if len(ai) == 0 or len(ci) == 0:
            return out.reshape(nq, -1)
        sj, nj = padded_slots(ai, nq)
        sk, nk = padded_slots(ci, nq)
        uj = torch.zeros(nq, nj, 3, dtype=dt, device=dev).index_put((ai, sj), ad / ar[:, None])
        rj = torch.zeros(nq, nj, dtype=dt, device=dev).index_put((ai, sj), ar)
        wj = torch.zeros(nq, nj, dtype=dt, device=dev).index_put((ai, sj), cosine_cutoff(ar, cfg.qm_angular_cutoff))
        ej = torch.zeros(nq, nj, self.n_el, dtype=dt, device=dev)
        ej[ai, sj, sp[aj]] = 1.0  # element of neighbour j, one-hot (constant)
        uk = torch.zeros(nq, nk, 3, dtype=dt, device=dev).index_put((ci, sk), cvec / cr[:, None])
        rk = torch.zeros(nq, nk, dtype=dt, device=dev).index_put((ci, sk), cr)
        wk = torch.zeros(nq, nk, dtype=dt, device=dev).index_put(
            (ci, sk), cosine_cutoff(cr, cfg.mm_angular_cutoff) * cq
        )
        cos_t = torch.bmm(uj, uk.transpose(1, 2)).clamp(-1.0, 1.0)  # (nq, J, K)
        base = {1.0: 1.0 + cos_t, -1.0: 1.0 - cos_t}
        ang = torch.stack([_power(base[lam], z) for z, lam in self.zeta_lambda], dim=-1)  # (nq, J, K, nzl)
        x = 0.5 * (rj[:, :, None] + rk[:, None, :])[..., None] - self.rs_mma  # (nq, J, K, ns)
        rad = torch.exp(x * x * (-0.5 / cfg.mm_angular_width**2)) * wk[:, None, :, None]
        # sum over K: (nq J, nzl, K) x (nq J, K, ns); then the 2^(1 - zeta) normalisation and f_c(r_ij)
        per_j = torch.bmm(ang.reshape(nq * nj, nk, -1).transpose(1, 2), rad.reshape(nq * nj, nk, -1))
        per_j = (per_j.reshape(nq, nj, -1, len(self.rs_mma)) * 2.0 ** (1.0 - self.zetas[:, None])).reshape(nq, nj, -1)
        per_j = per_j * wj[:, :, None]  # (nq, J, nzl * ns)
        return torch.bmm(ej.transpose(1, 2), per_j).reshape(nq, -1)  # sum over j by element

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, b: FrameBatch, mm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Features (Nq, n_features). ``mm_weight`` (Nm,) scales the MM charges (smooth switching)."""
        return self.features_and_potential(b, mm_weight)[0]

    def features_and_potential(
        self, b: FrameBatch, mm_weight: torch.Tensor | None = None, blocks: list[QMMMBlock] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (Nq, n_features) and, for undamped long-range terms, the exact potential of the
        embedded (switched) charges at every QM atom, sum_J q_J / r_iJ (Nq,) in e/nm (else None).

        ``blocks``: the batch's dense QM-MM distances (:func:`qmlmm.descriptors.qm_mm.qm_mm_blocks`) when
        the caller has them already (the switching weights need them too); computed here otherwise."""
        cfg = self.cfg
        if blocks is None:
            blocks = qm_mm_blocks(b)
        nq = len(b.qm_z)
        dt, dev = b.qm_pos.dtype, b.qm_pos.device
        sp = self.species(b.qm_z)
        q = b.mm_q if mm_weight is None else b.mm_q * mm_weight
        parts = []

        # QM-QM radial
        i, j = pairs_within(b.qm_pos, b.qm_frame, b.qm_pos, b.qm_frame, cfg.qm_radial_cutoff, exclude_self=True)
        dvec = b.qm_pos[j] - b.qm_pos[i]
        r = torch.linalg.norm(dvec, dim=-1)
        fc = cosine_cutoff(r, cfg.qm_radial_cutoff)
        g = torch.exp(-((r[:, None] - self.rs_qm) ** 2) / (2 * cfg.qm_radial_width**2)) * fc[:, None]
        rad = torch.zeros(nq, self.n_el, self.n_rad, dtype=dt, device=dev)
        rad = rad.index_put((i, sp[j]), g, accumulate=True)
        parts.append(rad.reshape(nq, -1))

        # QM-QM angular (subset of radial pairs within the angular cutoff)
        ka = r < cfg.qm_angular_cutoff
        ai, aj, ad, ar = i[ka], j[ka], dvec[ka], r[ka]
        p, s = triples_from_pairs(ai, aj)
        ang = torch.zeros(nq, self.n_pairs, self.n_ang, dtype=dt, device=dev)
        if len(p):
            cos_t = (ad[p] * ad[s]).sum(-1) / (ar[p] * ar[s])
            fca = cosine_cutoff(ar[p], cfg.qm_angular_cutoff) * cosine_cutoff(ar[s], cfg.qm_angular_cutoff)
            t = self._angular(cos_t, 0.5 * (ar[p] + ar[s]), fca, self.rs_ang, cfg.qm_angular_width)
            ang = ang.index_put((ai[p], self.pair_index[sp[aj[p]], sp[aj[s]]]), t, accumulate=True)
        parts.append(ang.reshape(nq, -1))

        # QM-MM pairs out to the longest MM cutoff; near-field radial terms on the short subset
        damped = cfg.long_range and cfg.long_range_damped
        rc_mm = max(cfg.mm_radial_cutoff, cfg.long_range_cutoff if damped else 0.0, cfg.mm_angular_cutoff)
        mi, mj = pairs_from_blocks(blocks, rc_mm)
        mvec = b.qm_pos[mi] - b.mm_pos[mj]  # from MM atom to QM atom
        mr = torch.linalg.norm(mvec, dim=-1)
        kr = mr < cfg.mm_radial_cutoff
        ri, rr = mi[kr], mr[kr]
        rfc = cosine_cutoff(rr, cfg.mm_radial_cutoff) * q[mj[kr]]
        mg = torch.exp(-((rr[:, None] - self.rs_mm) ** 2) / (2 * cfg.mm_radial_width**2)) * rfc[:, None]
        mrad = torch.zeros(nq, self.n_mm_rad, dtype=dt, device=dev).index_add(0, ri, mg)
        parts.append(mrad)
        phi_exact = None
        if cfg.long_range:
            if damped:
                lfc = cosine_cutoff(mr, cfg.long_range_cutoff) * q[mj]
                phi = torch.zeros(nq, dtype=dt, device=dev).index_add(0, mi, lfc / mr)
                efield = torch.zeros(nq, 3, dtype=dt, device=dev).index_add(0, mi, mvec * (lfc / mr**3)[:, None])
            else:
                phi, efield = potential_and_field(b, q, blocks)
                phi_exact = phi
            emag = torch.sqrt((efield * efield).sum(-1) + cfg.field_epsilon**2)
            proj = (efield[i] * dvec).sum(-1) / r * fc  # E_i . u_ij f_c
            eproj = torch.zeros(nq, self.n_el, dtype=dt, device=dev).index_put((i, sp[j]), proj, accumulate=True)
            parts += [phi[:, None], emag[:, None], eproj]

        # QM-MM angular: centre i, QM neighbour j (angular cutoff), MM atom K (mm angular cutoff)
        km = mr < cfg.mm_angular_cutoff
        mang = self._mm_angular(nq, sp, ai, aj, ad, ar, -mvec[km], mr[km], mi[km], q[mj[km]])
        parts.append(mang)
        return torch.cat(parts, dim=1), phi_exact

    def feature_names(self) -> list[str]:
        """Human-readable name of every feature column."""
        from qmlmm.elements import symbol

        names: list[str] = []
        syms = [symbol(z) for z in self.elements]
        for e in syms:
            names += [f"G2[{e}] Rs={x:.2f}" for x in self.cfg.qm_radial_shifts]
        pairs = [(a, b) for a in range(self.n_el) for b in range(a, self.n_el)]
        zl = [(z, lam) for z in self.cfg.angular_zetas for lam in (1, -1)]
        for a, b in pairs:
            names += [
                f"G4[{syms[a]}{syms[b]}] z={z:g} l={lam:+d} Rs={x:.2f}"
                for z, lam in zl
                for x in self.cfg.qm_angular_shifts
            ]
        names += [f"MM G2 Rs={x:.2f}" for x in self.cfg.mm_radial_shifts]
        if self.cfg.long_range:
            names += ["MM potential", "MM |field|"] + [f"MM field . u[{e}]" for e in syms]
        for e in syms:
            names += [f"MM G4[{e}] z={z:g} l={lam:+d} Rs={x:.2f}" for z, lam in zl for x in self.cfg.mm_angular_shifts]
        return names

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

Each term is a small module of :mod:`qmlmm.descriptors.terms` (its equation in its docstring); the
descriptor is their list. Distances in nm. All terms are invariant to rotation, translation and
permutation of like atoms, and each MM atom enters only through its charge and position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.descriptors.cutoffs import cosine_cutoff
from qmlmm.descriptors.neighbors import pairs_within
from qmlmm.descriptors.qm_mm import QMMMBlock, pairs_from_blocks, potential_and_field, qm_mm_blocks
from qmlmm.descriptors.terms import (
    MM_CHANNELS,
    LongRange,
    MMAngular,
    MMRadial,
    Neighbours,
    QMAngular,
    QMRadial,
    Term,
    use_native,
)

__all__ = ["DescriptorConfig", "ACSF", "Features", "potential_and_field"]


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
    mm_channels: str = "charge"  # short-range MM terms weighted by the charge, or ("sign") by its +/- parts

    def __post_init__(self) -> None:
        from qmlmm.errors import InputError

        for name in ("qm_radial_cutoff", "qm_angular_cutoff", "mm_radial_cutoff", "long_range_cutoff",
                     "mm_angular_cutoff", "qm_radial_width", "qm_angular_width", "mm_radial_width"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                raise InputError(f"descriptor {name} must be a positive number (nm), got {v!r}")
        if self.mm_channels not in MM_CHANNELS:
            raise InputError(f"descriptor mm_channels must be one of {MM_CHANNELS}, got {self.mm_channels!r}")
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


@dataclass
class Features:
    """The descriptor of a batch: features (Nq, F) of every QM atom and, for undamped long-range terms, the
    exact potential (Nq,) in e/nm and field (Nq, 3) in e/nm^2 of the embedded (switched) charges at every
    QM atom (else None), which the model's electrostatic terms reuse."""

    x: torch.Tensor
    potential: torch.Tensor | None = None
    field: torch.Tensor | None = None


class ACSF(nn.Module):
    """Descriptor module: FrameBatch -> (Nq, n_features) features of every QM atom, the concatenation of
    its terms' blocks (:mod:`qmlmm.descriptors.terms`) in the order QM radial, QM angular, MM radial,
    long range (if enabled), MM angular."""

    zmap: torch.Tensor

    def __init__(self, cfg: DescriptorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        els = sorted(int(z) for z in cfg.elements)
        self.elements = els
        zmap = torch.full((max(els) + 1,), -1, dtype=torch.long)
        zmap[torch.tensor(els)] = torch.arange(len(els))
        self.register_buffer("zmap", zmap, persistent=False)
        ne = self.n_el = len(els)
        terms: list[Term] = [
            QMRadial(cfg.qm_radial_shifts, cfg.qm_radial_width, ne),
            QMAngular(cfg.qm_angular_shifts, cfg.qm_angular_width, cfg.qm_angular_cutoff, cfg.angular_zetas, ne),
            MMRadial(cfg.mm_radial_shifts, cfg.mm_radial_width, cfg.mm_radial_cutoff, cfg.mm_channels),
        ]
        if cfg.long_range:
            terms.append(LongRange(ne, cfg.field_epsilon, cfg.long_range_damped, cfg.long_range_cutoff))
        terms.append(
            MMAngular(
                cfg.mm_angular_shifts,
                cfg.mm_angular_width,
                cfg.mm_angular_cutoff,
                cfg.qm_angular_cutoff,
                cfg.angular_zetas,
                ne,
                cfg.mm_channels,
            )
        )
        self.terms = nn.ModuleList(terms)
        #: columns of each block (long_range 0 when disabled), in feature order
        self.sizes = {name: 0 for name in ("qm_radial", "qm_angular", "mm_radial", "long_range", "mm_angular")}
        self.sizes.update({t.name: t.size for t in terms})
        self.n_features = sum(self.sizes.values())
        damped = cfg.long_range and cfg.long_range_damped
        # QM-MM pairs are listed out to the longest short-range MM cutoff (the damped long-range term's too)
        self.mm_pair_cutoff = max(cfg.mm_radial_cutoff, cfg.long_range_cutoff if damped else 0.0, cfg.mm_angular_cutoff)
        self.native = True  # the pair lists by the compiled kernel where it can run (terms.use_native)

    def species(self, z: torch.Tensor) -> torch.Tensor:
        """Element index 0..n_el-1 of atomic numbers z; raises for elements the model does not know."""
        if len(z) and (int(z.max()) >= len(self.zmap) or bool((self.zmap[z.clamp(max=len(self.zmap) - 1)] < 0).any())):
            bad = sorted({int(v) for v in z.tolist() if v >= len(self.zmap) or int(self.zmap[v]) < 0})
            from qmlmm.errors import InputError

            raise InputError(f"element(s) {bad} not known to this model (elements {self.elements})")
        return self.zmap[z]

    def neighbours(
        self, b: FrameBatch, mm_weight: torch.Tensor | None = None, blocks: QMMMBlock | None = None
    ) -> Neighbours:
        """The neighbour lists every term reads, for batch ``b`` (``mm_weight`` (Nm,) scales the charges).
        ``blocks``: the batch's dense QM-MM distances, when the caller has them (else made here only if the
        pair lists need them)."""
        cfg = self.cfg
        # the pair lists by the compiled kernel (native.pairs_within), as the terms choose theirs (index lists
        # carry no gradient, so training could use it too; it keeps torch's form, which runs on any device):
        # the same lists, without the dense QM-MM block (not needed here then)
        if use_native(self, [], b.qm_pos.device):
            from qmlmm.descriptors import native

            qm, mm, nf = (b.qm_pos, b.qm_frame), (b.mm_pos, b.mm_frame), b.n_frames
            i, j = native.pairs_within(*qm, *qm, nf, cfg.qm_radial_cutoff, exclude_self=True)
            mi, mj = native.pairs_within(*qm, *mm, nf, self.mm_pair_cutoff)
        else:
            i, j = pairs_within(b.qm_pos, b.qm_frame, b.qm_pos, b.qm_frame, cfg.qm_radial_cutoff, exclude_self=True)
            blocks = qm_mm_blocks(b) if blocks is None else blocks
            mi, mj = pairs_from_blocks(blocks, self.mm_pair_cutoff, b.qm_pos.device)
        dvec = b.qm_pos[j] - b.qm_pos[i]
        r = torch.linalg.norm(dvec, dim=-1)
        ka = r < cfg.qm_angular_cutoff
        mvec = b.qm_pos[mi] - b.mm_pos[mj]  # from MM atom to QM atom
        return Neighbours(
            b=b,
            sp=self.species(b.qm_z),
            q=b.mm_q if mm_weight is None else b.mm_q * mm_weight,
            i=i,
            j=j,
            dvec=dvec,
            r=r,
            fc=cosine_cutoff(r, cfg.qm_radial_cutoff),
            ai=i[ka],
            aj=j[ka],
            ad=dvec[ka],
            ar=r[ka],
            mi=mi,
            mj=mj,
            mvec=mvec,
            mr=torch.linalg.norm(mvec, dim=-1),
            blocks=blocks,
        )

    def forward(self, b: FrameBatch, mm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Features (Nq, n_features). ``mm_weight`` (Nm,) scales the MM charges (smooth switching)."""
        return self.features_and_fields(b, mm_weight).x

    def features_and_fields(
        self, b: FrameBatch, mm_weight: torch.Tensor | None = None, blocks: QMMMBlock | None = None
    ) -> Features:
        """Features (Nq, n_features) and, for undamped long-range terms, the exact potential and field of the
        embedded (switched) charges at every QM atom (:class:`Features`).

        ``blocks``: the batch's padded QM-MM distances (:func:`qmlmm.descriptors.qm_mm.qm_mm_blocks`) when
        the caller has them already (the switching weights need them too); computed here otherwise."""
        nb = self.neighbours(b, mm_weight, blocks)
        x = torch.cat([term(nb) for term in self.terms], dim=1)
        return Features(x, nb.potential, nb.field)

    def feature_names(self) -> list[str]:
        """Human-readable name of every feature column."""
        from qmlmm.elements import symbol

        syms = [symbol(z) for z in self.elements]
        terms: list[Term] = list(self.terms)  # type: ignore[arg-type]
        return [n for t in terms for n in t.feature_names(syms)]

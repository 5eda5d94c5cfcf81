"""Every QM-MM distance of a batch once, as one dense block per frame.

A frame's QM region (~50 atoms) sees a few thousand embedded charges, and four parts of the model need
their distances: the switching weights (each MM atom's shortest distance to a QM atom), the exact
potential and field of the charges at the QM atoms (every pair), and the short-range MM terms of the
descriptor (the pairs within ~0.8 nm). One dense (Nq_f, Nm_f) block per frame serves all four: its
reductions are sums over an axis (cheap forward and backward), where a pair list of all Nq_f x Nm_f
pairs costs a gather and, in the backward pass, a scatter of every pair (measured on retinoic acid with
2760 charges: ~15 ms of a 72 ms model call; benchmarks/results/md_profile.md).

Distances in nm, charges in e, potential in e/nm, field in e/nm^2. Differentiable in positions (and in
the charges for the potential and field), to any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmlmm.batch import FrameBatch

__all__ = ["QMMMBlock", "qm_mm_blocks", "shortest_qm_distance", "potential_and_field", "pairs_from_blocks"]


@dataclass
class QMMMBlock:
    """One frame's QM-MM geometry.

    Attributes:
        qm (nq,), mm (nm,): indices of the frame's QM and MM atoms in the batch.
        r (nq, nm): |r_i - r_J| in nm.
    """

    qm: torch.Tensor
    mm: torch.Tensor
    r: torch.Tensor


def _frame_indices(frame: torch.Tensor, n_frames: int) -> list[torch.Tensor]:
    """Batch indices of the atoms of each frame (frames are contiguous in a collated batch, but the
    indices are taken from ``frame`` so that any order works)."""
    order = torch.sort(frame, stable=True).indices
    counts = torch.bincount(frame, minlength=n_frames).tolist()
    return list(torch.split(order, counts))


def qm_mm_blocks(b: FrameBatch) -> list[QMMMBlock]:
    """The dense QM-MM distance block of every frame that has QM and MM atoms."""
    qm_idx = _frame_indices(b.qm_frame, b.n_frames)
    mm_idx = _frame_indices(b.mm_frame, b.n_frames)
    blocks = []
    for iq, im in zip(qm_idx, mm_idx, strict=True):
        if len(iq) == 0 or len(im) == 0:
            continue
        vec = b.qm_pos[iq][:, None, :] - b.mm_pos[im][None, :, :]
        # explicit sum of squares, not torch.cdist: cdist's small-input kernel has no double backward (the
        # force loss of training needs one)
        r = torch.sqrt((vec * vec).sum(-1))
        blocks.append(QMMMBlock(iq, im, r))
    return blocks


def shortest_qm_distance(b: FrameBatch, blocks: list[QMMMBlock]) -> torch.Tensor:
    """(Nm,) shortest distance in nm from every MM atom to a QM atom of its frame (inf without QM atoms)."""
    d = torch.full((len(b.mm_q),), float("inf"), dtype=b.mm_pos.dtype, device=b.mm_pos.device)
    for blk in blocks:
        d = d.index_copy(0, blk.mm, blk.r.amin(dim=0))
    return d


def potential_and_field(
    b: FrameBatch, q: torch.Tensor, blocks: list[QMMMBlock] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact potential phi_i = sum_J q_J / r_iJ (Nq,) in e/nm and field E_i = sum_J q_J (r_i - r_J) / r_iJ^3
    (Nq, 3) in e/nm^2 of the MM charges ``q`` (Nm,) e at every QM atom of the batch (all pairs of a frame)."""
    if blocks is None:
        blocks = qm_mm_blocks(b)
    nq = len(b.qm_z)
    dt, dev = b.qm_pos.dtype, b.qm_pos.device
    phi = torch.zeros(nq, dtype=dt, device=dev)
    field = torch.zeros(nq, 3, dtype=dt, device=dev)
    for blk in blocks:
        qr = q[blk.mm][None, :] / blk.r  # (nq, nm)
        phi = phi.index_copy(0, blk.qm, qr.sum(1))
        # E_i = sum_J w_iJ (r_i - r_J) = r_i sum_J w_iJ - sum_J w_iJ r_J as a matrix product (w = q / r^3),
        # positions taken from the QM region's centre (exact: E_i does not depend on the origin) so that
        # the two terms stay of the size of their difference
        w = qr / (blk.r * blk.r)
        qm_pos, mm_pos = b.qm_pos[blk.qm], b.mm_pos[blk.mm]
        centre = qm_pos.detach().mean(0)
        e = (qm_pos - centre) * w.sum(1, keepdim=True) - w @ (mm_pos - centre)
        field = field.index_copy(0, blk.qm, e)
    return phi, field


@torch.no_grad()
def pairs_from_blocks(
    blocks: list[QMMMBlock], cutoff: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All QM-MM pairs (i, J) of the batch with r_iJ < ``cutoff`` (nm), as batch indices i (P,), J (P,),
    sorted by i (the order of :func:`qmlmm.descriptors.neighbors.pairs_within`)."""
    out_i, out_j = [], []
    for blk in blocks:
        a, c = torch.nonzero(blk.r < cutoff, as_tuple=True)
        out_i.append(blk.qm[a])
        out_j.append(blk.mm[c])
    if not out_i:
        e = torch.zeros(0, dtype=torch.long, device=device)  # no frame has QM and MM atoms: the batch's device
        return e, e.clone()
    i, j = torch.cat(out_i), torch.cat(out_j)
    order = torch.sort(i, stable=True).indices
    return i[order], j[order]

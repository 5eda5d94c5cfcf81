"""Every QM-MM distance of a batch once, as one dense block padded over its frames.

A frame's QM region (~50 atoms) sees a few thousand embedded charges, and four parts of the model need
their distances: the switching weights (each MM atom's shortest distance to a QM atom), the exact
potential and field of the charges at the QM atoms (every pair), and the short-range MM terms of the
descriptor (the pairs within ~0.8 nm). One dense (B, Q, M) block serves all four: frame f's QM atoms in
row slots 0..nq_f-1, its MM atoms in column slots 0..nm_f-1, the rest padding. Its reductions are sums over
an axis (cheap forward and backward), where a pair list of all Nq_f x Nm_f pairs costs a gather and, in
the backward pass, a scatter of every pair (measured on retinoic acid with 2760 charges: ~15 ms of a 72 ms
model call; benchmarks/results/md_profile.md); and one block for all frames of a training batch, not one
per frame, keeps the number of tensor operations (each ~10-50 us of overhead on a CPU, three times over
with a force loss's double backward) independent of the batch size.

Padding slots point at a real atom of the batch (index 0), and their distance is set to sqrt(3) nm (atoms
of two frames can coincide), so every distance is finite and nonzero and every gradient defined; they
carry zero charge and are masked out of minima and pair lists, so they add exactly nothing.

Distances in nm, charges in e, potential in e/nm, field in e/nm^2. Differentiable in positions (and in
the charges for the potential and field), to any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmlmm.batch import FrameBatch

__all__ = [
    "QMMMBlock",
    "frame_slots",
    "qm_mm_blocks",
    "shortest_qm_distance",
    "potential_and_field",
    "pairs_from_blocks",
]


@dataclass
class QMMMBlock:
    """A batch's QM-MM geometry, padded over frames.

    Attributes:
        qm (B, Q), mm (B, M): batch indices of each frame's QM and MM atoms in slot order (padding: 0).
        qm_mask (B, Q), mm_mask (B, M): which slots hold an atom of the frame.
        r (B, Q, M): |r_i - r_J| in nm (padding slots: finite, meaningless).
        qm_pos (B, Q, 3), mm_pos (B, M, 3): the positions (nm) in slot order (padding: atom 0's), gathered
            once for the distances and the field.
    """

    qm: torch.Tensor
    mm: torch.Tensor
    qm_mask: torch.Tensor
    mm_mask: torch.Tensor
    r: torch.Tensor
    qm_pos: torch.Tensor
    mm_pos: torch.Tensor

    @property
    def pair_mask(self) -> torch.Tensor:
        """(B, Q, M) True where both slots hold atoms."""
        return self.qm_mask[:, :, None] & self.mm_mask[:, None, :]

    @property
    def padded(self) -> bool:
        """Whether any slot is padding (frames of different sizes)."""
        return _padded(self.qm_mask, self.mm_mask)


def _padded(qm_mask: torch.Tensor, mm_mask: torch.Tensor) -> bool:
    """Whether the slot masks (B, Q), (B, M) hold any padding slot."""
    return not (bool(qm_mask.all()) and bool(mm_mask.all()))


@torch.no_grad()
def frame_slots(frame: torch.Tensor, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms tagged with their ``frame`` (N,) laid out per frame: indices (B, W) of each frame's atoms in
    batch order (padding 0) and the mask (B, W) of real slots; W the largest count (0 without atoms)."""
    if n_frames == 1:  # one frame (MD, prediction): every atom in batch order, no padding
        n = len(frame)
        return torch.arange(n, device=frame.device)[None], torch.ones(1, n, dtype=torch.bool, device=frame.device)
    counts = torch.bincount(frame, minlength=n_frames)
    width = int(counts.max()) if len(frame) else 0
    order = torch.sort(frame, stable=True).indices
    start = torch.cumsum(counts, 0) - counts
    f = frame[order]
    slot = torch.arange(len(frame), device=frame.device) - start[f]
    idx = torch.zeros(n_frames, width, dtype=torch.long, device=frame.device)
    mask = torch.zeros(n_frames, width, dtype=torch.bool, device=frame.device)
    idx[f, slot] = order
    mask[f, slot] = True
    return idx, mask


def qm_mm_blocks(b: FrameBatch) -> QMMMBlock:
    """The padded QM-MM distance block of the batch."""
    qm, qm_mask = frame_slots(b.qm_frame, b.n_frames)
    mm, mm_mask = frame_slots(b.mm_frame, b.n_frames)
    qm_pos, mm_pos = b.qm_pos[qm], b.mm_pos[mm]  # (B, Q, 3), (B, M, 3)
    pair_mask = qm_mask[:, :, None] & mm_mask[:, None, :] if _padded(qm_mask, mm_mask) else None
    # r^2 summed component by component over (B, Q, M) blocks: the same exact differences as one
    # (B, Q, M, 3) block, but no reduction over a last axis of 3 and no broadcast sums of (B, Q, M, 3)
    # gradients in the backward pass (3.4 -> 1.3 ms forward and backward on retinoic acid with 2628
    # charges). Explicit squares, not torch.cdist: cdist's small-input kernel has no double backward (the
    # force loss of training needs one).
    sq = []
    for k in range(3):
        d = qm_pos[:, :, None, k] - mm_pos[:, None, :, k]
        # a padding slot's difference is set to 1 nm: two atoms of different frames can coincide, and a
        # zero distance would give 0/0 in the potential and in sqrt's derivative even where the slot is
        # masked (one frame, or frames of equal size, have no padding slot: nothing to replace)
        if pair_mask is not None:
            d = torch.where(pair_mask, d, torch.ones((), dtype=d.dtype, device=d.device))
        sq.append(d * d)
    r2 = sq[0] + sq[1] + sq[2]
    r = torch.sqrt(r2)
    return QMMMBlock(qm, mm, qm_mask, mm_mask, r, qm_pos, mm_pos)


def shortest_qm_distance(b: FrameBatch, blk: QMMMBlock) -> torch.Tensor:
    """(Nm,) shortest distance in nm from every MM atom to a QM atom of its frame (inf without QM atoms)."""
    inf = torch.tensor(float("inf"), dtype=blk.r.dtype, device=blk.r.device)
    dmin = torch.where(blk.qm_mask[:, :, None], blk.r, inf).amin(dim=1) if blk.r.shape[1] else None
    d = torch.full((len(b.mm_q),), float("inf"), dtype=b.mm_pos.dtype, device=b.mm_pos.device)
    if dmin is None:
        return d
    return d.index_copy(0, blk.mm[blk.mm_mask], dmin[blk.mm_mask])


def potential_and_field(
    b: FrameBatch, q: torch.Tensor, blk: QMMMBlock | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact potential phi_i = sum_J q_J / r_iJ (Nq,) in e/nm and field E_i = sum_J q_J (r_i - r_J) / r_iJ^3
    (Nq, 3) in e/nm^2 of the MM charges ``q`` (Nm,) e at every QM atom of the batch (all pairs of a frame)."""
    if blk is None:
        blk = qm_mm_blocks(b)
    nq = len(b.qm_z)
    dt, dev = b.qm_pos.dtype, b.qm_pos.device
    phi = torch.zeros(nq, dtype=dt, device=dev)
    field = torch.zeros(nq, 3, dtype=dt, device=dev)
    if blk.r.shape[2] == 0:
        return phi, field
    qm_real = blk.qm[blk.qm_mask]
    qb = (q[blk.mm] * blk.mm_mask)[:, :, None]  # (B, M, 1); padded columns carry no charge
    inv = blk.r.reciprocal()  # (B, Q, M)
    phi = phi.index_copy(0, qm_real, torch.bmm(inv, qb)[..., 0][blk.qm_mask])
    # E_i = sum_J q_J (r_i - r_J) / r_iJ^3 = r_i sum_J q_J / r_iJ^3 - sum_J q_J r_J / r_iJ^3: both sums as one
    # matrix product of the (B, Q, M) block with (q_J, q_J r_J) (B, M, 4), positions taken from each frame's
    # QM centre (exact: E_i does not depend on the origin) so that the two terms stay of the size of their
    # difference. Sums as matrix products, not reductions of (B, Q, M) products: fewer passes over the
    # block forward and backward
    qm_pos, mm_pos = blk.qm_pos, blk.mm_pos
    n_qm = blk.qm_mask.sum(1, keepdim=True).clamp(min=1).to(dt)
    centre = ((qm_pos.detach() * blk.qm_mask[..., None]).sum(1) / n_qm)[:, None, :]  # (B, 1, 3)
    sums = torch.bmm(inv * inv * inv, torch.cat([qb, qb * (mm_pos - centre)], dim=-1))  # (B, Q, 4)
    e = (qm_pos - centre) * sums[..., :1] - sums[..., 1:]
    return phi, field.index_copy(0, qm_real, e[blk.qm_mask])


@torch.no_grad()
def pairs_from_blocks(blk: QMMMBlock | None, cutoff: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All QM-MM pairs (i, J) of the batch with r_iJ < ``cutoff`` (nm), as batch indices i (P,), J (P,),
    sorted by i (the order of :func:`qmlmm.descriptors.neighbors.pairs_within`). ``blk`` None: no pairs."""
    if blk is None or blk.r.numel() == 0:
        e = torch.zeros(0, dtype=torch.long, device=device)  # no frame has QM and MM atoms: the batch's device
        return e, e.clone()
    within = blk.r < cutoff
    f, a, c = torch.nonzero(within & blk.pair_mask if blk.padded else within, as_tuple=True)
    i, j = blk.qm[f, a], blk.mm[f, c]
    if blk.qm.shape[0] == 1:  # one frame: slots are batch order and nonzero is row-major, so i is sorted
        return i, j
    order = torch.sort(i, stable=True).indices
    return i[order], j[order]

"""Neighbour lists within frames of a batch (non-periodic: positions come from the embedding,
which already resolved periodic images and made the QM region whole).

Index construction runs without gradients; distances are recomputed from positions by the
callers, so forces flow through positions only. Frames never see each other's atoms.
"""

from __future__ import annotations

import torch

__all__ = ["padded_slots", "pairs_within", "triples_from_pairs"]


@torch.no_grad()
def pairs_within(
    pos_a: torch.Tensor,
    frame_a: torch.Tensor,
    pos_b: torch.Tensor,
    frame_b: torch.Tensor,
    cutoff: float,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (i, j) with i in set a, j in set b, same frame, |r_i - r_j| < cutoff.

    Args:
        pos_a (Na, 3), frame_a (Na,), pos_b (Nb, 3), frame_b (Nb,): positions and frame indices.
        exclude_self: the sets are the same; drop i == j.
    Returns index tensors i (P,), j (P,), sorted by i (within an i, by j). All frames at once: each frame's
    atoms in padded slots (:func:`qmlmm.descriptors.qm_mm.frame_slots`), one (B, Wa, Wb) distance block.
    """
    from qmlmm.descriptors.qm_mm import frame_slots

    n_frames = int(max(frame_a.max().item() if len(frame_a) else -1, frame_b.max().item() if len(frame_b) else -1)) + 1
    if n_frames == 0 or len(frame_a) == 0 or len(frame_b) == 0:
        e = torch.zeros(0, dtype=torch.long, device=pos_a.device)
        return e, e.clone()
    ia, ma = frame_slots(frame_a, n_frames)
    ib, mb = frame_slots(frame_b, n_frames)
    mask = (torch.cdist(pos_a[ia], pos_b[ib]) < cutoff) & ma[:, :, None] & mb[:, None, :]
    if exclude_self:
        mask &= ia[:, :, None] != ib[:, None, :]
    f, a, c = torch.nonzero(mask, as_tuple=True)
    i, j = ia[f, a], ib[f, c]
    if n_frames == 1:  # slots are batch order and nonzero is row-major: i is sorted (within an i, j too)
        return i, j
    order = torch.sort(i, stable=True).indices
    return i[order], j[order]


@torch.no_grad()
def triples_from_pairs(
    center: torch.Tensor, nb: torch.Tensor, center2: torch.Tensor | None = None, nb2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of pair indices (p, q) sharing the same centre atom.

    With one pair list: all p < q with center[p] == center[q] (unordered neighbour pairs).
    With a second list: all (p, q), p in list 1, q in list 2, center[p] == center2[q].
    Returns (p (T,), q (T,)).
    """
    dev = center.device
    if center2 is None:
        center2, same = center, True
    else:
        same = False
    if len(center) == 0 or len(center2) == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e.clone()
    n = int(max(center.max().item(), center2.max().item())) + 1
    c1 = torch.bincount(center, minlength=n)
    c2 = torch.bincount(center2, minlength=n)
    s1 = torch.cumsum(c1, 0) - c1  # start of each centre's block (lists sorted by centre)
    s2 = torch.cumsum(c2, 0) - c2
    per = c1 * c2  # candidate combinations per centre
    tot = int(per.sum().item())
    if tot == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e.clone()
    cen = torch.repeat_interleave(torch.arange(n, device=dev), per)
    local = torch.arange(tot, device=dev) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
    a = local // c2[cen]
    b = local % c2[cen]
    p = s1[cen] + a
    q = s2[cen] + b
    if same:
        keep = a < b
        p, q = p[keep], q[keep]
    return p, q


@torch.no_grad()
def padded_slots(center: torch.Tensor, n_centres: int) -> tuple[torch.Tensor, int]:
    """Slot of every pair in its centre's padded row: pairs sorted by ``center`` (P,) get slots
    0, 1, ... within each centre. Returns slots (P,) and the row width (the largest count, >= 1)."""
    counts = torch.bincount(center, minlength=n_centres)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(center), device=center.device) - start[center]
    return slot, max(1, int(counts.max().item()) if len(counts) else 1)

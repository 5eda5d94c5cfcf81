"""All members of an ensemble in one pass: each element's K networks as batched matrix products.

An ensemble of K HDNNPs with E elements runs K x E small MLPs (and as many charge networks), each a few
(n_e, 64) products: on retinoic acid (50 QM atoms, 5 elements, K = 4) the loop over 40 networks costs
~7 ms of forward and backward on 2 threads, most of it per-call overhead. Stacking the members' weights
of one element, (K, n_in, n_out), turns the loop into E chains of ``torch.baddbmm``. The weights are
stacked from the members' parameters on every call, so the result follows training and gradients flow
to every member's parameters. Same numbers as :meth:`HDNNP.forward` of each member (tests/test_models.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.models.hdnnp import HDNNP, ModelInputs
from qmlmm.units import COULOMB_KJMOL_NM

__all__ = ["fused_member_energies"]

_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "tanh": torch.tanh,
    "celu": F.celu,
    "softplus": F.softplus,
}


def _stacked_mlp(nets: Sequence[nn.Module], x: torch.Tensor, activation: str) -> torch.Tensor:
    """(K, n, 1) outputs of K same-shape MLPs (nn.Sequential of Linear and activation), input x (K, n, F)."""
    act = _ACT[activation]
    layers = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]  # type: ignore[attr-defined]
    h = x
    for li in range(len(layers[0])):
        w = torch.stack([lay[li].weight for lay in layers]).transpose(1, 2)  # (K, in, out)
        bias = torch.stack([lay[li].bias for lay in layers])[:, None, :]  # (K, 1, out)
        h = torch.baddbmm(bias, h, w)
        if li < len(layers[0]) - 1:
            h = act(h)
    return h


def _per_element(
    members: Sequence[HDNNP], which: str, x: torch.Tensor, sp: torch.Tensor, cols: torch.Tensor | None
) -> torch.Tensor:
    """(K, Nq) output of every member's element networks ``which`` ("nets" or "charge_nets") on its
    scaled features (columns ``cols``: all)."""
    m0 = members[0]
    act = m0.cfg.activation
    out = torch.zeros(len(members), len(sp), dtype=x.dtype, device=x.device)
    mean = torch.stack([m.feat_mean for m in members])  # (K, E, F)
    std = torch.stack([m.feat_std for m in members])
    for e in range(len(m0.elements)):
        idx = torch.nonzero(sp == e).flatten()
        if len(idx) == 0:
            continue
        xe = (x[idx][None] - mean[:, e, None, :]) / std[:, e, None, :]  # (K, n_e, F)
        if cols is not None:
            xe = xe[:, :, cols]
        nets = [getattr(m, which)[e] for m in members]
        out = out.index_copy(1, idx, _stacked_mlp(nets, xe, act).squeeze(-1))
    return out


def fused_member_energies(members: Sequence[HDNNP], b: FrameBatch, inputs: ModelInputs) -> torch.Tensor:
    """(K, B) energies in kJ/mol (float64) of K members with one architecture, on shared ``inputs``.

    Each member: sum over QM atoms of its short-range network times its energy scale, plus (with the
    electrostatic term) k_e q_i phi_i with its charges, plus its per-element offsets, as
    :meth:`HDNNP.forward`.
    """
    m0 = members[0]
    sp = m0.acsf.species(b.qm_z)
    k = len(members)
    scale = torch.stack([m.e_scale for m in members])[:, None]  # (K, 1)
    out = _per_element(members, "nets", inputs.features, sp, m0.short_cols) * scale  # (K, Nq)
    if m0.cfg.electrostatics == "charges":
        assert inputs.potential is not None
        q_shift = torch.stack([m.q_shift for m in members])  # (K, E)
        raw = _per_element(members, "charge_nets", inputs.features, sp, None) + q_shift[:, sp]
        if m0.cfg.charge_sum == "total":
            target = b.total_charges().to(raw.dtype)
        else:
            target = torch.zeros(b.n_frames, dtype=raw.dtype, device=raw.device)
        n = torch.bincount(b.qm_frame, minlength=b.n_frames).to(raw.dtype).clamp(min=1)
        total = torch.zeros(k, b.n_frames, dtype=raw.dtype, device=raw.device).index_add(1, b.qm_frame, raw)
        q = raw + ((target - total) / n)[:, b.qm_frame]
        out = out + COULOMB_KJMOL_NM * q * inputs.potential[None, :]
    e_nn = torch.zeros(k, b.n_frames, dtype=out.dtype, device=out.device).index_add(1, b.qm_frame, out)
    shift = torch.stack([m.e_shift for m in members])[:, sp]  # (K, Nq) float64
    e_off = torch.zeros(k, b.n_frames, dtype=torch.float64, device=out.device).index_add(1, b.qm_frame, shift)
    return e_nn.double() + e_off

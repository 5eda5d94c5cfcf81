"""All members of an ensemble in one pass: each element's K networks as batched matrix products.

An ensemble of K HDNNPs with E elements runs K x E small MLPs (and as many charge networks), each a few
(n_e, 64) products: on retinoic acid (50 QM atoms, 5 elements, K = 4) the loop over 40 networks costs
~7 ms of forward and backward on 2 threads, most of it per-call overhead. Stacking the members' weights
of one element, (K, n_in, n_out), turns the loop into E chains of ``torch.baddbmm``. The weights are
stacked from the members' parameters on every call, so the result follows training and gradients flow
to every member's parameters. Same numbers as :meth:`HDNNP.forward` of each member (tests/test_descriptors.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.models.hdnnp import ALPHA_UNIT_NM3, HDNNP, ModelInputs, charges_adding_up, frame_energies, induction_energies
from qmlmm.units import COULOMB_KJMOL_NM

__all__ = ["fused_member_energies"]


def _stacked_mlp(nets: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """(K, n, 1) outputs of K same-shape MLPs (nn.Sequential of Linear layers and activations, as
    ``hdnnp._element_mlps`` makes them), input x (K, n, F); the activations are the first net's own."""
    seq = list(nets[0])  # type: ignore[call-overload]
    h = x
    for li, layer in enumerate(seq):
        if isinstance(layer, nn.Linear):
            same = [net[li] for net in nets]  # type: ignore[index]
            w = torch.stack([lay.weight for lay in same]).transpose(1, 2)  # (K, in, out)
            bias = torch.stack([lay.bias for lay in same])[:, None, :]  # (K, 1, out)
            h = torch.baddbmm(bias, h, w)
        else:
            h = layer(h)
    return h


def _per_element(
    members: Sequence[HDNNP], which: str, x: torch.Tensor, sp: torch.Tensor, cols: torch.Tensor | None
) -> torch.Tensor:
    """(K, Nq) output of every member's element networks ``which`` ("nets", "charge_nets", "pol_nets") on its
    scaled features (columns ``cols``: all)."""
    m0 = members[0]
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
        out = out.index_copy(1, idx, _stacked_mlp(nets, xe).squeeze(-1))
    return out


def fused_member_energies(members: Sequence[HDNNP], b: FrameBatch, inputs: ModelInputs) -> torch.Tensor:
    """(K, B) energies in kJ/mol (float64) of K members with one architecture, on shared ``inputs``.

    Each member: sum over QM atoms of its short-range network times its energy scale, plus (with the
    electrostatic term) k_e q_i phi_i with its charges, plus (with polarisabilities) -1/2 k_e alpha_i |E_i|^2,
    plus its per-element offsets, as :meth:`HDNNP.forward`.
    """
    m0 = members[0]
    sp = m0.acsf.species(b.qm_z)
    scale = torch.stack([m.e_scale for m in members])[:, None]  # (K, 1)
    out = _per_element(members, "nets", inputs.features, sp, m0.short_cols) * scale  # (K, Nq)
    if m0.cfg.has_charges:
        assert inputs.potential is not None
        q_shift = torch.stack([m.q_shift for m in members])  # (K, E)
        raw = _per_element(members, "charge_nets", inputs.features, sp, None) + q_shift[:, sp]
        q = charges_adding_up(raw, b, m0.cfg.charge_sum)
        out = out + COULOMB_KJMOL_NM * q * inputs.potential[None, :]
    if m0.cfg.has_polarisability:
        assert inputs.field is not None
        alpha = _per_element(members, "pol_nets", inputs.features, sp, None) * ALPHA_UNIT_NM3
        out = out + induction_energies(alpha, inputs.field)
    shift = torch.stack([m.e_shift for m in members])[:, sp]  # (K, Nq) float64
    return frame_energies(out, shift, b)

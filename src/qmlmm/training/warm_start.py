"""Warm start: begin training from a trained model's networks instead of random weights.

Used by active learning (each round's ensemble from the last round's). The new run's training frames
give new feature statistics; :func:`restandardise` moves a network onto them without changing what it
computes (the first layer of every per-element network absorbs the change), so the optimiser sees
features standardised on the data it trains on and the start is exactly the old model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qmlmm.errors import InputError
from qmlmm.models.hdnnp import HDNNP, ModelConfig


def warm_start_states(
    init: str | Path, mcfg: ModelConfig, target: str, baseline: str | None
) -> list[dict[str, torch.Tensor]]:
    """The members' state dicts (float64) of the model file ``init``; InputError when it learnt another
    quantity (its target or baseline level is not ``target``/``baseline``: its energy offsets, kept by the
    warm start, would be another level's) or its architecture (descriptor, networks, embedding, electrostatic
    term) is not ``mcfg``'s."""
    from qmlmm.models import QMLMMModel

    prev = QMLMMModel.load(init, dtype=torch.float64)
    if (prev.meta.target, prev.meta.baseline) != (target, baseline):
        raise InputError(f"cannot warm-start from {init}: it learnt target {prev.meta.target!r} over baseline "
                         f"{prev.meta.baseline!r}, this run {target!r} over {baseline!r}")  # fmt: skip
    have, want = prev.ensemble.cfg.to_dict(), mcfg.to_dict()
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise InputError(f"cannot warm-start from {init}: its model differs from this run's in {diff}")
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in prev.ensemble.members]


def restandardise(model: HDNNP, feat_mean: torch.Tensor, feat_std: torch.Tensor) -> None:
    """Give ``model`` the feature statistics ``feat_mean``, ``feat_std`` (n_elements, n_features) in place,
    rescaling the first layer of each per-element network (energy, charge, polarisability) so that every
    output stays the same: with z = (x - m) / s, W z_old + b = (W s'/s) z_new + b + W (m' - m)/s."""
    with torch.no_grad():
        m_old, s_old = model.feat_mean.double(), model.feat_std.double()
        m_new, s_new = feat_mean.double().to(m_old.device), feat_std.double().to(m_old.device)
        scale, offset = s_new / s_old, (m_new - m_old) / s_old  # (ne, nf)
        groups: list[tuple[torch.nn.ModuleList, torch.Tensor | None]] = [(model.nets, model.short_cols)]
        groups += [(getattr(model, n), None) for n in ("charge_nets", "pol_nets") if hasattr(model, n)]
        for nets, cols in groups:
            for e, net in enumerate(nets):
                first: torch.nn.Linear = net[0]  # type: ignore[index]
                sc, off = (scale[e], offset[e]) if cols is None else (scale[e, cols], offset[e, cols])
                w = first.weight.double()
                first.bias.copy_((first.bias.double() + w @ off).to(first.bias.dtype))
                first.weight.copy_((w * sc).to(first.weight.dtype))
        model.feat_mean.copy_(m_new.to(model.feat_mean.dtype))
        model.feat_std.copy_(s_new.to(model.feat_std.dtype))

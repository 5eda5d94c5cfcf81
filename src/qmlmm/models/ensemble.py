"""Ensembles of HDNNPs that share one descriptor: mean prediction and spread as the uncertainty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.models.fused import StackCache, fused_member_energies
from qmlmm.models.hdnnp import HDNNP, ModelConfig, with_grad_inputs

__all__ = ["Ensemble", "EnsemblePrediction"]


@dataclass
class EnsemblePrediction:
    """Mean energies (B,) kJ/mol and forces (Nq, 3), (Nm, 3) kJ/mol/nm, with the ensemble spreads.

    ``energy_std`` (B,) is the standard deviation of the members' energies; ``qm_forces_std`` and
    ``mm_forces_std`` (same shapes as the forces) are per component, computed only when asked for
    (they need one backward pass per member). ``mm_potential`` (Nm,) is dE/dq when asked for.
    """

    energy: torch.Tensor
    qm_forces: torch.Tensor
    mm_forces: torch.Tensor
    energy_std: torch.Tensor
    qm_forces_std: torch.Tensor | None = None
    mm_forces_std: torch.Tensor | None = None
    mm_potential: torch.Tensor | None = None


class Ensemble(nn.Module):
    """K HDNNPs with one descriptor configuration (features computed once per batch)."""

    def __init__(self, cfg: ModelConfig, members: Sequence[HDNNP] | int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        if isinstance(members, int):
            members = [HDNNP(cfg) for _ in range(members)]
        self.members = nn.ModuleList(members)
        self._stack_cache = StackCache()  # the eval-mode pass's stacked weights (qmlmm.models.fused)

    def _cache(self) -> StackCache:
        """The stacked-weights cache (made here for ensembles pickled before it existed)."""
        if "_stack_cache" not in self.__dict__:
            self._stack_cache = StackCache()
        return self._stack_cache

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def elements(self) -> list[int]:
        return self.members[0].elements  # type: ignore[return-value]

    def member_energies(self, b: FrameBatch) -> torch.Tensor:
        """(K, B) energies of every member: the features (and MM potential) once for all members, then, in
        eval mode, all members' networks in one batched pass (:mod:`qmlmm.models.fused`, with the members'
        weights stacked once while they do not change: eval-mode energies are not differentiable in the
        parameters); in training mode member by member (each member keeps its charges for the charge loss)."""
        m0: HDNNP = self.members[0]  # type: ignore[assignment]
        shared = m0.inputs(b)
        if self.training:
            return torch.stack([m(b, shared) for m in self.members])
        return fused_member_energies(list(self.members), b, shared, self._cache())  # type: ignore[arg-type]

    def forward(self, b: FrameBatch) -> torch.Tensor:
        """(B,) mean energy."""
        return self.member_energies(b).mean(0)

    def predict(self, b: FrameBatch, force_spread: bool = False, potential: bool = False) -> EnsemblePrediction:
        """Mean energies and forces, the energy spread and, optionally, force spreads and dE/dq."""
        bb = with_grad_inputs(b, potential)
        qm, mm, q = bb.qm_pos, bb.mm_pos, bb.mm_q
        with torch.enable_grad():
            ek = self.member_energies(bb)  # (K, B)
            e = ek.mean(0)
            inputs = [qm, mm] + ([q] if potential else [])
            grads = torch.autograd.grad(e.sum(), inputs, retain_graph=force_spread, allow_unused=True)
            fq_std = fm_std = None
            if force_spread and self.size > 1:
                fq, fm = [], []
                for k in range(self.size):
                    gk = torch.autograd.grad(ek[k].sum(), [qm, mm], retain_graph=k < self.size - 1, allow_unused=True)
                    fq.append(-(gk[0] if gk[0] is not None else torch.zeros_like(qm)))
                    fm.append(-(gk[1] if gk[1] is not None else torch.zeros_like(mm)))
                fq_std = torch.stack(fq).std(0, unbiased=False)
                fm_std = torch.stack(fm).std(0, unbiased=False)
        gq = grads[0] if grads[0] is not None else torch.zeros_like(qm)
        gm = grads[1] if grads[1] is not None else torch.zeros_like(mm)
        pot = (grads[2] if grads[2] is not None else torch.zeros_like(q)) if potential else None
        std = ek.std(0, unbiased=False) if self.size > 1 else torch.zeros_like(e)
        return EnsemblePrediction(
            energy=e.detach(),
            qm_forces=-gq.detach(),
            mm_forces=-gm.detach(),
            energy_std=std.detach(),
            qm_forces_std=fq_std,
            mm_forces_std=fm_std,
            mm_potential=None if pot is None else pot.detach(),
        )

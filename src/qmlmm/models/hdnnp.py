"""High-dimensional neural network potential (Behler-Parrinello) with the MM environment as an element.

E = sum_i [ shift_{e(i)} + scale * NN_{e(i)}((x_i - mean_e) / std_e) ] over QM atoms i, where x_i are
the ACSF features (QM neighbours and charge-weighted MM atoms) and e(i) the element of atom i.
Forces on QM and MM atoms are minus the autograd gradient of E with respect to their positions.

With smooth embedding (switch_width > 0) the MM charges are scaled inside the model by the same
molecule switching function as in the labels, computed from positions, so autograd includes the
switching force exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qmlmm.data.batch import FrameBatch
from qmlmm.descriptors.acsf import ACSF, DescriptorConfig
from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH, EmbeddingSettings
from qmlmm.switching import switch_value

__all__ = ["ModelConfig", "HDNNP", "switch_weights", "energy_and_forces"]

_ACT = {"silu": nn.SiLU, "tanh": nn.Tanh, "celu": nn.CELU, "softplus": nn.Softplus}


@dataclass
class ModelConfig:
    """Architecture of one network of the ensemble."""

    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "silu"
    cutoff: float = DEFAULT_CUTOFF  # embedding cutoff (nm) of the labels the model learns
    switch_width: float = DEFAULT_SWITCH_WIDTH  # smooth embedding width (nm), as in the labels

    def to_dict(self) -> dict[str, object]:
        return {
            "descriptor": self.descriptor.to_dict(),
            "hidden": list(self.hidden),
            "activation": self.activation,
            "cutoff": self.cutoff,
            "switch_width": self.switch_width,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelConfig:
        return cls(
            descriptor=DescriptorConfig.from_dict(d["descriptor"]),  # type: ignore[arg-type]
            hidden=[int(h) for h in d.get("hidden", [64, 64])],  # type: ignore[attr-defined]
            activation=str(d.get("activation", "silu")),
            cutoff=float(d.get("cutoff", 1.4)),  # type: ignore[arg-type]
            # model files without the key predate smooth embedding: they were trained on sharp labels
            switch_width=float(d.get("switch_width", 0.0)),  # type: ignore[arg-type]
        )

    @property
    def embedding(self) -> EmbeddingSettings:
        return EmbeddingSettings(self.cutoff, self.switch_width)


def switch_weights(b: FrameBatch, cutoff: float, width: float) -> torch.Tensor:
    """(Nm,) molecule switching weight of every MM atom, differentiable in positions.

    S(d_J) with d_J the shortest distance between an atom of molecule J and a QM atom of its frame,
    the one switching function of :mod:`qmlmm.switching`, as the labels use it.
    """
    nm = len(b.mm_q)
    if width <= 0 or nm == 0:
        return torch.ones(nm, dtype=b.mm_pos.dtype, device=b.mm_pos.device)
    dmin = torch.empty(nm, dtype=b.mm_pos.dtype, device=b.mm_pos.device)
    parts = []
    for f in range(b.n_frames):
        im = torch.nonzero(b.mm_frame == f).flatten()
        iq = torch.nonzero(b.qm_frame == f).flatten()
        if len(im) == 0:
            continue
        # explicit differences, not torch.cdist: cdist's small-input kernel has no double backward (the
        # force loss of training needs one), its large-input one has
        d2 = ((b.mm_pos[im][:, None, :] - b.qm_pos[iq][None, :, :]) ** 2).sum(-1)
        parts.append((im, d2.amin(dim=1).sqrt()))
    for im, d in parts:
        dmin = dmin.index_copy(0, im, d)
    n_mol = int(b.mm_mol.max().item()) + 1
    dmol = torch.full((n_mol,), float("inf"), dtype=dmin.dtype, device=dmin.device)
    dmol = dmol.scatter_reduce(0, b.mm_mol, dmin, reduce="amin", include_self=True)
    return switch_value(dmol, cutoff - width, cutoff)[b.mm_mol]


class HDNNP(nn.Module):
    """One HDNNP: descriptor, per-element feature scaling, per-element MLPs, per-element shifts."""

    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    e_shift: torch.Tensor
    e_scale: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.acsf = ACSF(cfg.descriptor)
        ne, nf = self.acsf.n_el, self.acsf.n_features
        self.register_buffer("feat_mean", torch.zeros(ne, nf))
        self.register_buffer("feat_std", torch.ones(ne, nf))
        self.register_buffer("e_shift", torch.zeros(ne))
        self.register_buffer("e_scale", torch.ones(()))
        act = _ACT[cfg.activation]
        nets = []
        for _ in range(ne):
            layers: list[nn.Module] = []
            width = nf
            for h in cfg.hidden:
                layers += [nn.Linear(width, h), act()]
                width = h
            layers.append(nn.Linear(width, 1))
            nets.append(nn.Sequential(*layers))
        self.nets = nn.ModuleList(nets)

    @property
    def elements(self) -> list[int]:
        return self.acsf.elements

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, b: FrameBatch) -> torch.Tensor:
        """Raw (unscaled) features (Nq, F).

        With smooth embedding the raw MM charges are switched here, unless the batch says its charges
        are already the switched ones (``b.meta["switched"]``, as engines receive them).
        """
        w = None
        if self.cfg.switch_width > 0 and not b.meta.get("switched"):
            w = switch_weights(b, self.cfg.cutoff, self.cfg.switch_width)
        return self.acsf(b, mm_weight=w)

    def _apply(self, fn: Any, recurse: bool = True) -> HDNNP:
        # ``.to(float32)`` casts every buffer; the per-element energy offsets stay float64, since a
        # molecule's total (~1e6 kJ/mol) has a float32 spacing of 0.06-0.5 kJ/mol.
        shift = self.e_shift
        super()._apply(fn, recurse)
        self.e_shift = shift.to(device=self.e_scale.device, dtype=torch.float64)
        return self

    def _network_part(self, b: FrameBatch, feats: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom network outputs times the energy scale (Nq,) in the model dtype, and species (Nq,)."""
        x = self.features(b) if feats is None else feats
        sp = self.acsf.species(b.qm_z)
        out = torch.zeros(len(sp), dtype=x.dtype, device=x.device)
        for e, net in enumerate(self.nets):
            idx = torch.nonzero(sp == e).flatten()
            if len(idx) == 0:
                continue
            xe = (x[idx] - self.feat_mean[e]) / self.feat_std[e]
            out = out.index_copy(0, idx, net(xe).squeeze(-1) * self.e_scale)
        return out, sp

    def atomic_energies(self, b: FrameBatch, feats: torch.Tensor | None = None) -> torch.Tensor:
        """(Nq,) atomic energies in kJ/mol (float64: network part + per-element offset)."""
        nn_part, sp = self._network_part(b, feats)
        return nn_part.double() + self.e_shift[sp]

    def forward(self, b: FrameBatch, feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) energies in kJ/mol, float64 whatever the model dtype.

        The network outputs (small) are summed in the model dtype, the per-element offsets (large)
        in float64, so float32 models keep sub-0.01 kJ/mol resolution of total energies."""
        nn_part, sp = self._network_part(b, feats)
        e_nn = torch.zeros(b.n_frames, dtype=nn_part.dtype, device=nn_part.device).index_add(0, b.qm_frame, nn_part)
        e_off = torch.zeros(b.n_frames, dtype=torch.float64, device=nn_part.device).index_add(
            0, b.qm_frame, self.e_shift[sp]
        )
        return e_nn.double() + e_off


def with_grad_inputs(b: FrameBatch, charges: bool = False) -> FrameBatch:
    """A copy of ``b`` (no targets) whose QM and MM positions (and, if ``charges``, MM charges) are
    fresh leaf tensors that require grad, for forces (and dE/dq) by autograd."""
    return FrameBatch(
        qm_z=b.qm_z,
        qm_pos=b.qm_pos.detach().requires_grad_(True),
        qm_frame=b.qm_frame,
        mm_pos=b.mm_pos.detach().requires_grad_(True),
        mm_q=b.mm_q.detach().requires_grad_(charges),
        mm_frame=b.mm_frame,
        mm_mol=b.mm_mol,
        n_frames=b.n_frames,
        meta=b.meta,
    )


def energy_and_forces(
    model: nn.Module, b: FrameBatch, create_graph: bool = False, potential: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Energies (B,), QM forces (Nq, 3), MM forces (Nm, 3) and optionally dE/dq (Nm,) of a model.

    ``create_graph`` keeps the graph for a force loss (training).
    """
    bb = with_grad_inputs(b, potential)
    qm, mm, q = bb.qm_pos, bb.mm_pos, bb.mm_q
    with torch.enable_grad():
        e = model(bb)
        inputs = [qm, mm] + ([q] if potential else [])
        grads = torch.autograd.grad(e.sum(), inputs, create_graph=create_graph, allow_unused=True)
    gq = grads[0] if grads[0] is not None else torch.zeros_like(qm)
    gm = grads[1] if grads[1] is not None else torch.zeros_like(mm)
    pot = None
    if potential:
        pot = grads[2] if grads[2] is not None else torch.zeros_like(q)
    return e, -gq, -gm, pot

"""High-dimensional neural network potential (Behler-Parrinello) with the MM environment as an element.

E = sum_i [ shift_{e(i)} + scale * NN_{e(i)}((x_i - mean_e) / std_e) ] over QM atoms i, where x_i are
the ACSF features (QM neighbours and charge-weighted MM atoms) and e(i) the element of atom i.
Forces on QM and MM atoms are minus the autograd gradient of E with respect to their positions.

With smooth embedding (switch_width > 0) the MM charges are scaled inside the model by the same
molecule switching function as in the labels, computed from positions, so autograd includes the
switching force exactly.

Electrostatics from physics (``electrostatics="charges"``, the default of new models): per-element
networks map the same scaled features to environment-dependent QM atomic charges q_i, shifted evenly
within each frame so that they add up to the QM region's total charge (``charge_sum="total"``, direct
models) or to zero (``"zero"``, delta models: the correction to the baseline's charges), and the model
adds their Coulomb energy in the exact potential of the embedded, switched MM charges:

    E = E_short + k_e sum_i q_i phi_i,      phi_i = sum_J S_J q_J / r_iJ    (k_e = 138.935 kJ/mol nm/e^2)

so the 1/r coupling to every embedded charge, which the labels contain out to the cutoff, is
represented exactly, and the short-range networks only need the first solvation shells: with the term,
E_short does not see the long-range features (potential and field), only the charge networks do (the
charges polarise in the field). So a distant charge interacts with the model through the charges alone:
its energy tends to k_e q (Q/R + mu.R/R^3 + ...) with the QM region's model charges and dipole
(tests/test_descriptors.py); a short-range network fed the potential would add a spurious 1/R term. Forces on QM
and MM atoms (through q_i, phi_i and the switching weights) by autograd, as for E_short.

Induced dipoles (``electrostatics="charges+polarisability"``): further per-element networks give each QM atom a
polarisability alpha_i (nm^3, in units of ALPHA_UNIT_NM3 = 1e-3 nm^3 = 1 A^3 per network output; no sign
constraint, since a delta model learns the target's polarisability minus the baseline's, and DFTB has no
on-site dipole response at all), and the model adds the energy of the dipoles alpha_i E_i induced by the
exact field E_i of the embedded, switched charges:

    E += -1/2 k_e sum_i alpha_i |E_i|^2,      E_i = sum_J S_J q_J (r_i - r_J) / r_iJ^3

(the dipoles are not coupled to each other: the first-order response, as in EMLE's induced term without
its self-consistency). The networks start at alpha = 0, so such a model starts as the charges-only one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.descriptors.acsf import ACSF, DescriptorConfig
from qmlmm.descriptors.qm_mm import QMMMBlock, potential_and_field, qm_mm_blocks, shortest_qm_distance
from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH, EmbeddingSettings
from qmlmm.errors import InputError
from qmlmm.switching import switch_value
from qmlmm.units import COULOMB_KJMOL_NM

__all__ = [
    "ALPHA_UNIT_NM3",
    "ELECTROSTATICS",
    "HDNNP",
    "ModelConfig",
    "ModelInputs",
    "energy_and_forces",
    "induction_energies",
    "switch_weights",
]

#: the model's electrostatic term: none, environment-dependent QM charges in the MM potential, or those and
#: induced dipoles of environment-dependent polarisabilities in the MM field
ELECTROSTATICS = ("none", "charges", "charges+polarisability")
#: nm^3 per unit of the polarisability networks' output (1 A^3, an atom's polarisability volume's size)
ALPHA_UNIT_NM3 = 1e-3
CHARGE_SUMS = ("total", "zero")

_ACT = {"silu": nn.SiLU, "tanh": nn.Tanh, "celu": nn.CELU, "softplus": nn.Softplus}


@dataclass
class ModelConfig:
    """Architecture of one network of the ensemble.

    ``electrostatics``: "charges" (predicted QM charges in the exact MM potential, module docstring),
    "charges+polarisability" (and induced dipoles in the exact MM field) or "none"; ``charge_hidden``: hidden
    layers of the per-element charge (and polarisability) networks; ``charge_sum``: what the charges of a
    frame add up to, "total" (its QM charge) or "zero" (delta models).
    """

    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "silu"
    cutoff: float = DEFAULT_CUTOFF  # embedding cutoff (nm) of the labels the model learns
    switch_width: float = DEFAULT_SWITCH_WIDTH  # smooth embedding width (nm), as in the labels
    electrostatics: str = "charges"
    charge_hidden: list[int] = field(default_factory=lambda: [16])
    charge_sum: str = "total"

    def __post_init__(self) -> None:
        if self.electrostatics not in ELECTROSTATICS:
            raise InputError(f"electrostatics must be one of {ELECTROSTATICS}, got {self.electrostatics!r}")
        if self.charge_sum not in CHARGE_SUMS:
            raise InputError(f"charge_sum must be one of {CHARGE_SUMS}, got {self.charge_sum!r}")
        if self.has_polarisability and not (self.descriptor.long_range and not self.descriptor.long_range_damped):
            raise InputError("electrostatics 'charges+polarisability' needs the exact field: descriptor long_range "
                             "on and long_range_damped off")  # fmt: skip
        if self.activation not in _ACT:
            raise InputError(f"activation must be one of {sorted(_ACT)}, got {self.activation!r}")
        for name in ("hidden", "charge_hidden"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in v):
                raise InputError(f"{name} must be a list of positive layer sizes, got {v!r}")

    def to_dict(self) -> dict[str, object]:
        return {
            "descriptor": self.descriptor.to_dict(),
            "hidden": list(self.hidden),
            "activation": self.activation,
            "cutoff": self.cutoff,
            "switch_width": self.switch_width,
            "electrostatics": self.electrostatics,
            "charge_hidden": list(self.charge_hidden),
            "charge_sum": self.charge_sum,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelConfig:
        """The config of a model file; files from before a setting existed get the value they were made with
        (sharp embedding, cosine-damped long-range features, no electrostatic term)."""
        desc = dict(d["descriptor"])  # type: ignore[call-overload]
        desc.setdefault("long_range_damped", True)
        return cls(
            descriptor=DescriptorConfig.from_dict(desc),
            hidden=[int(h) for h in d.get("hidden", [64, 64])],  # type: ignore[attr-defined]
            activation=str(d.get("activation", "silu")),
            cutoff=float(d.get("cutoff", 1.4)),  # type: ignore[arg-type]
            # model files without the key predate smooth embedding: they were trained on sharp labels
            switch_width=float(d.get("switch_width", 0.0)),  # type: ignore[arg-type]
            electrostatics=str(d.get("electrostatics", "none")),
            charge_hidden=[int(h) for h in d.get("charge_hidden", [16])],  # type: ignore[attr-defined]
            charge_sum=str(d.get("charge_sum", "total")),
        )

    @property
    def embedding(self) -> EmbeddingSettings:
        return EmbeddingSettings(self.cutoff, self.switch_width)

    @property
    def has_charges(self) -> bool:
        """The model predicts QM charges (electrostatics other than "none")."""
        return self.electrostatics != "none"

    @property
    def has_polarisability(self) -> bool:
        """The model predicts polarisabilities (induced dipoles in the MM field)."""
        return self.electrostatics == "charges+polarisability"


@dataclass
class ModelInputs:
    """What the members of an ensemble share: raw features (Nq, F) and, with the electrostatic term, the
    potential (Nq,) in e/nm and, with polarisabilities, the field (Nq, 3) in e/nm^2 of the embedded (switched)
    MM charges at every QM atom."""

    features: torch.Tensor
    potential: torch.Tensor | None = None
    field: torch.Tensor | None = None


def switch_weights(b: FrameBatch, cutoff: float, width: float, blocks: QMMMBlock | None = None) -> torch.Tensor:
    """(Nm,) molecule switching weight of every MM atom, differentiable in positions.

    S(d_J) with d_J the shortest distance between an atom of molecule J and a QM atom of its frame,
    the one switching function of :mod:`qmlmm.switching`, as the labels use it. ``blocks``: the batch's
    dense QM-MM distances, if the caller has them.
    """
    nm = len(b.mm_q)
    if width <= 0 or nm == 0:
        return torch.ones(nm, dtype=b.mm_pos.dtype, device=b.mm_pos.device)
    dmin = shortest_qm_distance(b, qm_mm_blocks(b) if blocks is None else blocks)
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
    q_shift: torch.Tensor
    short_cols: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.acsf = ACSF(cfg.descriptor)
        ne, nf = self.acsf.n_el, self.acsf.n_features
        self.register_buffer("feat_mean", torch.zeros(ne, nf))
        self.register_buffer("feat_std", torch.ones(ne, nf))
        self.register_buffer("e_shift", torch.zeros(ne, dtype=torch.float64))  # float64 always (see _apply)
        self.register_buffer("e_scale", torch.ones(()))
        # columns of the features the short-range energy networks see: all, or, with the electrostatic
        # term, all but the long-range block (the charges carry the long range)
        cols = torch.arange(nf)
        if cfg.has_charges and self.acsf.sizes["long_range"]:
            sz = self.acsf.sizes  # block order: qm_radial, qm_angular, mm_radial, long_range, mm_angular
            start = sz["qm_radial"] + sz["qm_angular"] + sz["mm_radial"]
            cols = torch.cat([cols[:start], cols[start + self.acsf.sizes["long_range"] :]])
        self.register_buffer("short_cols", cols, persistent=False)
        self.nets = _element_mlps(ne, len(cols), cfg.hidden, cfg.activation)
        if cfg.has_charges:
            self.charge_nets = _zero_start_mlps(ne, nf, cfg.charge_hidden, cfg.activation)  # evenly shared charges
            self.register_buffer("q_shift", torch.zeros(ne))  # per-element mean charge (e), set by training
        if cfg.has_polarisability:
            self.pol_nets = _zero_start_mlps(ne, nf, cfg.charge_hidden, cfg.activation)  # alpha = 0 at the start

    @property
    def elements(self) -> list[int]:
        return self.acsf.elements

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _switches_charges(self, b: FrameBatch) -> bool:
        """Whether the model switches ``b``'s raw MM charges itself (smooth embedding, and the batch does not
        say its charges are already the switched ones, as engines receive them)."""
        return self.cfg.switch_width > 0 and not b.meta.get("switched")

    def _mm_weight(self, b: FrameBatch, blocks: QMMMBlock | None = None) -> torch.Tensor | None:
        if self._switches_charges(b):
            return switch_weights(b, self.cfg.cutoff, self.cfg.switch_width, blocks)
        return None

    def inputs(self, b: FrameBatch) -> ModelInputs:
        """Features and (with the electrostatic term) the MM potential at the QM atoms, computed once for
        all members. With smooth embedding the raw MM charges are switched here, unless the batch says its
        charges are already the switched ones (``b.meta["switched"]``, as engines receive them)."""
        # every QM-MM distance once, where the switching weights need them (potential and pair lists share them;
        # with the compiled kernels and already switched charges, as in MD, nothing does)
        blocks = qm_mm_blocks(b) if self._switches_charges(b) else None
        w = self._mm_weight(b, blocks)
        f = self.acsf.features_and_fields(b, mm_weight=w, blocks=blocks)
        phi = f.potential
        if self.cfg.has_charges and phi is None:  # long-range features off or damped: the exact potential here
            phi = potential_and_field(b, b.mm_q if w is None else b.mm_q * w, blocks)[0]
        return ModelInputs(f.x, phi if self.cfg.has_charges else None, f.field if self.cfg.has_polarisability else None)

    def features(self, b: FrameBatch) -> torch.Tensor:
        """Raw (unscaled) features (Nq, F)."""
        return self.acsf(b, mm_weight=self._mm_weight(b))

    def _apply(self, fn: Any, recurse: bool = True) -> HDNNP:
        # ``.to(float32)`` casts every buffer; the per-element energy offsets stay float64, since a
        # molecule's total (~1e6 kJ/mol) has a float32 spacing of 0.06-0.5 kJ/mol.
        shift = self.e_shift
        super()._apply(fn, recurse)
        self.e_shift = shift.to(device=self.e_scale.device, dtype=torch.float64)
        return self

    def _per_element(
        self, nets: nn.ModuleList, x: torch.Tensor, sp: torch.Tensor, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(Nq,) output of each atom's element network on its scaled features (columns ``cols``: all)."""
        out = torch.zeros(len(sp), dtype=x.dtype, device=x.device)
        for e, net in enumerate(nets):
            idx = torch.nonzero(sp == e).flatten()
            if len(idx) == 0:
                continue
            xe = (x[idx] - self.feat_mean[e]) / self.feat_std[e]
            out = out.index_copy(0, idx, net(xe if cols is None else xe[:, cols]).squeeze(-1))
        return out

    def _resolve(self, b: FrameBatch, inputs: ModelInputs | torch.Tensor | None) -> ModelInputs:
        if inputs is None:
            return self.inputs(b)
        if isinstance(inputs, torch.Tensor):  # features alone (models without the electrostatic term)
            if self.cfg.electrostatics != "none":
                raise InputError("this model needs ModelInputs with the MM potential, not features alone")
            return ModelInputs(inputs)
        return inputs

    def charges(self, b: FrameBatch, inputs: ModelInputs | torch.Tensor | None = None) -> torch.Tensor:
        """(Nq,) QM atomic charges in e (model dtype): network outputs plus the per-element shift, shifted
        evenly within each frame to add up to its QM charge (``charge_sum`` "total") or to zero."""
        if not self.cfg.has_charges:
            raise InputError("this model has no charges (electrostatics: none)")
        inp = self._resolve(b, inputs)
        sp = self.acsf.species(b.qm_z)
        raw = self._per_element(self.charge_nets, inp.features, sp) + self.q_shift[sp]
        return charges_adding_up(raw, b, self.cfg.charge_sum)

    def polarisabilities(self, b: FrameBatch, inputs: ModelInputs | torch.Tensor | None = None) -> torch.Tensor:
        """(Nq,) QM atomic polarisabilities in nm^3 (model dtype; a delta model's may be negative)."""
        if not self.cfg.has_polarisability:
            raise InputError(f"this model has no polarisabilities (electrostatics: {self.cfg.electrostatics})")
        inp = self._resolve(b, inputs)
        return self._per_element(self.pol_nets, inp.features, self.acsf.species(b.qm_z)) * ALPHA_UNIT_NM3

    def _network_part(
        self, b: FrameBatch, inputs: ModelInputs | torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies without the offsets (Nq,) in the model dtype: short-range network times the
        energy scale, plus k_e q_i phi_i with the electrostatic term; and species (Nq,)."""
        inp = self._resolve(b, inputs)
        sp = self.acsf.species(b.qm_z)
        out = self._per_element(self.nets, inp.features, sp, self.short_cols) * self.e_scale
        if self.cfg.has_charges:
            assert inp.potential is not None
            q = self.charges(b, inp)
            if self.training:  # (Nq,) of the last training evaluation, for the trainer's charge loss
                self.last_charges = q
            out = out + COULOMB_KJMOL_NM * q * inp.potential
        if self.cfg.has_polarisability:
            assert inp.field is not None
            out = out + induction_energies(self.polarisabilities(b, inp), inp.field)
        return out, sp

    def atomic_energies(self, b: FrameBatch, inputs: ModelInputs | torch.Tensor | None = None) -> torch.Tensor:
        """(Nq,) atomic energies in kJ/mol (float64: network part + per-element offset)."""
        nn_part, sp = self._network_part(b, inputs)
        return nn_part.double() + self.e_shift[sp]

    def forward(self, b: FrameBatch, inputs: ModelInputs | torch.Tensor | None = None) -> torch.Tensor:
        """(B,) energies in kJ/mol, float64 whatever the model dtype.

        The network outputs (small) are summed in the model dtype, the per-element offsets (large)
        in float64, so float32 models keep sub-0.01 kJ/mol resolution of total energies."""
        nn_part, sp = self._network_part(b, inputs)
        return frame_energies(nn_part, self.e_shift[sp], b)


def charges_adding_up(raw: torch.Tensor, b: FrameBatch, charge_sum: str) -> torch.Tensor:
    """Charges (..., Nq) in e: ``raw`` (..., Nq) shifted evenly within each frame of ``b`` to add up to the
    frame's QM charge (``charge_sum`` "total") or to zero ("zero"); leading dimensions (ensemble members)
    are shifted each on their own."""
    if charge_sum == "total":
        target = b.total_charges().to(raw.dtype)
    else:
        target = torch.zeros(b.n_frames, dtype=raw.dtype, device=raw.device)
    n = torch.bincount(b.qm_frame, minlength=b.n_frames).to(raw.dtype)
    total = torch.zeros(*raw.shape[:-1], b.n_frames, dtype=raw.dtype, device=raw.device)
    total = total.index_add(-1, b.qm_frame, raw)
    return raw + ((target - total) / n.clamp(min=1))[..., b.qm_frame]


def frame_energies(nn_part: torch.Tensor, offsets: torch.Tensor, b: FrameBatch) -> torch.Tensor:
    """(..., B) frame energies in kJ/mol (float64) from per-atom network parts (..., Nq) in the model dtype
    and per-atom offsets (..., Nq) in float64: the small network parts are summed in the model dtype, the
    large offsets in float64, so float32 models keep sub-0.01 kJ/mol resolution of total energies."""
    lead = nn_part.shape[:-1]
    e_nn = torch.zeros(*lead, b.n_frames, dtype=nn_part.dtype, device=nn_part.device).index_add(-1, b.qm_frame, nn_part)
    e_off = torch.zeros(*offsets.shape[:-1], b.n_frames, dtype=torch.float64, device=nn_part.device)
    return e_nn.double() + e_off.index_add(-1, b.qm_frame, offsets)


def induction_energies(alpha: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """(..., Nq) energies in kJ/mol of the dipoles induced in QM atoms of polarisability ``alpha`` (..., Nq) nm^3
    by the field (Nq, 3) e/nm^2: -1/2 k_e alpha_i |E_i|^2."""
    return -0.5 * COULOMB_KJMOL_NM * alpha * (field * field).sum(-1)


def _zero_start_mlps(n_el: int, n_in: int, hidden: list[int], activation: str) -> nn.ModuleList:
    """Per-element MLPs whose last layer starts at zero (output 0 until training moves it)."""
    nets = _element_mlps(n_el, n_in, hidden, activation)
    for net in nets:
        nn.init.zeros_(net[-1].weight)  # type: ignore[index]
        nn.init.zeros_(net[-1].bias)  # type: ignore[index]
    return nets


def _element_mlps(n_el: int, n_in: int, hidden: list[int], activation: str) -> nn.ModuleList:
    """One MLP per element: n_in -> hidden layers (activation) -> 1."""
    act = _ACT[activation]
    nets = []
    for _ in range(n_el):
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, 1))
        nets.append(nn.Sequential(*layers))
    return nn.ModuleList(nets)


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
        qm_charge=b.qm_charge,
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

"""All members of an ensemble in one pass: every element's K networks as one batched product per layer.

An ensemble of K HDNNPs with E elements runs K x E small MLPs of each kind (energy, and with the
electrostatic term charge and polarisability networks), each a few (n_e, 64) products: on retinoic acid
(50 QM atoms, 3 elements present, K = 4) a loop over them costs ~7 ms of forward and backward on 2
threads, most of it per-operation overhead. Here the atoms are laid out per element in padded rows,
(E', n_max) for the E' elements present, and every layer of every element and member is one product of
(E', K, n_max, n_in) with the stacked weights (E', K, n_in, n_out); the first layers of all network kinds,
which read the same scaled features, are one product together (the energy networks' weights widened with
zero rows where they skip the long-range columns), and each member's feature scaling is folded into its first
layer, so that all members read the raw features: one product of width K x (sum of widths), whose backward
needs no sum over members. Padding rows compute on atom 0's features and are never read back. An eval-mode
ensemble stacks the weights once and reuses them while no member changes (:class:`StackCache`, ~1 ms of
stacking a call otherwise); without a cache they are stacked on every call, with gradients to every
parameter. Same numbers as :meth:`HDNNP.forward` of each member, to rounding (tests/test_descriptors.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qmlmm.batch import FrameBatch
from qmlmm.models.hdnnp import ALPHA_UNIT_NM3, HDNNP, ModelInputs, charges_adding_up, frame_energies, induction_energies
from qmlmm.units import COULOMB_KJMOL_NM

__all__ = ["StackCache", "fused_member_energies"]


@dataclass
class _ElementRows:
    """QM atoms laid out per element: ``present`` (E',) element indices with atoms, ``rows`` (E', W) the atom
    in each padded slot (padding: atom 0), and ``slot`` (Nq,) each atom's flat slot e * W + row."""

    present: torch.Tensor
    rows: torch.Tensor
    slot: torch.Tensor


@torch.no_grad()
def _element_rows(sp: torch.Tensor, n_el: int) -> _ElementRows:
    """The per-element layout of atoms of species ``sp`` (Nq,) among ``n_el`` elements."""
    counts = torch.bincount(sp, minlength=n_el)
    present = torch.nonzero(counts).flatten()
    width = int(counts.max()) if len(sp) else 0
    order = torch.sort(sp, stable=True).indices
    start = torch.cumsum(counts, 0) - counts
    row_of_el = torch.full((n_el,), -1, dtype=torch.long, device=sp.device)
    row_of_el[present] = torch.arange(len(present), device=sp.device)
    s = sp[order]
    within = torch.arange(len(sp), device=sp.device) - start[s]
    rows = torch.zeros(len(present), width, dtype=torch.long, device=sp.device)
    rows[row_of_el[s], within] = order
    slot = torch.empty_like(sp)
    slot[order] = row_of_el[s] * width + within
    return _ElementRows(present, rows, slot)


def _linears(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]  # type: ignore[attr-defined]


def _stacked(layers: list[list[nn.Linear]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (E', K, in, out) and biases (E', K, 1, out) of one layer, ``layers[e][k]``."""
    w = torch.stack([torch.stack([lay.weight for lay in row]) for row in layers]).transpose(-1, -2)
    b = torch.stack([torch.stack([lay.bias for lay in row]) for row in layers])[:, :, None, :]
    return w.contiguous(), b


@dataclass
class _Stacked:
    """The members' weights for the elements present, stacked once: the members' mean feature means
    ``centre`` (E', 1, F); the first layers of all kinds and all members as one (E', F, K S) product on the
    features minus ``centre``, with its bias (E', 1, K S) (S the sum of the kinds' widths, each kind's width in
    ``widths``; each member's feature scaling folded in); each kind's later layers as (weights, biases) pairs;
    the activation (identity where no network has a hidden layer)."""

    centre: torch.Tensor
    first: tuple[torch.Tensor, torch.Tensor]
    widths: list[int]
    later: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    act: nn.Module


def _stack_weights(members: Sequence[HDNNP], kinds: list[str], present: list[int]) -> _Stacked:
    """:class:`_Stacked` of ``members`` for the element indices ``present`` and network ``kinds``."""
    m0 = members[0]
    idx = torch.tensor(present, device=m0.feat_mean.device)
    mean = torch.stack([m.feat_mean for m in members])[:, idx].transpose(0, 1)[:, :, None]  # (E', K, 1, F)
    inv_std = 1.0 / torch.stack([m.feat_std for m in members])[:, idx].transpose(0, 1)[:, :, None]
    chains = {k: [[_linears(getattr(m, k)[e]) for m in members] for e in present] for k in kinds}
    nf = mean.shape[-1]
    firsts = []
    for k in kinds:
        w, b = _stacked([[lin[0] for lin in row] for row in chains[k]])
        if w.shape[2] != nf:  # energy networks skip the long-range columns: zero rows there
            w = w.new_zeros(*w.shape[:2], nf, w.shape[3]).index_copy(2, m0.short_cols, w)
        firsts.append((w, b))
    later = {
        k: [_stacked([[lin[li] for lin in row] for row in chains[k]]) for li in range(1, len(chains[k][0][0]))]
        for k in kinds
    }
    acts = [m for k in kinds for m in getattr(m0, k)[0] if not isinstance(m, nn.Linear)]
    act = acts[0] if acts else nn.Identity()  # none: no network has a hidden layer, act is never called
    w, b = torch.cat([w for w, _ in firsts], -1), torch.cat([b for _, b in firsts], -1)  # (E', K, F, S), (E', K, 1, S)
    # ((x - m) / s) @ w + b = (x - c) @ (w / s) + (b - ((m - c) / s) @ w) with c the members' mean m: every
    # member's first layer reads the same centred features, so all K are one product of width K S (its
    # backward one product, no sum over K). Centring by c keeps float32 as exact as before where the members
    # share their feature means (the common case); the folding itself runs in float64
    dt = w.dtype
    w64, m64, inv64 = w.double(), mean.double(), inv_std.double()
    centre = m64.mean(1, keepdim=True)  # (E', 1, 1, F)
    scaled_w = w64 * inv64.transpose(-1, -2)
    scaled_b = b.double() - ((m64 - centre) * inv64) @ w64
    first = (
        scaled_w.permute(0, 2, 1, 3).flatten(2).to(dt).contiguous(),  # (E', F, K S), member-major columns
        scaled_b.permute(0, 2, 1, 3).flatten(2).to(dt).contiguous(),
    )
    return _Stacked(centre[:, 0].to(dt), first, [w.shape[3] for w, _ in firsts], later, act)


class StackCache:
    """The last stacked weights of an ensemble (:class:`_Stacked`) and its atoms' element layout, reused while
    the members, network kinds and elements are the same and every tensor they were made from is the same
    object, on the same storage, unchanged in place: their version counters only grow, so an unchanged sum
    means no optimiser step, load_state_dict or in-place edit since; a replaced parameter, buffer or network
    (``load_state_dict(assign=True)``, ``p.data = ...``, ``vector_to_parameters``, a ``.to()`` that converts
    them) is a different object or storage. Checked on every call (~0.05 ms). Never made under
    ``torch.inference_mode`` (its tensors could not be used for forces afterwards). Pickles empty."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: tuple[object, ...] | None = None
        self.tensors: list[torch.Tensor] = []
        self.storage: list[int] = []
        self.versions = -1
        self.stacked: _Stacked | None = None
        self.species: torch.Tensor | None = None
        self.rows: _ElementRows | None = None

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.clear()


def _tensors_used(members: Sequence[HDNNP], kinds: list[str], present: list[int]) -> list[torch.Tensor]:
    """Every tensor :func:`_stack_weights` reads, as the members hold them now (through the modules'
    dictionaries: nn.Module attribute access would cost ~0.1 ms a call)."""
    out: list[torch.Tensor] = []
    for m in members:
        buf = m._buffers
        out += [buf["feat_mean"], buf["feat_std"], buf["short_cols"]]  # type: ignore[list-item]
        for k in kinds:
            nets = m._modules[k]._modules  # type: ignore[union-attr]
            for e in present:
                for layer in nets[str(e)]._modules.values():  # type: ignore[union-attr]
                    par = layer._parameters  # type: ignore[union-attr]
                    if par:
                        out += [par["weight"], par["bias"]]  # type: ignore[list-item]
    return out


def _stacked_weights(
    members: Sequence[HDNNP], kinds: list[str], present: list[int], cache: StackCache | None
) -> _Stacked:
    """The stacked weights of ``members``, from ``cache`` while they are current (made again otherwise)."""
    if cache is None or torch.is_inference_mode_enabled():
        return _stack_weights(members, kinds, present)
    key = (tuple(id(m) for m in members), tuple(kinds), tuple(present))
    now = _tensors_used(members, kinds, present)
    storage = [t.data_ptr() for t in now]
    versions = sum(t._version for t in now)
    if (
        cache.stacked is not None
        and cache.key == key
        and len(now) == len(cache.tensors)
        and all(a is b for a, b in zip(now, cache.tensors, strict=True))
        and storage == cache.storage
        and versions == cache.versions
    ):
        return cache.stacked
    cache.clear()
    with torch.no_grad():  # a cached copy must not hold a graph to the parameters
        cache.stacked = _stack_weights(members, kinds, present)
    cache.tensors, cache.storage, cache.versions, cache.key = now, storage, versions, key
    return cache.stacked


def _cached_rows(sp: torch.Tensor, n_el: int, cache: StackCache | None) -> _ElementRows:
    """:func:`_element_rows`, from ``cache`` while the species are the same (every step of an MD run)."""
    if cache is None or torch.is_inference_mode_enabled():
        return _element_rows(sp, n_el)
    same = cache.species is not None and cache.species.shape == sp.shape and torch.equal(cache.species, sp)
    if cache.rows is None or not same:
        cache.rows, cache.species = _element_rows(sp, n_el), sp.clone()
    return cache.rows


def _affine(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h @ w + b for h (E', K, W, in), w (E', K, in, out), b (E', K, 1, out): one batched product."""
    return torch.baddbmm(b.flatten(0, 1), h.flatten(0, 1), w.flatten(0, 1)).unflatten(0, h.shape[:2])


def _network_outputs(
    members: Sequence[HDNNP], kinds: list[str], x: torch.Tensor, sp: torch.Tensor, cache: StackCache | None
) -> dict[str, torch.Tensor]:
    """(K, Nq) output of every member's element networks of each kind ("nets", "charge_nets", "pol_nets") on
    its scaled features (the energy networks on their ``short_cols`` columns)."""
    lay = _cached_rows(sp, len(members[0].elements), cache)
    st = _stacked_weights(members, kinds, lay.present.tolist(), cache)
    n_members = len(members)
    h1 = torch.baddbmm(st.first[1], x[lay.rows] - st.centre, st.first[0])  # (E', W, K S)
    h1 = h1.unflatten(-1, (n_members, -1)).transpose(1, 2)  # (E', K, W, S)
    out = {}
    for k, h in zip(kinds, h1.split(st.widths, -1), strict=True):
        for w, b in st.later[k]:
            h = _affine(st.act(h), w, b)
        # (E', K, W, 1) -> (K, E' W) -> each atom's slot
        out[k] = h[..., 0].transpose(0, 1).flatten(1)[:, lay.slot]
    return out


def fused_member_energies(
    members: Sequence[HDNNP], b: FrameBatch, inputs: ModelInputs, cache: StackCache | None = None
) -> torch.Tensor:
    """(K, B) energies in kJ/mol (float64) of K members with one architecture, on shared ``inputs``; with a
    ``cache``, the members' weights are stacked once and reused while unchanged (:class:`StackCache`): then the
    energies are not differentiable in the parameters (the stacked copies carry no graph; training runs the
    members themselves). Without one they are stacked on every call, with gradients to every parameter.

    Each member: sum over QM atoms of its short-range network times its energy scale, plus (with the
    electrostatic term) k_e q_i phi_i with its charges, plus (with polarisabilities) -1/2 k_e alpha_i |E_i|^2,
    plus its per-element offsets, as :meth:`HDNNP.forward`.
    """
    m0 = members[0]
    sp = m0.acsf.species(b.qm_z)
    kinds = ["nets"] + ["charge_nets"] * m0.cfg.has_charges + ["pol_nets"] * m0.cfg.has_polarisability
    nets = _network_outputs(members, kinds, inputs.features, sp, cache)  # each (K, Nq)
    out = nets["nets"] * torch.stack([m.e_scale for m in members])[:, None]
    if m0.cfg.has_charges:
        assert inputs.potential is not None
        q_shift = torch.stack([m.q_shift for m in members])  # (K, E)
        q = charges_adding_up(nets["charge_nets"] + q_shift[:, sp], b, m0.cfg.charge_sum)
        out = out + COULOMB_KJMOL_NM * q * inputs.potential[None, :]
    if m0.cfg.has_polarisability:
        assert inputs.field is not None
        out = out + induction_energies(nets["pol_nets"] * ALPHA_UNIT_NM3, inputs.field)
    shift = torch.stack([m.e_shift for m in members])[:, sp]  # (K, Nq) float64
    return frame_energies(out, shift, b)

"""Compiled CPU kernels of the descriptor, built on first use with torch's C++ extension loader.

The angular terms (:class:`qmlmm.descriptors.terms.QMAngular` and :class:`~qmlmm.descriptors.terms.MMAngular`)
were the largest part of a model call in MD: in torch's form each is a few dozen tensor operations over
triples or (pairs x MM neighbours) blocks, forward and backward ~2-4 ms each of a ~15 ms call on retinoic
acid in water (2 threads); the MM radial term and the exact potential and field of the embedded charges
(:class:`~qmlmm.descriptors.terms.LongRange`) have kernels too, and so do the QM-QM and QM-MM pair lists
(without the dense QM-MM distance block that torch's form builds for them). The kernels
(``qmlmm/kernels/angular.cpp``, built and loaded by :mod:`qmlmm.compiled`) compute the same sums centre by
centre, with analytic first derivatives. They have no second derivative, so models use them only in eval
mode (MD, prediction, labelling, evaluation); training, whose force loss differentiates the forces again,
uses the torch form. Both forms give the same numbers (tests/test_native.py). Where the kernels cannot be
built, or with ``QMLMM_NATIVE=0``, the torch form runs.
"""

from __future__ import annotations

from typing import Any

import torch

from qmlmm.compiled import STALE_LOCK_SECONDS, build_directory, wait_for_build_lock
from qmlmm.compiled import available as native_available
from qmlmm.compiled import module as _module

__all__ = [
    "STALE_LOCK_SECONDS",
    "build_directory",
    "mm_angular",
    "mm_radial",
    "native_available",
    "pairs_within",
    "potential_and_field",
    "qm_angular",
    "wait_for_build_lock",
]


class _MMAngular(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        ad: torch.Tensor,
        cvec: torch.Tensor,
        wq: torch.Tensor,
        consts: tuple[torch.Tensor, ...],
        n_rows: int,
        lengths: tuple[float, float, float],
    ) -> torch.Tensor:
        mod = _module()
        assert mod is not None
        ad, cvec, wq = ad.contiguous(), cvec.contiguous(), wq.contiguous()
        ctx.save_for_backward(ad, cvec, wq)
        ctx.consts, ctx.lengths = consts, lengths
        a_ptr, c_ptr, arow, shifts, zetas, lams, zint = consts
        return mod.mm_angular_forward(a_ptr, c_ptr, arow, ad, cvec, wq, shifts, zetas, lams, zint, n_rows, *lengths)

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[Any, ...]:
        _first_derivative_only()
        mod = _module()
        assert mod is not None
        ad, cvec, wq = ctx.saved_tensors
        a_ptr, c_ptr, arow, shifts, zetas, lams, zint = ctx.consts
        gad, gcvec, gwq = mod.mm_angular_backward(
            gout, a_ptr, c_ptr, arow, ad, cvec, wq, shifts, zetas, lams, zint, *ctx.lengths
        )
        return gad, gcvec, gwq, None, None, None


def _first_derivative_only() -> None:
    """Refuse a backward pass that builds a graph (``create_graph``, as for a force loss or a Hessian): the
    kernels' derivatives are not differentiable, and a second derivative would silently miss their part.
    (torch's once_differentiable raises only when the incoming gradient itself requires grad.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the descriptor's compiled kernels have first derivatives only, and this backward pass builds a "
            "graph for a second one (create_graph=True): put the model in train mode, or set native = False "
            "on its angular and MM radial terms, for the torch form"
        )


def _offsets(centre: torch.Tensor, n: int) -> torch.Tensor:
    """(n + 1,) CSR offsets of items sorted by ``centre`` (P,) over centres (or frames) 0..n-1 (unsorted, or an
    index beyond n - 1: an error, since the kernels would sum wrong items silently or read past the offsets)."""
    if len(centre) > 1 and bool((centre[1:] < centre[:-1]).any()):
        raise ValueError("the descriptor kernels need their lists sorted by centre (or by frame)")
    if len(centre) and not 0 <= int(centre[0]) <= int(centre[-1]) < n:
        raise ValueError(f"the descriptor kernels got a centre (or frame) index outside 0..{n - 1}")
    counts = torch.bincount(centre, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _angular_settings(shifts: torch.Tensor, zl: list[tuple[float, float]], dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The kernels' angular settings: shifts (ns,), zetas and lambdas (nzl,) in ``dt``, and the zetas as whole
    numbers (int32; 0 where pow is needed: not whole, or above 16) from the (zeta, lambda) pairs ``zl``."""
    zetas = [z for z, _ in zl]
    whole = [int(z) if float(z).is_integer() and 1 <= z <= 16 else 0 for z in zetas]
    return (
        shifts.to(dt).contiguous(),
        torch.tensor(zetas, dtype=dt),
        torch.tensor([lam for _, lam in zl], dtype=dt),
        torch.tensor(whole, dtype=torch.int32),
    )


def mm_angular(
    ai: torch.Tensor,
    arow: torch.Tensor,
    ad: torch.Tensor,
    ci: torch.Tensor,
    cvec: torch.Tensor,
    wq: torch.Tensor,
    n_centres: int,
    n_rows: int,
    shifts: torch.Tensor,
    zl: list[tuple[float, float]],
    width: float,
    cutoff: float,
    qm_cutoff: float,
) -> torch.Tensor:
    """(n_rows, nzl C ns) sums of the MM angular term (layout [zeta-lambda, channel, shift]).

    ai (P,) centre of every QM pair, sorted; arow (P,) the output row of each pair; ad (P, 3) nm the pair
    vectors r_j - r_i; ci (M,) centre of every QM-MM pair, sorted; cvec (M, 3) nm the vectors r_K - r_i;
    wq (M, C) e the channel weights of the MM atoms; shifts (ns,) nm; ``zl`` the (zeta, lambda) pairs, zeta
    >= 1; the Gaussian ``width`` and the MM and QM angular cutoffs in nm. Differentiable once in ``ad``,
    ``cvec`` and ``wq``.
    """
    consts = (
        _offsets(ai, n_centres),
        _offsets(ci, n_centres),
        arow.contiguous(),
        *_angular_settings(shifts, zl, ad.dtype),
    )
    out: torch.Tensor = _MMAngular.apply(ad, cvec, wq, consts, n_rows, (width, cutoff, qm_cutoff))
    return out


class _QMAngular(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, ad: torch.Tensor, consts: tuple[torch.Tensor, ...], n_ep: int, lengths: tuple[float, float]
    ) -> torch.Tensor:
        mod = _module()
        assert mod is not None
        ad = ad.contiguous()
        ctx.save_for_backward(ad)
        ctx.consts, ctx.n_ep, ctx.lengths = consts, n_ep, lengths
        a_ptr, el, pidx, shifts, zetas, lams, zint = consts
        return mod.qm_angular_forward(a_ptr, el, pidx, n_ep, ad, shifts, zetas, lams, zint, *lengths)

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[Any, ...]:
        _first_derivative_only()
        mod = _module()
        assert mod is not None
        (ad,) = ctx.saved_tensors
        a_ptr, el, pidx, shifts, zetas, lams, zint = ctx.consts
        gad = mod.qm_angular_backward(gout, a_ptr, el, pidx, ctx.n_ep, ad, shifts, zetas, lams, zint, *ctx.lengths)
        return gad, None, None, None


def qm_angular(
    ai: torch.Tensor,
    el: torch.Tensor,
    ad: torch.Tensor,
    pair_index: torch.Tensor,
    n_pairs: int,
    n_centres: int,
    shifts: torch.Tensor,
    zl: list[tuple[float, float]],
    width: float,
    cutoff: float,
) -> torch.Tensor:
    """(n_centres * n_ep, nzl ns) sums of the QM angular term over every two QM neighbours of each centre
    (layout [zeta-lambda, shift]; rows centre by centre, then element pair).

    ai (P,) centre of every QM pair within ``cutoff`` (nm), sorted; el (P,) the element index of its
    neighbour; ad (P, 3) nm the pair vectors r_j - r_i; pair_index (E, E) the element-pair row (0..n_pairs-1)
    of two neighbours' elements; shifts (ns,) nm; ``zl`` the (zeta, lambda) pairs, zeta >= 1; the Gaussian
    ``width`` in nm. Differentiable once in ``ad``.
    """
    consts = (
        _offsets(ai, n_centres),
        el.contiguous(),
        pair_index.contiguous(),
        *_angular_settings(shifts, zl, ad.dtype),
    )
    out: torch.Tensor = _QMAngular.apply(ad, consts, n_pairs, (width, cutoff))
    return out


class _MMRadial(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, r: torch.Tensor, wq: torch.Tensor, consts: tuple[torch.Tensor, ...], lengths: tuple[float, float]
    ) -> torch.Tensor:
        mod = _module()
        assert mod is not None
        r, wq = r.contiguous(), wq.contiguous()
        ctx.save_for_backward(r, wq)
        ctx.consts, ctx.lengths = consts, lengths
        c_ptr, shifts = consts
        return mod.mm_radial_forward(c_ptr, r, wq, shifts, *lengths)

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[Any, ...]:
        _first_derivative_only()
        mod = _module()
        assert mod is not None
        r, wq = ctx.saved_tensors
        c_ptr, shifts = ctx.consts
        gr, gwq = mod.mm_radial_backward(gout, c_ptr, r, wq, shifts, *ctx.lengths)
        return gr, gwq, None, None


def mm_radial(
    ci: torch.Tensor,
    r: torch.Tensor,
    wq: torch.Tensor,
    n_centres: int,
    shifts: torch.Tensor,
    width: float,
    cutoff: float,
) -> torch.Tensor:
    """(n_centres, C ns) sums of the MM radial term f_c(r) w_c exp(-(r - R_s)^2 / (2 w^2)) over each centre's
    QM-MM pairs (layout [channel, shift]).

    ci (M,) centre of every QM-MM pair, sorted; r (M,) nm their distances (pairs beyond ``cutoff`` add
    nothing); wq (M, C) e the channel weights; shifts (ns,) nm; ``width`` and ``cutoff`` in nm.
    Differentiable once in ``r`` and ``wq``.
    """
    consts = (_offsets(ci, n_centres), shifts.to(r.dtype).contiguous())
    out: torch.Tensor = _MMRadial.apply(r, wq, consts, (width, cutoff))
    return out


class _Field(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, qpos: torch.Tensor, mpos: torch.Tensor, q: torch.Tensor, ptrs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mod = _module()
        assert mod is not None
        qpos, mpos_t, q = qpos.contiguous(), mpos.t().contiguous(), q.contiguous()
        ctx.save_for_backward(qpos, mpos_t, q)
        ctx.ptrs = ptrs
        phi, field = mod.field_forward(ptrs[0], ptrs[1], qpos, mpos_t, q)
        return phi, field

    @staticmethod
    def backward(ctx: Any, gphi: torch.Tensor, gfield: torch.Tensor) -> tuple[Any, ...]:
        _first_derivative_only()
        mod = _module()
        assert mod is not None
        qpos, mpos_t, q = ctx.saved_tensors
        gq, gm, gc = mod.field_backward(gphi, gfield, ctx.ptrs[0], ctx.ptrs[1], qpos, mpos_t, q)
        return gq, gm, gc, None


def potential_and_field(
    qm_pos: torch.Tensor,
    qm_frame: torch.Tensor,
    mm_pos: torch.Tensor,
    mm_frame: torch.Tensor,
    q: torch.Tensor,
    n_frames: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Potential phi_i = sum_J q_J / r_iJ (Nq,) in e/nm and field E_i = sum_J q_J (r_i - r_J) / r_iJ^3 (Nq, 3)
    in e/nm^2 of the MM charges ``q`` (Nm,) e at the QM atoms ``qm_pos`` (Nq, 3) nm, over the pairs of each
    frame (``qm_frame`` (Nq,), ``mm_frame`` (Nm,): each sorted); MM positions (Nm, 3) nm. The kernel form of
    :func:`qmlmm.descriptors.qm_mm.potential_and_field`. Differentiable once in positions and charges."""
    ptrs = (_offsets(qm_frame, n_frames), _offsets(mm_frame, n_frames))
    phi, field = _Field.apply(qm_pos, mm_pos, q, ptrs)
    return phi, field


@torch.no_grad()
def pairs_within(
    pos_a: torch.Tensor,
    frame_a: torch.Tensor,
    pos_b: torch.Tensor,
    frame_b: torch.Tensor,
    n_frames: int,
    cutoff: float,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (i, j), i of set a and j of set b in the same frame, with |r_i - r_j| < ``cutoff`` nm, sorted by i
    (within an i by j): the kernel form of :func:`qmlmm.descriptors.neighbors.pairs_within` and
    :func:`qmlmm.descriptors.qm_mm.pairs_from_blocks`, without their dense distance blocks.

    pos_a (Na, 3), pos_b (Nb, 3) nm; frame_a (Na,), frame_b (Nb,) frame indices 0..n_frames-1, each sorted.
    ``exclude_self``: the sets are the same; drop i == j. Returns i (P,), j (P,) (int64, no gradient).
    """
    mod = _module()
    assert mod is not None
    ptr_a, ptr_b = _offsets(frame_a, n_frames), _offsets(frame_b, n_frames)
    dt = pos_a.dtype
    pi, pj = mod.pairs_within(
        ptr_a, ptr_b, pos_a.detach().contiguous(), pos_b.detach().to(dt).contiguous(), float(cutoff), exclude_self
    )
    return pi, pj

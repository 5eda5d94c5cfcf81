"""The compiled forms of DFTB's geometry-dependent matrices and point-charge potential (``kernels/dftb.cpp``) as
autograd functions, for the CPU in float64.

They compute what :meth:`DFTBCalculator._matrices_torch` and :meth:`DFTBCalculator._potential_torch` compute
(those stay as the fallback, for other devices and dtypes, and as the reference in tests), in one pass over
the atom pairs instead of some hundred small tensor operations, and their backward passes give the exact first
derivatives (forward-mode dual numbers per pair; no second derivatives). A DFTB3/MM step on one thread
spends most of its time outside the SCC in those operations and their autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["USE_KERNEL", "MatrixArgs", "compiled_matrices", "compiled_potential", "kernel_runs"]

#: the compiled matrices and potential where they can run (CPU, float64, kernels built); False: the torch
#: forms always (the tests compare the two)
USE_KERNEL = True


def kernel_runs(t: torch.Tensor) -> bool:
    """Whether the compiled forms run for tensors like ``t``: :data:`USE_KERNEL`, CPU, float64, and the
    kernels build (:mod:`qmlmm.compiled`; ``QMLMM_NATIVE=0`` turns them off)."""
    if not USE_KERNEL or t.device.type != "cpu" or t.dtype != torch.float64:
        return False
    from qmlmm.compiled import available

    return available()


@dataclass(frozen=True)
class MatrixArgs:
    """The constant arguments of the compiled matrices for one molecule (every tensor contiguous).

    idx: pair atoms i, j (P,), each atom's first orbital and highest shell (n,), each pair's slot in the B-A
    tables or -1 (P,), whether a pair has a hydrogen atom and the parameters a zeta (P,), U and U^d (n,);
    ab, ba: the A-B and B-A :class:`~qmlmm.engines.dftb.tensors.PairTables` as (coef, base, dr, k_max,
    r_max, tail); rep: the repulsive splines as (knots, k_max, coef, base, exp, cutoff); onsite (N,) Hartree;
    zeta (-1 without); tail_len Bohr; third: DFTB3's third-order kernels."""

    idx: list[torch.Tensor]
    ab: list[torch.Tensor]
    ba: list[torch.Tensor]
    rep: list[torch.Tensor]
    onsite: torch.Tensor
    zeta: float
    tail_len: float
    third: bool

    def as_list(self) -> list[Any]:
        return [self.idx, self.ab, self.ba, self.rep, self.onsite, self.zeta, self.tail_len, self.third]


def _native() -> Any:
    from qmlmm.compiled import module

    return module()


def _first_derivative_only() -> None:
    """Refuse a backward pass that builds a graph (``create_graph``, for a second derivative): the kernels'
    derivatives are not differentiable, and a second derivative would silently miss their part (torch's
    once_differentiable raises only when a path to the inputs runs through the incoming gradients)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "DFTB's compiled matrices and potential have first derivatives only, and this backward pass builds "
            "a graph for a second one (create_graph=True): set qmlmm.engines.dftb.compiled_terms.USE_KERNEL = "
            "False for the torch forms"
        )


class _Matrices(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, R: torch.Tensor, args: MatrixArgs) -> tuple[torch.Tensor, ...]:
        out = _native().dftb_matrices_forward(R.detach(), *args.as_list())
        ctx.save_for_backward(R)
        ctx.args = args
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        _first_derivative_only()
        (R,) = ctx.saved_tensors
        gH0, gS, ggam, gG3, gerep = grads
        gR = _native().dftb_matrices_backward(R.detach(), gH0, gS, ggam, gG3, gerep, *ctx.args.as_list())
        return gR, None


class _Potential(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, R: torch.Tensor, Rm: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(R, Rm, Q)
        return _native().dftb_potential_forward(R.detach(), Rm.detach(), Q.detach())

    @staticmethod
    def backward(ctx: Any, gphi: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _first_derivative_only()
        R, Rm, Q = ctx.saved_tensors
        gR, gRm, gQ = _native().dftb_potential_backward(R.detach(), Rm.detach(), Q.detach(), gphi)
        need = ctx.needs_input_grad
        return (gR if need[0] else None, gRm if need[1] else None, gQ if need[2] else None)


def compiled_matrices(
    R: torch.Tensor, args: MatrixArgs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """H0, S (B, N, N) Hartree and 1, gamma, Gamma (B, n, n; None without third order) Hartree/e^2 and E_rep
    (B,) Hartree for positions R (B, n, 3) Bohr (float64, CPU), differentiable in R."""
    H0, S, gam, G3, e_rep = _Matrices.apply(R, args)
    return H0, S, gam, (G3 if args.third else None), e_rep


def compiled_potential(R: torch.Tensor, Rm: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """phi (B, n) Hartree/e: phi_A = sum_J Q_J / |R_A - R_J| for QM positions R (B, n, 3) Bohr and charges Q
    (B, m) e at Rm (B, m, 3) Bohr, m > 0, differentiable in all three."""
    return _Potential.apply(R, Rm, Q)

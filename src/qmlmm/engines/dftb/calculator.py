"""SCC-DFTB2 / DFTB3 with electrostatic embedding, batched over frames of one molecule (PyTorch).

Energy (atomic units), with Mulliken populations q_A and dq_A = q_A - q0_A (excess electrons):

    E = sum_{mu nu} P H0 + 1/2 sum_AB gamma_AB dq_A dq_B + 1/3 sum_AB Gamma_AB dq_A^2 dq_B
        + E_rep - sum_A dq_A phi_A,        phi_A = sum_J Q_J / |R_A - R_J|

The last term is the interaction of the net Mulliken charges (-dq) with the MM point charges by
bare 1/r, which also enters the SCC Hamiltonian through the shifts (DFTB+ convention).

Forces: after self-consistency, the gradient of the "force functional"

    G(R) = sum P H0(R) - sum W S(R) + sum P S(R) (V_mu + V_nu)/2 + E2(R) + E3(R) + E_rep(R) + E_ext(R)

with the density P, energy-weighted density W, shifts V and charges dq held fixed, equals the
gradient of E (the SCC energy is variational in dq, and W accounts for the overlap's dependence
on R). PyTorch autograd differentiates G once, giving forces on QM atoms, on MM charges, and
dE/dQ_J (the potential at the charges) in one backward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from qmlmm.engines.dftb.compiled_terms import MatrixArgs, compiled_matrices, compiled_potential, kernel_runs
from qmlmm.engines.dftb.gamma import charge_kernels
from qmlmm.engines.dftb.slater_koster import real_sh_rotations, sk_blocks
from qmlmm.engines.dftb.tensors import TAIL_BOHR, DFTBParameters, PairTables
from qmlmm.errors import InputError, SCFNotConvergedError

log = logging.getLogger(__name__)

__all__ = ["DFTBCalculator", "DFTBResult", "SCCOptions"]

_FAR_BOHR = 1.0e6  # position of padding point charges (charge zero)
#: the largest change of any atom's charge (e) between the last two calls for which the SCC starts from their
#: linear extrapolation (consecutive MD steps change them by ~1e-3 e); beyond it, from the last call's charges
#: (unrelated frames, where an extrapolation would double the difference)
EXTRAPOLATE_MAX_STEP = 0.02


@dataclass
class SCCOptions:
    """Self-consistent-charge settings.

    Attributes:
        tol: convergence when max |dq_out - dq_in| < tol (e) for every frame.
        maxiter: iterations before SCFNotConvergedError.
        mixing: mixing parameter (Anderson), or the inverse Jacobian's start -mixing * I (Broyden).
        history: number of previous iterations Anderson mixing uses.
        mixer: the charge update. "anderson": Pulay mixing of the last ``history`` iterations.
            "newton": Broyden's second method on the inverse Jacobian of the charge residual, started at each call
            from the exact Jacobian of the first iteration (linear response of the Mulliken charges,
            integer occupations only), ~2 ms for 50 atoms, converging in ~4 iterations from the
            previous MD step's charges where Anderson takes ~13. "auto" (default): newton with integer
            occupations, anderson with Fermi ones.
        reuse_charges: start from the previous call's converged charges (same number of frames).
        guess: with ``reuse_charges``, "linear" (default): extrapolate the last two calls' converged charges,
            2 dq_1 - dq_2, for each frame whose charges changed by at most :data:`EXTRAPOLATE_MAX_STEP` between
            them (consecutive MD steps: 3.1 iterations a step instead of 3.8 with newton, retinoic acid in water,
            `benchmarks/results/dftb_scc_iterations.md`), else the last call's; "previous": the last call's.
        kt: electronic temperature k_B T (Hartree). 0: integer occupations (aufbau). > 0: Fermi
            occupations, and the energy is the Mermin free energy E - T S_el (its gradient is what
            the forces are), as DFTB+'s Fermi filling; helps the SCC where frontier orbitals are
            near-degenerate (bonds being broken).
    """

    tol: float = 1e-8
    maxiter: int = 200
    mixing: float = 0.4
    history: int = 8
    mixer: str = "auto"
    reuse_charges: bool = True
    guess: str = "linear"
    kt: float = 0.0

    def __post_init__(self) -> None:
        if self.guess not in ("linear", "previous"):
            raise InputError(f"SCC start guess must be linear or previous, got {self.guess!r}")


@dataclass
class DFTBResult:
    """Per-frame results in atomic units (Hartree, Bohr, e); leading dimension B (frames)."""

    energy: torch.Tensor
    gradient: torch.Tensor | None
    mm_gradient: torch.Tensor | None
    mm_potential: torch.Tensor | None
    charges: torch.Tensor
    iterations: int
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _BlockIndex:
    """Scatter indices of one shell-pair block type (shell l1 of the pair's first atom, l2 of its second),
    over every atom pair whose elements have both shells."""

    l1: int
    l2: int
    pairs: torch.Tensor  # (Pg,) indices into the pair list
    rows: torch.Tensor  # (Pg * (2l1+1) * (2l2+1),)
    cols: torch.Tensor


class DFTBCalculator:
    """DFTB2/DFTB3 for one molecule (fixed atoms and total charge), any number of frames."""

    def __init__(
        self, params: DFTBParameters, numbers: Sequence[int], charge: int = 0, options: SCCOptions | None = None
    ) -> None:
        self.p = params
        self.numbers = [int(z) for z in numbers]
        self.opts = options or SCCOptions()
        params.check_elements(self.numbers)
        dev, dt = params.device, params.dtype
        self.device, self.dtype = dev, dt
        n = len(self.numbers)
        self.n = n
        sp = [params.species(z) for z in self.numbers]
        norb = [s.n_orb for s in sp]
        offs = [0]
        for k in norb:
            offs.append(offs[-1] + k)
        self.n_orb = offs[-1]
        self._orb_offsets = offs[:-1]  # each atom's first orbital
        self._lmax = [s.lmax for s in sp]  # each atom's highest shell
        self.atom_of_orb = torch.tensor([a for a in range(n) for _ in range(norb[a])], device=dev)
        # each atom's orbitals (n, max orbitals per atom), padded with N (a zero row appended where used)
        self.orb_slots = torch.tensor(
            [[offs[a] + k if k < norb[a] else offs[-1] for k in range(max(norb))] for a in range(n)], device=dev
        )
        onsite = []
        for s in sp:
            for l in range(s.lmax + 1):
                onsite += [s.onsite[l]] * (2 * l + 1)
        self.onsite = torch.tensor(onsite, dtype=dt, device=dev)
        self.U = torch.tensor([s.hubbard for s in sp], dtype=dt, device=dev)
        self.Ud = torch.tensor([s.hubbard_deriv for s in sp], dtype=dt, device=dev)
        self.q0 = torch.tensor([s.n_valence for s in sp], dtype=dt, device=dev)
        self.is_h = torch.tensor([z == 1 for z in self.numbers], device=dev)
        nel = float(self.q0.sum()) - charge
        if abs(nel - round(nel)) > 1e-8 or round(nel) % 2 != 0 or nel <= 0:
            raise InputError(f"DFTB engine is closed-shell only: charge {charge} leaves {nel:g} valence electrons")
        self.charge = charge
        self.n_occ = round(nel) // 2
        if self.n_occ > self.n_orb:
            raise InputError(f"charge {charge} needs {self.n_occ} occupied orbitals, the basis has {self.n_orb}")
        # atom pairs, each once, ordered so that Z_i <= Z_j: fewer (element pair, shell pair) block types
        ii, jj = torch.triu_indices(n, n, offset=1, device=dev)
        zt = torch.tensor(self.numbers, device=dev)
        swap = zt[ii] > zt[jj]
        ii, jj = torch.where(swap, jj, ii), torch.where(swap, ii, jj)
        self.pi, self.pj = ii, jj
        # the integrals of every pair from one stacked evaluation (tables A-B, A the pair's first atom); the
        # B-A tables only where a block needs them (l1 > l2) and the elements differ
        za, zb = zt[ii].tolist(), zt[jj].tolist()
        keys = sorted({key for a, b in zip(za, zb, strict=True) for key in ((a, b), (b, a))})
        keys = keys or [(self.numbers[0],) * 2]  # a lone atom: no pairs, one table to stack
        tab = {key: t for t, key in enumerate(keys)}
        tables = [params.pair(*key) for key in keys]
        ab = [tab[(a, b)] for a, b in zip(za, zb, strict=True)]
        self.tables_ab = PairTables(tables, torch.tensor(ab, dtype=torch.long))
        lmax = torch.tensor(self._lmax, device=dev)
        hetero = torch.tensor([a != b for a, b in zip(za, zb, strict=True)], dtype=torch.bool, device=dev)
        self.ba_pairs = torch.nonzero(hetero & (lmax[ii] > 0)).flatten()  # a shell l1 > l2 = 0 exists
        ba = [tab[(zb[k], za[k])] for k in self.ba_pairs.tolist()]
        self.tables_ba = PairTables(tables, torch.tensor(ba, dtype=torch.long))
        self.blocks = self._block_types(ii, jj, self._lmax, self._orb_offsets)
        self.hpair = (self.is_h[ii] | self.is_h[jj]) & (params.zeta is not None)
        self._last_dq: dict[tuple[int, ...], torch.Tensor] = {}  # the last call's converged charges
        self._before_dq: dict[tuple[int, ...], torch.Tensor] = {}  # the call's before that
        self._args: MatrixArgs | None = None
        self.opts = replace(self.opts, mixer=resolved_mixer(self.opts.mixer, self.opts.kt))

    @staticmethod
    def _block_types(ii: torch.Tensor, jj: torch.Tensor, lmax: list[int], offs: list[int]) -> list[_BlockIndex]:
        """The shell-pair block types (l1, l2) of the pairs (ii, jj) and where their entries go in the
        (N, N) matrices: atom a's orbitals start at offs[a], its shell l at offs[a] + l^2 (s, p, d)."""
        dev = ii.device
        la, lb = torch.tensor(lmax, device=dev)[ii], torch.tensor(lmax, device=dev)[jj]
        off = torch.tensor(offs, device=dev)
        blocks = []
        for l1 in range(max(lmax) + 1):
            for l2 in range(max(lmax) + 1):
                idx = torch.nonzero((la >= l1) & (lb >= l2)).flatten()
                if len(idx) == 0:
                    continue
                r1 = off[ii[idx]][:, None] + l1 * l1 + torch.arange(2 * l1 + 1, device=dev)[None, :]
                c2 = off[jj[idx]][:, None] + l2 * l2 + torch.arange(2 * l2 + 1, device=dev)[None, :]
                rows = r1[:, :, None].expand(-1, -1, 2 * l2 + 1).reshape(-1)
                cols = c2[:, None, :].expand(-1, 2 * l1 + 1, -1).reshape(-1)
                blocks.append(_BlockIndex(l1, l2, idx, rows, cols))
        return blocks

    # ---- geometry-dependent matrices ----------------------------------------------------------
    def _matrices(
        self, R: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """H0, S (B, N, N), gamma, Gamma (B, n, n) and E_rep (B,) for positions R (B, n, 3) Bohr: compiled on
        the CPU in float64 (:mod:`~qmlmm.engines.dftb.compiled_terms`), else :meth:`_matrices_torch`."""
        if kernel_runs(R):
            return compiled_matrices(R, self._kernel_args())
        return self._matrices_torch(R)

    def _kernel_args(self) -> MatrixArgs:
        """The compiled matrices' constant arguments (built once)."""
        if self._args is None:
            slot = torch.full((len(self.pi),), -1, dtype=torch.long)
            slot[self.ba_pairs.cpu()] = torch.arange(len(self.ba_pairs))

            def tables(t: PairTables) -> list[torch.Tensor]:
                return [x.contiguous() for x in (t.coef, t.base, t.dr, t.k_max, t.r_max, t.tail)]

            t = self.tables_ab
            rep = [t.rep_knots, t.rep_kmax, t.rep_coef, t.rep_base, t.rep_exp, t.rep_cutoff]
            offsets, lmax = torch.tensor(self._orb_offsets), torch.tensor(self._lmax)
            idx = [self.pi, self.pj, offsets, lmax, slot, self.hpair, self.U, self.Ud]
            self._args = MatrixArgs(
                idx=[x.contiguous() for x in idx],
                ab=tables(self.tables_ab),
                ba=tables(self.tables_ba),
                rep=[x.contiguous() for x in rep],
                onsite=self.onsite.contiguous(),
                zeta=-1.0 if self.p.zeta is None else float(self.p.zeta),
                tail_len=TAIL_BOHR,
                third=bool(self.p.third_order),
            )
        return self._args

    def _matrices_torch(
        self, R: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """H0, S (B, N, N), gamma, Gamma (B, n, n) and E_rep (B,) for positions R (B, n, 3) Bohr (torch ops)."""
        B, n, N = R.shape[0], self.n, self.n_orb
        d = R[:, self.pj] - R[:, self.pi]  # (B, P, 3), from i to j
        r = torch.linalg.norm(d, dim=-1)
        u = d / r.unsqueeze(-1)
        lmax = max(b.l1 for b in self.blocks) if self.blocks else 0
        lmax = max(lmax, max((b.l2 for b in self.blocks), default=0))
        D = real_sh_rotations(u, lmax)
        vals_h, vals_s, rows, cols = [], [], [], []
        v_ab = self.tables_ab.integrals(r)  # (B, P, 20)
        v_ba = v_ab
        if len(self.ba_pairs):  # B-A tables of the pairs of different elements that need them
            v_ba = v_ab.index_copy(1, self.ba_pairs, self.tables_ba.integrals(r[:, self.ba_pairs]))
        e_rep = self.tables_ab.repulsive(r)  # (B,)
        for blk in self.blocks:
            Dg = [Dl[:, blk.pairs] for Dl in D]
            hs = sk_blocks(blk.l1, blk.l2, Dg, v_ab[:, blk.pairs], v_ba[:, blk.pairs])  # (B, Pg, 2, 2l1+1, 2l2+1)
            vals_h.append(hs[:, :, 0].reshape(B, -1))
            vals_s.append(hs[:, :, 1].reshape(B, -1))
            rows.append(blk.rows)
            cols.append(blk.cols)
        zeros = torch.zeros(B, N, N, dtype=R.dtype, device=R.device)
        eye = torch.eye(N, dtype=R.dtype, device=R.device).expand(B, N, N)
        if rows:
            rr, cc = torch.cat(rows), torch.cat(cols)
            bidx = torch.arange(B, device=R.device)[:, None]
            hu = zeros.index_put((bidx, rr[None, :], cc[None, :]), torch.cat(vals_h, dim=1))
            su = zeros.index_put((bidx, rr[None, :], cc[None, :]), torch.cat(vals_s, dim=1))
        else:
            hu = su = zeros
        H0 = hu + hu.transpose(-1, -2) + torch.diag_embed(self.onsite).expand(B, N, N)
        S = su + su.transpose(-1, -2) + eye
        # charge kernels
        ua, ub = self.U[self.pi], self.U[self.pj]
        uda, udb = self.Ud[self.pi], self.Ud[self.pj]
        g, g_ij, g_ji = charge_kernels(r, ua, ub, uda, udb, self.hpair, self.p.zeta, self.p.third_order)  # (B, P)
        gam = torch.zeros(B, n, n, dtype=R.dtype, device=R.device)
        gam = _scatter_sym(gam, self.pi, self.pj, g)
        gam = gam + torch.diag_embed(self.U).expand(B, n, n)
        G3 = None
        if g_ij is not None and g_ji is not None:  # Gamma_ij uses U^d_i, Gamma_ji uses U^d_j
            G3 = torch.zeros(B, n, n, dtype=R.dtype, device=R.device)
            bidx = torch.arange(B, device=R.device)[:, None]
            G3 = G3.index_put((bidx, self.pi[None], self.pj[None]), g_ij)
            G3 = G3.index_put((bidx, self.pj[None], self.pi[None]), g_ji)
            G3 = G3 + torch.diag_embed(0.5 * self.Ud).expand(B, n, n)
        return H0, S, gam, G3, e_rep

    @staticmethod
    def _potential(R: torch.Tensor, Rm: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """phi_A = sum_J Q_J / |R_A - R_J| (B, n): compiled on the CPU in float64, else
        :meth:`_potential_torch`."""
        if Rm.shape[1] == 0:
            return torch.zeros(R.shape[:2], dtype=R.dtype, device=R.device)
        if kernel_runs(R):
            return compiled_potential(R, Rm, Q)
        return DFTBCalculator._potential_torch(R, Rm, Q)

    @staticmethod
    def _potential_torch(R: torch.Tensor, Rm: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """phi_A = sum_J Q_J / |R_A - R_J| (B, n) (torch ops; m > 0)."""
        dist = torch.cdist(R, Rm)
        return (Q[:, None, :] / dist).sum(-1)

    def _shifts(self, dq: torch.Tensor, gam: torch.Tensor, G3: torch.Tensor | None, phi: torch.Tensor) -> torch.Tensor:
        V = torch.einsum("bij,bj->bi", gam, dq) - phi
        if G3 is not None:
            V = V + (2.0 * dq * torch.einsum("bij,bj->bi", G3, dq) + torch.einsum("bji,bj->bi", G3, dq * dq)) / 3.0
        return V

    def _solve(
        self, H0p: torch.Tensor, L: torch.Tensor, Linv: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Orbital energies (B, N), occupied coefficients C_occ (B, N, n_occ), orbital Mulliken
        populations (B, N) and all eigenvectors in the orthogonal basis (B, N, N) of
        H = H0 + S (V_mu + V_nu)/2, with S = L L^T.

        In the orthogonal basis (X = L^-T): X^T H X = H0' + (A + A^T)/2 with A = L^-1 diag(V) L, one
        matrix product per iteration; populations (P S)_mumu = 2 sum_k (L^-T C')_mu k (L C')_mu k.
        """
        Vo = V[:, self.atom_of_orb]
        A = Linv @ (Vo[:, :, None] * L)
        Hp = H0p + 0.5 * (A + A.transpose(-1, -2))
        eps, Cp = torch.linalg.eigh(Hp)
        if self.opts.kt > 0:  # every orbital, weighted by sqrt(f/2): P = 2 C C^T still holds
            Co = Cp * torch.sqrt(0.5 * self._fermi(eps))[:, None, :]
        else:
            Co = Cp[:, :, : self.n_occ]
        C_occ = Linv.transpose(-1, -2) @ Co
        pop = 2.0 * (C_occ * (L @ Co)).sum(-1)
        return eps, C_occ, pop, Cp

    def _residual_jacobian(
        self, eps: torch.Tensor, C: torch.Tensor, S: torch.Tensor, gam: torch.Tensor, G3: torch.Tensor | None,
        dq: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Jacobian (B, n, n) of the charge residual f(dq) = dq_out(dq) - dq at the input charges ``dq``
        (B, n), from first-order perturbation theory of the orbitals (B, N) ``eps`` and coefficients ``C``
        (B, N, N) that ``dq`` gives (integer occupations).

        dq_out responds to a change of the shifts dV by chi dV, chi_AB = 4 sum_ia q^A_ia q^B_ia / (e_i - e_a)
        (i occupied, a virtual; q^A_ia = 1/2 sum_{mu in A} C_mu,i (S C)_mu,a + C_mu,a (S C)_mu,i, the
        Mulliken transition charges), and dV/d dq = gamma + 2/3 (diag(G3 dq) + dq_A G3_AC + G3_CA dq_C)
        (DFTB3). So df/d dq = chi dV/d dq - I. chi is negative semidefinite and dV/d dq positive definite
        (DFTB2), so the Jacobian's eigenvalues are at most -1: it is never singular there."""
        o, n, N = self.n_occ, self.n, self.n_orb
        chi = []
        for b in range(C.shape[0]):  # frame by frame: the transition charges take n * o * v numbers a frame
            SC = S[b] @ C[b]
            pad = torch.zeros(1, N, dtype=C.dtype, device=C.device)
            Cg = torch.cat([C[b], pad])[self.orb_slots]  # (n, k, N): atom A's orbitals, padded with zero rows
            SCg = torch.cat([SC, pad])[self.orb_slots]
            qt = 0.5 * (Cg[..., :o].transpose(-1, -2) @ SCg[..., o:] + SCg[..., :o].transpose(-1, -2) @ Cg[..., o:])
            de = eps[b, :o, None] - eps[b, None, o:]  # (o, v), negative
            chi.append(4.0 * (qt / de).flatten(1) @ qt.flatten(1).T)
        chi_t = torch.stack(chi)
        dV = gam
        if G3 is not None:
            g3dq = (G3 @ dq.unsqueeze(-1)).squeeze(-1)
            dV = gam + (2.0 / 3.0) * (
                torch.diag_embed(g3dq) + dq[:, :, None] * G3 + G3.transpose(-1, -2) * dq[:, None, :]
            )
        eye = torch.eye(n, dtype=C.dtype, device=C.device)
        return chi_t @ dV - eye

    def _fermi(self, eps: torch.Tensor) -> torch.Tensor:
        """Occupations f (B, N) in [0, 2] at k_B T = opts.kt with the Fermi level (bisection) that
        holds 2 n_occ electrons."""
        kt = self.opts.kt
        nel = 2.0 * self.n_occ
        lo = eps.amin(-1) - 40.0 * kt
        hi = eps.amax(-1) + 40.0 * kt
        for _ in range(200):
            mu = 0.5 * (lo + hi)
            n = (2.0 * torch.sigmoid(-(eps - mu[:, None]) / kt)).sum(-1)
            lo = torch.where(n < nel, mu, lo)
            hi = torch.where(n < nel, hi, mu)
            if bool(((hi - lo) < 1e-14).all()):
                break
        return 2.0 * torch.sigmoid(-(eps - 0.5 * (lo + hi)[:, None]) / kt)

    def _entropy_term(self, eps: torch.Tensor) -> torch.Tensor:
        """-T S_el (B,) in Hartree of the Fermi occupations (0 at kt = 0)."""
        if self.opts.kt <= 0:
            return torch.zeros(eps.shape[0], dtype=eps.dtype, device=eps.device)
        g = (0.5 * self._fermi(eps)).clamp(1e-300, 1.0)
        h = (1.0 - g).clamp(1e-300, 1.0)
        return 2.0 * self.opts.kt * (g * torch.log(g) + h * torch.log(h)).sum(-1)

    def _charges(self, pop: torch.Tensor) -> torch.Tensor:
        """dq (B, n): atomic Mulliken populations minus the neutral-atom valence electrons."""
        q = torch.zeros(pop.shape[0], self.n, dtype=pop.dtype, device=pop.device).index_add_(1, self.atom_of_orb, pop)
        return q - self.q0

    # ---- main entry ---------------------------------------------------------------------------
    def __call__(
        self,
        positions: torch.Tensor,
        mm_positions: torch.Tensor | None = None,
        mm_charges: torch.Tensor | None = None,
        forces: bool = True,
        potential: bool = False,
    ) -> DFTBResult:
        """Energies (and gradients) for frames.

        Args:
            positions: (B, n, 3) or (n, 3) QM positions in Bohr.
            mm_positions: (B, m, 3) point-charge positions in Bohr (pad with charge 0 for ragged).
            mm_charges: (B, m) charges in e.
            forces: also compute gradients w.r.t. QM and MM positions.
            potential: also compute dE/dQ_J (the potential at the charges, Hartree/e).
        """
        dt, dev = self.dtype, self.device
        R = torch.as_tensor(positions, dtype=dt, device=dev)
        single = R.dim() == 2
        if single:
            R = R.unsqueeze(0)
        B = R.shape[0]
        if R.shape[1:] != (self.n, 3):
            raise InputError(f"positions have shape {tuple(R.shape)}, expected (B, {self.n}, 3)")
        if mm_positions is None or mm_charges is None:
            Rm = torch.zeros(B, 0, 3, dtype=dt, device=dev)
            Q = torch.zeros(B, 0, dtype=dt, device=dev)
        else:
            Rm = torch.as_tensor(mm_positions, dtype=dt, device=dev).reshape(B, -1, 3)
            Q = torch.as_tensor(mm_charges, dtype=dt, device=dev).reshape(B, -1)
        need_grad = forces or potential
        R = R.detach().requires_grad_(forces)
        Rm = Rm.detach().requires_grad_(forces and Rm.shape[1] > 0)
        Q = Q.detach().requires_grad_(potential and Q.shape[1] > 0)
        with torch.set_grad_enabled(need_grad):
            H0, S, gam, G3, e_rep = self._matrices(R)
            phi = self._potential(R, Rm, Q)
        G3d = None if G3 is None else G3.detach()
        dq_in, eps, C_occ, dq, it = self._scc(
            H0.detach(), S.detach(), gam.detach(), G3d, phi.detach(), key=self._guess_key(Rm)
        )
        with torch.no_grad():
            # the last SCC diagonalisation (shifts of dq_in) is the final one; its Mulliken charges dq
            # differ from dq_in by less than the tolerance, and the energy is evaluated with them (a
            # functional of the density matrix P alone: errors quadratic in the tolerance)
            V = self._shifts(dq_in, gam.detach(), G3d, phi.detach())
            P = 2.0 * C_occ @ C_occ.transpose(-1, -2)
            W = 2.0 * (C_occ * eps[:, None, : C_occ.shape[-1]]) @ C_occ.transpose(-1, -2)
            e_band = (P * H0.detach()).sum((-1, -2))
            e2 = 0.5 * torch.einsum("bi,bij,bj->b", dq, gam.detach(), dq)
            e3 = (
                torch.einsum("bi,bij,bj->b", dq * dq, G3.detach(), dq) / 3.0 if G3 is not None else torch.zeros_like(e2)
            )
            e_ext = -(dq * phi.detach()).sum(-1)
            e_ts = self._entropy_term(eps)  # Mermin: F = E - T S (0 with integer occupations)
            energy = e_band + e2 + e3 + e_rep.detach() + e_ext + e_ts
        grad = mm_grad = pot = None
        if need_grad:
            Vo = V[:, self.atom_of_orb]
            G = (
                (P * H0).sum((-1, -2))
                - (W * S).sum((-1, -2))
                + 0.5 * (P * S * (Vo[:, :, None] + Vo[:, None, :])).sum((-1, -2))
                + 0.5 * torch.einsum("bi,bij,bj->b", dq, gam, dq)
                + e_rep
                - (dq * phi).sum(-1)
            )
            if G3 is not None:
                G = G + torch.einsum("bi,bij,bj->b", dq * dq, G3, dq) / 3.0
            inputs = [t for t in (R, Rm, Q) if t.requires_grad]
            grads = torch.autograd.grad(G.sum(), inputs, allow_unused=True)
            gmap = {id(t): g for t, g in zip(inputs, grads, strict=True)}
            grad = gmap.get(id(R))
            mm_grad = gmap.get(id(Rm), torch.zeros_like(Rm)) if forces else None
            pot = gmap.get(id(Q)) if potential else None
            if forces and mm_grad is None:
                mm_grad = torch.zeros_like(Rm)
        res = DFTBResult(
            energy=energy,
            gradient=grad,
            mm_gradient=mm_grad,
            mm_potential=pot,
            charges=-dq,
            iterations=it,
            terms={"band": e_band, "scc2": e2, "scc3": e3, "rep": e_rep.detach(), "ext": e_ext, "-TS": e_ts},
        )
        return res

    def _guess_key(self, Rm: torch.Tensor) -> tuple[int, ...]:
        return (int(Rm.shape[0]),)

    def _start_charges(self, last: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """The SCC's start (B, n) from the last two calls' converged charges (B, n) (options.guess)."""
        if self.opts.guess == "previous" or before is None:
            return last.clone()
        step = last - before
        near = step.abs().amax(-1, keepdim=True) <= EXTRAPOLATE_MAX_STEP
        return torch.where(near, last + step, last)

    def _scc(
        self,
        H0: torch.Tensor,
        S: torch.Tensor,
        gam: torch.Tensor,
        G3: torch.Tensor | None,
        phi: torch.Tensor,
        key: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Self-consistent charges by the options' mixer (newton or Anderson); raises SCFNotConvergedError.

        Returns the converged input charges dq_in (B, n), the orbital energies (B, N) and occupied
        coefficients (B, N, n_occ) of the Hamiltonian they define, its Mulliken charges dq (B, n)
        and the iteration count. The previous call's charges (same number of frames) are the starting
        guess when ``opts.reuse_charges`` (consecutive MD steps or frames).
        """
        B = H0.shape[0]
        o = self.opts
        L = torch.linalg.cholesky(S)
        Linv = torch.linalg.solve_triangular(
            L, torch.eye(self.n_orb, dtype=S.dtype, device=S.device).expand_as(S), upper=False
        )
        H0p = Linv @ H0 @ Linv.transpose(-1, -2)
        prev = self._last_dq.get(key) if o.reuse_charges else None
        if prev is not None:
            dq = self._start_charges(prev, self._before_dq.get(key))
        else:
            dq = torch.zeros(B, self.n, dtype=S.dtype, device=S.device)
        mixer: _Anderson | _Broyden
        if o.mixer == "newton":
            mixer = _Broyden(o.mixing, dq)
        else:
            mixer = _Anderson(o.mixing, o.history)
        done = torch.zeros(B, dtype=torch.bool, device=S.device)
        last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # newton: input, residual, error
        err = torch.full((B,), float("inf"), dtype=S.dtype, device=S.device)
        keep: list[torch.Tensor] = []
        for it in range(1, o.maxiter + 1):
            V = self._shifts(dq, gam, G3, phi)
            eps, C_occ, pop, Cp = self._solve(H0p, L, Linv, V)
            if it == 1 and isinstance(mixer, _Broyden):
                mixer.restart_from(self._residual_jacobian(eps, Linv.transpose(-1, -2) @ Cp, S, gam, G3, dq))
            dq_out = self._charges(pop)
            f = dq_out - dq
            err = f.abs().amax(-1)
            newly = (err < o.tol) & ~done
            # keep each frame's results from the iteration where it converged
            now = [dq, eps, C_occ, dq_out]
            if not keep:
                keep = [t.clone() for t in now]
            else:
                keep = [
                    torch.where(newly.view(-1, *([1] * (t.dim() - 1))), t, k_) for t, k_ in zip(now, keep, strict=True)
                ]
            done = done | newly
            if bool(done.all()):
                if o.reuse_charges:
                    self._before_dq = {key: prev} if prev is not None else {}
                    self._last_dq = {key: keep[0].detach().clone()}
                return keep[0], keep[1], keep[2], keep[3], it
            if isinstance(mixer, _Broyden) and last is not None and bool(((err > last[2]) & ~done).any()):
                # a quasi-Newton step grew the residual: too far from linear response here; Anderson from
                # the point before that step
                mixer = _Anderson(o.mixing, o.history)
                new = mixer.step(last[0], last[1])
            else:
                last = (dq, f, err)
                new = mixer.step(dq, f)
            dq = torch.where(done[:, None], dq, new)  # converged frames keep their charges
        bad = torch.nonzero(~done).flatten().tolist()
        raise SCFNotConvergedError(
            f"DFTB SCC not converged in {o.maxiter} iterations for frame(s) {bad[:10]} (max |dq change| "
            f"{float(err.max()):.2e} e, tolerance {o.tol:g})"
        )


def resolved_mixer(mixer: str, kt: float) -> str:
    """The SCC mixer ``mixer`` (auto, anderson or newton) means at electronic temperature ``kt`` (> 0: Fermi
    occupations): auto is newton with integer occupations, anderson with Fermi ones; InputError for an unknown
    mixer, or newton with Fermi occupations (its Jacobian assumes integer ones)."""
    if mixer == "auto":
        return "newton" if kt <= 0 else "anderson"
    if mixer not in ("anderson", "newton"):
        raise InputError(f"unknown SCC mixer {mixer!r}; known: auto, anderson, newton")
    if mixer == "newton" and kt > 0:
        raise InputError("the newton SCC mixer needs integer occupations (etemp 0); use mixer=anderson or auto")
    return mixer


class _Anderson:
    """Anderson (Pulay) mixing of the last ``history`` input charges and residuals."""

    def __init__(self, mixing: float, history: int) -> None:
        self.mixing, self.history = mixing, history
        self.hist_x: list[torch.Tensor] = []
        self.hist_f: list[torch.Tensor] = []

    def step(self, dq: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Next input charges (B, n) from the input ``dq`` and residual ``f = dq_out - dq`` (B, n)."""
        self.hist_x = [*self.hist_x, dq][-self.history :]
        self.hist_f = [*self.hist_f, f][-self.history :]
        if len(self.hist_f) < 2:
            return dq + self.mixing * f
        F = torch.stack(self.hist_f, 1)  # (B, k, n)
        X = torch.stack(self.hist_x, 1)
        M = F @ F.transpose(-1, -2)
        k, B = M.shape[-1], M.shape[0]
        reg = 1e-12 * torch.diagonal(M, dim1=-2, dim2=-1).sum(-1) + 1e-300
        M = M + reg[:, None, None] * torch.eye(k, dtype=M.dtype, device=M.device)
        c, _ = torch.linalg.solve_ex(M, torch.ones(B, k, 1, dtype=M.dtype, device=M.device))
        c = c[..., 0] / c[..., 0].sum(-1, keepdim=True)
        new = torch.einsum("bk,bkn->bn", c, X + self.mixing * F)
        ok = torch.isfinite(new).all(-1, keepdim=True)  # degenerate history: plain linear mixing
        return torch.where(ok, new, dq + self.mixing * f)


class _Broyden:
    """Broyden's second method: an estimate ``jinv`` (B, n, n) of the inverse Jacobian of the residual
    f(dq) = dq_out(dq) - dq, updated so that it maps each residual change onto its charge change; the
    step is dq - jinv f. It starts (``start``) from -mixing * I (linear mixing) until :meth:`restart_from`
    gives it a Jacobian (the caller hands over to Anderson when a step grows the residual)."""

    def __init__(self, mixing: float, dq: torch.Tensor) -> None:
        B, n = dq.shape
        self.start = -mixing * torch.eye(n, dtype=dq.dtype, device=dq.device).expand(B, n, n)
        self.jinv = self.start.clone()
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def restart_from(self, jacobian: torch.Tensor) -> None:
        """Start again from the inverse of ``jacobian`` (B, n, n) of the residual (Newton's step); frames
        whose Jacobian cannot be inverted keep linear mixing."""
        inv, info = torch.linalg.inv_ex(jacobian)
        ok = (info == 0)[:, None, None] & torch.isfinite(inv).all(-1, keepdim=True).all(-2, keepdim=True)
        self.start = torch.where(ok, inv, self.start)
        self.jinv = self.start.clone()
        self.last = None

    def step(self, dq: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Next input charges (B, n) from the input ``dq`` and residual ``f = dq_out - dq`` (B, n)."""
        if self.last is not None:
            x0, f0 = self.last
            dx, df = dq - x0, f - f0
            dd = (df * df).sum(-1)  # (B,)
            u = (dx - (self.jinv @ df.unsqueeze(-1)).squeeze(-1)) / torch.where(dd > 0, dd, 1.0).unsqueeze(-1)
            upd = self.jinv + u.unsqueeze(-1) * df.unsqueeze(-2)
            self.jinv = torch.where((dd > 0)[:, None, None], upd, self.jinv)
        self.last = (dq, f)
        new = dq - (self.jinv @ f.unsqueeze(-1)).squeeze(-1)
        ok = torch.isfinite(new).all(-1, keepdim=True)
        return torch.where(ok, new, dq - (self.start @ f.unsqueeze(-1)).squeeze(-1))


def _scatter_sym(m: torch.Tensor, i: torch.Tensor, j: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """m (B, n, n) with vals (B, P) put at (i, j) and (j, i)."""
    bidx = torch.arange(m.shape[0], device=m.device)[:, None]
    m = m.index_put((bidx, i[None], j[None]), vals)
    return m.index_put((bidx, j[None], i[None]), vals)

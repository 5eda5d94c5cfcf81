"""The descriptor's compiled kernels (qmlmm.descriptors.native) against the torch form of every term.

The kernels replace the QM angular, MM angular and MM radial terms in eval mode. They must give the same
features and the same first derivatives in positions and charges (float64, to rounding), for batches of
frames of different sizes, for both charge-channel settings, for the default sizes (compiled with their
loops unrolled) and for other sizes, whole and fractional zetas, and Gaussians too narrow for the
factorised form. The build is part of the test: where it fails, these tests fail (set QMLMM_NATIVE=0 to
run the torch form only, and these are skipped).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cluster_frame
from qmlmm.batch import FrameBatch
from qmlmm.data.batch import FrameTensors, collate, frame_tensors
from qmlmm.descriptors import ACSF, DescriptorConfig
from qmlmm.descriptors.terms import LongRange, MMAngular, MMRadial, QMAngular
from qmlmm.environment import EmbeddingSettings
from test_descriptors import CFG  # the descriptor settings of the descriptor tests

pytestmark = pytest.mark.skipif(os.environ.get("QMLMM_NATIVE") == "0", reason="QMLMM_NATIVE=0: torch form only")

NATIVE_TERMS = (QMAngular, MMAngular, MMRadial, LongRange)


def _items() -> list[FrameTensors]:
    """Two methanol clusters of different sizes (the batch pads them), charges as the embedding gives."""
    return [
        frame_tensors(cluster_frame("methanol", n_waters=n, radius=r, seed=s), EmbeddingSettings(cutoff=0.9))
        for n, r, s in ((9, 0.36, 1), (5, 0.3, 5))
    ]


def _with_grad(b: FrameBatch) -> FrameBatch:
    return dataclasses.replace(
        b,
        qm_pos=b.qm_pos.clone().requires_grad_(),
        mm_pos=b.mm_pos.clone().requires_grad_(),
        mm_q=b.mm_q.clone().requires_grad_(),
    )


def _features_and_grads(acsf: ACSF, b: FrameBatch, native: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Features (eval mode) and the gradient of a weighted sum of them in QM positions, MM positions and
    MM charges, with the angular and MM radial terms in their compiled (``native``) or torch form."""
    for t in acsf.terms:
        if isinstance(t, NATIVE_TERMS):
            t.native = native
    acsf.native = native  # the pair lists too
    acsf.eval()
    x = acsf(b)
    w = torch.linspace(-1.0, 2.0, x.numel(), dtype=x.dtype).reshape(x.shape)  # every column weighs differently
    grads = torch.autograd.grad((x * w).sum(), [b.qm_pos, b.mm_pos, b.mm_q])
    return x.detach(), list(grads)


def _compare(cfg: DescriptorConfig, rtol: float = 1e-11) -> None:
    acsf = ACSF(cfg).double()
    b = _with_grad(collate(_items(), dtype=torch.float64))
    x_t, g_t = _features_and_grads(acsf, b, native=False)
    x_n, g_n = _features_and_grads(acsf, b, native=True)
    assert all(t.native for t in acsf.terms if isinstance(t, NATIVE_TERMS))
    names = acsf.feature_names()
    for prefix in ("G4[", "MM G2", "MM+ G2", "MM G4", "MM+ G4", "MM potential", "MM |field|", "MM field . u"):
        cols = [k for k, n in enumerate(names) if prefix in n]  # every kernel's block is there and not zero
        if ("+" not in prefix and "MM G" not in prefix) or cfg.mm_channels == ("sign" if "+" in prefix else "charge"):
            assert cols and float(x_t[:, cols].abs().max()) > 1e-3, prefix
    torch.testing.assert_close(x_n, x_t, rtol=rtol, atol=rtol * float(x_t.abs().max()))
    for gn, gt in zip(g_n, g_t, strict=True):
        assert float(gt.abs().max()) > 1e-3
        torch.testing.assert_close(gn, gt, rtol=rtol, atol=rtol * float(gt.abs().max()))


@pytest.mark.parametrize("channels", ["charge", "sign"])
def test_kernels_equal_the_torch_form_with_the_default_sizes(channels: str) -> None:
    """Default zetas (1, 4: four zeta-lambda pairs) and shifts: the unrolled kernels."""
    _compare(dataclasses.replace(CFG, mm_channels=channels))


@pytest.mark.parametrize("channels", ["charge", "sign"])
def test_kernels_equal_the_torch_form_with_other_sizes_and_fractional_zetas(channels: str) -> None:
    """Six zeta-lambda pairs (one of them a fractional zeta, taken by pow) and five MM angular shifts: the
    kernels' general loops."""
    cfg = dataclasses.replace(
        CFG, mm_channels=channels, angular_zetas=[1.0, 2.5, 8.0], mm_angular_shifts=[0.15, 0.2, 0.3, 0.4, 0.45]
    )
    _compare(cfg)


def test_kernels_equal_the_torch_form_with_gaussians_too_narrow_to_factorise() -> None:
    """A 0.02 nm MM angular width: the factors of the one-exp form would leave float32's range, so the
    kernel takes one exp per shift (factor_fits in angular.cpp)."""
    _compare(dataclasses.replace(CFG, mm_angular_width=0.02, mm_angular_shifts=[0.3, 0.4, 0.45]))


def test_kernels_give_the_same_bits_on_one_and_on_two_threads() -> None:
    """Each centre's sums belong to one thread, in a fixed order: the thread count changes nothing."""
    acsf = ACSF(CFG).double()
    out = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            b = _with_grad(collate(_items(), dtype=torch.float64))
            out.append(_features_and_grads(acsf, b, native=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0])
    for g1, g2 in zip(out[0][1], out[1][1], strict=True):
        assert torch.equal(g1, g2)


def test_gradcheck_of_the_kernels() -> None:
    """Analytic first derivatives against finite differences (float64), through QM and MM positions and
    the MM charges, for each compiled term alone."""
    acsf = ACSF(dataclasses.replace(CFG, mm_channels="sign")).double().eval()
    it = _items()[1]
    b0 = collate([it], dtype=torch.float64)
    nb_terms = [t for t in acsf.terms if isinstance(t, NATIVE_TERMS)]
    assert len(nb_terms) == 4 and all(t.native for t in nb_terms)

    def f(qm: torch.Tensor, mm: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b = dataclasses.replace(b0, qm_pos=qm, mm_pos=mm, mm_q=q)
        nb = acsf.neighbours(b)
        return torch.cat([t(nb) for t in nb_terms], dim=1)

    args = (
        b0.qm_pos.clone().requires_grad_(),
        b0.mm_pos.clone().requires_grad_(),
        b0.mm_q.clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_training_mode_keeps_the_torch_form_and_eval_mode_refuses_a_second_derivative() -> None:
    """The force loss of training differentiates forces again: train mode runs the torch form (second
    derivatives work); the kernels have first derivatives only, and a backward pass that builds a graph for a
    second one in eval mode is an error, not a second derivative that silently misses the kernels' part."""
    acsf = ACSF(CFG).double()
    b = _with_grad(collate(_items(), dtype=torch.float64))
    acsf.train()
    (g,) = torch.autograd.grad(acsf(b).sum(), [b.qm_pos], create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), [b.qm_pos])
    assert float(gg.abs().max()) > 0.0
    acsf.eval()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(acsf(b).sum(), [b.qm_pos], create_graph=True)
    (g,) = torch.autograd.grad(acsf(b).sum(), [b.qm_pos])  # first derivatives: fine
    assert float(g.abs().max()) > 0.0


def test_float32_kernels_agree_with_float64() -> None:
    """Models run in float32: the kernels' float32 features and forces agree with float64 to float32's
    rounding (the factorised Gaussians keep their factors within range)."""
    acsf = ACSF(CFG)
    b32 = _with_grad(collate(_items(), dtype=torch.float32))
    x32, g32 = _features_and_grads(acsf.float(), b32, native=True)
    b64 = _with_grad(collate(_items(), dtype=torch.float64))
    x64, g64 = _features_and_grads(acsf.double(), b64, native=True)
    np.testing.assert_allclose(x32.double().numpy(), x64.numpy(), rtol=1e-4, atol=1e-5 * float(x64.abs().max()))
    for a, c in zip(g32, g64, strict=True):
        np.testing.assert_allclose(a.double().numpy(), c.numpy(), rtol=1e-3, atol=1e-4 * float(c.abs().max()))


def test_qmlmm_native_0_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """QMLMM_NATIVE=0: no build, the torch form runs."""
    from qmlmm import compiled

    monkeypatch.setenv("QMLMM_NATIVE", "0")
    assert compiled.module.__wrapped__() is None
    monkeypatch.setenv("QMLMM_NATIVE", "1")
    assert compiled.module.__wrapped__() is not None


def test_a_killed_builds_lock_is_removed_and_a_live_one_waited_for(tmp_path: Path) -> None:
    """torch's loader waits for a build lock forever; a build killed half-way leaves one. qmlmm waits while
    the lock is fresh (another process building) and removes it once unchanged for the stale time."""
    import threading
    import time

    from qmlmm.compiled import wait_for_build_lock

    lock = tmp_path / "lock"
    wait_for_build_lock(tmp_path)  # no lock: returns at once
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    wait_for_build_lock(tmp_path, stale_after=600)  # an hour old: a killed build's
    assert not lock.exists()
    lock.touch()  # a live build that finishes after 0.3 s
    timer = threading.Timer(0.3, lock.unlink)
    timer.start()
    t0 = time.perf_counter()
    wait_for_build_lock(tmp_path, stale_after=600, poll=0.05)
    assert 0.25 < time.perf_counter() - t0 < 5.0
    lock.touch()  # fresh, never released: removed once older than the stale time
    t0 = time.perf_counter()
    wait_for_build_lock(tmp_path, stale_after=0.5, poll=0.05)
    assert not lock.exists() and 0.4 < time.perf_counter() - t0 < 5.0


def test_an_unsorted_pair_list_is_refused() -> None:
    """The kernels read each centre's pairs as one contiguous range: an unsorted list is an error, not a
    wrong sum."""
    from qmlmm.descriptors.native import _offsets

    assert _offsets(torch.tensor([0, 0, 2, 2, 2]), 4).tolist() == [0, 2, 2, 5, 5]
    with pytest.raises(ValueError, match="sorted by centre"):
        _offsets(torch.tensor([0, 2, 1]), 3)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):  # a frame index past n_frames: offsets too long
        _offsets(torch.tensor([0, 1, 3]), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_list_kernel_gives_the_torch_forms_lists(dtype: torch.dtype) -> None:
    """The compiled pair lists (QM-MM without the dense block, QM-QM without self pairs) are torch's, pair for
    pair and in the same order, for frames of different sizes, one without MM atoms and one without QM atoms."""
    from qmlmm.descriptors import native
    from qmlmm.descriptors.neighbors import pairs_within

    g = torch.Generator().manual_seed(3)
    qa = torch.rand(40, 3, generator=g, dtype=dtype) * 1.2
    fa = torch.tensor([0] * 12 + [1] * 6 + [3] * 22)  # frame 2 has no QM atom
    mb = torch.rand(500, 3, generator=g, dtype=dtype) * 2.0
    fb = torch.tensor([0] * 150 + [2] * 50 + [3] * 300)  # frame 1 has no MM atom
    for a, f_a, b, f_b, rc, same in ((qa, fa, mb, fb, 0.6, False), (qa, fa, qa, fa, 0.5, True)):
        i, j = native.pairs_within(a, f_a, b, f_b, 4, rc, same)
        i_ref, j_ref = pairs_within(a, f_a, b, f_b, rc, exclude_self=same)
        assert len(i_ref) > 50
        assert torch.equal(i, i_ref) and torch.equal(j, j_ref)
        assert bool((f_a[i] == f_b[j]).all()) and not (same and bool((i == j).any()))
    with pytest.raises(ValueError, match="sorted"):
        native.pairs_within(qa, fa.flip(0), mb, fb, 4, 0.6)
    one, one_frame = qa[:1], fa[:1]
    for a, f_a, b, f_b, same in (
        (one, one_frame, one, one_frame, True),  # one QM atom: no QM pair
        (qa, fa, mb[:0], fb[:0], False),  # no MM atoms
        (qa[12:18], fa[12:18], mb, fb, False),  # frame 1 has QM atoms, no MM atom
    ):
        i, j = native.pairs_within(a, f_a, b, f_b, 4, 0.6, exclude_self=same)  # no pair at all: empty lists
        assert len(i) == 0 and len(j) == 0


def test_features_of_a_one_atom_qm_region_without_mm_atoms() -> None:
    """A QM region of one atom (an ion: no QM pair) in a frame without MM atoms, batched with a frame that has
    both: the eval-mode descriptor (kernels, empty pair lists) equals the torch form."""
    it = _items()[0]
    ion = dataclasses.replace(
        it, qm_z=it.qm_z[:1], qm_pos=it.qm_pos[:1], mm_pos=it.mm_pos[:0], mm_q=it.mm_q[:0], mm_mol=it.mm_mol[:0]
    )
    for items in ([ion], [ion, it]):
        b = _with_grad(collate(items, dtype=torch.float64))
        acsf = ACSF(CFG).double()
        x_torch, g_torch = _features_and_grads(acsf, b, native=False)
        x_kernel, g_kernel = _features_and_grads(acsf, b, native=True)
        torch.testing.assert_close(x_kernel, x_torch, rtol=0, atol=1e-11)
        for a, c in zip(g_kernel, g_torch, strict=True):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-11)


def test_potential_and_field_kernel_equals_the_block_form() -> None:
    """The exact potential and field of the embedded charges at the QM atoms (the electrostatic model's
    inputs), kernel against the dense-block torch form, per frame of a batch of two frames of different
    sizes: values and the gradients of a weighted sum in positions and charges, float64."""
    from qmlmm.descriptors import native
    from qmlmm.descriptors.qm_mm import potential_and_field

    b = _with_grad(collate(_items(), dtype=torch.float64))
    out = []
    for use_kernel in (False, True):
        if use_kernel:
            phi, field = native.potential_and_field(b.qm_pos, b.qm_frame, b.mm_pos, b.mm_frame, b.mm_q, b.n_frames)
        else:
            phi, field = potential_and_field(b, b.mm_q)
        w = torch.linspace(-1.0, 1.0, len(phi), dtype=phi.dtype)
        loss = (w * phi).sum() + (w[:, None] * field * torch.tensor([1.0, -2.0, 0.5], dtype=phi.dtype)).sum()
        out.append([phi.detach(), field.detach(), *torch.autograd.grad(loss, [b.qm_pos, b.mm_pos, b.mm_q])])
    for t, n in zip(*out, strict=True):
        assert float(t.abs().max()) > 1e-3
        torch.testing.assert_close(n, t, rtol=1e-11, atol=1e-11 * float(t.abs().max()))


def test_kernels_release_pythons_lock() -> None:
    """A delta model's baseline runs in a second Python thread beside the network: a kernel must not hold
    Python's lock while it runs (holding it made the delta ML/MM step 61-66 ms instead of 48-56). While one
    long kernel call runs in a thread, this thread keeps running Python: the longest pause between its loop
    steps stays well below the call's length (with the lock held it would be the whole call)."""
    import threading
    import time

    from qmlmm.descriptors import native

    g = torch.Generator().manual_seed(0)
    qm = torch.rand(200, 3, generator=g, dtype=torch.float64)
    mm = 3.0 + torch.rand(40000, 3, generator=g, dtype=torch.float64)
    q = torch.rand(40000, generator=g, dtype=torch.float64) - 0.5
    zq, zm = torch.zeros(200, dtype=torch.long), torch.zeros(40000, dtype=torch.long)

    def call() -> None:
        native.potential_and_field(qm, zq, mm, zm, q, 1)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel on one core, this loop on the other
    try:
        call()
        t0 = time.perf_counter()
        call()
        alone = time.perf_counter() - t0
        assert alone > 0.01  # long enough to see a held lock

        def three_calls() -> None:
            for _ in range(3):
                call()

        worker = threading.Thread(target=three_calls)
        gaps, last = [], time.perf_counter()
        worker.start()
        while worker.is_alive():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert max(gaps) < 0.5 * alone, (max(gaps), alone)

"""Training an HDNNP ensemble on energies, QM forces and MM forces; resumable; with test metrics.

Outputs next to the model file ``MODEL``: ``MODEL`` (the self-describing model),
``<stem>.metrics.json`` (test/validation/train errors and, for delta models, the baseline's own
errors), ``<stem>.test.npz`` (test-set predictions and references, which callers turn into
``<stem>.parity.png`` with :func:`qmlmm.analysis.plots.parity_plot_of_model`), ``<stem>.history.json``
and, while training, ``<stem>.ckpt``
(resumed when the same command runs again after an interruption).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmlmm.data.batch import FrameTensors, collate
from qmlmm.data.training_set import TrainingData
from qmlmm.descriptors.acsf import DescriptorConfig
from qmlmm.models.ensemble import Ensemble
from qmlmm.models.evaluation import charge_errors, collect_predictions, compute_metrics
from qmlmm.models.hdnnp import HDNNP, ModelConfig, energy_and_forces
from qmlmm.models.model import ModelMeta, QMLMMModel
from qmlmm.training.config import TrainConfig
from qmlmm.training.diagnosis import fit_diagnosis
from qmlmm.training.warm_start import restandardise, warm_start_states

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "side_files"]


@dataclass
class TrainResult:
    model: QMLMMModel
    metrics: dict[str, Any]
    path: Path
    history: list[list[dict[str, float]]]
    seconds: float
    frames_per_second: float


def side_files(model_path: Path) -> dict[str, Path]:
    stem = model_path.with_suffix("") if model_path.suffix else model_path
    names = ("metrics.json", "test.npz", "parity.png", "history.json", "ckpt")
    return {k: stem.parent / f"{stem.name}.{k}" for k in names}


def _model_config(cfg: TrainConfig, data: TrainingData) -> ModelConfig:
    d: dict[str, Any] = {
        "elements": data.elements,
        "long_range_cutoff": data.embedding.cutoff,
        "mm_radial_cutoff": min(DescriptorConfig().mm_radial_cutoff, data.embedding.cutoff),
    }
    d.update(cfg.descriptor)
    return ModelConfig(
        descriptor=DescriptorConfig.from_dict(d),
        hidden=list(cfg.hidden),
        activation=cfg.activation,
        cutoff=data.embedding.cutoff,
        switch_width=data.embedding.switch_width,
        electrostatics=cfg.electrostatics,
        charge_hidden=list(cfg.charge_hidden),
        charge_sum="zero" if data.baseline else "total",
    )


@dataclass
class _Stats:
    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    e_shift: torch.Tensor
    e_scale: float
    var_e: float
    var_fq: float
    var_fm: float
    q_shift: torch.Tensor  # (ne,) per-element mean reference charge (e), zeros without references
    var_q: float  # mean square reference charge (e^2), the charge loss's scale


def _statistics(
    mcfg: ModelConfig, items: Sequence[FrameTensors], dtype: torch.dtype, feature_scaling: str = "feature"
) -> _Stats:
    """Per-element feature mean and scale (``feature_scaling``: each feature's std, or one RMS std per
    descriptor term, :func:`_term_scales`), per-element energy shifts (ridge fit on composition), scales."""
    probe = HDNNP(mcfg).to(dtype)
    ne, nf = probe.acsf.n_el, probe.acsf.n_features
    s1 = torch.zeros(ne, nf, dtype=torch.float64)
    s2 = torch.zeros(ne, nf, dtype=torch.float64)
    cnt = torch.zeros(ne, dtype=torch.float64)
    with torch.no_grad():
        for k in range(0, len(items), 16):
            b = collate(items[k : k + 16], dtype=dtype)
            x = probe.features(b).double()
            sp = probe.acsf.species(b.qm_z)
            s1.index_add_(0, sp, x)
            s2.index_add_(0, sp, x * x)
            cnt.index_add_(0, sp, torch.ones(len(sp), dtype=torch.float64))
    c = cnt.clamp(min=1)[:, None]
    mean = s1 / c
    std = torch.sqrt((s2 / c - mean**2).clamp(min=0))
    std = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))
    if feature_scaling == "term":
        std = _term_scales(torch.sqrt((s2 / c - mean**2).clamp(min=0)), mean, probe.acsf.sizes)
    comp = np.zeros((len(items), ne))
    for k, it in enumerate(items):
        sp = probe.acsf.species(torch.as_tensor(it.qm_z)).numpy()  # type: ignore[assignment]
        np.add.at(comp[k], sp, 1.0)
    e = np.array([it.energy for it in items])
    lam = 1e-6 * len(items)
    shift = np.linalg.solve(comp.T @ comp + lam * np.eye(ne), comp.T @ e)
    resid = e - comp @ shift
    n_at = comp.sum(1)
    var_e = float(max(np.var(resid / n_at), 1e-4))
    e_scale = float(max(np.std(resid) / math.sqrt(max(n_at.mean(), 1.0)), 1.0))  # type: ignore[arg-type]
    fq = np.concatenate([it.qm_forces for it in items])
    fm = np.concatenate([it.mm_forces for it in items]).reshape(-1, 3)
    q_shift, var_q = _charge_statistics(probe, items)
    return _Stats(
        mean.to(dtype),
        std.to(dtype),
        torch.as_tensor(shift, dtype=dtype),
        e_scale,
        var_e,
        float(max(np.mean(fq**2), 1e-6)),
        float(max(np.mean(fm**2), 1e-8)) if len(fm) else 1.0,
        q_shift.to(dtype),
        var_q,
    )


def _term_scales(std: torch.Tensor, mean: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
    """(E, F) scales from the features' standard deviations and means (E, F): every feature of a descriptor
    term (columns in the order of ``sizes``) divided by the RMS of that term's standard deviations for the
    element, so that a feature that is almost always 0 stays small instead of being blown up to |z| ~ 10-60
    by its own tiny standard deviation (measured on beta-alanine in water: 1e-7-scale rare-geometry
    features). 1 where the term does not vary beyond rounding (RMS std <= 1e-6 (1 + RMS mean), the guard of
    the per-feature scaling: a rigid QM region's constant features would be blown up by their noise)."""
    out = torch.ones_like(std)
    start = 0
    for width in sizes.values():
        cols = slice(start, start + width)
        rms = torch.sqrt((std[:, cols] ** 2).mean(1, keepdim=True))
        size = torch.sqrt((mean[:, cols] ** 2).mean(1, keepdim=True))
        out[:, cols] = torch.where(rms > 1e-6 * (1 + size), rms, torch.ones_like(rms)).expand(-1, width)
        start += width
    return out


def _charge_statistics(probe: HDNNP, items: Sequence[FrameTensors]) -> tuple[torch.Tensor, float]:
    """Per-element mean of the reference QM charges (e; the charge networks start from it) and their
    mean square (e^2, floor 1e-4: the charge loss's scale), over the frames that have references."""
    ne = probe.acsf.n_el
    with_q = [it for it in items if it.qm_q_ref is not None]
    if not with_q:
        return torch.zeros(ne, dtype=torch.float64), 1.0
    sp = probe.acsf.species(torch.as_tensor(np.concatenate([it.qm_z for it in with_q]))).numpy()
    q = np.concatenate([it.qm_q_ref for it in with_q])
    mean = np.bincount(sp, weights=q, minlength=ne) / np.maximum(np.bincount(sp, minlength=ne), 1)
    return torch.as_tensor(mean, dtype=torch.float64), float(max(np.mean(q**2), 1e-4))


@dataclass
class _ErrorSums:
    """Sums of squared errors over a set of frames and the counts they are averaged by: the training
    loss's terms before the division, so that a loss over many batches is exactly that of their union.
    Also the sums of absolute errors (kJ/mol, kJ/mol/nm) for the validation MAEs."""

    se_e: torch.Tensor  # sum over frames of ((E - E_ref) / n_qm)^2
    n_e: int
    se_fq: torch.Tensor  # sum over QM force components
    n_fq: int
    se_fm: torch.Tensor
    n_fm: int
    se_q: torch.Tensor  # sum over QM atoms with reference charges
    n_q: int
    ae_e: torch.Tensor  # detached: the MAEs are read only from validation sums (no sync per training batch)
    ae_fq: torch.Tensor
    ae_fm: torch.Tensor

    def detached(self) -> _ErrorSums:
        return dataclasses.replace(
            self, se_e=self.se_e.detach(), se_fq=self.se_fq.detach(), se_fm=self.se_fm.detach(), se_q=self.se_q.detach()
        )

    def __add__(self, o: _ErrorSums) -> _ErrorSums:
        return _ErrorSums(
            self.se_e + o.se_e, self.n_e + o.n_e, self.se_fq + o.se_fq, self.n_fq + o.n_fq,
            self.se_fm + o.se_fm, self.n_fm + o.n_fm, self.se_q + o.se_q, self.n_q + o.n_q,
            self.ae_e + o.ae_e, self.ae_fq + o.ae_fq, self.ae_fm + o.ae_fm,
        )  # fmt: skip


def _error_sums(model: torch.nn.Module, b: Any, cfg: TrainConfig, create_graph: bool) -> _ErrorSums:
    """Error sums of ``model`` (an HDNNP in training mode, which keeps its charges) on batch ``b``."""
    e, fq, fm, _ = energy_and_forces(model, b, create_graph=create_graph)
    n = b.n_qm_per_frame.to(e.dtype)
    de, dq, dm = e - b.energy, fq - b.qm_forces, fm - b.mm_forces
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    se_q, n_q = zero, 0
    q = getattr(model, "last_charges", None)  # the charges of the forward pass above
    if cfg.w_charges > 0 and q is not None and b.qm_q_ref is not None:
        have = torch.isfinite(b.qm_q_ref)
        se_q, n_q = ((q[have] - b.qm_q_ref[have]) ** 2).sum(), int(have.sum())
    return _ErrorSums(
        se_e=((de / n) ** 2).sum(),
        n_e=len(e),
        se_fq=(dq**2).sum(),
        n_fq=dq.numel(),
        se_fm=(dm**2).sum() if len(fm) else zero,
        n_fm=dm.numel(),
        se_q=se_q,
        n_q=n_q,
        ae_e=de.detach().abs().sum(),
        ae_fq=dq.detach().abs().sum(),
        ae_fm=dm.detach().abs().sum(),
    )


def _loss(s: _ErrorSums, st: _Stats, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of error sums: weighted mean squared errors of per-atom energies, QM forces, MM
    forces and (with references) QM charges, each over its variance in the training set."""
    le = s.se_e / max(s.n_e, 1) / st.var_e
    lq = s.se_fq / max(s.n_fq, 1) / st.var_fq
    lm = s.se_fm / s.n_fm / st.var_fm if s.n_fm else torch.zeros_like(le)
    lc = s.se_q / s.n_q / st.var_q if s.n_q else torch.zeros_like(le)
    loss = cfg.w_energy * le + cfg.w_qm_forces * lq + cfg.w_mm_forces * lm + (cfg.w_charges * lc if s.n_q else 0.0)
    return loss, {
        "loss": float(loss.detach()),
        "le": float(le.detach()),
        "lq": float(lq.detach()),
        "lm": float(lm.detach()),
        "lc": float(lc.detach()),
    }


def _warm_state(states: list[dict[str, torch.Tensor]] | None, k: int) -> dict[str, torch.Tensor] | None:
    """Start state of member ``k`` of a warm start from ``states`` (one per member of the start model), None:
    random weights (no warm start, or more members than the start model has: a copy of another member would
    start two members at one function and bias the ensemble's spread low)."""
    if not states:
        return None
    if k >= len(states):
        log.info("member %d starts from random weights: the start model has %d members", k + 1, len(states))
        return None
    return states[k]


def _validation(
    model: torch.nn.Module, items: Sequence[FrameTensors], st: _Stats, cfg: TrainConfig, dtype: torch.dtype, device: str
) -> tuple[float, dict[str, float]]:
    """The training loss on the validation frames (all of them, batch by batch, exactly as one set) and
    their MAEs of energy, QM forces and MM forces."""
    total: _ErrorSums | None = None
    for s0 in range(0, len(items), cfg.batch_size):
        b = collate(list(items[s0 : s0 + cfg.batch_size]), dtype=dtype, device=device)
        s = _error_sums(model, b, cfg, create_graph=False).detached()
        total = s if total is None else total + s
    assert total is not None
    loss, _ = _loss(total, st, cfg)
    mae = {
        "energy": float(total.ae_e) / max(total.n_e, 1),
        "qm_forces": float(total.ae_fq) / max(total.n_fq, 1),
        "mm_forces": float(total.ae_fm) / max(total.n_fm, 1),
    }
    return float(loss.detach()), mae


def _atomic_save(obj: Any, path: Path) -> None:
    from qmlmm.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _fingerprint(cfg: TrainConfig, data: TrainingData, init: Path | None = None) -> str:
    h = hashlib.sha256(json.dumps(cfg.result_settings(), sort_keys=True).encode())
    if init is not None:  # a warm start from another model is another run
        h.update(hashlib.sha256(init.read_bytes()).digest())
    h.update(data.source.encode())
    h.update(np.asarray(data.train).tobytes())
    h.update(np.array([it.energy for it in data.items]).tobytes())
    return h.hexdigest()[:16]


def _training_frames(data: TrainingData, cfg: TrainConfig) -> tuple[np.ndarray, list[FrameTensors], list[FrameTensors]]:
    """Training frame indices (subsampled to ``max_train_frames``), training items and validation items
    (the training items when there is no validation part)."""
    train_idx = data.train
    if cfg.max_train_frames is not None and len(train_idx) > cfg.max_train_frames:
        # drawn with the split's seed: another ``seed`` with ``split_seed`` kept trains on the same frames
        rng = np.random.default_rng(cfg.split_settings.seed)
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_frames, replace=False))
    tr_items = data.subset(train_idx)
    return train_idx, tr_items, data.subset(data.valid) if len(data.valid) else tr_items


def _member_items(tr_items: list[FrameTensors], cfg: TrainConfig, k: int) -> list[FrameTensors]:
    """The frames member ``k`` fits: the training frames, or with ``cfg.bootstrap`` its own resample of them
    (as many, with replacement; drawn from ``cfg.seed`` and ``k``, so a resumed run redraws the same)."""
    if not cfg.bootstrap:
        return tr_items
    pick = np.random.default_rng([cfg.seed, k]).integers(0, len(tr_items), len(tr_items))
    return [tr_items[int(i)] for i in pick]


def _read_checkpoint(path: Path, fp: str, resume: bool) -> dict[str, Any]:
    """The checkpoint of this run (fingerprint ``fp``), or {} (none, another run's, unreadable)."""
    if not (resume and path.exists()):
        return {}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        log.warning("cannot read checkpoint %s (%s); starting afresh", path, e)
        return {}
    if ckpt.get("fingerprint") != fp:
        log.warning("checkpoint %s belongs to another run; starting afresh", path)
        return {}
    log.info(  # the epoch of the member in progress (the checkpoint holds it under "current")
        "resuming from %s (member %d, epoch %d)",
        path,
        len(ckpt["done"]) + 1,
        (ckpt.get("current") or {}).get("epoch", 0),
    )
    return dict(ckpt)


@dataclass
class _Member:
    """One network's training state: what a checkpoint holds for the member in progress."""

    model: HDNNP
    opt: torch.optim.Optimizer
    sched: Any
    rng: np.random.Generator
    epoch: int = 0
    best: float = float("inf")
    best_state: dict[str, torch.Tensor] | None = None
    hist: list[dict[str, float]] = field(default_factory=list)
    since_best: int = 0

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "epoch": self.epoch,
            "best": self.best,
            "best_state": self.best_state,
            "hist": self.hist,
            "since_best": self.since_best,
        }


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled weight decay on every parameter) when ``cfg.weight_decay`` > 0."""
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    """The learning-rate schedule of ``cfg.lr_schedule``, stepped once per epoch (:func:`_step_schedule`)."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr_min)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.lr_factor, patience=cfg.lr_patience,
                                                      min_lr=cfg.lr_min)  # fmt: skip


def _step_schedule(sched: Any, valid_loss: float) -> None:
    """One epoch's step of the schedule: the plateau rule reads the validation loss, a fixed one does not."""
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(valid_loss)
    else:
        sched.step()


def _start_member(k: int, mcfg: ModelConfig, st: _Stats, cfg: TrainConfig, dtype: torch.dtype, device: str,
                  current: dict[str, Any] | None, init: dict[str, torch.Tensor] | None = None) -> _Member:  # fmt: skip
    """Member ``k``: fresh (seeded, scaled by the training statistics), warm-started from the state ``init``
    of a trained member (its function, restandardised on these statistics) or, given the checkpoint's
    ``current`` state, where it stopped."""
    torch.manual_seed(cfg.seed * 1000 + k)
    model = HDNNP(mcfg).to(dtype)
    if init is not None:
        model.load_state_dict(init)
        restandardise(model, st.feat_mean, st.feat_std)
    else:
        model.feat_mean.copy_(st.feat_mean)
        model.feat_std.copy_(st.feat_std)
        model.e_shift.copy_(st.e_shift)
        model.e_scale.fill_(st.e_scale)
        if mcfg.has_charges:
            model.q_shift.copy_(st.q_shift)
    model.to(device)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg)
    m = _Member(model, opt, sched, np.random.default_rng(cfg.seed * 1000 + k))
    if current is not None:
        model.load_state_dict(current["model"])
        opt.load_state_dict(current["opt"])
        sched.load_state_dict(current["sched"])
        m.epoch, m.best, m.best_state = current["epoch"], current["best"], current["best_state"]
        m.hist, m.since_best = current["hist"], current["since_best"]
        m.rng = np.random.default_rng(cfg.seed * 1000 + k + 7919 * m.epoch)
    return m


def _train_epoch(m: _Member, items: Sequence[FrameTensors], st: _Stats, cfg: TrainConfig, dtype: torch.dtype,
                 device: str) -> tuple[float, int]:  # fmt: skip
    """One pass over ``items`` in random batches: mean training loss and frames seen."""
    m.model.train()
    order = m.rng.permutation(len(items))
    losses, seen = [], 0
    for s0 in range(0, len(order), cfg.batch_size):
        b = collate([items[i] for i in order[s0 : s0 + cfg.batch_size]], dtype=dtype, device=device)
        m.opt.zero_grad(set_to_none=True)
        loss, parts = _loss(_error_sums(m.model, b, cfg, create_graph=True), st, cfg)
        loss.backward()
        m.opt.step()
        losses.append(parts["loss"])
        seen += b.n_frames
    return float(np.mean(losses)), seen


def _train_member(m: _Member, tr_items: Sequence[FrameTensors], va_items: Sequence[FrameTensors], st: _Stats,
                  cfg: TrainConfig, dtype: torch.dtype, device: str, bar: Any,
                  save: Callable[[_Member], None]) -> int:  # fmt: skip
    """Epochs until early stopping (or ``cfg.epochs``), checkpointing after each with ``save``; keeps the
    best validation state in ``m``. Returns the frames seen."""
    seen = 0
    for _ in bar:
        train_loss, n = _train_epoch(m, tr_items, st, cfg, dtype, device)
        seen += n
        # the training loss on the validation set (the model stays in training mode, which only keeps its
        # charges for the charge term: an HDNNP has no dropout or batch statistics)
        vloss, vmae = _validation(m.model, va_items, st, cfg, dtype, device)
        _step_schedule(m.sched, vloss)
        lr = m.opt.param_groups[0]["lr"]
        m.epoch += 1
        m.hist.append({
            "epoch": m.epoch, "train_loss": train_loss, "valid_loss": vloss, "lr": lr,
            "valid_energy_mae": vmae["energy"], "valid_qm_forces_mae": vmae["qm_forces"],
            "valid_mm_forces_mae": vmae["mm_forces"],
        })  # fmt: skip
        if vloss < m.best:
            m.best, m.best_state, m.since_best = vloss, copy.deepcopy(m.model.state_dict()), 0
        else:
            m.since_best += 1
        bar.set_postfix_str(
            f"E {vmae['energy']:.3f} Fqm {vmae['qm_forces']:.2f} Fmm {vmae['mm_forces']:.3f} lr {lr:.1e}"
        )
        save(m)
        if m.since_best >= cfg.patience or (lr <= cfg.lr_min * 1.0001 and m.since_best >= cfg.lr_patience):
            break
    return seen


def _final_metrics(ens: Ensemble, data: TrainingData, cfg: TrainConfig, train_idx: np.ndarray, dtype: torch.dtype,
                   device: str, test_npz: Path) -> dict[str, Any]:  # fmt: skip
    """Metrics of the trained ensemble on the test, validation and training frames (and the charges where
    the labels have them); the test predictions saved to ``test_npz`` for a parity plot."""
    metrics: dict[str, Any] = {}
    for name, idx in (("test", data.test), ("valid", data.valid), ("train", train_idx)):
        if len(idx):
            c = collect_predictions(ens, data.subset(idx), dtype, device, cfg.batch_size)
            metrics[name] = compute_metrics(c)
            qerr = charge_errors(ens, data.subset(idx), dtype, device)
            if qerr is not None:
                metrics[name]["charges"] = qerr
            if name == "test":  # the numbers behind a parity plot; callers plot (training imports no analysis)
                c.save(test_npz)
    return metrics


def train(
    data: TrainingData,
    cfg: TrainConfig,
    out: str | Path,
    progress: bool = True,
    resume: bool = True,
    position: int | None = None,
    init: str | Path | None = None,
) -> TrainResult:
    """Train an ensemble on ``data`` with ``cfg``; write the model and its side files at ``out``.

    Members one after the other, each checkpointed after every epoch (a killed run resumes where it
    stopped, if its data and settings are unchanged). ``position`` places the progress bar on its own line
    when several runs share a terminal. ``init``: a model file to warm-start from (same architecture; member
    k starts from its member k modulo its size, :mod:`qmlmm.training.warm_start`).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = side_files(out)
    torch.set_num_threads(max(1, cfg.threads))
    dtype = getattr(torch, cfg.dtype)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    train_idx, tr_items, va_items = _training_frames(data, cfg)
    mcfg = _model_config(cfg, data)
    st = _statistics(mcfg, tr_items, dtype, cfg.feature_scaling)
    if mcfg.has_charges and cfg.w_charges > 0 and not any(it.qm_q_ref is not None for it in tr_items):
        log.warning(
            "the labels of %s carry no QM charges: the electrostatic term's charges are learnt from energies "
            "and forces alone, which on few frames can drift to unphysical values and break MD (docs/model.md); "
            "relabel with qmlmm label --overwrite to record them",
            data.source,
        )
    init = Path(init) if init is not None else None
    init_states = warm_start_states(init, mcfg, data.target, data.baseline) if init is not None else None
    fp = _fingerprint(cfg, data, init)
    ckpt = _read_checkpoint(files["ckpt"], fp, resume)
    done_states: list[dict[str, torch.Tensor]] = ckpt.get("done", [])
    history: list[list[dict[str, float]]] = ckpt.get("history", [])
    t0 = time.perf_counter()
    n_frames_seen = 0
    for k in range(len(done_states), cfg.ensemble):
        current = ckpt.get("current") if ckpt.get("member") == k else None
        start = _warm_state(init_states, k)
        m = _start_member(k, mcfg, st, cfg, dtype, device, current, start)
        bar = tqdm(range(m.epoch, cfg.epochs), desc=f"{out.stem} network {k + 1}/{cfg.ensemble}", position=position,
                   leave=position is None, unit="epoch", disable=not progress, dynamic_ncols=True, initial=m.epoch,
                   total=cfg.epochs)  # fmt: skip

        def save(m: _Member, k: int = k) -> None:
            state = {"fingerprint": fp, "done": done_states, "history": history, "member": k, "current": m.state()}
            _atomic_save(state, files["ckpt"])

        fit_items = _member_items(tr_items, cfg, k)
        n_frames_seen += _train_member(m, fit_items, va_items, st, cfg, dtype, device, bar, save)
        bar.close()
        assert m.best_state is not None
        done_states.append({kk: v.detach().cpu() for kk, v in m.best_state.items()})
        history.append(m.hist)
        _atomic_save(
            {"fingerprint": fp, "done": done_states, "history": history, "member": k + 1, "current": None},
            files["ckpt"],
        )
    seconds = time.perf_counter() - t0
    members = []
    for sd in done_states:
        member = HDNNP(mcfg).to(dtype)
        member.load_state_dict(sd)
        members.append(member)
    ens = Ensemble(mcfg, members).to(device)
    meta = ModelMeta(
        target=data.target,
        target_method=data.target_method,
        baseline=data.baseline,
        baseline_method=data.baseline_method,
        dtype=cfg.dtype,
        training=cfg.to_dict(),
        data=data.source,
    )
    metrics: dict[str, Any] = {
        "n_train": len(tr_items),
        "n_valid": len(data.valid),
        "n_test": len(data.test),
        "split": data.split_info,
        "n_parameters_per_network": members[0].n_parameters(),
        "n_features": members[0].acsf.n_features,
        "train_seconds": seconds,
        "mode": "delta" if data.baseline else "direct",
        "target": data.target,
        "baseline": data.baseline,
        "config": cfg.to_dict(),
        "data": data.source,
        "warm_start_from": str(init) if init is not None else None,
        **_final_metrics(ens, data, cfg, train_idx, dtype, device, files["test.npz"]),
    }
    if "train" in metrics and "valid" in metrics:
        diag = fit_diagnosis(metrics, history)
        metrics["diagnosis"] = {"verdict": diag.verdict, "message": diag.message}
        log.info("fit: %s", diag.message)
    meta.metrics = metrics
    model_obj = QMLMMModel(ens, meta)
    model_obj.save(out)
    files["metrics.json"].write_text(json.dumps(metrics, indent=2))
    files["history.json"].write_text(json.dumps(history))
    if files["ckpt"].exists():
        files["ckpt"].unlink()
    fps = n_frames_seen / seconds if seconds > 0 else float("nan")
    return TrainResult(model_obj, metrics, out, history, seconds, fps)

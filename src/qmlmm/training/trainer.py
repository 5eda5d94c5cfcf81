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
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


def _statistics(mcfg: ModelConfig, items: Sequence[FrameTensors], dtype: torch.dtype) -> _Stats:
    """Per-element feature mean/std, per-element energy shifts (ridge fit on composition), scales."""
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


def _loss(model: torch.nn.Module, b: Any, st: _Stats, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    e, fq, fm, _ = energy_and_forces(model, b, create_graph=True)
    n = b.n_qm_per_frame.to(e.dtype)
    le = (((e - b.energy) / n) ** 2).mean() / st.var_e
    lq = ((fq - b.qm_forces) ** 2).mean() / st.var_fq
    lm = ((fm - b.mm_forces) ** 2).mean() / st.var_fm if len(fm) else torch.zeros((), dtype=e.dtype)
    loss = cfg.w_energy * le + cfg.w_qm_forces * lq + cfg.w_mm_forces * lm
    lc = torch.zeros((), dtype=e.dtype)
    q = getattr(model, "last_charges", None)  # the charges of the forward pass above
    if cfg.w_charges > 0 and q is not None and b.qm_q_ref is not None:
        have = torch.isfinite(b.qm_q_ref)
        if bool(have.any()):
            lc = ((q[have] - b.qm_q_ref[have]) ** 2).mean() / st.var_q
            loss = loss + cfg.w_charges * lc
    return loss, {
        "loss": float(loss.detach()),
        "le": float(le.detach()),
        "lq": float(lq.detach()),
        "lm": float(lm.detach()),
        "lc": float(lc.detach()),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    from qmlmm.fileio import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _fingerprint(cfg: TrainConfig, data: TrainingData) -> str:
    h = hashlib.sha256(json.dumps(cfg.result_settings(), sort_keys=True).encode())
    h.update(data.source.encode())
    h.update(np.asarray(data.train).tobytes())
    h.update(np.array([it.energy for it in data.items]).tobytes())
    return h.hexdigest()[:16]


def train(
    data: TrainingData,
    cfg: TrainConfig,
    out: str | Path,
    progress: bool = True,
    resume: bool = True,
    position: int | None = None,
) -> TrainResult:
    """Train an ensemble on ``data`` with ``cfg``; write the model and its side files at ``out``.

    ``position`` places the progress bar on its own line when several runs share a terminal.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = side_files(out)
    torch.set_num_threads(max(1, cfg.threads))
    dtype = getattr(torch, cfg.dtype)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    train_idx = data.train
    if cfg.max_train_frames is not None and len(train_idx) > cfg.max_train_frames:
        train_idx = np.sort(np.random.default_rng(cfg.seed).choice(train_idx, cfg.max_train_frames, replace=False))
    tr_items = data.subset(train_idx)
    va_items = data.subset(data.valid) if len(data.valid) else tr_items
    mcfg = _model_config(cfg, data)
    st = _statistics(mcfg, tr_items, dtype)
    if mcfg.electrostatics == "charges" and cfg.w_charges > 0 and not any(it.qm_q_ref is not None for it in tr_items):
        log.warning(
            "the labels of %s carry no QM charges: the electrostatic term's charges are learnt from energies "
            "and forces alone, which on few frames can drift to unphysical values and break MD (docs/model.md); "
            "relabel with qmlmm label --overwrite to record them",
            data.source,
        )
    fp = _fingerprint(cfg, data)

    ckpt: dict[str, Any] = {}
    if resume and files["ckpt"].exists():
        try:
            ckpt = torch.load(files["ckpt"], map_location="cpu", weights_only=False)
            if ckpt.get("fingerprint") != fp:
                log.warning("checkpoint %s belongs to another run; starting afresh", files["ckpt"])
                ckpt = {}
            else:
                log.info(  # the epoch of the member in progress (the checkpoint holds it under "current")
                    "resuming from %s (member %d, epoch %d)",
                    files["ckpt"],
                    len(ckpt["done"]) + 1,
                    (ckpt.get("current") or {}).get("epoch", 0),
                )
        except Exception as e:
            log.warning("cannot read checkpoint %s (%s); starting afresh", files["ckpt"], e)
            ckpt = {}
    done_states: list[dict[str, torch.Tensor]] = ckpt.get("done", [])
    history: list[list[dict[str, float]]] = ckpt.get("history", [])
    t0 = time.perf_counter()
    n_frames_seen = 0
    for k in range(len(done_states), cfg.ensemble):
        torch.manual_seed(cfg.seed * 1000 + k)
        rng = np.random.default_rng(cfg.seed * 1000 + k)
        model = HDNNP(mcfg).to(dtype)
        model.feat_mean.copy_(st.feat_mean)
        model.feat_std.copy_(st.feat_std)
        model.e_shift.copy_(st.e_shift)
        model.e_scale.fill_(st.e_scale)
        if mcfg.electrostatics == "charges":
            model.q_shift.copy_(st.q_shift)
        model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.lr_min
        )
        start_epoch, best, best_state, hist, since_best = 0, float("inf"), None, [], 0
        if ckpt.get("current") is not None and ckpt.get("member") == k:
            cur = ckpt["current"]
            model.load_state_dict(cur["model"])
            opt.load_state_dict(cur["opt"])
            sched.load_state_dict(cur["sched"])
            start_epoch, best, best_state, hist, since_best = (
                cur["epoch"],
                cur["best"],
                cur["best_state"],
                cur["hist"],
                cur["since_best"],
            )
            rng = np.random.default_rng(cfg.seed * 1000 + k + 7919 * start_epoch)
        bar = tqdm(
            range(start_epoch, cfg.epochs),
            desc=f"{out.stem} network {k + 1}/{cfg.ensemble}",
            position=position,
            leave=position is None,
            unit="epoch",
            disable=not progress,
            dynamic_ncols=True,
            initial=start_epoch,
            total=cfg.epochs,
        )
        for epoch in bar:
            model.train()
            order = rng.permutation(len(tr_items))
            tl = []
            for s0 in range(0, len(order), cfg.batch_size):
                b = collate([tr_items[i] for i in order[s0 : s0 + cfg.batch_size]], dtype=dtype, device=device)
                opt.zero_grad(set_to_none=True)
                loss, parts = _loss(model, b, st, cfg)
                loss.backward()
                opt.step()
                tl.append(parts["loss"])
                n_frames_seen += b.n_frames
            model.eval()
            c = collect_predictions(model, va_items, dtype, device, cfg.batch_size)
            m = compute_metrics(c)
            vloss = (
                cfg.w_energy * m["energy_per_atom"]["rmse"] ** 2 / st.var_e  # type: ignore[index]
                + cfg.w_qm_forces * m["qm_forces"]["rmse"] ** 2 / st.var_fq  # type: ignore[index]
                + cfg.w_mm_forces * (m["mm_forces"]["rmse"] ** 2 / st.var_fm if c.fm_ref.size else 0.0)  # type: ignore[index]
            )
            sched.step(vloss)
            lr = opt.param_groups[0]["lr"]
            rec = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(tl)),
                "valid_loss": float(vloss),
                "lr": lr,
                "valid_energy_mae": m["energy"]["mae"],  # type: ignore[index]
                "valid_qm_forces_mae": m["qm_forces"]["mae"],  # type: ignore[index]
                "valid_mm_forces_mae": m["mm_forces"]["mae"],  # type: ignore[index]
            }
            hist.append(rec)
            if vloss < best:
                best, best_state, since_best = vloss, copy.deepcopy(model.state_dict()), 0
            else:
                since_best += 1
            bar.set_postfix_str(
                f"E {rec['valid_energy_mae']:.3f} Fqm {rec['valid_qm_forces_mae']:.2f} "
                f"Fmm {rec['valid_mm_forces_mae']:.3f} lr {lr:.1e}"
            )
            _atomic_save(
                {
                    "fingerprint": fp,
                    "done": done_states,
                    "history": history,
                    "member": k,
                    "current": {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "epoch": epoch + 1,
                        "best": best,
                        "best_state": best_state,
                        "hist": hist,
                        "since_best": since_best,
                    },
                },
                files["ckpt"],
            )
            if since_best >= cfg.patience or (lr <= cfg.lr_min * 1.0001 and since_best >= cfg.lr_patience):
                break
        bar.close()
        assert best_state is not None
        done_states.append({kk: v.detach().cpu() for kk, v in best_state.items()})
        history.append(hist)
        _atomic_save(
            {"fingerprint": fp, "done": done_states, "history": history, "member": k + 1, "current": None},
            files["ckpt"],
        )
    seconds = time.perf_counter() - t0
    members = []
    for sd in done_states:
        m_ = HDNNP(mcfg).to(dtype)
        m_.load_state_dict(sd)
        members.append(m_)
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
    model_obj = QMLMMModel(ens, meta)
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
    }
    for name, idx in (("test", data.test), ("valid", data.valid), ("train", train_idx)):
        if len(idx):
            c = collect_predictions(ens, data.subset(idx), dtype, device, cfg.batch_size)
            metrics[name] = compute_metrics(c)
            qerr = charge_errors(ens, data.subset(idx), dtype, device)
            if qerr is not None:
                metrics[name]["charges"] = qerr
            if name == "test":  # the numbers behind a parity plot; callers plot (training imports no analysis)
                c.save(files["test.npz"])
    meta.metrics = metrics
    model_obj.save(out)
    files["metrics.json"].write_text(json.dumps(metrics, indent=2))
    files["history.json"].write_text(json.dumps(history))
    if files["ckpt"].exists():
        files["ckpt"].unlink()
    fps = n_frames_seen / seconds if seconds > 0 else float("nan")
    return TrainResult(model_obj, metrics, out, history, seconds, fps)

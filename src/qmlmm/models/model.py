"""A trained qmlmm model: ensemble + everything needed to use it, in one self-describing file.

The file (``torch.save`` of a plain dict, loaded with ``weights_only=True``) holds: format and
version, the qmlmm version, the architecture (:class:`ModelConfig`), every member's weights and
scaling buffers, the embedding settings of the labels, the target level and, for delta learning,
the baseline level and its engine spec, units, training configuration and test metrics.
``qmlmm md``, ``evaluate`` and ``predict`` need nothing else.

As an engine (:class:`ModelEngine`), a direct model returns E_nn; a delta model returns
E_baseline + E_nn, running its baseline engine in the same call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmlmm import __version__
from qmlmm.batch import FrameBatch
from qmlmm.data.batch import FrameTensors, collate, frame_tensors
from qmlmm.engines.base import Engine, EngineResult, QMMMInput
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError, SchemaError
from qmlmm.models.ensemble import Ensemble
from qmlmm.models.hdnnp import HDNNP, ModelConfig
from qmlmm.system import Frame

log = logging.getLogger(__name__)

__all__ = ["ModelMeta", "QMLMMModel", "ModelEngine", "Prediction", "MODEL_FORMAT"]

MODEL_FORMAT = "qmlmm-model"
#: stack of the thread a delta model's baseline runs in beside the network (bytes, virtual)
BASELINE_THREAD_STACK = 256 * 2**20
MODEL_VERSION = 1


@dataclass
class ModelMeta:
    """What the model predicts and how it was made."""

    target: str
    target_method: str = ""
    baseline: str | None = None
    baseline_method: str | None = None
    dtype: str = "float32"
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    qmlmm_version: str = __version__
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    data: str = ""

    @property
    def delta(self) -> bool:
        return self.baseline is not None


@dataclass
class Prediction:
    """Model prediction for one frame: energy (kJ/mol), forces (N, 3) on all atoms (kJ/mol/nm),
    ensemble spreads of both, and the baseline part (delta models)."""

    energy: float
    forces: np.ndarray
    energy_std: float
    forces_std: np.ndarray | None = None
    baseline_energy: float | None = None


class QMLMMModel:
    """An ensemble with its metadata; use :meth:`load` / :meth:`save`."""

    def __init__(self, ensemble: Ensemble, meta: ModelMeta) -> None:
        # eval mode: a model predicts (training trains the members themselves); in eval mode the members'
        # networks run in one fused pass and the descriptor takes its compiled kernel where it builds
        self.ensemble = ensemble.eval()
        self.meta = meta

    @property
    def config(self) -> ModelConfig:
        return self.ensemble.cfg

    @property
    def embedding(self) -> EmbeddingSettings:
        return self.config.embedding

    @property
    def dtype(self) -> torch.dtype:
        return next(self.ensemble.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.ensemble.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> QMLMMModel:
        if device is not None:
            self.ensemble.to(device)
        if dtype is not None:
            self.ensemble.to(dtype)
            self.meta.dtype = str(dtype).replace("torch.", "")
        return self

    # ---- file ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "qmlmm_version": __version__,
            "config": self.config.to_dict(),
            "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.ensemble.members],
            "meta": {k: getattr(self.meta, k) for k in self.meta.__dataclass_fields__},
            "units": {"length": "nm", "energy": "kJ/mol", "force": "kJ/mol/nm", "charge": "e"},
        }

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically."""
        from qmlmm.fileio import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        return path

    @classmethod
    def from_state(
        cls, st: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> QMLMMModel:
        if not isinstance(st, dict) or st.get("format") != MODEL_FORMAT:
            raise SchemaError("not a qmlmm model file")
        if int(st.get("version", 0)) > MODEL_VERSION:
            raise SchemaError(f"model file version {st.get('version')} is newer than this qmlmm supports")
        cfg = ModelConfig.from_dict(st["config"])
        members = []
        for sd in st["members"]:
            m = HDNNP(cfg)
            m.load_state_dict(sd)
            members.append(m)
        meta = ModelMeta(**st["meta"])
        model = cls(Ensemble(cfg, members), meta)
        want = dtype or getattr(torch, meta.dtype)
        return model.to(device, want)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> QMLMMModel:
        """Load a model file (``device``: cpu, cuda, auto)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SchemaError(f"{path} is not a qmlmm model file: {e}") from e
        try:
            return cls.from_state(st, device, dtype)
        except SchemaError as e:
            raise SchemaError(f"{path}: {e}") from e

    # ---- prediction ----------------------------------------------------------------------------
    def batch(self, items: Sequence[FrameTensors]) -> FrameBatch:
        return collate(items, dtype=self.dtype, device=self.device)

    def predict_tensors(
        self, items: Sequence[FrameTensors], batch_size: int = 8, force_spread: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """Network-only predictions (no baseline) for prepared frames, one dict per frame."""
        out: list[dict[str, np.ndarray]] = []
        self.ensemble.eval()
        for s0 in range(0, len(items), batch_size):
            chunk = items[s0 : s0 + batch_size]
            b = self.batch(chunk)
            p = self.ensemble.predict(b, force_spread=force_spread)
            qf = b.qm_frame.cpu().numpy()
            mf = b.mm_frame.cpu().numpy()
            for k in range(len(chunk)):
                d = {
                    "energy": float(p.energy[k]),
                    "energy_std": float(p.energy_std[k]),
                    "qm_forces": p.qm_forces[qf == k].double().cpu().numpy(),
                    "mm_forces": p.mm_forces[mf == k].double().cpu().numpy(),
                }
                if p.qm_forces_std is not None and p.mm_forces_std is not None:
                    d["qm_forces_std"] = p.qm_forces_std[qf == k].double().cpu().numpy()
                    d["mm_forces_std"] = p.mm_forces_std[mf == k].double().cpu().numpy()
                out.append(d)  # type: ignore[arg-type]
        return out

    def predict_frames(
        self,
        frames: Sequence[Frame],
        batch_size: int = 8,
        force_spread: bool = True,
        baseline: Engine | None = None,
        baseline_level: str | None = None,
        use_labels: bool = True,
    ) -> list[Prediction]:
        """Total predictions for frames: network, plus the baseline for delta models.

        With ``use_labels`` the baseline is taken from each frame's label ``baseline_level`` (default:
        the model's baseline level) when present, as in a dataset labelled with the same embedding;
        otherwise it is computed with ``baseline`` (default: the model's baseline engine).
        """
        items = [frame_tensors(fr, self.embedding) for fr in frames]
        nn_pred = self.predict_tensors(items, batch_size, force_spread)
        preds = []
        base_engine = baseline
        for fr, it, p in zip(frames, items, nn_pred, strict=True):
            forces = np.zeros((fr.n_atoms, 3))
            forces[it.qm_index] = p["qm_forces"]
            forces[it.mm_index] = p["mm_forces"]
            fstd = None
            if "qm_forces_std" in p:
                fstd = np.zeros((fr.n_atoms, 3))
                fstd[it.qm_index] = p["qm_forces_std"]
                fstd[it.mm_index] = p["mm_forces_std"]
            energy, e_base = float(p["energy"]), None
            if self.meta.delta:
                lvl = baseline_level or self.meta.baseline
                if use_labels and lvl in fr.labels:
                    lab = fr.labels[lvl]
                else:
                    if base_engine is None:
                        base_engine = self.baseline_engine()
                    from qmlmm.engines import label_frame

                    lab, _ = label_frame(base_engine, fr, self.embedding)
                e_base = float(lab.energy)
                energy += e_base
                forces = forces + lab.forces
            preds.append(Prediction(energy, forces, float(p["energy_std"]), fstd, e_base))
        return preds

    def baseline_engine(self, threads: int = 1) -> Engine:
        if not self.meta.delta or not self.meta.baseline_method:
            raise InputError("this model is not a delta model")
        from qmlmm.engines import make_engine

        return make_engine(self.meta.baseline_method, threads=threads)

    def engine(self, threads: int = 1, concurrent_baseline: bool = False) -> ModelEngine:
        """The model as a QM/MM engine (baseline included for delta models; with ``concurrent_baseline`` the
        baseline runs in a second thread beside the network)."""
        return ModelEngine(self, threads, concurrent_baseline)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of every member's weights and buffers: two files with the same number
        are the same model."""
        import hashlib

        h = hashlib.sha256()
        for m in self.ensemble.members:
            for k, v in sorted(m.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().double().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        m = self.meta
        kind = f"delta ({m.target} - {m.baseline}, baseline {m.baseline_method})" if m.delta else f"direct ({m.target})"
        n_par = sum(p.numel() for p in self.ensemble.parameters()) // max(1, self.ensemble.size)
        return (
            f"qmlmm HDNNP ensemble of {self.ensemble.size}, {kind}; elements {self.ensemble.elements}; "
            f"{n_par} parameters per network; embedding cutoff {self.embedding.cutoff} nm, switch "
            f"{self.embedding.switch_width} nm; {m.dtype}"
        )


class ModelEngine(Engine):
    """A model behind the engine interface (QM/MM energy and forces from the network)."""

    family = "model"

    def __init__(self, model: QMLMMModel, threads: int = 1, concurrent_baseline: bool = False) -> None:
        self.model = model
        self.spec = "model" + (f"+{model.meta.baseline_method}" if model.meta.delta else "")
        self.base = model.baseline_engine(threads) if model.meta.delta else None
        self.last_baseline: EngineResult | None = None
        self._shifts: dict[tuple[int, ...], float] = {}
        #: run the baseline in a second thread beside the network (:meth:`_compute`); the MD runner turns it
        #: on when the cores allow (:func:`qmlmm.md.system.concurrent_baseline_fits`)
        self.concurrent_baseline = concurrent_baseline
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._threads = max(1, int(threads))
        self._worker_threads = threading.local()
        self.set_threads(threads)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"], state["_worker_threads"] = None, None  # threads do not pickle; made again on use
        state["_pool_pid"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("concurrent_baseline", False)  # engines pickled before the option
        state.setdefault("_threads", torch.get_num_threads())
        state.setdefault("_pool", None)
        state.setdefault("_pool_pid", 0)
        state.setdefault("_shifts", {})
        self.__dict__.update(state)
        self._worker_threads = threading.local()

    @property
    def baseline_beside_network(self) -> bool:
        """Whether a call runs the baseline in the worker thread while the network runs (delta models with
        ``concurrent_baseline``)."""
        return self.base is not None and self.concurrent_baseline

    def _baseline_pool(self) -> ThreadPoolExecutor:
        """The one worker thread of the baseline (made again in a forked child, which has no thread)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(1, thread_name_prefix="qmlmm-baseline"), os.getpid()
            # its thread with a large stack: a new thread gets RLIMIT_STACK, or 2 MiB where that is unlimited
            # (as xtb's docs advise), where the main thread's stack grows; xtb's Fortran keeps arrays there
            old = threading.stack_size(BASELINE_THREAD_STACK)
            try:
                self._pool.submit(lambda: None).result()  # starts the thread now, with that stack
            finally:
                threading.stack_size(old)
        return self._pool

    def set_threads(self, n: int) -> None:
        self._threads = max(1, int(n))
        torch.set_num_threads(self._threads)
        if self.base is not None:
            self.base.set_threads(n)

    def versions(self) -> dict[str, str]:
        v = {"qmlmm-model": self.model.meta.qmlmm_version, "torch": torch.__version__}
        if self.base is not None:
            v.update(self.base.versions())
        return v

    def settings(self) -> dict[str, object]:
        return {"model": self.model.describe(), "fingerprint": self.model.fingerprint()}

    def _compute(self, inp: QMMMInput) -> EngineResult:
        m = self.model
        dt, dev = m.dtype, m.device
        b = FrameBatch(
            qm_z=torch.as_tensor(inp.numbers, device=dev),
            qm_pos=torch.as_tensor(inp.qm_positions, dtype=dt, device=dev),
            qm_frame=torch.zeros(len(inp.numbers), dtype=torch.long, device=dev),
            mm_pos=torch.as_tensor(inp.mm_positions, dtype=dt, device=dev).reshape(-1, 3),
            mm_q=torch.as_tensor(inp.mm_charges, dtype=dt, device=dev),
            mm_frame=torch.zeros(len(inp.mm_charges), dtype=torch.long, device=dev),
            mm_mol=torch.zeros(len(inp.mm_charges), dtype=torch.long, device=dev),
            n_frames=1,
            qm_charge=torch.tensor([float(inp.charge)], dtype=torch.float64, device=dev),
            meta={"switched": True},  # engines receive already switched charges
        )
        # a delta model's baseline in a second thread while the network runs in this one (both release the
        # GIL in their numerical kernels): inside MD the callback has the cores OpenMM waits with
        pending = self._baseline_pool().submit(self._baseline, inp) if self.baseline_beside_network else None
        try:
            p = m.ensemble.predict(b, potential=inp.need_potential)
        except BaseException:
            if pending is not None:  # the baseline finishes before the error leaves: no call left running
                wait([pending])
            raise
        res = EngineResult(
            energy=float(p.energy[0]),
            qm_forces=p.qm_forces.double().cpu().numpy(),
            mm_forces=p.mm_forces.double().cpu().numpy(),
            mm_potential=None if p.mm_potential is None else p.mm_potential.double().cpu().numpy(),
            info={"energy_std": float(p.energy_std[0])},
        )
        if self.base is not None:
            rb = self._baseline(inp) if pending is None else pending.result()
            # the baseline alone, for a step that falls back to it: its forces, and its energy on the model's
            # scale (the members' per-element shifts added, a constant of the QM elements: a run's potential
            # energy does not jump by the atomisation-energy difference of the two methods where it falls back)
            self.last_baseline = replace(rb, energy=rb.energy + self.energy_shift(inp.numbers))
            res.info["baseline_energy"] = rb.energy
            res.energy += rb.energy
            res.qm_forces = res.qm_forces + rb.qm_forces
            res.mm_forces = res.mm_forces + rb.mm_forces
            if inp.need_potential and res.mm_potential is not None and rb.mm_potential is not None:
                res.mm_potential = res.mm_potential + rb.mm_potential
        return res

    def energy_shift(self, numbers: np.ndarray) -> float:
        """Sum over QM atoms ``numbers`` (Nq,) of the members' mean per-element energy shift (kJ/mol): the part
        of the model's energy that does not depend on the geometry."""
        key = tuple(int(z) for z in numbers)
        if key not in self._shifts:
            members: list[HDNNP] = list(self.model.ensemble.members)  # type: ignore[arg-type]
            z = torch.as_tensor(numbers, device=members[0].e_shift.device)
            per = [float(m.e_shift[m.acsf.species(z)].sum()) for m in members]
            self._shifts[key] = float(np.mean(per))
        return self._shifts[key]

    def _baseline(self, inp: QMMMInput) -> EngineResult:
        """The baseline engine's result, in whichever thread calls it."""
        assert self.base is not None
        local = self._worker_threads
        if getattr(local, "threads", None) != self._threads:
            # an OpenMP thread count is per calling thread: a worker thread keeps the one it started with
            self.base.set_threads(self._threads)
            local.threads = self._threads
        return self.base.compute(
            inp.numbers,
            inp.qm_positions,
            inp.mm_positions,
            inp.mm_charges,
            inp.charge,
            inp.mult,
            inp.mm_numbers,
            inp.need_potential,
        )

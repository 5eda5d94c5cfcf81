"""Typed training configuration, read from YAML and written into the model file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qmlmm.data.training_set import SplitSettings
from qmlmm.errors import InputError

__all__ = ["FEATURE_SCALINGS", "LR_SCHEDULES", "TrainConfig", "load_config"]

#: how the learning rate falls during training (TrainConfig.lr_schedule)
LR_SCHEDULES = ("plateau", "cosine")
#: how the descriptor columns are scaled for the networks (TrainConfig.feature_scaling)
FEATURE_SCALINGS = ("feature", "term")


@dataclass
class TrainConfig:
    """Everything that determines a training run (defaults in brackets).

    Targets: ``target`` level [dft]; ``baseline`` level for delta learning [none]; the baseline's
    engine spec is read from the dataset. Model: ``hidden`` layer sizes [64, 64], ``activation``
    [silu], ``ensemble`` members [4], ``descriptor`` overrides of DescriptorConfig fields,
    ``electrostatics`` [charges] (predicted QM charges in the exact MM potential; charges+polarisability:
    and induced dipoles of predicted polarisabilities in the exact MM field; or none) with
    ``charge_hidden`` [16] layers per element (the charges add up to the QM charge for direct models,
    to zero for delta models).
    Optimisation: Adam, ``lr`` [1e-3], decoupled ``weight_decay`` per step (AdamW; 0 is plain Adam)
    [0]; ``lr_schedule`` [cosine]: ``cosine`` lowers the rate from ``lr`` to ``lr_min`` [1e-5] along half a
    cosine over ``epochs``; ``plateau`` (the default before 2026-12-06) lowers it by ``lr_factor`` [0.5]
    after ``lr_patience`` [25] epochs without validation improvement, down to ``lr_min``; early stop after
    ``patience`` [80] epochs; at most ``epochs`` [600]; ``batch_size`` frames [8].
    Features: each descriptor column minus its mean over the training frames (per element), divided by
    ``feature_scaling`` [feature]: its own standard deviation, or (``term``) the RMS standard deviation of
    its descriptor term, which keeps rare-geometry features near 0 instead of blowing them up.
    Loss: each term's mean squared error divided by the variance of that target on the training
    set, weighted by ``w_energy`` (per atom) [0.1; 1 before 2026-12-06], ``w_qm_forces`` [1],
    ``w_mm_forces`` [1]. The defaults come from benchmarks/results/learning_curves.md: with the energy
    weight at 1 the energies held the forces back (the QM-force error on the training frames halved at 0.1).
    Split (:class:`qmlmm.data.training_set.SplitSettings`): ``split`` [runs] whole sampling runs to train /
    validation / test (fractions ``valid_fraction`` [0.1] and ``test_fraction`` [0.1] of the runs,
    shuffled with ``split_seed`` [None: ``seed``, 0]; fewer than three runs: ``time``, each run cut in time order with
    gaps of ``split_gap_frames`` [None: one statistical inefficiency of the energies]); ``blocks``:
    consecutive blocks of ``block_size`` [10] frames shuffled (the old default, test frames next to
    training frames); ``max_train_frames`` limits the training set (learning curves). ``seed`` also
    draws the initial weights and the batches: another ``seed`` with ``split_seed`` kept is the same
    training on the same frames from other random numbers (how much a result owes to chance).
    ``bootstrap`` [false]: each member trains on its own resample of the training frames (as many, drawn with
    replacement with ``seed`` and the member's index; bagging), so that the ensemble's spread also carries
    the scatter that comes from which frames were labelled, not from the initial weights alone.
    """

    target: str = "dft"
    baseline: str | None = None
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "silu"
    ensemble: int = 4
    descriptor: dict[str, Any] = field(default_factory=dict)
    electrostatics: str = "charges"
    charge_hidden: list[int] = field(default_factory=lambda: [16])
    epochs: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    feature_scaling: str = "feature"
    lr_factor: float = 0.5
    lr_patience: int = 25
    lr_min: float = 1e-5
    patience: int = 80
    w_energy: float = 0.1
    w_qm_forces: float = 1.0
    w_mm_forces: float = 1.0
    w_charges: float = 1.0
    split: str = "runs"
    split_gap_frames: int | None = None
    block_size: int = 10
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_frames: int | None = None
    bootstrap: bool = False
    seed: int = 0
    split_seed: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2

    def __post_init__(self) -> None:
        self._check_types()
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.feature_scaling not in FEATURE_SCALINGS:
            raise InputError(
                f"feature_scaling must be one of {', '.join(FEATURE_SCALINGS)}, got {self.feature_scaling!r}"
            )
        if self.dtype not in ("float32", "float64"):
            raise InputError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.ensemble < 1 or self.epochs < 1 or self.batch_size < 1:
            raise InputError("ensemble, epochs and batch_size must be positive")
        if (
            not 0 <= self.valid_fraction < 1
            or not 0 <= self.test_fraction < 1
            or self.valid_fraction + self.test_fraction >= 1
        ):
            raise InputError("valid_fraction + test_fraction must be below 1")
        if self.baseline is not None and self.baseline == self.target:
            raise InputError("baseline and target are the same level")
        self.split_settings  # noqa: B018 - validates split, split_gap_frames, block_size
        positive = ("lr", "threads", "lr_patience", "patience")
        for name in positive:
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.lr_factor < 1 or self.lr_min < 0:
            raise InputError(f"lr_factor must lie in (0, 1) and lr_min be >= 0, got {self.lr_factor}, {self.lr_min}")
        if self.lr_min >= self.lr:
            raise InputError(f"lr_min ({self.lr_min}) must be below lr ({self.lr}): both schedules lower the rate "
                             "from lr towards lr_min")  # fmt: skip
        for name in ("w_energy", "w_qm_forces", "w_mm_forces", "w_charges", "weight_decay"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.w_energy + self.w_qm_forces + self.w_mm_forces == 0:
            raise InputError("w_energy, w_qm_forces and w_mm_forces are all 0: the loss would fit nothing")
        if self.max_train_frames is not None and self.max_train_frames < 1:
            raise InputError(f"max_train_frames must be >= 1, got {self.max_train_frames}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise InputError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        from qmlmm.descriptors.acsf import DescriptorConfig
        from qmlmm.models.hdnnp import ModelConfig

        # the architecture as it will be built: unknown descriptor keys, bad activation, layer sizes
        ModelConfig(
            descriptor=DescriptorConfig.from_dict(dict(self.descriptor)),
            hidden=self.hidden,
            activation=self.activation,
            electrostatics=self.electrostatics,
            charge_hidden=self.charge_hidden,
        )

    def _check_types(self) -> None:
        """Every setting of the type its field declares (YAML gives strings, floats for ints, ...)."""
        for f in fields(self):
            v = getattr(self, f.name)
            kind = str(f.type)
            ok = True
            if kind.startswith("int"):
                ok = (isinstance(v, int) and not isinstance(v, bool)) or (v is None and "None" in kind)
            elif kind == "float":
                ok = isinstance(v, int | float) and not isinstance(v, bool)
                if ok:
                    setattr(self, f.name, float(v))
            elif kind.startswith("str"):
                ok = isinstance(v, str) or (v is None and "None" in kind)
            elif kind.startswith("list[int]"):
                ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            elif kind.startswith("dict"):
                ok = isinstance(v, dict)
            if not ok:
                raise InputError(f"training setting {f.name} must be {kind}, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def split_settings(self) -> SplitSettings:
        """How the frames are split (checked when the config is made)."""
        return SplitSettings.of_training(self.to_dict())

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide the trained model (:func:`result_settings_of` of :meth:`to_dict`)."""
        return result_settings_of(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def result_settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a training config (a dict, e.g. stored in a metrics file) that decide the trained
    model: all but where it runs (threads, device) and the split parameters its split kind does not use
    (block_size outside ``blocks``, split_gap_frames with ``blocks``). Stored keys are taken as stored
    (a key a file lacks stays missing, so an older model never matches a newer setting by its default)."""
    d = {k: v for k, v in config.items() if k not in ("threads", "device")}
    if not d.get("bootstrap", False):  # off: as files from before the setting, which lack it
        d.pop("bootstrap", None)
    if d.get("split_seed") in (None, d.get("seed", 0)):  # splits with ``seed``, as files from before it did
        d.pop("split_seed", None)
    if d.get("split", "blocks") != "blocks":
        d.pop("block_size", None)
    else:
        d.pop("split_gap_frames", None)
    return d


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a YAML file (optional) with keyword overrides (None values ignored)."""
    d: dict[str, Any] = {}
    if path is not None:
        import yaml

        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: a training config must be a YAML mapping")
        d.update(loaded)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(d)

"""Typed training configuration, read from YAML and written into the model file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qmlmm.errors import InputError
from qmlmm.training.data import SplitSettings

__all__ = ["TrainConfig", "load_config"]


@dataclass
class TrainConfig:
    """Everything that determines a training run (defaults in brackets).

    Targets: ``target`` level [dft]; ``baseline`` level for delta learning [none]; the baseline's
    engine spec is read from the dataset. Model: ``hidden`` layer sizes [64, 64], ``activation``
    [silu], ``ensemble`` members [4], ``descriptor`` overrides of DescriptorConfig fields.
    Optimisation: Adam, ``lr`` [1e-3], ReduceLROnPlateau by ``lr_factor`` [0.5] after ``lr_patience``
    [25] epochs without validation improvement, down to ``lr_min`` [1e-5]; early stop after
    ``patience`` [80] epochs; at most ``epochs`` [600]; ``batch_size`` frames [8].
    Loss: each term's mean squared error divided by the variance of that target on the training
    set, weighted by ``w_energy`` (per atom) [1], ``w_qm_forces`` [1], ``w_mm_forces`` [1].
    Split (:class:`qmlmm.training.data.SplitSettings`): ``split`` [runs] whole sampling runs to train /
    validation / test (fractions ``valid_fraction`` [0.1] and ``test_fraction`` [0.1] of the runs,
    shuffled with ``seed`` [0]; fewer than three runs: ``time``, each run cut in time order with
    gaps of ``split_gap_frames`` [None: one statistical inefficiency of the energies]); ``blocks``:
    consecutive blocks of ``block_size`` [10] frames shuffled (the old default, test frames next to
    training frames); ``max_train_frames`` limits the training set (learning curves).
    """

    target: str = "dft"
    baseline: str | None = None
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "silu"
    ensemble: int = 4
    descriptor: dict[str, Any] = field(default_factory=dict)
    epochs: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    lr_factor: float = 0.5
    lr_patience: int = 25
    lr_min: float = 1e-5
    patience: int = 80
    w_energy: float = 1.0
    w_qm_forces: float = 1.0
    w_mm_forces: float = 1.0
    split: str = "runs"
    split_gap_frames: int | None = None
    block_size: int = 10
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_frames: int | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def split_settings(self) -> SplitSettings:
        """How the frames are split (checked when the config is made)."""
        return SplitSettings.of_training(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a YAML file (optional) with keyword overrides (None values ignored)."""
    d: dict[str, Any] = {}
    if path is not None:
        import yaml

        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: a training config must be a YAML mapping")
        d.update(loaded)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(d)

"""The pipeline's settings: one size of an example config (typed, validated when read)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.environment import DEFAULT_CUTOFF, DEFAULT_SWITCH_WIDTH
from qmlmm.errors import InputError

__all__ = ["PipelineConfig", "load_pipeline_config", "load_run_config"]


@dataclass
class PipelineConfig:
    """One size of an example (all lengths nm, times fs/ps)."""

    name: str
    solutes: list[str]  # SMILES
    charge: int | None = None
    padding: float | None = None  # None: derived from the cutoff (unique periodic images, qmlmm.md.build)
    gap: float = 0.35
    equilibrate_ps: float = 10.0  # MM NPT at build time (water density)
    anchors: dict[int, list[float]] = field(default_factory=dict)  # solute index -> (p, c, s, d), see SoluteSpec
    # sampling
    sample_engine: str = "dftb3:3ob"
    sample_steps: int = 200
    sample_every: int = 10
    sample_runs: int = 1
    equil_steps: int = 1000
    cutoff: float = DEFAULT_CUTOFF
    switch_width: float = DEFAULT_SWITCH_WIDTH
    # labelling
    reference: str = "dft:b3lyp/6-31g*"
    baseline: str = "dftb3:3ob"
    workers: int = 2
    threads: int = 1
    # training
    train: dict[str, Any] = field(default_factory=dict)
    delta_hidden: list[int] | None = None
    learning_curve: list[int] | None = None  # training-set sizes for a learning curve (None: none)
    # MD with the models
    md_steps: int = 200
    md_dt_fs: float = 0.5
    md_report_every: int = 10
    md_compare_baseline: bool = True
    md_reference_steps: int = 0  # a short stretch of reference (DFT) QM/MM MD to compare with (0: none)
    max_uncertainty: float | None = None
    # past max_uncertainty the delta-ML/MM step: "stop" the run, or take it from the model's "baseline" or the
    # "reference" engine (the frame queued to uncertain.h5), for md_fallback_hold further force calls too
    md_fallback: str = "stop"
    md_fallback_hold: int = 0
    # analysis
    dihedral_solute: int | None = 0  # solute index whose conjugated chain dihedrals are analysed
    # solute element - water site ("OW" or "HW") radial distribution functions
    rdf_pairs: list[list[str]] = field(default_factory=lambda: _default_rdf_pairs())
    # reaction (optional): restraint rc:i,j,k,l,d (atom indices within the QM region), umbrella windows
    reaction: dict[str, Any] | None = None
    reaction_windows: str | None = None  # start:stop:n (nm), overrides reaction["windows"]
    reaction_steps: int | None = None  # MD steps per umbrella window
    # extra windows start:stop:n (nm), e.g. over the transition state where windows with the regular force
    # constant slide off to either side, with their own force constant (kJ/mol/nm^2; default the regular
    # one); numbered after the regular windows, so adding them to a finished run reuses its windows
    reaction_extra_windows: str | None = None
    reaction_extra_k: float | None = None
    sample_windows: str | None = None  # start:stop:n windows for sampling (default: the umbrella windows)
    # validation (optional): independent MD runs of the reference, baseline and both models, compared
    # (qmlmm.workflows.pipeline.validation.ValidationSettings: runs, steps, dt_fs, hmr_amu, every, skip_ps, ...)
    validation: dict[str, Any] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from qmlmm.typecheck import check_field_types

        check_field_types(self, "pipeline")
        positive = ("sample_steps", "sample_every", "sample_runs", "workers", "threads", "md_steps", "md_report_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"pipeline setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("equil_steps", "md_reference_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"pipeline setting {name} must be >= 0, got {getattr(self, name)}")
        if self.md_fallback not in ("stop", "baseline", "reference"):
            raise InputError(
                f"pipeline setting md_fallback must be stop, baseline or reference, got {self.md_fallback!r}"
            )
        if self.md_fallback_hold < 0:
            raise InputError(f"pipeline setting md_fallback_hold must be >= 0 calls, got {self.md_fallback_hold}")
        if self.md_fallback != "stop" and self.max_uncertainty is None:
            raise InputError(f"pipeline setting md_fallback {self.md_fallback!r} needs max_uncertainty (kJ/mol)")
        if self.md_fallback_hold > 0 and self.md_fallback == "stop":
            raise InputError("pipeline setting md_fallback_hold needs md_fallback baseline or reference")
        if self.max_uncertainty is not None and not (0 < self.max_uncertainty < float("inf")):
            raise InputError(f"pipeline setting max_uncertainty must be positive (kJ/mol), got {self.max_uncertainty}")
        if self.sample_steps < self.sample_every:
            raise InputError(f"sample_steps ({self.sample_steps}) must be >= sample_every ({self.sample_every})")
        if not self.solutes:
            raise InputError("pipeline setting solutes names no solute")

    def validate(self) -> None:
        """Everything that can be checked before the first step runs: engine specs (options, functional,
        basis), the training settings, the embedding, windows, the reaction block, the RDF pairs."""
        from qmlmm.engines import parse_spec
        from qmlmm.environment import EmbeddingSettings
        from qmlmm.md.build import BuildSettings
        from qmlmm.md.restraints import umbrella_windows
        from qmlmm.training import TrainConfig

        for spec in (self.sample_engine, self.reference, self.baseline):
            parse_spec(spec)
        EmbeddingSettings(self.cutoff, self.switch_width)
        BuildSettings(padding=self.padding, cutoff=self.cutoff, gap=self.gap, equilibrate_ps=self.equilibrate_ps)
        if self.padding is not None and self.padding <= 0:
            raise InputError(f"pipeline setting padding must be positive, got {self.padding}")
        for mode in ("direct", "delta"):
            TrainConfig.from_dict(
                {**{"target": "ref", "seed": self.seed}, **self.train, "baseline": "base" if mode == "delta" else None}
            )
        for name in ("reaction_windows", "reaction_extra_windows", "sample_windows"):
            if getattr(self, name):
                umbrella_windows(getattr(self, name))
        if self.learning_curve is not None and (not self.learning_curve or min(self.learning_curve) < 1):
            raise InputError(f"pipeline setting learning_curve must list positive sizes, got {self.learning_curve}")
        if self.validation is not None:
            from qmlmm.workflows.pipeline.validation import ValidationSettings, check_solute

            vs = ValidationSettings.from_dict(self.validation)
            check_solute(self, vs)
            if vs.refit and self.train.get("max_train_frames"):
                raise InputError(
                    "validation refit with train max_train_frames: the subsample would drop frames the refit "
                    "round adds at random; leave max_train_frames out"
                )
        if self.reaction is not None:
            known = {"atoms", "d", "k", "keep_together", "windows", "steps", "every", "bins", "compare_baseline"}
            unknown = sorted(set(self.reaction) - known)
            if unknown:
                raise InputError(f"unknown reaction setting(s) {unknown}; known: {sorted(known)}")
            if not isinstance(self.reaction.get("atoms"), list) or len(self.reaction["atoms"]) != 4:
                raise InputError("reaction atoms must list 4 atoms (i, j, k, l of xi = r_ij + d r_kl)")
            if not (self.reaction_windows or self.reaction.get("windows")):
                raise InputError("a reaction needs windows (reaction_windows or reaction: windows)")
            umbrella_windows(self.reaction_windows or self.reaction["windows"])
            kt = self.reaction.get("keep_together")
            if kt is not None and (not isinstance(kt, list) or len(kt) != 4):
                raise InputError("reaction keep_together must be [atom, atom, r0 (nm), k (kJ/mol/nm^2)]")

    @property
    def total_threads(self) -> int:
        """Threads for the steps that run in one process (MD, umbrella sampling): all workers' threads."""
        return self.threads * max(1, self.workers)


def _default_rdf_pairs() -> list[list[str]]:
    """A fresh copy of the analysis' default pairs (imported when needed, like the steps' modules)."""
    from qmlmm.analysis.report import DEFAULT_RDF_PAIRS

    return [list(p) for p in DEFAULT_RDF_PAIRS]


def load_pipeline_config(path: str | Path, size: str) -> PipelineConfig:
    import yaml

    try:
        d = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(d, dict) or "sizes" not in d:
        raise InputError(f"{path}: a pipeline config needs a 'sizes' mapping (tiny, small, full)")
    if size not in d["sizes"]:
        raise InputError(f"{path}: no size {size!r}; sizes: {sorted(d['sizes'])}")
    common = {k: v for k, v in d.items() if k != "sizes"}
    merged = {**common, **(d["sizes"][size] or {})}
    known = {f.name for f in fields(PipelineConfig)}
    unknown = set(merged) - known
    if unknown:
        raise InputError(f"{path}: unknown pipeline setting(s) {sorted(unknown)}")
    cfg = PipelineConfig(**merged)
    cfg.validate()
    from qmlmm.analysis.report import rdf_pair_atoms

    try:  # checked now, not after hours of labelling and MD
        rdf_pair_atoms(cfg.rdf_pairs, np.zeros(0, dtype=int), np.zeros(0, dtype=bool))
    except (InputError, KeyError, ValueError) as e:
        raise InputError(f"{path}: {e}") from e
    return cfg


def load_run_config(out: str | Path) -> PipelineConfig:
    """The config a pipeline folder was run with (its ``pipeline_config.json``)."""
    p, s = Path(out) / "pipeline_config.json", Path(out) / "summary.json"
    if p.exists():
        d = json.loads(p.read_text())
    elif s.exists():  # folders made before pipeline_config.json existed
        d = json.loads(s.read_text())["config"]
    else:
        raise InputError(f"{out} is not a pipeline folder (no pipeline_config.json or summary.json)")
    known = {f.name for f in fields(PipelineConfig)}
    d = {k: v for k, v in d.items() if k in known}
    d["anchors"] = {int(k): v for k, v in (d.get("anchors") or {}).items()}  # JSON made the keys strings
    return PipelineConfig(**d)

"""Running a pipeline: the steps in order, their times, fingerprints and the summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from qmlmm.errors import InputError
from qmlmm.workflows.pipeline.config import PipelineConfig
from qmlmm.workflows.pipeline.fingerprints import STEP_SETTINGS, check_fingerprints, record_fingerprint
from qmlmm.workflows.pipeline.lock import run_lock
from qmlmm.workflows.pipeline.summary import _n_frames, _write_json_atomic, step_seconds_all, summary_markdown

log = logging.getLogger(__name__)

__all__ = ["run_pipeline"]

_NEEDED_FOR_ANALYSIS = ("system/meta.json", "frames.h5", "labels.h5", "models/direct.pt", "models/delta.pt")


def run_pipeline(
    cfg: PipelineConfig, out: str | Path, progress: bool = True, analyze_only: bool = False
) -> dict[str, Any]:
    """Run (or continue) the pipeline; returns the summary (also written to summary.json/.md).

    ``analyze_only``: compute nothing new (no labels, training or MD), only the evaluation, analysis,
    profiles and summary from what the folder holds (``qmlmm analyze RUN/``).
    """
    out = Path(out)
    if analyze_only:
        missing = [m for m in _NEEDED_FOR_ANALYSIS if not (out / m).exists()]
        if missing:
            raise InputError(f"{out}: no {', '.join(missing)}; run `qmlmm pipeline CONFIG -o {out}` first")
        return _run_pipeline(cfg, out, progress, analyze_only)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        return _run_pipeline(cfg, out, progress, analyze_only)


class _Timer:
    """Step times of this invocation, appended to ``timings.jsonl`` as each step ends (they survive a kill),
    with the step's settings recorded (fingerprints.json) once it has run."""

    def __init__(self, cfg: PipelineConfig, out: Path, analyze_only: bool) -> None:
        self.cfg, self.out, self.analyze_only = cfg, out, analyze_only
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def done(self, name: str) -> None:
        dt = time.perf_counter() - self.t0
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        if not self.analyze_only:
            if name in STEP_SETTINGS:
                record_fingerprint(self.cfg, self.out, name)
            with open(self.out / "timings.jsonl", "a") as f:
                f.write(json.dumps({"step": name, "seconds": dt, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        self.t0 = time.perf_counter()


def _run_pipeline(cfg: PipelineConfig, out: Path, progress: bool, analyze_only: bool) -> dict[str, Any]:
    from qmlmm.models import QMLMMModel
    from qmlmm.workflows.pipeline import steps
    from qmlmm.workflows.pipeline.observables import observables_step
    from qmlmm.workflows.pipeline.reaction import reaction_step
    from qmlmm.workflows.pipeline.validation import validation_step

    if not analyze_only:  # what `qmlmm analyze RUN/` reads back
        check_fingerprints(cfg, out)
        _write_json_atomic(out / "pipeline_config.json", {f.name: getattr(cfg, f.name) for f in fields(cfg)})
    t_start = time.perf_counter()
    timer = _Timer(cfg, out, analyze_only)
    system, frames, labels, models = out / "system", out / "frames.h5", out / "labels.h5", out / "models"
    if not steps.is_done(out, "build", "system/meta.json"):
        steps.build_step(cfg, system)
    timer.done("build")
    if not steps.is_done(out, "sample", "frames.h5"):
        steps.sample_step(cfg, system, frames, progress)
    timer.done("sample")
    rep = steps.label_step(cfg, frames, labels, progress, analyze_only)
    timer.done("label")
    metrics = {} if analyze_only else steps.train_step(cfg, labels, models, progress)
    if analyze_only:
        metrics = {m: json.loads((models / f"{m}.metrics.json").read_text()) for m in ("direct", "delta")}
    timer.done("train")
    curve = steps.learning_curve_step(cfg, labels, out, progress, analyze_only)
    timer.done("learning_curve")
    evals = steps.evaluate_step(labels, models)
    timer.done("evaluate")
    delta_model = QMLMMModel.load(models / "delta.pt")
    md_runs = steps.md_step(cfg, out, system, delta_model, progress, analyze_only)
    timer.done("md")
    reaction = reaction_step(cfg, out, system, delta_model, progress, analyze_only) if cfg.reaction else None
    timer.done("reaction")
    analysis = observables_step(cfg, out, system, list(md_runs))
    timer.done("analysis")
    validation = validation_step(cfg, out, system, models, progress, analyze_only)
    timer.done("validation")
    summary = {
        "name": cfg.name,
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        "n_frames": _n_frames(labels),
        "label_failures": {k: len(v) for k, v in rep.failed.items()},
        "train_metrics": {m: metrics[m].get("test") for m in metrics},
        "split": {m: metrics[m].get("split") for m in metrics},
        "evaluation": evals,
        "md": {
            k: {
                **{kk: v.get(kk) for kk in ("steps_done", "stopped", "qmmm_seconds_per_call")},
                "ns_per_day": v.get("ns_per_day_all", v.get("ns_per_day")),  # every invocation of a resumed run
                # the uncertainty guard's fallback and the steps it took over (every invocation)
                "fallback": v.get("fallback"),
                "fallback_steps": v.get("fallback_steps_total", v.get("fallback_steps")),
            }
            for k, v in md_runs.items()
        },
        "analysis": analysis,
        "reaction": reaction,
        "validation": validation,
        "learning_curve": curve,
        "timings_s": timer.seconds,
        "total_s": time.perf_counter() - t_start,
        "timings_all_s": step_seconds_all(out),
    }
    if analyze_only and (out / "summary.json").exists():  # keep the timings of the run that did the work
        before = json.loads((out / "summary.json").read_text())
        summary["timings_s"], summary["total_s"] = before.get("timings_s", timer.seconds), before.get("total_s", 0.0)
    _write_json_atomic(out / "summary.json", summary)
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary_markdown(summary, out))
    tmp.replace(out / "summary.md")
    return summary

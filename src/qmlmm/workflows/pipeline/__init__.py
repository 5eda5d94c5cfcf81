"""End-to-end recipes: build -> sample (baseline QM/MM) -> label (reference + baseline) -> train
(direct and delta) -> evaluate -> ML/MM and baseline MD -> [umbrella sampling] -> analysis -> summary.

A pipeline is a YAML config (see examples/*/config.yaml) with a section per size (tiny, small,
full). Every step writes into the output folder and is skipped when its result exists, so an
interrupted run continues where it stopped (labelling, training, MD and umbrella windows also resume
inside a step); a setting changed where results exist is refused (fingerprints).

The files read like the stages: ``config`` (the typed settings), ``steps`` (build ... MD), ``reaction``
(umbrella sampling and profiles), ``observables`` (the MD runs' structure), ``fingerprints``, ``lock``,
``summary``, and ``run`` (the steps in order).
"""

from qmlmm.workflows.pipeline.config import PipelineConfig, load_pipeline_config, load_run_config
from qmlmm.workflows.pipeline.fingerprints import check_fingerprints, record_fingerprint, step_fingerprints
from qmlmm.workflows.pipeline.lock import run_lock
from qmlmm.workflows.pipeline.reaction import reaction_step, umbrella_profile
from qmlmm.workflows.pipeline.run import run_pipeline
from qmlmm.workflows.pipeline.steps import build_step
from qmlmm.workflows.pipeline.summary import step_seconds_all, summary_markdown

__all__ = [
    "PipelineConfig",
    "build_step",
    "check_fingerprints",
    "load_pipeline_config",
    "load_run_config",
    "reaction_step",
    "record_fingerprint",
    "run_lock",
    "run_pipeline",
    "step_fingerprints",
    "step_seconds_all",
    "summary_markdown",
    "umbrella_profile",
]

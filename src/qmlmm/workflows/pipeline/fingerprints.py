"""What each step's results depend on: a changed setting where results exist is refused, not reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qmlmm.errors import InputError
from qmlmm.workflows.pipeline.config import PipelineConfig
from qmlmm.workflows.pipeline.summary import _jsonable, _write_json_atomic

__all__ = ["STEP_SETTINGS", "check_fingerprints", "record_fingerprint", "step_fingerprints"]

#: the settings each step's results depend on, and the files that hold those results. A folder's
#: fingerprints.json records the values each step ran with; a changed value where results exist is refused
#: (the step would be "done before, reused" with the old value while the summary showed the new one).
STEP_SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "build": (("solutes", "charge", "padding", "gap", "equilibrate_ps", "anchors", "seed", "cutoff"), ("system",)),
    "sample": (
        (
            *("sample_engine", "sample_steps", "sample_every", "sample_runs", "equil_steps", "switch_width"),
            *("sample_windows", "reaction:atoms", "reaction:d", "reaction:k", "reaction:keep_together"),
            *("reaction:windows", "validation:starts", "validation:solute"),
        ),
        ("frames.h5", "frames.h5.parts"),
    ),
    "label": (("reference", "baseline"), ("labels.h5",)),
    "train": (("train", "delta_hidden"), ("models",)),
    "learning_curve": (("learning_curve",), ("learning_curve",)),
    "md": (("md_dt_fs", "max_uncertainty", "md_fallback", "md_fallback_hold"), ("md",)),
    "reaction": (
        (
            *("reaction_windows", "reaction_extra_windows", "reaction_extra_k"),
            *("max_uncertainty", "md_fallback", "md_fallback_hold"),  # the delta windows' guard
        ),
        ("umbrella",),
    ),
    # more runs or steps extend the validation; another step, masses, temperature or drivers' runs would mix
    "validation": (
        (
            *("validation:dt_fs", "validation:hmr_amu", "validation:temperature", "validation:every"),
            *("validation:max_uncertainty", "validation:fallback"),
        ),
        ("validation",),
    ),
}


#: the value a step ran with where its recorded fingerprints predate the setting (what qmlmm did then);
#: a setting missing from a record and not listed here is not compared
LEGACY_VALUES: dict[str, Any] = {"md_fallback": "stop", "md_fallback_hold": 0}


def _setting(cfg: PipelineConfig, key: str) -> Any:
    if ":" in key:  # a key of a block: reaction:atoms, validation:dt_fs
        block, name = key.split(":", 1)
        return (getattr(cfg, block) or {}).get(name)
    return getattr(cfg, key)


def step_fingerprints(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per step, the values of the settings its results depend on (JSON-normalised)."""
    return {
        step: json.loads(json.dumps({k: _setting(cfg, k) for k in keys}, default=_jsonable))
        for step, (keys, _) in STEP_SETTINGS.items()
    }


def check_fingerprints(cfg: PipelineConfig, out: Path) -> None:
    """Refuse (InputError naming the setting, its old and new value and what to delete) a config whose
    settings differ from those that made the results already in ``out``; record the current values for
    steps that have results and no record (folders from before fingerprints.json)."""
    path = out / "fingerprints.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    now = step_fingerprints(cfg)
    changed = False
    for step, (_, files) in STEP_SETTINGS.items():
        if not any((out / f).exists() for f in files):
            continue
        if step not in stored:
            stored[step], changed = now[step], True
            continue
        for key, value in now[step].items():
            if key not in stored[step] and key not in LEGACY_VALUES:
                continue
            was = stored[step][key] if key in stored[step] else LEGACY_VALUES[key]
            if was != value:
                later = [f for s_, (_, fs) in STEP_SETTINGS.items() for f in fs if (out / f).exists()]
                first = list(STEP_SETTINGS).index(step)
                redo = [f for f in later if list(STEP_SETTINGS).index(_step_of(f)) >= first]
                raise InputError(
                    f"setting {key!r} changed ({was!r} -> {value!r}) since the {step} step ran in "
                    f"{out}: its results were made with the old value. Use a new output folder, or delete "
                    f"{', '.join(str(out / f) for f in redo)} to redo the {step} step and what follows"
                )
    if changed:
        _write_json_atomic(path, stored)


def _step_of(file: str) -> str:
    return next(s for s, (_, fs) in STEP_SETTINGS.items() if file in fs)


def record_fingerprint(cfg: PipelineConfig, out: Path, step: str) -> None:
    """Record the values ``step`` ran with (after it ran)."""
    path = out / "fingerprints.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[step] = step_fingerprints(cfg)[step]
    _write_json_atomic(path, stored)

"""Umbrella sampling windows along a restrained coordinate: the one driver of ``qmlmm md --umbrella``
and the pipeline.

Windows run one after the other. The first (the regular window whose centre lies nearest the
coordinate of the built structure) starts from the built structure, with the MM-only water relaxation
and velocities drawn at the temperature. Every other window continues the trajectory of a window that
ran through, from its final positions *and velocities*, with no MM-only stage: the solvent keeps its
response to the solute's charge distribution along the coordinate (an MM-only stage with the solute's
fixed reactant charges would reset it in every window, and water reorients on picoseconds).

- Regular windows run outwards from the first; each starts where its neighbour towards the first
  ended (if that one stopped early, the next one towards the first that ran through).
- Extra windows (e.g. stiffer ones over a transition state) come after the regular ones and start
  from the window, among those already run through, whose last logged coordinate lies nearest their
  centre (a window can slide over a barrier: its mean can lie near the centre and its end far away).

A window whose run.json says it reached its steps is reused; one with a checkpoint resumes from it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qmlmm.engines.base import Engine
from qmlmm.environment import EmbeddingSettings
from qmlmm.errors import InputError, QMLMMError
from qmlmm.md.restraints import DistanceRestraint, RCRestraint, Restraint, rc_value
from qmlmm.md.runner import MDSettings, StartState, load_final_state, require_same_engine, run_md

log = logging.getLogger(__name__)

__all__ = ["UmbrellaWindow", "WindowOutcome", "make_windows", "run_windows", "window_order", "window_folder"]


@dataclass(frozen=True)
class UmbrellaWindow:
    """One window: its restraints (the coordinate restraint first, centred at ``r0`` nm with force
    constant ``k`` kJ/mol/nm^2; then any restraints that are the same in every window)."""

    index: int
    r0: float
    k: float
    restraints: tuple[Restraint, ...]
    extra: bool = False


@dataclass
class WindowOutcome:
    """What happened to one window: steps done, why it stopped early (None: ran through), where it
    started (a window folder, or the built structure)."""

    index: int
    folder: Path
    steps_done: int = 0
    stopped: str | None = None
    started_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ran_through(self) -> bool:
        return self.stopped is None and self.steps_done > 0


def _with_centre(r: Restraint, r0: float, k: float) -> Restraint:
    if isinstance(r, RCRestraint):
        return RCRestraint(r.i, r.j, r.k_, r.l, r.d, r0, k)
    return DistanceRestraint(r.i, r.j, r0, k)


def make_windows(
    coordinate: Restraint,
    centres: list[float],
    others: list[Restraint] | None = None,
    k: float | None = None,
    extra_centres: list[float] | None = None,
    extra_k: float | None = None,
) -> list[UmbrellaWindow]:
    """Regular windows at ``centres`` (nm) with force constant ``k`` (default: the coordinate restraint's),
    then extra windows at ``extra_centres`` with ``extra_k`` (default ``k``), numbered after the regular
    ones (so adding extra windows to a finished run reuses its windows); ``others`` apply in every window."""
    kr = float(coordinate.k if k is None else k)
    ke = float(kr if extra_k is None else extra_k)
    rest = tuple(others or [])
    wins = [UmbrellaWindow(n, float(c), kr, (_with_centre(coordinate, c, kr), *rest)) for n, c in enumerate(centres)]
    n0 = len(wins)
    wins += [
        UmbrellaWindow(n0 + n, float(c), ke, (_with_centre(coordinate, c, ke), *rest), extra=True)
        for n, c in enumerate(extra_centres or [])
    ]
    if len(wins) < 1:
        raise InputError("umbrella sampling needs at least one window")
    return wins


def window_order(windows: list[UmbrellaWindow], xi0: float) -> tuple[int, list[int]]:
    """(index of the first window, the order to run all windows in): the regular window nearest ``xi0``
    (nm, the built structure's coordinate), then outwards to the high end, then to the low end, then the
    extra windows in their order."""
    regular = [w.index for w in windows if not w.extra]
    if not regular:
        raise InputError("umbrella sampling needs at least one regular window to start from")
    first = min(regular, key=lambda i: abs(windows[i].r0 - xi0))
    up = [i for i in regular if i > first]
    down = [i for i in reversed(regular) if i < first]
    return first, [first, *up, *down, *[w.index for w in windows if w.extra]]


def window_folder(out: Path, index: int) -> Path:
    """The run folder of window ``index`` under ``out``."""
    return Path(out) / f"window_{index:02d}"


def _neighbour_start(out: Path, w: int, first: int, outcomes: dict[int, WindowOutcome]) -> StartState | None:
    """Final state of regular window ``w``'s neighbour towards ``first`` that ran through (skipping ones that
    stopped early: their last state may be the distorted one that made them fail)."""
    step = -1 if w > first else 1
    nb = w + step
    while (nb - first) * step <= 0:
        o = outcomes.get(nb)
        if o is not None and o.ran_through:
            st = load_final_state(o.folder)
            if st is not None:
                return st
        nb += step
    return None


def _last_coordinate(folder: Path) -> float | None:
    """The last logged value (nm) of a window's coordinate restraint (``rc0_nm`` of its log.csv)."""
    p = folder / "log.csv"
    if not p.exists() or len(p.read_text().splitlines()) < 2:
        return None
    x = np.atleast_1d(np.genfromtxt(p, delimiter=",", names=True)["rc0_nm"])
    return float(x[-1]) if len(x) else None


def _nearest_end_start(r0: float, outcomes: dict[int, WindowOutcome]) -> StartState | None:
    """Final state of the window (ran through) whose last logged coordinate lies nearest ``r0`` nm."""
    best: tuple[float, Path] | None = None
    for o in outcomes.values():
        if not o.ran_through:
            continue
        x = _last_coordinate(o.folder)
        if x is not None and (best is None or abs(x - r0) < best[0]):
            best = (abs(x - r0), o.folder)
    return load_final_state(best[1]) if best else None


def _outcome_of(folder: Path, index: int) -> WindowOutcome:
    info = json.loads((folder / "run.json").read_text())
    return WindowOutcome(
        index, folder, int(info.get("steps_done", 0)), info.get("stopped"), (info.get("start") or {}).get("from")
    )


def run_windows(
    system_dir: str | Path,
    engine: Engine,
    out: str | Path,
    windows: list[UmbrellaWindow],
    settings: MDSettings,
    embedding: EmbeddingSettings,
    progress: bool = True,
    seed_per_window: bool = True,
) -> dict[int, WindowOutcome]:
    """Run (or continue, or reuse) every window under ``out`` (``window_NN``) by the start rules of the
    module docstring; ``settings`` apply to every window (``seed`` + window index with
    ``seed_per_window``). A window that fails with a qmlmm error is recorded as stopped and the others
    still run. Returns the outcome of every window by index."""
    from qmlmm.md.system import MDSystem

    out = Path(out)
    msys = MDSystem.load(system_dir)
    xi0 = rc_value(msys.positions, windows[0].restraints[0], msys.box)
    first, order = window_order(windows, xi0)
    for w in order:  # before any window runs: a window of another engine would fail alone, or be reused
        require_same_engine(window_folder(out, w), engine, redo=out)
    outcomes: dict[int, WindowOutcome] = {}
    for w in order:
        win = windows[w]
        folder = window_folder(out, w)
        done = (folder / "run.json").exists() and _outcome_of(folder, w).steps_done >= settings.steps
        if done:
            outcomes[w] = _outcome_of(folder, w)
            continue
        restart = (folder / "checkpoint.chk").exists()
        start = None
        if not restart and w != first:
            start = _nearest_end_start(win.r0, outcomes) if win.extra else _neighbour_start(out, w, first, outcomes)
            if start is None:
                log.warning(
                    "umbrella window %d (r0 %.3f nm): no finished window to continue from; starting from the "
                    "built structure with the MM-only relaxation",
                    w,
                    win.r0,
                )
        s = replace(settings, seed=settings.seed + w if seed_per_window else settings.seed)
        try:
            run_md(
                system_dir,
                engine,
                folder,
                s,
                embedding,
                restart=restart,
                progress=progress,
                start=start,
                restraints=list(win.restraints),
            )
        except QMLMMError as e:  # one bad window (e.g. its start) does not end the study
            log.error("umbrella window %d (r0 %.3f nm) failed: %s", w, win.r0, e)
            outcomes[w] = WindowOutcome(w, folder, 0, f"{type(e).__name__}: {e}")
            continue
        outcomes[w] = _outcome_of(folder, w)
    return outcomes

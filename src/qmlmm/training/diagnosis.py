"""What limits a trained model: memorising, still learning when training stopped, or the number of frames.

Issue 17 asks that training "picks a capacity that fits the number of frames (or tells the user)". The
measurement behind this module (docs/results.md 0b, beta-alanine in water, whole-run splits): networks of
2x16 to 2x64 give test errors within 10 % of each other at 100-300 frames, and the best validation epoch
is the last or nearly so: capacity is not what limits these models, the data and the optimiser steps
are. So the trainer keeps the configured network and says, from the numbers of the run itself, which of
the three it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: validation MAE over training MAE of the QM forces above which a model is said to memorise its frames
MEMORISING_RATIO = 2.0
#: a member whose best validation epoch lies in this last fraction of its epochs was still learning
STILL_LEARNING_FRACTION = 0.1


@dataclass(frozen=True)
class FitDiagnosis:
    """The verdict on one trained model and the numbers behind it.

    ``verdict`` is "memorising", "still learning" or "data-limited"; ``valid_over_train`` the validation
    MAE over the training MAE of the QM forces; ``best_epochs`` and ``epochs_run`` per ensemble member;
    ``parameters_per_frame`` the parameters of one network per training frame.
    """

    verdict: str
    valid_over_train: float
    best_epochs: tuple[int, ...]
    epochs_run: tuple[int, ...]
    parameters_per_frame: float
    message: str


def fit_diagnosis(metrics: dict[str, Any], history: list[list[dict[str, float]]]) -> FitDiagnosis:
    """Diagnose a training run from its metrics (``train``/``valid`` MAE of ``qm_forces``,
    ``n_train``, ``n_parameters_per_network``) and per-member history (``valid_loss`` per epoch).

    Raises ValueError when the metrics lack a training or validation MAE of the QM forces or the history
    is empty (a run without a validation set cannot be diagnosed)."""
    try:
        f_train = float(metrics["train"]["qm_forces"]["mae"])
        f_valid = float(metrics["valid"]["qm_forces"]["mae"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"fit_diagnosis needs the train and valid QM-force MAE in the metrics: {e!r} missing") from e
    if not history or not all(history):
        raise ValueError("fit_diagnosis needs a non-empty history of every member")
    best = tuple(int(min(h, key=lambda r: r["valid_loss"])["epoch"]) for h in history)
    run = tuple(len(h) for h in history)
    ratio = f_valid / f_train if f_train > 0 else float("inf")
    per_frame = float(metrics["n_parameters_per_network"]) / max(int(metrics["n_train"]), 1)
    numbers = (
        f"QM-force MAE train {f_train:.3g}, valid {f_valid:.3g} kJ/mol/nm (x{ratio:.2f}); best epoch "
        f"{', '.join(f'{b}/{r}' for b, r in zip(best, run, strict=True))}; {per_frame:.0f} parameters per network "
        "per training frame"
    )
    if ratio > MEMORISING_RATIO:
        verdict = "memorising"
        advice = ("the model fits its training frames far better than the validation frames: more frames "
                  "(from more independent runs) will help; a smaller network or weight decay may")  # fmt: skip
    elif all(b > (1 - STILL_LEARNING_FRACTION) * r for b, r in zip(best, run, strict=True)):
        verdict = "still learning"
        advice = ("the validation error was still falling when training stopped and the model does not "
                  "memorise: more epochs will lower the error (more frames: more steps per epoch)")  # fmt: skip
    else:
        verdict = "data-limited"
        advice = ("training converged without memorising: more frames will lower the error; a larger network "
                  "will not (2x16 to 2x64 measured within 10 % at 100-300 frames, docs/results.md 0b)")  # fmt: skip
    return FitDiagnosis(verdict, ratio, best, run, per_frame, f"{verdict}: {advice}. {numbers}.")

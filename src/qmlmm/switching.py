"""The smooth switching function of the embedding, written once for numpy arrays and torch tensors.

S(d) = 1 - x^3 (10 - 15 x + 6 x^2), x = clip((d - r_on) / (r_off - r_on), 0, 1): 1 below ``r_on``, 0
above ``r_off``, continuous with zero first and second derivatives at both ends (quintic smoothstep).
The labels (:mod:`qmlmm.environment`, numpy, with the explicit derivative) and the model
(:mod:`qmlmm.models.hdnnp`, torch, derivative by autograd) both call :func:`switch_value`, so they
weight every MM charge identically. Distances in nm.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

__all__ = ["switch_value", "switch_derivative"]

A = TypeVar("A")  # a numpy array or a torch tensor: only arithmetic and ``.clip`` are used


def _x(d: A, r_on: float, r_off: float) -> A:
    return ((d - r_on) / (r_off - r_on)).clip(0.0, 1.0)  # type: ignore[operator, attr-defined]


def switch_value(d: A, r_on: float, r_off: float) -> A:
    """S(d) (same shape and type as ``d``); ``r_off <= r_on`` means a sharp cutoff (numpy only)."""
    if r_off <= r_on:
        return (np.asarray(d) < r_off).astype(np.float64)  # type: ignore[return-value]
    x = _x(d, r_on, r_off)
    return 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)  # type: ignore[operator]


def switch_derivative(d: A, r_on: float, r_off: float) -> A:
    """dS/dd in 1/nm (zero everywhere for a sharp cutoff)."""
    if r_off <= r_on:
        return np.zeros_like(np.asarray(d, dtype=np.float64))  # type: ignore[return-value]
    x = _x(d, r_on, r_off)
    return -30.0 * x * x * (1.0 - x) ** 2 / (r_off - r_on)  # type: ignore[operator, return-value]

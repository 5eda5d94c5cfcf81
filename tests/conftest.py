"""Shared test helpers: tiny real systems, finite differences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from qmlmm.system import Frame
from qmlmm.testing import TIP3P_CHARGES, solute, tip3p_water


def central_difference(f: Callable[[np.ndarray], float], x: np.ndarray, h: float) -> np.ndarray:
    """Gradient of scalar f at x (any shape) by central differences with step h."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        xp = x.copy()
        xp[idx] += h
        xm = x.copy()
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


def water_shell(
    name: str = "water", n_waters: int = 4, radius: float = 0.32, seed: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A solute with ``n_waters`` TIP3P waters around it at about ``radius`` nm (isolated cluster).

    Returns numbers (n,), qm positions (n, 3) nm, mm positions (m, 3) nm, mm charges (m,), mm numbers (m,).
    """
    rng = np.random.default_rng(seed)
    z, p = solute(name, rotate_seed=seed)
    mm, q, zn = [], [], []
    dirs = rng.normal(size=(n_waters, 3))
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    for d in dirs:
        mm.append(tip3p_water(rng) + d * (radius + 0.05 * rng.random()))
        q.append(TIP3P_CHARGES)
        zn.append([8, 1, 1])
    return z, p, np.concatenate(mm), np.concatenate(q), np.concatenate(zn)


def cluster_frame(
    name: str = "water", n_waters: int = 4, radius: float = 0.32, seed: int = 1, box: float | None = None
) -> Frame:
    """``water_shell`` as a Frame (QM atoms first, one molecule id per water)."""
    z, p, mm, q, zn = water_shell(name, n_waters, radius, seed)
    n = len(z)
    offset = 0.0 if box is None else box / 2
    return Frame(
        numbers=np.concatenate([z, zn]),
        positions=np.concatenate([p, mm]) + offset,
        is_qm=np.arange(n + len(zn)) < n,
        charges=np.concatenate([np.zeros(n), q]),
        mol_ids=np.concatenate([np.zeros(n, int), 1 + np.arange(len(zn)) // 3]),
        box=None if box is None else np.eye(3) * box,
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)

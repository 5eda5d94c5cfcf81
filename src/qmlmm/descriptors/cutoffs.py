"""Smooth cutoff functions f_c(r): 1 at r = 0, 0 with zero slope at r = r_c."""

from __future__ import annotations

import math

import torch

__all__ = ["cosine_cutoff"]


def cosine_cutoff(r: torch.Tensor, rc: float) -> torch.Tensor:
    """0.5 (cos(pi r / r_c) + 1) for r < r_c, else 0 (value and first derivative continuous)."""
    x = torch.clamp(r / rc, max=1.0)
    return 0.5 * (torch.cos(math.pi * x) + 1.0)

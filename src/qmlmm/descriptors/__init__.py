"""Atom-centred symmetry functions with the MM point charges as an extra, charge-weighted element."""

from qmlmm.descriptors.acsf import ACSF, DescriptorConfig

__all__ = ["ACSF", "DescriptorConfig"]

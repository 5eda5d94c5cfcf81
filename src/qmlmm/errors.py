"""Exceptions of qmlmm. Every message names the problem and, where it helps, the fix."""

from __future__ import annotations


class QMLMMError(Exception):
    """Base class of all qmlmm errors."""


class InputError(QMLMMError, ValueError):
    """Bad user input: unknown element, impossible charge/multiplicity, overlapping atoms, ..."""


class SchemaError(QMLMMError, ValueError):
    """A file is not of the expected schema (wrong kind of file, missing fields, newer version)."""


class LevelConflictError(QMLMMError, ValueError):
    """A label level already exists in a dataset with different settings."""


class EngineError(QMLMMError, RuntimeError):
    """A QM engine failed on one frame (the frame is recorded as failed, never stored)."""


class SCFNotConvergedError(EngineError):
    """The SCF (or SCC) iterations did not reach the requested tolerance."""


class MissingParametersError(QMLMMError, FileNotFoundError):
    """Parameter files (e.g. Slater-Koster tables) are missing."""


class DependencyError(QMLMMError, ImportError):
    """An optional dependency is not installed."""


class AnalysisError(QMLMMError, RuntimeError):
    """An analysis cannot give a result from these data (e.g. MBAR over umbrella windows that do not
    overlap)."""

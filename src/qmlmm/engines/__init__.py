"""QM/MM engines, named by spec strings.

Spec grammar: ``family:method[,key=value...]``, for example

- ``dft:b3lyp/def2-svp`` (PySCF; options ``df=yes|no``, ``conv=1e-9``, ``grids=3``, ``maxcycle=100``)
- ``xtb:gfn2``, ``xtb:gfn1`` (xtb wheel; options ``acc=1.0``, ``etemp=300``, ``maxiter=250``)
- ``dftb3:3ob``, ``dftb2:mio`` (qmlmm's PyTorch DFTB; options ``tol=1e-8``, ``maxiter=200``)

The family (the part before the colon) is the default label level name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmlmm.engines.base import Engine, EngineResult, label_frame
from qmlmm.errors import InputError

__all__ = [
    "FAMILIES",
    "Engine",
    "EngineResult",
    "EngineSpec",
    "label_frame",
    "make_engine",
    "parse_spec",
]

FAMILIES = ("dft", "xtb", "dftb3", "dftb2")


@dataclass(frozen=True)
class EngineSpec:
    """A parsed engine spec: ``family:method,key=value,...``."""

    family: str
    method: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.family}:{self.method}{opts}"


def parse_spec(spec: str) -> EngineSpec:
    """Parse an engine spec string; raise InputError naming what is wrong."""
    if ":" not in spec:
        raise InputError(
            f"engine spec {spec!r} needs the form family:method, e.g. dft:b3lyp/def2-svp, "
            f"xtb:gfn2, dftb3:3ob (families: {', '.join(FAMILIES)})"
        )
    family, rest = spec.split(":", 1)
    family = family.strip().lower()
    if family not in FAMILIES:
        raise InputError(f"unknown engine family {family!r} in {spec!r}; known: {', '.join(FAMILIES)}")
    parts = [p.strip() for p in rest.split(",")]
    method, opts = parts[0].lower(), {}
    if not method:
        raise InputError(f"engine spec {spec!r} names no method")
    for p in parts[1:]:
        if "=" not in p:
            raise InputError(f"engine option {p!r} in {spec!r} must be key=value")
        k, v = p.split("=", 1)
        opts[k.strip().lower()] = v.strip()
    return EngineSpec(family, method, opts)


def make_engine(spec: str | EngineSpec, threads: int = 1) -> Engine:
    """Build the engine named by ``spec`` using ``threads`` threads."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    eng: Engine
    if s.family == "dft":
        from qmlmm.engines.pyscf_dft import PySCFEngine

        eng = PySCFEngine(s)
    elif s.family == "xtb":
        from qmlmm.engines.xtb import XTBEngine

        eng = XTBEngine(s)
    else:
        from qmlmm.engines.dftb.engine import DFTBEngine

        eng = DFTBEngine(s)
    eng.set_threads(threads)
    return eng

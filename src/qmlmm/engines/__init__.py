"""QM/MM engines, named by spec strings.

Spec grammar: ``family:method[,key=value...]``, for example

- ``dft:b3lyp/def2-svp`` (PySCF; options ``df=yes|no``, ``conv=1e-9``, ``grids=3``, ``maxcycle=100``)
- ``xtb:gfn2``, ``xtb:gfn1`` (xtb wheel; options ``acc=1.0``, ``etemp=300``, ``maxiter=250``)
- ``dftb3:3ob``, ``dftb2:mio`` (qmlmm's PyTorch DFTB; options ``tol=1e-8``, ``maxiter=200``)

The family (the part before the colon) is the default label level name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmlmm.engines.base import Engine, EngineResult, label_frame
from qmlmm.errors import InputError

__all__ = [
    "FAMILIES",
    "Engine",
    "EngineResult",
    "EngineSpec",
    "fetch_parameters",
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


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """A checker of a numeric option value: its type and range (inclusive, or open at ``low``)."""

    def check(name: str, v: str) -> None:
        try:
            x = kind(v)
        except ValueError:
            want = "an integer" if kind is int else "a number"
            raise InputError(f"engine option {name}={v!r} must be {want}") from None
        if x != x or (low is not None and (x < low or (low_open and x == low))) or (high is not None and x > high):
            rng = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
            raise InputError(f"engine option {name}={v!r} must be {rng}")

    return check


def _choice(*values: str) -> Any:
    def check(name: str, v: str) -> str:
        if v.lower() not in values:
            raise InputError(f"engine option {name}={v!r} must be one of {', '.join(values)}")
        return v.lower()  # one spelling: the spec's text (an MD restart's engine identity, label keys) too

    return check


def _any(name: str, v: str) -> None:
    if not v:
        raise InputError(f"engine option {name} has no value")


_YESNO = _choice("yes", "no", "true", "false", "1", "0", "on", "off")
_DFTB_OPTIONS = {
    "tol": _number(float, 0.0, low_open=True),
    "maxiter": _number(int, 1),
    "etemp": _number(float, 0.0),
    "reuse": _choice("yes", "no"),
    "device": _any,
    "mixer": _choice("auto", "anderson", "newton"),
    "guess": _choice("linear", "previous"),
}
#: the options of each family and their checks, applied when a spec is parsed (before any engine exists)
OPTIONS: dict[str, dict[str, Any]] = {
    "dft": {
        "df": _YESNO,
        "conv": _number(float, 0.0, low_open=True),
        "grids": _number(int, 0, 9),
        "maxcycle": _number(int, 1),
        "reuse": _YESNO,
        "soscf": _YESNO,
        "aux": _any,
        "dfmem": _number(float, 0.0),
    },
    "xtb": {"acc": _number(float, 1e-4, 1e3), "etemp": _number(float, 0.0), "maxiter": _number(int, 1)},
    "dftb3": _DFTB_OPTIONS,
    "dftb2": _DFTB_OPTIONS,
}


def _check_dft_method(spec: str, method: str) -> None:
    """functional/basis: both known to PySCF (checked now, not after the first SCF of a long job)."""
    if "/" not in method:
        raise InputError(f"dft spec needs functional/basis, e.g. dft:b3lyp/def2-svp; got {spec!r}")
    xc, basis = method.split("/", 1)
    from pyscf import gto
    from pyscf.dft import libxc

    try:
        libxc.parse_xc(xc)
    except (KeyError, ValueError):
        raise InputError(f"unknown DFT functional {xc!r} in {spec!r}") from None
    import warnings

    try:
        with warnings.catch_warnings():  # PySCF's hint to install basis-set-exchange for unknown names
            warnings.simplefilter("ignore")
            ok = bool(gto.basis.load(basis, "H") or gto.basis.load(basis, "C"))
    except Exception:  # PySCF raises BasisNotFoundError, KeyError, RuntimeError depending on the name
        ok = False
    if not ok:
        raise InputError(f"unknown basis set {basis!r} in {spec!r} (PySCF has no basis of that name)")


def parse_spec(spec: str) -> EngineSpec:
    """Parse an engine spec string; raise InputError naming what is wrong (unknown family or option, an
    option value of the wrong type or range, for dft an unknown functional or basis)."""
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
    known = OPTIONS[family]
    for k, v in list(opts.items()):
        if k not in known:
            raise InputError(f"unknown {family} option {k!r} in {spec!r}; known: {', '.join(sorted(known))}")
        canonical = known[k](k, v)  # a check returns the value's one spelling where it has one
        if canonical is not None:
            opts[k] = canonical
    if family == "dft":
        _check_dft_method(spec, method)
    return EngineSpec(family, method, opts)


def fetch_parameters(dest: str | Path | None = None, force: bool = False) -> Path:
    """Download the DFTB Slater-Koster sets (3ob-3-1, mio-1-1) into ``dest`` (default: $QMLMM_SLAKO_DIR or
    ~/.local/share/qmlmm/slako) unless present; returns the folder."""
    from qmlmm.engines.dftb.slako_files import fetch_slako

    return Path(fetch_slako(None if dest is None else Path(dest), force=force))


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

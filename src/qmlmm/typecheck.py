"""Type checks of configuration dataclasses read from YAML, so a bad value fails when the file is read."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from qmlmm.errors import InputError

__all__ = ["check_field_types"]


def _split_top(s: str, sep: str) -> list[str]:
    """Split ``s`` at ``sep`` outside brackets."""
    out, depth, cur = [], 0, ""
    i = 0
    while i < len(s):
        c = s[i]
        depth += c == "["
        depth -= c == "]"
        if depth == 0 and s.startswith(sep, i):
            out.append(cur.strip())
            cur, i = "", i + len(sep)
            continue
        cur += c
        i += 1
    out.append(cur.strip())
    return out


def _matches(v: Any, t: str) -> bool:
    t = t.strip()
    alts = _split_top(t, "|")
    if len(alts) > 1:
        return any(_matches(v, a) for a in alts)
    if t == "None":
        return v is None
    if t == "Any":
        return True
    if t == "bool":
        return isinstance(v, bool)
    if t == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if t == "str":
        return isinstance(v, str)
    if t.startswith("list[") or t.startswith("tuple["):
        inner = t[t.index("[") + 1 : -1]
        return isinstance(v, list | tuple) and all(_matches(x, inner) for x in v)
    if t.startswith("dict["):
        k, val = _split_top(t[5:-1], ",")
        return isinstance(v, dict) and all(_matches(a, k) and _matches(b, val) for a, b in v.items())
    return True  # a type this checker does not know: left to the class


def check_field_types(obj: Any, what: str) -> None:
    """Raise InputError naming the first field of dataclass ``obj`` whose value does not have its declared
    type (string annotations as written with ``from __future__ import annotations``); ints given for
    float fields become floats."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        t = str(f.type)
        if not _matches(v, t):
            raise InputError(f"{what} setting {f.name} must be {t}, got {v!r}")
        if t == "float" and isinstance(v, int):
            setattr(obj, f.name, float(v))

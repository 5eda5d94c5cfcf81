"""The layering of docs/architecture.md holds: every `qmlmm` import (module level or inside a function)
goes from a part to itself or to one of the parts it may use."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qmlmm"

#: the core modules (qmlmm/<name>.py), usable by every part
CORE = {
    "units",
    "elements",
    "errors",
    "system",
    "environment",
    "switching",
    "fileio",
    "typecheck",
    "batch",
    "testing",
    "threads",
    "compiled",
}

#: part -> the parts it may import (besides itself and core); the same table as docs/architecture.md
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": set(),
    "engines": set(),
    "descriptors": set(),
    "models": {"data", "descriptors", "engines"},
    "training": {"data", "descriptors", "models"},
    "md": {"data", "engines"},
    "analysis": {"data", "models", "md"},
    "workflows": {"data", "engines", "descriptors", "models", "training", "md", "analysis"},
    "cli": {"data", "engines", "descriptors", "models", "training", "md", "analysis", "workflows"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in CORE or parts[1] == "__init__":
        return "core"
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("qmlmm"):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("qmlmm")]
    return out


def test_every_import_follows_the_layers() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    broken = []
    for f in files:
        mod = ".".join(f.relative_to(SRC.parent).with_suffix("").parts)
        src = _part(mod)
        assert src in ALLOWED, f"{f}: part {src!r} is not in docs/architecture.md"
        for line, target in _imports(f):
            dst = _part(target)
            if dst not in (src, "core") and dst not in ALLOWED[src]:
                broken.append(f"{f.relative_to(SRC)}:{line} ({src}) imports {target} ({dst})")
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_core_imports_no_part_above_it() -> None:
    for name in CORE:
        for line, target in _imports(SRC / f"{name}.py"):
            assert _part(target) == "core", f"qmlmm/{name}.py:{line} imports {target}"


def test_the_document_lists_the_same_arrows() -> None:
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    for part, allowed in ALLOWED.items():
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{part}`")), None)
        assert row is not None, f"docs/architecture.md has no row for {part}"
        listed = {w.strip(" `") for w in row.split("|")[3].split(",") if w.strip(" `-")}
        assert listed == allowed, (part, listed, allowed)

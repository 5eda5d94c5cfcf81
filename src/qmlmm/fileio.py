"""Safe outputs: atomic writes with the user's permissions, and never replacing an input or an existing
result by accident."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qmlmm.errors import InputError

__all__ = ["atomic_path", "check_output", "umask_mode"]


def umask_mode(base: int = 0o666) -> int:
    """``base`` permissions with the process's umask applied (what ``open`` would give a new file)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``; on success it replaces ``path`` (one rename, so a reader or a
    crash never sees half a file) with the user's umask permissions (mkstemp alone gives 0600); on an
    error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output(out: str | Path, inputs: Sequence[str | Path] = (), overwrite: bool = False, what: str = "") -> Path:
    """``out`` as a Path, after refusing (InputError) an output that is one of the ``inputs`` (it would
    replace them), an existing one without ``overwrite``, or one in a folder that cannot be written."""
    out = Path(out)
    for src in inputs:
        if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise InputError(f"output {out} is the input {src}: writing it would replace the input; choose another -o")
    if out.exists() and not overwrite:
        raise InputError(f"{what or 'output'} {out} exists; choose another -o or pass --overwrite to replace it")
    parent = out.parent if out.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise InputError(f"cannot write {out}: {probe} is not writable")
    return out

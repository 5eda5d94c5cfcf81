"""One pipeline per folder: a lock file holding the running process's PID."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qmlmm.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["run_lock"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.pipeline.lock`` (holding this process's PID) while a pipeline writes to ``folder``.

    Raises InputError when a live process holds it (two runs would write the same labels and models);
    the lock of a process that no longer exists (a killed run) is taken over. Released on exit.
    """
    lock = folder / ".pipeline.lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise InputError(
                    f"{folder} is in use by another qmlmm pipeline (pid {pid}); wait for it or stop it "
                    f"(if no such run exists, delete {lock})"
                ) from None
            log.warning("taking over the stale lock %s (pid %d is gone)", lock, pid)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise InputError(f"could not take the lock {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)

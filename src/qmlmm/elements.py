"""Element symbols, atomic numbers and masses (from ASE's tables), with clear errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from ase.data import atomic_masses, atomic_numbers, chemical_symbols

from qmlmm.errors import InputError

__all__ = ["atomic_number", "check_charge_multiplicity", "mass", "symbol", "to_numbers"]


def atomic_number(sym: str | int) -> int:
    """Atomic number of an element symbol ("C", "c", "Cl") or a number; unknown -> InputError."""
    if isinstance(sym, (int, np.integer)):
        z = int(sym)
        if not 1 <= z < len(chemical_symbols):
            raise InputError(f"unknown element: atomic number {z}")
        return z
    key = str(sym).strip()
    key = key[:1].upper() + key[1:].lower()
    found = atomic_numbers.get(key)
    if found is None or found == 0:
        raise InputError(f"unknown element {sym!r}")
    return int(found)


def symbol(z: int) -> str:
    """Element symbol of atomic number ``z``."""
    return chemical_symbols[atomic_number(int(z))]


def to_numbers(symbols: Iterable[str | int]) -> np.ndarray:
    """Atomic numbers, shape (n,), int64, of a sequence of symbols or numbers."""
    return np.array([atomic_number(s) for s in symbols], dtype=np.int64)


def mass(z: int) -> float:
    """Standard atomic mass in Da (g/mol)."""
    return float(atomic_masses[atomic_number(z)])


def check_charge_multiplicity(numbers: Sequence[int] | np.ndarray, charge: int, mult: int) -> int:
    """Check that total ``charge`` and spin multiplicity ``mult`` are possible for these atoms.

    Returns the number of electrons. Raises InputError when the electron count is negative, or its
    parity does not match the multiplicity (n_electrons + mult must be odd), or mult < 1, or there
    are fewer electrons than unpaired ones.
    """
    if int(mult) != mult or mult < 1:
        raise InputError(f"spin multiplicity must be a positive integer, got {mult}")
    if int(charge) != charge:
        raise InputError(f"total charge must be an integer, got {charge}")
    nelec = int(np.sum(numbers)) - int(charge)
    if nelec < 0:
        raise InputError(f"charge {charge} leaves {nelec} electrons")
    if (nelec + int(mult)) % 2 == 0:
        raise InputError(
            f"charge {charge} and multiplicity {mult} are impossible together: {nelec} electrons "
            f"{'(even)' if nelec % 2 == 0 else '(odd)'} need an {'odd' if nelec % 2 == 0 else 'even'} "
            "multiplicity"
        )
    if mult - 1 > nelec:
        raise InputError(f"multiplicity {mult} needs {mult - 1} unpaired electrons, only {nelec} exist")
    return nelec

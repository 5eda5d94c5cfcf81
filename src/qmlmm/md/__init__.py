"""Molecular dynamics: building solvated systems, the OpenMM QM/MM force, restraints, runners."""

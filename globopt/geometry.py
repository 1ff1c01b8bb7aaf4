"""Geometry sanity limits derived from the composition.

The same limits are used before a relaxation (to reject hopeless candidates for free) and after it
(to catch a potential that collapsed atoms onto each other or blew the cell up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from globopt.evaluator.relax import closest_pair_violation


@dataclass(frozen=True)
class GeometryLimits:
    min_distance: np.ndarray  # [Z_i, Z_j] -> Å, zero for element pairs not in the composition
    volume_per_atom_range: tuple[float, float]

    def describe(self) -> str:
        low, high = self.volume_per_atom_range
        return f"volume/atom in [{low:.1f}, {high:.1f}] Å^3"


def geometry_limits(
    elements: Iterable[str],
    counts: Iterable[int],
    min_distance_factor: float,
    volume_factor_range: tuple[float, float],
) -> GeometryLimits:
    """Scale covalent radii into pair distances and sphere volumes into a volume window."""
    elements = list(elements)
    counts = list(counts)
    numbers = [atomic_numbers[el] for el in elements]
    size = max(numbers) + 1
    matrix = np.zeros((size, size))
    for zi in numbers:
        for zj in numbers:
            matrix[zi, zj] = min_distance_factor * (covalent_radii[zi] + covalent_radii[zj])
    total = sum(counts)
    mean_sphere = sum(
        n * 4.0 / 3.0 * math.pi * covalent_radii[z] ** 3 for z, n in zip(numbers, counts, strict=True)
    )
    mean_sphere /= total
    low, high = volume_factor_range
    return GeometryLimits(matrix, (low * mean_sphere, high * mean_sphere))


def geometry_problem(structure: Structure, limits: GeometryLimits) -> str:
    """Return why the structure is not sane, or '' if it is."""
    n_atoms = len(structure)
    if n_atoms == 0:
        return "structure has no atoms"
    volume_per_atom = structure.volume / n_atoms
    low, high = limits.volume_per_atom_range
    if not low <= volume_per_atom <= high:
        return f"volume {volume_per_atom:.1f} Å^3/atom outside [{low:.1f}, {high:.1f}]"
    atoms = AseAtomsAdaptor.get_atoms(structure)
    if atoms.numbers.max() >= limits.min_distance.shape[0]:
        return "structure contains elements outside the composition"
    return closest_pair_violation(atoms, limits.min_distance)

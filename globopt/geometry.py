"""Geometry sanity limits derived from the composition, and the periodic pair distances behind them.

The same limits are used before a relaxation (to reject hopeless candidates for free) and after it
(to catch a potential that collapsed atoms onto each other or blew the cell up). ``periodic_pairs`` is the
one routine that lists close pairs of a periodic cell; the checks, the GA operators and the surrogate's
descriptors all use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Structure
from pymatgen.optimization.neighbors import find_points_in_spheres

_PERIODIC = np.array([1, 1, 1], dtype=np.int64)
# pairs closer than this are an atom and itself (or two atoms on one spot: caught by the limits anyway)
_SAME_POINT = 1e-8


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
    numbers = np.array([site.specie.Z for site in structure])
    if numbers.max() >= limits.min_distance.shape[0]:
        return "structure contains elements outside the composition"
    symbols = [site.specie.symbol for site in structure]
    return closest_pair_violation(structure.lattice.matrix, structure.frac_coords, numbers, symbols, limits)


def periodic_pairs(
    lattice: np.ndarray, frac: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every ordered pair of atoms closer than ``cutoff``, periodic images included: i, j, the vector from
    i to the image of j (Å, Cartesian) and its length.

    Each unordered pair appears twice (once from each end), and an atom's own periodic images count. Exact
    for any cell shape. pymatgen's compiled cell list makes this 15-50x faster than a vectorised numpy
    loop over lattice translations on 8-56 atom cells, which matters because rank 0 checks every proposal.
    """
    lattice = np.ascontiguousarray(lattice, dtype=float)
    cart = np.ascontiguousarray(np.mod(frac, 1.0) @ lattice)
    centres, points, images, distances = find_points_in_spheres(
        cart, cart, r=float(cutoff), pbc=_PERIODIC, lattice=lattice, tol=_SAME_POINT
    )
    keep = distances > _SAME_POINT
    i, j, images, distances = centres[keep], points[keep], images[keep], distances[keep]
    vectors = cart[j] + images @ lattice - cart[i]
    return i.astype(int), j.astype(int), vectors, distances


def closest_pair_violation(
    lattice: np.ndarray, frac: np.ndarray, numbers: np.ndarray, symbols: list[str], limits: GeometryLimits
) -> str:
    """Describe the worst pair closer than allowed, or return '' when all pairs are fine.

    The distance is rounded down and the limit up (to 0.001 Å), so the message never shows a pair "below"
    a minimum that prints as the same number or a smaller one.
    """
    min_distance = limits.min_distance
    cutoff = float(min_distance.max())
    if cutoff <= 0:
        return ""
    i, j, _, d = periodic_pairs(lattice, frac, cutoff)
    if len(d) == 0:
        return ""
    allowed = min_distance[numbers[i], numbers[j]]
    bad = d < allowed
    if not bad.any():
        return ""
    worst = int(np.argmin(np.where(bad, d / allowed, np.inf)))
    return (
        f"atoms {i[worst]} ({symbols[i[worst]]}) and {j[worst]} ({symbols[j[worst]]}) are "
        f"{math.floor(d[worst] * 1000) / 1000:.3f} Å apart, below the minimum "
        f"{math.ceil(allowed[worst] * 1000) / 1000:.3f} Å"
    )

"""Geometry sanity limits for a screen, whose compositions are only known one proposal at a time.

The engine's checks scale covalent radii into a minimum pair distance and a volume-per-atom window. A
screen needs them per composition (cached by the engine) and, for the guards inside the relaxation, an
envelope over every element the screen can produce. Elemental references include molecular crystals (N2,
O2, F2, Cl2) whose volume per atom is 10-25 times their covalent-sphere volume, so single-element cells get
a wider upper bound than the configured one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Structure

from globopt.geometry import GeometryLimits, geometry_limits

MOLECULAR_VOLUME_FACTOR = 30.0


def composition_limits(
    structure: Structure, min_distance_factor: float, volume_factor_range: tuple[float, float]
) -> GeometryLimits:
    amounts = structure.composition.get_el_amt_dict()
    low, high = volume_factor_range
    if len(amounts) == 1:
        high = max(high, MOLECULAR_VOLUME_FACTOR)
    return geometry_limits(
        list(amounts), [round(n) for n in amounts.values()], min_distance_factor, (low, high)
    )


def envelope_limits(
    elements: Iterable[str], min_distance_factor: float, volume_factor_range: tuple[float, float]
) -> GeometryLimits:
    """Pair distances for every element pair; a volume window that holds every composition's window."""
    elements = sorted(set(elements))
    base = geometry_limits(elements, [1] * len(elements), min_distance_factor, volume_factor_range)
    spheres = [4.0 / 3.0 * math.pi * covalent_radii[atomic_numbers[el]] ** 3 for el in elements]
    low, high = volume_factor_range
    return GeometryLimits(
        base.min_distance, (low * min(spheres), max(high, MOLECULAR_VOLUME_FACTOR) * max(spheres))
    )

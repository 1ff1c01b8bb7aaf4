"""Hit detection: did a search find the reference (same structure, or as low in energy)?"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure


@dataclass
class EvaluatedStructure:
    """One relaxation of a search, in the order it finished; ``structure`` None for a failed relaxation."""

    structure: Structure | None
    energy_per_atom: float | None
    finished_at: float


@dataclass
class FirstHit:
    evaluations: int  # relaxations used up to and including the hit
    seconds: float  # from the search's start to the hit's commit


def reference_matcher() -> StructureMatcher:
    """StructureMatcher with tight tolerances and without volume scaling.

    Why tight: the candidate and the reference are relaxed minima of one potential, so a true copy differs
    only by the looser fmax of the search (hundredths of an Å). pymatgen's defaults (ltol 0.2, stol 0.3) are
    meant for comparing different sources, and in 4-atom cells they match wurtzite (u = 0.38) with the
    layered h-BN-like P6_3/mmc structure (u = 0.5) that lies ~50 meV/atom higher under M3GNet for ZnO.
    Why scale=False: a true copy has the reference's volume; with scaling on, a strained high-energy
    look-alike of a 2-4 atom cell matches.
    """
    return StructureMatcher(ltol=0.1, stol=0.15, angle_tol=3, scale=False)


def first_hit(
    evaluations: Iterable[EvaluatedStructure],
    reference: Structure,
    reference_energy: float,
    tolerance: float,
    started_at: float,
) -> FirstHit | None:
    """The first relaxation at or below reference + tolerance, or matching the reference structure."""
    matcher = reference_matcher()
    for count, item in enumerate(evaluations, start=1):
        if item.structure is None or item.energy_per_atom is None:
            continue
        if item.energy_per_atom <= reference_energy + tolerance or matcher.fit(item.structure, reference):
            return FirstHit(count, item.finished_at - started_at)
    return None


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None

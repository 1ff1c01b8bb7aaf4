"""Two-stage duplicate detection: a cheap bucket key first, StructureMatcher only within the bucket.

StructureMatcher is exact but costs milliseconds per pair; a search keeps thousands of structures.
Bucketing by reduced formula and space group (and, for relaxed structures, an energy window) keeps the
number of full comparisons per query small and independent of archive size in practice.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer


def bucket_key(structure: Structure, symprec: float) -> tuple[str, int]:
    """(reduced formula, space group number); 0 when spglib cannot decide."""
    try:
        number = SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()
    except Exception:
        number = 0
    return structure.composition.reduced_formula, int(number)


def reduced_for_matching(structure: Structure) -> Structure:
    """The Niggli-reduced primitive cell StructureMatcher would compare (same steps, same order).

    Reducing each indexed structure once, instead of inside every ``fit``, removes most of a comparison's
    cost: pymatgen otherwise re-reduces both structures per pair, and its reduction cache compares whole
    structures for equality on every lookup.
    """
    return structure.get_reduced_structure(reduction_algo="niggli").get_primitive_structure()


def lattice_minima(reduced: Structure) -> np.ndarray:
    """The lattice's three successive minima (Niggli cell lengths, ascending) at unit volume.

    StructureMatcher (scale=True, no supercells) only matches a query to an indexed structure if the
    query lattice has three independent vectors within (1 + ltol) of the indexed lattice's lengths (as
    stored), both scaled to equal volume. So the query's i-th successive minimum must be below (1 + ltol)
    times the indexed structure's i-th shortest cell length: a necessary condition that costs microseconds,
    checked before a fit that costs milliseconds. Only the query side needs true minima (a Niggli
    reduction, about 1 ms, done on a worker where the structure comes from one).
    """
    lengths = np.sort(np.array(reduced.lattice.get_niggli_reduced_lattice().abc))
    return lengths / reduced.volume ** (1 / 3)


def cell_lengths(reduced: Structure) -> np.ndarray:
    """An indexed structure's cell lengths as StructureMatcher uses them, ascending, at unit volume."""
    return np.sort(np.array(reduced.lattice.abc)) / reduced.volume ** (1 / 3)


@dataclass
class _Entry:
    candidate_id: int
    reduced: Structure  # see reduced_for_matching
    energy: float | None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(3))  # see cell_lengths


class DuplicateIndex:
    """Structures seen so far, queried for a match before adding a new one."""

    def __init__(
        self,
        ltol: float,
        stol: float,
        angle_tol: float,
        energy_tol: float,
        symprec: float,
        bucket_by_spacegroup: bool = True,
    ) -> None:
        """Relaxed structures are bucketed by formula and energy only: a slightly distorted copy of a
        minimum can get another space group at a given symprec, yet it is the same minimum."""
        self.matcher = StructureMatcher(
            ltol=ltol, stol=stol, angle_tol=angle_tol, primitive_cell=True, scale=True
        )
        self.energy_tol = energy_tol
        # 1% slack over the matcher's own bound covers round-off in the two reductions
        self._minima_bound = (1 + ltol) * 1.01
        self.symprec = symprec
        self.bucket_by_spacegroup = bucket_by_spacegroup
        self._buckets: dict[tuple[str, int], list[_Entry]] = defaultdict(list)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._buckets.values())

    def find(
        self,
        structure: Structure,
        energy: float | None = None,
        key: tuple[str, int] | None = None,
        reduced: Structure | None = None,
        minima: np.ndarray | None = None,
    ) -> int | None:
        """Id of an indexed structure equivalent to this one, or None.

        With an energy given, only entries within energy_tol are compared: two relaxed minima that far
        apart in energy are different structures whatever their geometry looks like. ``reduced`` and
        ``minima`` (lattice_minima of it) when the caller has them already, e.g. from a worker.
        """
        key = key or self.key(structure)
        entries = self._buckets.get(key, ())
        if not entries:
            return None
        if reduced is None:
            reduced = reduced_for_matching(structure)
        for entry in entries:
            if (
                energy is not None
                and entry.energy is not None
                and abs(entry.energy - energy) > self.energy_tol
            ):
                continue
            # Without supercell matching, primitive cells of different sizes never match.
            if len(entry.reduced) != len(reduced):
                continue
            if minima is None:
                minima = lattice_minima(reduced)
            if np.any(minima >= self._minima_bound * entry.lengths):
                continue  # no lattice mapping within ltol exists (see lattice_minima)
            if self.matcher.fit(reduced, entry.reduced, skip_structure_reduction=True):
                return entry.candidate_id
        return None

    def add(
        self,
        candidate_id: int,
        structure: Structure,
        energy: float | None = None,
        key: tuple[str, int] | None = None,
        reduced: Structure | None = None,
    ) -> None:
        """Index a structure; ``key`` and ``reduced`` when the caller already has them from ``find``."""
        if reduced is None:
            reduced = reduced_for_matching(structure)
        entry = _Entry(candidate_id, reduced, energy, cell_lengths(reduced))
        self._buckets[key or self.key(structure)].append(entry)

    def replace(
        self,
        old_id: int,
        new_id: int,
        structure: Structure,
        energy: float | None,
        reduced: Structure | None = None,
    ) -> None:
        """Make a better-relaxed copy of an indexed minimum its representative."""
        if reduced is None:
            reduced = reduced_for_matching(structure)
        for entries in self._buckets.values():
            for i, entry in enumerate(entries):
                if entry.candidate_id == old_id:
                    entries[i] = _Entry(new_id, reduced, energy, cell_lengths(reduced))
                    return
        raise KeyError(old_id)

    def lowest(self, count: int) -> list[tuple[int, float, Structure]]:
        """(candidate id, energy, reduced cell) of the ``count`` lowest-energy entries, lowest first."""
        # called once per task with known_minima on: O(n log count), not a full sort of the archive
        entries = (e for bucket in self._buckets.values() for e in bucket if e.energy is not None)
        lowest = heapq.nsmallest(count, entries, key=lambda e: (e.energy, e.candidate_id))
        return [(e.candidate_id, e.energy, e.reduced) for e in lowest]

    def energy_of(self, candidate_id: int) -> float | None:
        for entries in self._buckets.values():
            for entry in entries:
                if entry.candidate_id == candidate_id:
                    return entry.energy
        raise KeyError(candidate_id)

    def key(self, structure: Structure) -> tuple[str, int]:
        if self.bucket_by_spacegroup:
            return bucket_key(structure, self.symprec)
        return structure.composition.reduced_formula, 0

"""Two-stage duplicate detection: a cheap bucket key first, StructureMatcher only within the bucket.

StructureMatcher is exact but costs milliseconds per pair; a search keeps thousands of structures.
Bucketing by reduced formula and space group (and, for relaxed structures, an energy window) narrows the
field; within a bucket, every entry's cell is held in numpy arrays and tested at once against conditions
every StructureMatcher match must meet (:class:`_Bucket`: same primitive-cell size, energy window, the
lattice-length conditions of :func:`lattice_minima` and :func:`vector_lengths`), so a query costs one
vectorised pass over its bucket and StructureMatcher runs only on the entries that could match.

Those conditions are weak for unrelaxed cells at the default tolerances (a site may move 0.3 of the mean
atomic spacing), so in a long search of one composition the entries that pass them grow with the archive.
Past ``max_comparisons`` of them, StructureMatcher runs only on the ones nearest the query by a
neighbour-distance fingerprint (:func:`structure_fingerprint`): the cost of a query stays bounded, at the
price of missing a matching entry that the fingerprint does not rank among the nearest (such a proposal is
relaxed, and its minimum is then recognised among the relaxed ones, which an energy window keeps small).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from globopt.candidate import ArchivedCell


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


def vector_lengths(reduced: Structure, radius: float) -> np.ndarray:
    """Lengths of the lattice vectors of ``reduced`` up to ``radius``, at unit volume, ascending.

    StructureMatcher maps a query onto an indexed structure only through three vectors of the query's
    lattice whose lengths are each within a factor (1 + ltol) of one of the indexed cell's lengths (pymatgen's
    ``Lattice.find_all_mappings``, both cells scaled to equal volume). So every indexed length needs a query
    vector within that factor: a necessary condition, tested for a whole bucket with two searchsorted calls.
    """
    scale = reduced.volume ** (1 / 3)
    lattice = reduced.lattice
    points = lattice.get_points_in_sphere(np.zeros((1, 3)), np.zeros(3), radius * scale, zip_results=False)
    distances = np.asarray(points[1], dtype=float) if len(points) > 1 and len(points[1]) else np.zeros(0)
    return np.sort(distances[distances > 1e-8]) / scale


# Neighbours per site and species in the fingerprint: the first shell or two of a 10-30 atom cell.
FINGERPRINT_NEIGHBOURS = 4


def structure_fingerprint(structure: Structure, neighbours: int = FINGERPRINT_NEIGHBOURS) -> np.ndarray:
    """Distances from each site to its nearest ``neighbours`` sites of each species, at unit spacing.

    For every pair of species (A, B) the distances from all A sites to their nearest B sites are sorted
    into one block, and the blocks are concatenated in species order: invariant to the choice of cell,
    origin and site order, and continuous in the positions, so structures StructureMatcher calls the same
    have nearby fingerprints more often than not. Lengths are in units of (volume per atom)^(1/3), the
    scale StructureMatcher compares at. Only compared between structures of one reduced formula and
    primitive size (one bucket), which have fingerprints of the same length.
    """
    n = len(structure)
    spacing = (structure.volume / n) ** (1 / 3)
    names = sorted({site.species_string for site in structure})
    labels = np.array([names.index(site.species_string) for site in structure])
    n_species = len(names)
    radius = 2.0 * spacing
    groups = np.arange(n * n_species)
    for _ in range(8):
        centres, others, _, distances = structure.get_neighbor_list(radius)
        keep = distances > 1e-8
        group = centres[keep] * n_species + labels[others[keep]]
        order = np.lexsort((distances[keep], group))
        group, distances = group[order], distances[keep][order]
        starts = np.searchsorted(group, groups, side="left")
        counts = np.searchsorted(group, groups, side="right") - starts
        if counts.min() >= neighbours:
            nearest = distances[starts[:, None] + np.arange(neighbours)].reshape(n, n_species, neighbours)
            pairs = [(a, b) for a in range(n_species) for b in range(n_species)]
            blocks = [np.sort(nearest[labels == a, b, :].ravel()) for a, b in pairs]
            return np.concatenate(blocks) / spacing
        radius *= 1.5
    # a cell too sparse for this many neighbours in any sane radius: it is compared without a fingerprint
    return np.zeros(0)


class _Bucket:
    """Entries of one bucket in insertion order, with their cell data as arrays for vectorised tests."""

    def __init__(self) -> None:
        self.entries: list[_Entry | None] = []  # None: removed
        self._size = 0
        self._lengths = np.zeros((8, 3))
        self._sites = np.zeros(8, dtype=np.int64)
        self._energy = np.full(8, np.nan)
        self._ids = np.zeros(8, dtype=np.int64)
        # fingerprints as rows, one matrix per fingerprint length, filled in when a query first needs them
        self._fingerprints: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # length -> (rows, filled)

    def __len__(self) -> int:
        return self._size

    def append(self, entry: _Entry) -> None:
        if self._size == len(self._sites):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
            self._sites = np.concatenate([self._sites, np.zeros_like(self._sites)])
            self._energy = np.concatenate([self._energy, np.full(len(self._energy), np.nan)])
            self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
            for length, (rows, filled) in list(self._fingerprints.items()):
                grown_rows = np.concatenate([rows, np.zeros_like(rows)])
                self._fingerprints[length] = (grown_rows, np.append(filled, np.zeros_like(filled)))
        self.entries.append(entry)
        self._set(self._size, entry)
        self._size += 1

    def replace(self, index: int, entry: _Entry) -> None:
        self.entries[index] = entry
        self._set(index, entry)

    def remove(self, index: int) -> None:
        """Leave a hole: no query's site count is -1, so the entry is never a candidate again."""
        self.entries[index] = None
        self._sites[index] = -1

    def _set(self, index: int, entry: _Entry) -> None:
        for _, filled in self._fingerprints.values():
            filled[index] = False
        self._ids[index] = entry.candidate_id
        self._lengths[index] = entry.lengths
        self._sites[index] = len(entry.reduced)
        self._energy[index] = np.nan if entry.energy is None else entry.energy

    def candidates(
        self,
        n_sites: int,
        minima: np.ndarray,
        query: Structure,
        bound: float,
        energy: float | None,
        energy_tol: float,
    ) -> np.ndarray:
        """Positions of the entries that pass every necessary condition of a match, in insertion order."""
        n = self._size
        lengths = self._lengths[:n]
        keep = self._sites[:n] == n_sites
        if energy is not None:
            # entries without an energy (nan) are compared whatever the query's energy
            keep &= ~(np.abs(self._energy[:n] - energy) > energy_tol)
        keep &= np.all(minima < bound * lengths, axis=1)
        if keep.any():
            radius = bound * float(lengths[keep].max())
            available = vector_lengths(query, radius)
            for column in range(3):
                wanted = lengths[:, column]
                low = np.searchsorted(available, wanted / bound, side="right")
                high = np.searchsorted(available, wanted * bound, side="left")
                keep &= high > low
        return np.flatnonzero(keep)

    def ids(self, positions: np.ndarray) -> np.ndarray:
        return self._ids[positions]

    def nearest(self, positions: np.ndarray, query: np.ndarray, count: int) -> np.ndarray:
        """The ``count`` of ``positions`` nearest ``query`` by fingerprint (mean absolute difference),
        nearest first, ties in insertion order. Entries without a comparable fingerprint come last."""
        length = len(query)
        if length not in self._fingerprints:
            capacity = len(self._sites)
            self._fingerprints[length] = (np.zeros((capacity, length)), np.zeros(capacity, dtype=bool))
        rows, filled = self._fingerprints[length]
        for position in positions[~filled[positions]]:
            entry = self.entries[position]
            fingerprint = entry.fingerprint
            if fingerprint is None:
                fingerprint = structure_fingerprint(entry.reduced)
            rows[position] = fingerprint if len(fingerprint) == length and length else np.inf
            filled[position] = True
        if not length:
            return positions[:count]
        distances = np.abs(rows[positions] - query).mean(axis=1)
        return positions[np.argsort(distances, kind="stable")[:count]]


@dataclass
class _Entry:
    candidate_id: int
    reduced: Structure  # see reduced_for_matching
    energy: float | None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(3))  # see cell_lengths
    _cell: ArchivedCell | None = None
    fingerprint: np.ndarray | None = None  # structure_fingerprint of reduced, when its worker sent it

    @property
    def cell(self) -> ArchivedCell:
        """The reduced cell as a worker receives it to compare a task with (evaluator/compare.py)."""
        if self._cell is None:
            self._cell = ArchivedCell.of(self.candidate_id, self.reduced)
        return self._cell


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
        max_comparisons: int | None = None,
    ) -> None:
        """Relaxed structures are bucketed by formula and energy only: a slightly distorted copy of a
        minimum can get another space group at a given symprec, yet it is the same minimum.

        ``max_comparisons``: StructureMatcher calls per query at most (None: every entry that passes the
        lattice conditions, exact but growing with the archive)."""
        self.matcher = StructureMatcher(
            ltol=ltol, stol=stol, angle_tol=angle_tol, primitive_cell=True, scale=True
        )
        self.energy_tol = energy_tol
        # 1% slack over the matcher's own bound covers round-off in the two reductions
        self._minima_bound = (1 + ltol) * 1.01
        self.symprec = symprec
        self.bucket_by_spacegroup = bucket_by_spacegroup
        self._buckets: dict[tuple[str, int], _Bucket] = defaultdict(_Bucket)
        self._where: dict[int, tuple[tuple[str, int], int]] = {}  # candidate id -> (bucket key, index)
        self.max_comparisons = max_comparisons
        self._formulas: dict[tuple, str] = {}  # cell content -> reduced formula (key)
        self.fits = 0  # StructureMatcher calls, for the cost report
        self.bounded_queries = 0  # queries that compared only the fingerprint-nearest entries

    def __len__(self) -> int:
        return len(self._where)

    def find(
        self,
        structure: Structure,
        energy: float | None = None,
        key: tuple[str, int] | None = None,
        reduced: Structure | None = None,
        minima: np.ndarray | None = None,
        fingerprint: np.ndarray | None = None,
    ) -> int | None:
        """Id of an indexed structure equivalent to this one, or None.

        With an energy given, only entries within energy_tol are compared: two relaxed minima that far
        apart in energy are different structures whatever their geometry looks like. ``reduced``,
        ``minima`` (lattice_minima of it) and ``fingerprint`` (structure_fingerprint of it) when the
        caller has them already, e.g. from a worker.
        """
        if reduced is None:
            reduced = reduced_for_matching(structure)
        for entry in self.comparisons(structure, energy, key, reduced, minima, fingerprint=fingerprint):
            self.fits += 1
            if self.matcher.fit(reduced, entry.reduced, skip_structure_reduction=True):
                return entry.candidate_id
        return None

    def comparisons(
        self,
        structure: Structure,
        energy: float | None = None,
        key: tuple[str, int] | None = None,
        reduced: Structure | None = None,
        minima: np.ndarray | None = None,
        before: int | None = None,
        fingerprint: np.ndarray | None = None,
    ) -> list[_Entry]:
        """The entries a query must be compared with, in the order ``find`` compares them.

        ``before``: only entries of lower candidate id (a re-issued task is compared with what was
        indexed when it was first handed out, not with proposals made after it).
        """
        bucket = self._buckets.get(key or self.key(structure))
        if not bucket:
            return []
        if reduced is None:
            reduced = reduced_for_matching(structure)
        if minima is None:
            minima = lattice_minima(reduced)
        # Without supercell matching, primitive cells of different sizes never match; the lattice
        # conditions are those of lattice_minima and vector_lengths.
        positions = bucket.candidates(
            len(reduced), minima, reduced, self._minima_bound, energy, self.energy_tol
        )
        if before is not None:
            positions = positions[bucket.ids(positions) < before]
        if self.max_comparisons is not None and len(positions) > self.max_comparisons:
            self.bounded_queries += 1
            if fingerprint is None:
                fingerprint = structure_fingerprint(reduced)
            positions = bucket.nearest(positions, fingerprint, self.max_comparisons)
        return [bucket.entries[i] for i in positions]

    def add(
        self,
        candidate_id: int,
        structure: Structure,
        energy: float | None = None,
        key: tuple[str, int] | None = None,
        reduced: Structure | None = None,
        fingerprint: np.ndarray | None = None,
    ) -> None:
        """Index a structure; ``key``, ``reduced`` and ``fingerprint`` when the caller has them already."""
        if reduced is None:
            reduced = reduced_for_matching(structure)
        entry = _Entry(candidate_id, reduced, energy, cell_lengths(reduced), fingerprint=fingerprint)
        key = key or self.key(structure)
        bucket = self._buckets[key]
        self._where[candidate_id] = (key, len(bucket))
        bucket.append(entry)

    def replace(
        self,
        old_id: int,
        new_id: int,
        structure: Structure,
        energy: float | None,
        reduced: Structure | None = None,
        fingerprint: np.ndarray | None = None,
    ) -> None:
        """Make a better-relaxed copy of an indexed minimum its representative."""
        if reduced is None:
            reduced = reduced_for_matching(structure)
        key, index = self._where.pop(old_id)
        entry = _Entry(new_id, reduced, energy, cell_lengths(reduced), fingerprint=fingerprint)
        self._buckets[key].replace(index, entry)
        self._where[new_id] = (key, index)

    def remove(self, candidate_id: int) -> None:
        """Forget an entry (a proposal a worker found to be a duplicate: a resume would not index it)."""
        if candidate_id not in self._where:
            return
        key, index = self._where.pop(candidate_id)
        self._buckets[key].remove(index)

    def lowest(self, count: int) -> list[tuple[int, float, Structure]]:
        """(candidate id, energy, reduced cell) of the ``count`` lowest-energy entries, lowest first."""
        # called once per task with known_minima on: O(n log count), not a full sort of the archive
        indexed = (e for bucket in self._buckets.values() for e in bucket.entries if e is not None)
        entries = (e for e in indexed if e.energy is not None)
        lowest = heapq.nsmallest(count, entries, key=lambda e: (e.energy, e.candidate_id))
        return [(e.candidate_id, e.energy, e.reduced) for e in lowest]

    def energy_of(self, candidate_id: int) -> float | None:
        key, index = self._where[candidate_id]
        return self._buckets[key].entries[index].energy

    def key(self, structure: Structure) -> tuple[str, int]:
        if self.bucket_by_spacegroup:
            return bucket_key(structure, self.symprec)
        # pymatgen's reduced_formula costs a quarter of a millisecond, and a run has few cell contents
        content = tuple(sorted(Counter(site.species_string for site in structure).items()))
        if (formula := self._formulas.get(content)) is None:
            formula = self._formulas[content] = structure.composition.reduced_formula
        return formula, 0

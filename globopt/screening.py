"""Rank 0's half of the evaluator pipeline: geometry and duplicate checks before a relaxation, and the
check of a relaxed structure against the minima already found.

Two duplicate indexes are kept, both derived from the archive (never stored apart, so a resume rebuilds
exactly what the killed run had): the *initial* structures of everything proposed and not screened out
(a proposal matching one of them would repeat a relaxation), and the *relaxed* unique minima (a proposal
matching one is already a minimum, and a relaxed structure matching one is the same minimum found again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymatgen.core import Structure

from globopt.archive import SCREENED_OUT, Archive
from globopt.candidate import ArchivedCell, Evaluation, Proposal, Status
from globopt.duplicates import DuplicateIndex, lattice_minima, reduced_for_matching
from globopt.geometry import geometry_problem
from globopt.search.base import SearchAlgorithm


@dataclass
class Screened:
    """A proposal that passed: the duplicate-index key and reduced cell, so indexing it costs nothing more,
    and the archived cells its worker must still compare it with (when the comparisons were deferred)."""

    key: tuple
    reduced: Structure
    compare_with: tuple[ArchivedCell, ...] = ()
    fingerprint: Any = None  # duplicates.structure_fingerprint of reduced, when a worker sent it


@dataclass
class ScreenedOut:
    """Why a proposal is not relaxed (rejected by geometry, or a duplicate of ``duplicate_of``)."""

    status: Status
    reason: str
    duplicate_of: int | None = None


class ProposalScreen:
    def __init__(
        self,
        search: SearchAlgorithm,
        ltol: float,
        stol: float,
        angle_tol: float,
        energy_tol: float,
        symprec: float,
        max_comparisons: int | None = None,
    ) -> None:
        self.search = search
        self.initial_index = DuplicateIndex(
            ltol, stol, angle_tol, energy_tol, symprec, max_comparisons=max_comparisons
        )
        self.relaxed_index = DuplicateIndex(
            ltol, stol, angle_tol, energy_tol, symprec, bucket_by_spacegroup=False,
            max_comparisons=max_comparisons,
        )  # fmt: skip

    @classmethod
    def from_config(cls, search: SearchAlgorithm, config) -> ProposalScreen:
        dup = config.duplicates
        return cls(
            search, dup.ltol, dup.stol, dup.angle_tol, dup.energy_tol, config.analysis.symprec,
            dup.max_comparisons,
        )  # fmt: skip

    def rebuild(self, archive: Archive) -> list[tuple[float, int, str | None]]:
        """Index every archived candidate; returns (enthalpy, id, space group) of each unique minimum."""
        minima = []
        # screened-out proposals were never relaxed: the search may propose them again
        for record in archive.records(exclude=SCREENED_OUT):
            self.initial_index.add(record.id, record.initial)
            if record.status is Status.RELAXED and record.duplicate_of is None:
                self.relaxed_index.add(record.id, record.relaxed, record.enthalpy_per_atom)
                minima.append((record.enthalpy_per_atom, record.id, record.spacegroup))
        return minima

    def screen(self, proposal: Proposal, defer_comparisons: bool = False) -> Screened | ScreenedOut:
        """Geometry, then duplicates among the proposed and among the minima.

        A proposal built on a worker arrives with its geometry verdict, key and reduced cell
        (``Proposal.screening``), computed there with the same limits and symprec. With
        ``defer_comparisons`` (workers in other processes) no StructureMatcher runs here: the archived
        cells it must be compared with go to its worker (evaluator/compare.py), in the order they would
        have been compared here.
        """
        prepared = proposal.screening
        if prepared is not None:
            problem = prepared.geometry_problem
        else:
            problem = geometry_problem(proposal.structure, self.search.limits_for(proposal.structure))
        if problem:
            return ScreenedOut(Status.REJECTED, problem)
        fingerprint = None
        if prepared is not None and prepared.key is not None and prepared.reduced is not None:
            key, reduced, minima = prepared.key, prepared.reduced, prepared.minima
            fingerprint = prepared.fingerprint
        else:
            key = self.initial_index.key(proposal.structure)
            reduced = reduced_for_matching(proposal.structure)
            minima = lattice_minima(reduced)
        if defer_comparisons:
            compare_with = self._cells_to_compare(
                proposal.structure, key, reduced, minima, fingerprint=fingerprint
            )
            return Screened(key, reduced, compare_with, fingerprint)
        match = self.initial_index.find(
            proposal.structure, key=key, reduced=reduced, minima=minima, fingerprint=fingerprint
        ) or self.relaxed_index.find(
            proposal.structure, reduced=reduced, minima=minima, fingerprint=fingerprint
        )
        if match is not None:
            return ScreenedOut(Status.DUPLICATE, f"same structure as candidate {match}", match)
        return Screened(key, reduced, fingerprint=fingerprint)

    def index_proposal(self, candidate_id: int, structure: Structure, screened: Screened) -> None:
        """A proposal that will be relaxed: later proposals of the same structure are duplicates."""
        self.initial_index.add(
            candidate_id,
            structure,
            key=screened.key,
            reduced=screened.reduced,
            fingerprint=screened.fingerprint,
        )

    def forget_proposal(self, candidate_id: int) -> None:
        """A proposal its worker found to be a duplicate: out of the index, as a resume would leave it."""
        self.initial_index.remove(candidate_id)

    def comparisons_for(self, candidate_id: int, structure: Structure) -> tuple[ArchivedCell, ...]:
        """What a pending candidate handed out again after a resume is compared with: the proposals indexed
        before it and the minima known now (its first worker may have been killed before comparing)."""
        reduced = reduced_for_matching(structure)
        key = self.initial_index.key(structure)
        return self._cells_to_compare(structure, key, reduced, lattice_minima(reduced), before=candidate_id)

    def _cells_to_compare(
        self,
        structure: Structure,
        key: tuple,
        reduced: Structure,
        minima,
        before: int | None = None,
        fingerprint=None,
    ) -> tuple[ArchivedCell, ...]:
        """The proposals and then the minima a structure must be compared with, the order ``screen``
        compares them in on rank 0; ``before`` limits the proposals to those of lower id."""
        entries = self.initial_index.comparisons(
            structure, key=key, reduced=reduced, minima=minima, before=before, fingerprint=fingerprint
        ) + self.relaxed_index.comparisons(structure, reduced=reduced, minima=minima, fingerprint=fingerprint)
        return tuple(entry.cell for entry in entries)

    def classify_minimum(self, evaluation: Evaluation) -> tuple[int | None, int | None]:
        """(duplicate_of, supersedes) for a relaxed structure.

        A match means the same minimum was found before. If this copy is relaxed to a lower enthalpy it
        becomes the minimum's representative (so best/ and the best-so-far show the lowest energy found),
        and the old representative is marked as its duplicate.
        """
        structure, energy, candidate_id = (
            evaluation.relaxed,
            evaluation.enthalpy_per_atom,
            evaluation.candidate_id,
        )
        reduced, minima = evaluation.relaxed_reduced, evaluation.relaxed_minima
        fingerprint = evaluation.relaxed_fingerprint
        if reduced is None:
            reduced = reduced_for_matching(structure)
            minima = fingerprint = None
        match = self.relaxed_index.find(
            structure, energy, reduced=reduced, minima=minima, fingerprint=fingerprint
        )
        if match is None:
            self.relaxed_index.add(candidate_id, structure, energy, reduced=reduced, fingerprint=fingerprint)
            return None, None
        if energy < self.relaxed_index.energy_of(match):
            self.relaxed_index.replace(
                match, candidate_id, structure, energy, reduced=reduced, fingerprint=fingerprint
            )
            return None, match
        return match, None

    def comparison_counts(self) -> tuple[int, int]:
        """(StructureMatcher calls, queries limited to the fingerprint-nearest entries) so far."""
        indexes = (self.initial_index, self.relaxed_index)
        return sum(i.fits for i in indexes), sum(i.bounded_queries for i in indexes)

    def lowest_minima(self, count: int) -> list[tuple]:
        """The ``count`` lowest unique minima as (id, structure, enthalpy) entries (DuplicateIndex.lowest)."""
        return self.relaxed_index.lowest(count)

"""Duplicate comparisons a worker makes before relaxing, so rank 0 never runs StructureMatcher on proposals.

Under MPI (and with a process pool) rank 0 only picks which archived structures a proposal could match:
the bucket, the lattice conditions and, past ``duplicates.max_comparisons``, the fingerprint-nearest
(globopt/duplicates.py). Their reduced cells travel with the task (``RelaxTask.compare_with``, each an
``ArchivedCell``) and the worker fits them, in rank 0's order, before it relaxes anything. A match comes
back as a ``duplicate`` outcome that cost no potential call, as if rank 0 had screened the proposal out,
only later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pymatgen.analysis.structure_matcher import StructureMatcher

from globopt.candidate import Evaluation, RelaxTask, Status
from globopt.duplicates import reduced_for_matching


@dataclass(frozen=True)
class MatchTolerances:
    """duplicates.ltol, stol and angle_tol of the run."""

    ltol: float = 0.2
    stol: float = 0.3
    angle_tol: float = 5.0


@functools.cache
def _matcher(tolerances: MatchTolerances) -> StructureMatcher:
    return StructureMatcher(
        ltol=tolerances.ltol, stol=tolerances.stol, angle_tol=tolerances.angle_tol,
        primitive_cell=True, scale=True,
    )  # fmt: skip


def duplicate_before_relaxing(task: RelaxTask, tolerances: MatchTolerances, worker: str) -> Evaluation | None:
    """The ``duplicate`` outcome of a task whose structure matches one it must be compared with, or None."""
    if not task.compare_with:
        return None
    reduced = reduced_for_matching(task.structure)
    matcher = _matcher(tolerances)
    for archived in task.compare_with:
        if len(archived.species) != len(reduced):
            continue
        if matcher.fit(reduced, archived.structure(), skip_structure_reduction=True):
            reason = f"same structure as candidate {archived.candidate_id}"
            return Evaluation(
                task.candidate_id, Status.DUPLICATE, reason, worker=worker, duplicate_of=archived.candidate_id
            )
    return None

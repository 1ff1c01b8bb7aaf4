"""The records that travel between search, scheduler, workers and archive."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure


class Status(StrEnum):
    """Outcome of one candidate. Only ``relaxed`` structures compete for best/; the rest say why not."""

    PENDING = "pending"  # issued to a worker, not finished (re-issued on resume)
    RELAXED = "relaxed"  # converged below fmax
    UNCONVERGED = "unconverged"  # hit max_steps; energy recorded, not ranked
    NAN = "nan"  # potential returned NaN/inf
    EXPLODED = "exploded"  # volume or energy ran out of physical bounds
    COLLAPSED = "collapsed"  # atoms closer than the minimum distance after/during relaxation
    FAILED = "failed"  # the calculator raised an error
    WORKER_DIED = "worker_died"  # the process relaxing it died, repeatedly
    REJECTED = "rejected"  # failed the geometry sanity check before relaxation (no potential call)
    DUPLICATE = "duplicate"  # matched an archived structure before relaxation (no potential call)
    SKIPPED = "skipped"  # ranked below another proposal by the surrogate, not relaxed (no potential call)
    STOPPED_EARLY = "stopped_early"  # cut short, heading above the best (projected energy in extra)

    @property
    def used_potential(self) -> bool:
        """Whether this outcome consumed a relaxation (and so counts against the evaluation budget)."""
        return self not in (Status.PENDING, Status.REJECTED, Status.DUPLICATE, Status.SKIPPED)


FINISHED_WITH_ENERGY = (Status.RELAXED, Status.UNCONVERGED)


@dataclass
class Screening:
    """What rank 0 needs to screen a structure, computed where the structure was made (a worker).

    The geometry verdict, the duplicate index's symmetry key and the reduced cell cost rank 0 several
    milliseconds per structure; built on a worker, they travel with the structure instead.
    """

    geometry_problem: str  # '' when the structure is sane
    key: tuple[str, int] | None  # duplicates.bucket_key; None when the geometry failed
    reduced: Structure | None  # duplicates.reduced_for_matching; None when the geometry failed
    minima: Any = None  # duplicates.lattice_minima of ``reduced`` (a numpy array), or None
    structure_json: str | None = (
        None  # structure_codec.structure_to_json of the structure, as the archive stores it
    )
    fingerprint: Any = None  # duplicates.structure_fingerprint of ``reduced`` (a numpy array), or None


@dataclass
class Proposal:
    """A structure a search algorithm wants evaluated, with where it came from."""

    structure: Structure
    origin: str  # e.g. "random:sg225"
    parents: tuple[int, ...] = ()
    screening: Screening | None = None  # precomputed on a worker (search/random_stream.py)


@dataclass
class RelaxTask:
    """Work for a worker: one candidate id and its starting structure."""

    candidate_id: int
    structure: Structure
    attempt: int = 1
    # best enthalpy per atom when the task was issued: early stopping compares against it (None: off)
    best_enthalpy_per_atom: float | None = None
    # lowest known minima when the task was issued (surrogates/known_minima.KnownMinimum): a relaxation
    # falling into one of them is stopped (empty: off)
    known_minima: tuple[Any, ...] = ()
    # random structures the worker builds after the relaxation, for rank 0's next proposals
    # (search/random_stream.RandomRecipe); never part of the archive
    generate: tuple[Any, ...] = ()
    # archived structures the worker compares this one with before relaxing it
    # (ArchivedCell, compared in evaluator/compare.py; empty when rank 0 screened it itself)
    compare_with: tuple[ArchivedCell, ...] = ()


@dataclass(frozen=True)
class ArchivedCell:
    """An archived structure's reduced cell (duplicates.reduced_for_matching) as plain arrays: pickling
    these costs rank 0 a small fraction of pickling pymatgen Structures."""

    candidate_id: int
    lattice: np.ndarray  # 3 x 3, rows are the cell vectors
    species: tuple[str, ...]
    frac_coords: np.ndarray  # n x 3

    @classmethod
    def of(cls, candidate_id: int, reduced: Structure) -> ArchivedCell:
        species = tuple(site.species_string for site in reduced)
        return cls(candidate_id, reduced.lattice.matrix.copy(), species, reduced.frac_coords.copy())

    def structure(self) -> Structure:
        return Structure(Lattice(self.lattice), list(self.species), self.frac_coords)


@dataclass
class Evaluation:
    """What a worker sends back about one relaxation."""

    candidate_id: int
    status: Status
    reason: str = ""
    relaxed: Structure | None = None
    energy: float | None = None  # eV, total
    energy_per_atom: float | None = None
    enthalpy_per_atom: float | None = None  # the fitness; equals energy_per_atom at zero pressure
    spacegroup: str | None = None
    spacegroup_number: int | None = None
    n_steps: int = 0
    n_force_calls: int = 0
    seconds: float = 0.0
    potential_seconds: float = 0.0
    worker: str = ""
    extra: dict = field(default_factory=dict)  # objective values etc., stored as JSON in the archive
    # the relaxed structure's reduced cell for the duplicate index (duplicates.reduced_for_matching),
    # computed on the worker so rank 0 does not; not stored
    relaxed_reduced: Structure | None = None
    relaxed_minima: Any = None  # duplicates.lattice_minima of relaxed_reduced (a numpy array), or None
    relaxed_fingerprint: Any = None  # duplicates.structure_fingerprint of relaxed_reduced, or None
    relaxed_json: str | None = None  # structure_codec.structure_to_json(relaxed), made on the worker
    generated: list[Any] = field(default_factory=list)  # built RelaxTask.generate recipes; not stored
    duplicate_of: int | None = None  # set by the engine: an earlier candidate that is the same minimum
    supersedes: int | None = None  # set by the engine: the same minimum found before, at a higher energy

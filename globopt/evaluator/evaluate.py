"""The worker half of the evaluator pipeline: relax one candidate and analyse the result.

Runs wherever the scheduler puts it (in-process, a pool process, an MPI rank). Everything it needs
travels in ``EvaluatorSettings`` (picklable), and the calculator is built once per process.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from globopt.candidate import Evaluation, RelaxTask, Status
from globopt.evaluator.compare import MatchTolerances, duplicate_before_relaxing
from globopt.evaluator.early_stop import EarlyStopper, EarlyStopSettings
from globopt.evaluator.known_minima import KnownMinimaSettings, KnownMinimaWatch
from globopt.evaluator.relax import RelaxOutcome, RelaxSettings, relax
from globopt.geometry import GeometryLimits, closest_pair_violation
from globopt.structure_codec import structure_to_json
from surrogates.potentials import PotentialBuildError, build_calculator

_FAILURE_STATUS = {
    "nan": Status.NAN,
    "exploded": Status.EXPLODED,
    "collapsed": Status.COLLAPSED,
    "error": Status.FAILED,
    "stopped_early": Status.STOPPED_EARLY,
}


# How often a rattle that pushes a pair below its limit is halved before the candidate relaxes unrattled.
RATTLE_HALVINGS = 3


@dataclass(frozen=True)
class EvaluatorSettings:
    potential: dict[str, Any]  # kind, model, calculator, calculator_kwargs, device
    relax: RelaxSettings  # includes the geometry guards (minimum distances, volume window)
    symprec: float = 0.1
    early_stop: EarlyStopSettings | None = None  # surrogate.early_stop; needs the task's best enthalpy
    known_minima: KnownMinimaSettings | None = None  # surrogate.early_stop.known_minima; the task's minima
    rattle: float = 0.0  # relax.rattle, Å
    seed: int = 0  # the run's seed: with the candidate id it fixes the rattle, so a re-issue repeats it
    batch_size: int | None = None  # relax.batch_size (None: auto); evaluator/batch_size.py decides
    match_tolerances: MatchTolerances = field(default_factory=MatchTolerances)  # duplicates.*: compare_with


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def prepare_worker(settings: EvaluatorSettings, torch_threads: int | None = None) -> None:
    """Pin thread counts and load the potential now, so the first candidate does not pay for it."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    build_calculator(**settings.potential)
    # Tasks may ask for random structures (RelaxTask.generate): importing pyxtal takes seconds, which must
    # not pass between two heartbeats of a task.
    import globopt.search.random_stream  # noqa: F401


def evaluate_task(
    task: RelaxTask, settings: EvaluatorSettings, on_step: Callable[[int, float], None] | None = None
) -> Evaluation:
    """What every worker runs for a task: the comparisons rank 0 left to it, then ``evaluate``."""
    between = None if on_step is None else (lambda: on_step(0, math.nan))
    duplicate = screen_on_worker(task, settings, between)
    return duplicate if duplicate is not None else evaluate(task, settings, on_step)


def screen_on_worker(
    task: RelaxTask, settings: EvaluatorSettings, between: Callable[[], None] | None
) -> Evaluation | None:
    """The task's ``duplicate`` outcome if it matches an archived structure it came with (the random
    structures it asks for are built all the same: rank 0 is waiting for them), else None."""
    duplicate = duplicate_before_relaxing(task, settings.match_tolerances, worker_label())
    if duplicate is not None:
        build_requested(task, settings, duplicate, between)
    return duplicate


def evaluate(
    task: RelaxTask, settings: EvaluatorSettings, on_step: Callable[[int, float], None] | None = None
) -> Evaluation:
    """Relax and analyse, then build the random structures the task asks for (rank 0's next proposals).

    Every failure becomes a status with a reason, never an exception. ``on_step(step, energy)`` is handed
    to relax(): MPI workers send heartbeats and honour stop requests from it, the local backends pass
    nothing.
    """
    calculator = _calculator(settings)
    atoms, stopper, watch = prepare(task, settings)
    outcome = relax(
        atoms, calculator, settings.relax, on_step=on_step, stopper=stopper, watch=watch,
        best_enthalpy_per_atom=task.best_enthalpy_per_atom,
    )  # fmt: skip
    result = analyse(task, settings, outcome)
    between = None if on_step is None else (lambda: on_step(0, math.nan))
    build_requested(task, settings, result, between)
    return result


def _calculator(settings: EvaluatorSettings):
    try:
        return build_calculator(**settings.potential)
    except Exception as exc:  # a broken model is the user's problem to fix; the engine reports and stops
        raise PotentialBuildError(f"cannot build the potential: {exc}") from exc


def build_requested(
    task: RelaxTask, settings: EvaluatorSettings, result: Evaluation, between: Callable[[], None] | None
) -> None:
    """Build the random structures the task asked for (RelaxTask.generate) into the result."""
    if task.generate:
        from globopt.search.random_stream import build_for_screening

        limits = GeometryLimits(settings.relax.min_distance, settings.relax.volume_per_atom_range)
        result.generated = build_for_screening(task.generate, limits, settings.symprec, between)


def prepare(task: RelaxTask, settings: EvaluatorSettings) -> tuple[Atoms, EarlyStopper | None, Any]:
    """The starting atoms (rattled), and the early stop and known-minima watch this task asks for."""
    atoms = AseAtomsAdaptor.get_atoms(task.structure)
    if settings.rattle > 0:
        atoms.positions += rattle_within_limits(atoms, settings, task.candidate_id)
    stopper = None
    if settings.early_stop is not None and task.best_enthalpy_per_atom is not None:
        stopper = EarlyStopper(settings.early_stop, task.best_enthalpy_per_atom, len(atoms))
    watch = None
    if settings.known_minima is not None and task.known_minima:
        watch = KnownMinimaWatch(settings.known_minima, task.known_minima)
    return atoms, stopper, watch


def analyse(task: RelaxTask, settings: EvaluatorSettings, outcome: RelaxOutcome) -> Evaluation:
    """The Evaluation of a finished relaxation: status, energies, space group, the reduced cell."""
    n_atoms = len(outcome.atoms)
    result = Evaluation(
        candidate_id=task.candidate_id,
        status=Status.RELAXED,
        n_steps=outcome.n_steps,
        n_force_calls=outcome.n_force_calls,
        seconds=outcome.seconds,
        potential_seconds=outcome.potential_seconds,
        worker=worker_label(),
    )
    if outcome.failure:
        result.status = _FAILURE_STATUS[outcome.failure]
        result.reason = outcome.reason
        if math.isfinite(outcome.energy):
            result.energy = outcome.energy
            result.energy_per_atom = outcome.energy / n_atoms
        if outcome.projected_enthalpy_per_atom is not None:
            result.extra["projected_enthalpy_per_atom"] = outcome.projected_enthalpy_per_atom
        if outcome.known_minimum is not None:
            result.extra["known_minimum"] = outcome.known_minimum
        return result
    relaxed = AseAtomsAdaptor.get_structure(outcome.atoms)
    result.relaxed = relaxed
    result.relaxed_json = structure_to_json(relaxed)  # serialised here rather than on rank 0
    result.energy = outcome.energy
    result.energy_per_atom = outcome.energy / n_atoms
    result.enthalpy_per_atom = outcome.enthalpy / n_atoms
    if not outcome.converged:
        result.status = Status.UNCONVERGED
        result.reason = f"max force {outcome.max_force:.3f} eV/Å after {outcome.n_steps} steps"
    result.spacegroup, result.spacegroup_number = spacegroup_of(relaxed, settings.symprec)
    if result.status is Status.RELAXED:  # rank 0 checks it against known minima: reduce it here
        from globopt.duplicates import lattice_minima, reduced_for_matching, structure_fingerprint

        try:
            result.relaxed_reduced = reduced_for_matching(relaxed)
            result.relaxed_minima = lattice_minima(result.relaxed_reduced)
            result.relaxed_fingerprint = structure_fingerprint(result.relaxed_reduced)
        except Exception:  # rank 0 reduces it itself, and reports what goes wrong there
            result.relaxed_reduced = result.relaxed_minima = result.relaxed_fingerprint = None
    return result


def rattle_displacements(seed: int, candidate_id: int, n_atoms: int, amplitude: float) -> np.ndarray:
    """The same displacements for a candidate wherever and however often it is relaxed (Å, (N, 3)).

    The archive keeps the structure as proposed; the rattle is a property of the relaxation, so it must be
    reproducible from the run seed and the candidate id alone.
    """
    return np.random.default_rng([seed % 2**63, candidate_id]).normal(0.0, amplitude, (n_atoms, 3))


def rattle_within_limits(atoms, settings: EvaluatorSettings, candidate_id: int) -> np.ndarray:
    """The candidate's rattle, scaled down until no pair ends below its minimum distance.

    A proposal that passed the geometry check with a pair just above its limit could otherwise be pushed
    below it by the rattle and be recorded as collapsed at step 0: a relaxation spent on nothing. The
    displacements keep their direction and are halved (at most RATTLE_HALVINGS times, then dropped), so
    the result is still a function of the run seed and the candidate id alone.
    """
    displacements = rattle_displacements(settings.seed, candidate_id, len(atoms), settings.rattle)
    if settings.relax.min_distance is None:
        return displacements
    limits = GeometryLimits(settings.relax.min_distance, settings.relax.volume_per_atom_range)
    cell, numbers, symbols = atoms.cell.array, atoms.numbers, atoms.get_chemical_symbols()
    inverse = np.linalg.inv(cell)
    for _ in range(RATTLE_HALVINGS + 1):
        frac = (atoms.positions + displacements) @ inverse
        if not closest_pair_violation(cell, frac, numbers, symbols, limits):
            return displacements
        displacements = 0.5 * displacements
    return np.zeros_like(displacements)


def spacegroup_of(structure, symprec: float) -> tuple[str | None, int | None]:
    try:
        analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
        return analyzer.get_space_group_symbol(), int(analyzer.get_space_group_number())
    except Exception:  # spglib gives up on badly distorted cells; the energy is still valid
        return None, None

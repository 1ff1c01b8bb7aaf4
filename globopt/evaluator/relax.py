"""Local relaxation of one structure with any ASE calculator, with the failure modes made explicit.

A global search throws thousands of random or mutated cells at the potential; some of them explode
(volume runs away), collapse (atoms fall into each other, a known failure of universal potentials far
from their training data), or produce NaN. Those must come back as a labelled outcome the archive can
record, never as an exception that ends the run, and they should be cut short as soon as they are
recognisable so they do not burn the step budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.optimize import BFGS, FIRE, LBFGS

from globopt.evaluator.cell_filter import FastFrechetCellFilter
from globopt.evaluator.early_stop import EarlyStopper
from globopt.evaluator.known_minima import KnownMinimaWatch
from globopt.geometry import GeometryLimits, closest_pair_violation
from surrogates.potentials import TimedCalculator

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}

# Energies per atom below this are not chemistry but a potential evaluated outside its domain
# (universal potentials are typically -1..-12 eV/atom).
ENERGY_FLOOR_EV_PER_ATOM = -30.0
# How often (in optimizer steps) the O(N^2) geometry guards run; NaN checks run every step.
GEOMETRY_CHECK_INTERVAL = 10


@dataclass(frozen=True)
class RelaxSettings:
    fmax: float = 0.05
    max_steps: int = 300
    pressure_gpa: float = 0.0
    optimizer: str = "FIRE"
    relax_cell: bool = True
    # geometry guards (absolute, computed by the caller from the composition)
    min_distance: np.ndarray | None = None  # pairwise minimum-distance matrix indexed like atomic numbers
    volume_per_atom_range: tuple[float, float] = (0.0, math.inf)


@dataclass
class RelaxOutcome:
    """What happened; ``failure`` is None for a relaxation that produced a usable structure."""

    atoms: Atoms
    energy: float  # eV, total (NaN when unavailable)
    n_steps: int
    converged: bool
    max_force: float
    n_force_calls: int
    potential_seconds: float
    seconds: float
    failure: str | None = None  # nan | exploded | collapsed | error | stopped_early
    reason: str = ""
    energies: list[float] = field(default_factory=list)
    pv: float = 0.0  # pressure x volume of the final cell, eV
    projected_enthalpy_per_atom: float | None = None  # where a stopped_early relaxation was heading
    known_minimum: int | None = None  # candidate id of the known minimum it was stopped falling into

    @property
    def enthalpy(self) -> float:
        return self.energy + self.pv


def relax(
    atoms: Atoms,
    calculator: Calculator,
    settings: RelaxSettings,
    on_step: Callable[[int, float], None] | None = None,
    stopper: EarlyStopper | None = None,
    watch: KnownMinimaWatch | None = None,
) -> RelaxOutcome:
    """Relax positions (and the cell, under the configured pressure) until fmax or max_steps.

    ``on_step(step, energy)`` runs after every optimiser step so the caller can show life without a
    thread (an MPI worker sends heartbeats from it) or cancel: an exception derived from BaseException
    but not Exception propagates, while an ordinary exception is recorded as an ``error`` outcome.
    ``stopper`` (early_stop.py) ends a relaxation heading clearly above the best enthalpy found so far as
    ``stopped_early``; ``watch`` (known_minima.py) ends one falling into a minimum the search has found
    already, also as ``stopped_early``.
    """
    start = time.perf_counter()
    atoms = atoms.copy()
    timed = TimedCalculator(calculator)
    atoms.calc = timed
    pressure = settings.pressure_gpa * units.GPa
    target = FastFrechetCellFilter(atoms, scalar_pressure=pressure) if settings.relax_cell else atoms
    optimizer = OPTIMIZERS[settings.optimizer](target, logfile=None)
    n_atoms = len(atoms)
    energies: list[float] = []
    enthalpies: list[float] = []
    failure: str | None = None
    reason = ""
    converged = False
    steps = 0
    try:
        for converged in optimizer.irun(fmax=settings.fmax, steps=settings.max_steps):
            steps = optimizer.nsteps
            energy = float(atoms.get_potential_energy())
            energies.append(energy)
            if on_step is not None:
                on_step(steps, energy)
            failure, reason = _guard(
                atoms, energy, n_atoms, settings, check_geometry=steps % GEOMETRY_CHECK_INTERVAL == 0
            )
            if failure or converged:
                break
            if stopper is not None:
                enthalpies.append(energy + pressure * atoms.get_volume())
                if stopper.hopeless(enthalpies):
                    failure = "stopped_early"
                    reason = (
                        f"projected {stopper.projected_per_atom:.3f} eV/atom after {steps} steps, more than "
                        f"{stopper.settings.margin} above the best {stopper.best_enthalpy_per_atom:.3f}"
                    )
                    break
            if watch is not None:
                enthalpy = energy + pressure * atoms.get_volume()
                minimum = watch.check(steps, atoms, enthalpy / n_atoms)
                if minimum is not None:
                    failure = "stopped_early"
                    reason = (
                        f"falling into known minimum {minimum.candidate_id} "
                        f"({minimum.enthalpy_per_atom:.4f} eV/atom) after {steps} steps"
                    )
                    break
        if not failure:
            failure, reason = _guard(atoms, float(atoms.get_potential_energy()), n_atoms, settings, True)
    except Exception as exc:  # a potential may raise anything on pathological input; record, never crash
        failure, reason = "error", f"{type(exc).__name__}: {exc}"

    energy = float("nan")
    max_force = float("nan")
    if failure not in ("error",):
        try:
            energy = float(atoms.get_potential_energy())
            max_force = float(np.abs(atoms.get_forces()).max()) if n_atoms else 0.0
        except Exception as exc:
            failure, reason = "error", f"{type(exc).__name__}: {exc}"
    final = atoms.copy()
    final.calc = None
    return RelaxOutcome(
        atoms=final,
        energy=energy,
        n_steps=steps,
        converged=bool(converged) and failure is None,
        max_force=max_force,
        n_force_calls=timed.calls,
        potential_seconds=timed.seconds,
        seconds=time.perf_counter() - start,
        failure=failure,
        reason=reason,
        energies=energies,
        pv=pressure * final.get_volume(),
        projected_enthalpy_per_atom=_projection(failure, stopper, watch),
        known_minimum=watch.entered.candidate_id if watch is not None and watch.entered else None,
    )


def _projection(failure: str | None, stopper: EarlyStopper | None, watch: KnownMinimaWatch | None):
    """Where a stopped relaxation was heading: the known minimum it fell into, or the stopper's estimate."""
    if failure != "stopped_early":
        return None
    if watch is not None and watch.entered is not None:
        return watch.entered.enthalpy_per_atom
    return stopper.projected_per_atom if stopper is not None else None


def _guard(
    atoms: Atoms, energy: float, n_atoms: int, settings: RelaxSettings, check_geometry: bool
) -> tuple[str | None, str]:
    if not math.isfinite(energy):
        return "nan", "potential returned a non-finite energy"
    forces = atoms.get_forces()
    if not np.all(np.isfinite(forces)):
        return "nan", "potential returned non-finite forces"
    if energy / n_atoms < ENERGY_FLOOR_EV_PER_ATOM:
        return (
            "exploded",
            f"energy {energy / n_atoms:.2f} eV/atom below {ENERGY_FLOOR_EV_PER_ATOM} (unphysical)",
        )
    volume_per_atom = atoms.get_volume() / n_atoms
    low, high = settings.volume_per_atom_range
    if volume_per_atom > high:
        return "exploded", f"volume {volume_per_atom:.1f} Å^3/atom above the limit {high:.1f}"
    if volume_per_atom < low:
        return "collapsed", f"volume {volume_per_atom:.1f} Å^3/atom below the limit {low:.1f}"
    if check_geometry and settings.min_distance is not None:
        limits = GeometryLimits(settings.min_distance, settings.volume_per_atom_range)
        problem = closest_pair_violation(
            atoms.cell.array, atoms.get_scaled_positions(wrap=False), atoms.numbers,
            atoms.get_chemical_symbols(), limits,
        )  # fmt: skip
        if problem:
            return "collapsed", problem
    return None, ""

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
    optimizer: str = "BFGS"
    relax_cell: bool = True
    # a relaxation that reaches max_steps this close (eV/atom) to the best enthalpy known when it started,
    # or with no best known yet, gets extend_steps more (0: never)
    extend_steps: int = 0
    extend_margin: float = 0.1
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
    best_enthalpy_per_atom: float | None = None,
) -> RelaxOutcome:
    """Relax positions (and the cell, under the configured pressure) until fmax or max_steps.

    ``on_step(step, energy)`` runs after every optimiser step so the caller can show life without a
    thread (an MPI worker sends heartbeats from it) or cancel: an exception derived from BaseException
    but not Exception propagates, while an ordinary exception is recorded as an ``error`` outcome.
    ``stopper`` (early_stop.py) ends a relaxation heading clearly above the best enthalpy found so far as
    ``stopped_early``; ``watch`` (known_minima.py) ends one falling into a minimum the search has found
    already, also as ``stopped_early``. ``best_enthalpy_per_atom`` (the best known when the task was issued)
    decides whether a relaxation that runs out of steps is promising enough to get ``extend_steps`` more.
    """
    relaxation = Relaxation(
        atoms, TimedCalculator(calculator), settings, on_step, stopper, watch, best_enthalpy_per_atom
    )
    while not relaxation.advance():
        pass
    return relaxation.outcome()


class Relaxation:
    """One relaxation as a sequence of optimiser steps, each started by the caller once the potential can
    answer for the current configuration.

    The loop is ASE's ``Dynamics.irun`` (initial evaluation, convergence check, then step / evaluate /
    check until converged or ``max_steps``), written out so that the evaluation can come from outside:
    :func:`relax` lets the calculator compute lazily, one structure at a time, while the batched driver
    (batch_relax.py) serves the results of one batched potential call to many relaxations in lockstep.
    Both therefore take the same steps, guards and early stops, structure by structure.
    """

    def __init__(
        self,
        atoms: Atoms,
        calculator: Calculator,
        settings: RelaxSettings,
        on_step: Callable[[int, float], None] | None = None,
        stopper: EarlyStopper | None = None,
        watch: KnownMinimaWatch | None = None,
        best_enthalpy_per_atom: float | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.best_enthalpy_per_atom = best_enthalpy_per_atom
        self.extended = False
        self.atoms = atoms.copy()
        self.atoms.calc = calculator
        self.calculator = calculator
        self.settings = settings
        self.on_step, self.stopper, self.watch = on_step, stopper, watch
        self.pressure = settings.pressure_gpa * units.GPa
        self.target = (
            FastFrechetCellFilter(self.atoms, scalar_pressure=self.pressure)
            if settings.relax_cell
            else self.atoms
        )
        self.optimizer = OPTIMIZERS[settings.optimizer](self.target, logfile=None)
        self.optimizer.fmax = settings.fmax
        self.optimizer.max_steps = settings.max_steps
        self.n_atoms = len(self.atoms)
        self.energies: list[float] = []
        self.enthalpies: list[float] = []
        self.failure: str | None = None
        self.reason = ""
        self.converged = False
        self.steps = 0
        self.finished = False
        # counted by the driver when it serves batched results; TimedCalculator counts the single path
        self.served_calls = 0
        self.served_seconds = 0.0

    def advance(self) -> bool:
        """Use the potential at the current configuration: check, guard, then move; True once finished.

        One call is one ``yield`` of ``irun`` and the step after it, so after a call that returns False
        the configuration has changed and the next call needs the potential there.
        """
        try:
            self.converged = bool(self.optimizer.converged())
            self.steps = steps = self.optimizer.nsteps
            energy = float(self.atoms.get_potential_energy())
            self.energies.append(energy)
            if self.on_step is not None:
                self.on_step(steps, energy)
            check_geometry = steps % GEOMETRY_CHECK_INTERVAL == 0
            self.failure, self.reason = _guard(
                self.atoms, energy, self.n_atoms, self.settings, check_geometry
            )
            if self.failure or self.converged or self._stopped_early(steps, energy):
                return self._finish()
            if steps >= self.optimizer.max_steps and not self._extend(energy):
                return self._finish()
            self.optimizer.step()
            self.optimizer.nsteps += 1
            return False
        except Exception as exc:  # a potential may raise anything on pathological input; record, never crash
            return self.fail(exc)

    def _extend(self, energy: float) -> bool:
        """Give a promising relaxation that ran out of steps ``extend_steps`` more, once.

        Structures of 10-30 atoms often need 300-700 optimiser steps, most of it slow cell and soft-mode
        convergence, and a relaxation cut off there cannot be ranked or bred from even when it is on its
        way to the lowest structure of the run. Extending every relaxation would spend that on hopeless
        ones too; one that is already within ``extend_margin`` of the best known enthalpy (or that starts
        before anything is known) is worth finishing.
        """
        settings = self.settings
        if self.extended or settings.extend_steps <= 0:
            return False
        enthalpy = (energy + self.pressure * self.atoms.get_volume()) / self.n_atoms
        best = self.best_enthalpy_per_atom
        if best is not None and enthalpy > best + settings.extend_margin:
            return False
        self.extended = True
        self.optimizer.max_steps += settings.extend_steps
        return True

    def fail(self, exc: Exception) -> bool:
        """End with an ``error`` outcome (the potential raised while evaluating this structure)."""
        self.failure, self.reason = "error", f"{type(exc).__name__}: {exc}"
        self.finished = True
        return True

    def _stopped_early(self, steps: int, energy: float) -> bool:
        stopper, watch = self.stopper, self.watch
        if stopper is not None:
            self.enthalpies.append(energy + self.pressure * self.atoms.get_volume())
            if stopper.hopeless(self.enthalpies):
                self.failure = "stopped_early"
                self.reason = (
                    f"projected {stopper.projected_per_atom:.3f} eV/atom after {steps} steps, more than "
                    f"{stopper.settings.margin} above the best {stopper.best_enthalpy_per_atom:.3f}"
                )
                return True
        if watch is not None:
            enthalpy = energy + self.pressure * self.atoms.get_volume()
            minimum = watch.check(steps, self.atoms, enthalpy / self.n_atoms)
            if minimum is not None:
                self.failure = "stopped_early"
                self.reason = (
                    f"falling into known minimum {minimum.candidate_id} "
                    f"({minimum.enthalpy_per_atom:.4f} eV/atom) after {steps} steps"
                )
                return True
        return False

    def _finish(self) -> bool:
        if not self.failure:
            energy = float(self.atoms.get_potential_energy())
            self.failure, self.reason = _guard(self.atoms, energy, self.n_atoms, self.settings, True)
        self.finished = True
        return True

    def outcome(self) -> RelaxOutcome:
        atoms, failure, reason = self.atoms, self.failure, self.reason
        energy = float("nan")
        max_force = float("nan")
        if failure != "error":
            try:
                energy = float(atoms.get_potential_energy())
                max_force = float(np.abs(atoms.get_forces()).max()) if self.n_atoms else 0.0
            except Exception as exc:
                failure, reason = "error", f"{type(exc).__name__}: {exc}"
        final = atoms.copy()
        final.calc = None
        timed = self.calculator if isinstance(self.calculator, TimedCalculator) else None
        return RelaxOutcome(
            atoms=final,
            energy=energy,
            n_steps=self.steps,
            converged=self.converged and failure is None,
            max_force=max_force,
            n_force_calls=timed.calls if timed else self.served_calls,
            potential_seconds=timed.seconds if timed else self.served_seconds,
            seconds=time.perf_counter() - self.started,
            failure=failure,
            reason=reason,
            energies=self.energies,
            pv=self.pressure * final.get_volume(),
            projected_enthalpy_per_atom=_projection(failure, self.stopper, self.watch),
            known_minimum=self.watch.entered.candidate_id
            if self.watch is not None and self.watch.entered
            else None,
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

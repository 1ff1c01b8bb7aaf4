"""Relaxation and its failure modes, with ASE's EMT as a cheap real potential."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from globopt.candidate import RelaxTask, Status
from globopt.evaluator.evaluate import EvaluatorSettings, evaluate
from globopt.evaluator.relax import RelaxSettings, relax
from globopt.geometry import geometry_limits, geometry_problem

LIMITS = geometry_limits(["Cu"], [4], 0.6, (0.4, 8.0))


def cu_cell(a: float = 3.75, rattle: float = 0.05):
    atoms = bulk("Cu", "fcc", a=a, cubic=True)
    atoms.rattle(rattle, seed=3)
    return atoms


def settings(**changes) -> RelaxSettings:
    base = {
        "fmax": 0.01,
        "max_steps": 400,
        "min_distance": LIMITS.min_distance,
        "volume_per_atom_range": LIMITS.volume_per_atom_range,
    }
    return RelaxSettings(**{**base, **changes})


class NaNAfter(EMT):
    """Fault injection: real EMT until call N, then NaN, as a diverging potential produces."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.count = 0

    def calculate(self, *args, **kwargs) -> None:
        super().calculate(*args, **kwargs)
        self.count += 1
        if self.count > self.n:
            self.results["energy"] = math.nan


class Raises(EMT):
    def calculate(self, *args, **kwargs) -> None:
        raise RuntimeError("segfault-like failure in the model")


def test_emt_copper_relaxes_to_its_lattice_constant() -> None:
    outcome = relax(cu_cell(), EMT(), settings())
    assert outcome.failure is None and outcome.converged
    a = outcome.atoms.cell.lengths().mean()
    assert a == pytest.approx(3.590, abs=0.01)  # EMT's fcc Cu lattice constant
    assert outcome.n_force_calls >= outcome.n_steps > 0
    assert 0 < outcome.potential_seconds <= outcome.seconds
    assert np.abs(outcome.atoms.cell.angles() - 90).max() < 0.5


def test_pressure_enters_enthalpy_and_compresses() -> None:
    free = relax(cu_cell(), EMT(), settings())
    squeezed = relax(cu_cell(), EMT(), settings(pressure_gpa=20.0))
    assert squeezed.atoms.get_volume() < free.atoms.get_volume()
    expected_pv = 20.0 * 0.006241509 * squeezed.atoms.get_volume()  # 1 GPa = 0.006241509 eV/Å^3
    assert squeezed.pv == pytest.approx(expected_pv, rel=1e-4)
    assert squeezed.enthalpy == pytest.approx(squeezed.energy + expected_pv)


def test_nan_energy_is_reported_not_raised() -> None:
    outcome = relax(cu_cell(), NaNAfter(5), settings())
    assert outcome.failure == "nan"
    assert "non-finite" in outcome.reason


def test_calculator_exception_is_reported() -> None:
    outcome = relax(cu_cell(), Raises(), settings())
    assert outcome.failure == "error"
    assert "segfault-like" in outcome.reason


def test_runaway_expansion_is_stopped_as_exploded() -> None:
    # 40 GPa of tension tears the crystal apart: the volume guard must stop it well before max_steps.
    outcome = relax(cu_cell(), EMT(), settings(pressure_gpa=-40.0, max_steps=2000))
    assert outcome.failure == "exploded", outcome.reason
    assert outcome.n_steps < 2000


def test_squashed_cell_is_reported_as_collapsed() -> None:
    outcome = relax(cu_cell(a=2.2), EMT(), settings(max_steps=1))
    assert outcome.failure == "collapsed"
    assert "below" in outcome.reason


def test_geometry_check_names_the_offending_pair() -> None:
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = cu_cell(rattle=0)
    atoms.positions[1] = atoms.positions[0] + [0.5, 0.0, 0.0]
    problem = geometry_problem(AseAtomsAdaptor.get_structure(atoms), LIMITS)
    assert "atoms 0 (Cu) and 1 (Cu) are 0.500 Å apart" in problem
    assert geometry_problem(AseAtomsAdaptor.get_structure(cu_cell()), LIMITS) == ""


def test_a_pair_just_below_its_limit_never_reads_as_equal_to_it() -> None:
    from pymatgen.core import Lattice, Structure

    allowed = float(LIMITS.min_distance[29, 29])
    for gap in (1e-4, 4e-4, 9e-4):
        distance = allowed - gap
        pair = Structure(Lattice.cubic(4.0), ["Cu", "Cu"], [[0, 0, 0], [distance / 4.0, 0, 0]])
        problem = geometry_problem(pair, LIMITS)
        shown = [
            float(word) for word in problem.replace("Å", " ").split() if word[0].isdigit() and "." in word
        ]
        assert shown[0] < shown[1], problem


def test_evaluate_maps_outcomes_to_statuses() -> None:
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(cu_cell())
    emt = {"kind": "emt", "model": "", "calculator": None, "calculator_kwargs": {}, "device": "cpu"}
    good = evaluate(RelaxTask(1, structure), EvaluatorSettings(emt, settings()))
    assert good.status is Status.RELAXED
    assert good.spacegroup == "Fm-3m" and good.spacegroup_number == 225
    assert good.enthalpy_per_atom == pytest.approx(good.energy / 4)
    short = evaluate(RelaxTask(2, structure), EvaluatorSettings(emt, settings(max_steps=2)))
    assert short.status is Status.UNCONVERGED and "after 2 steps" in short.reason
    blown = evaluate(RelaxTask(3, structure), EvaluatorSettings(emt, settings(pressure_gpa=-40.0)))
    assert blown.status is Status.EXPLODED and blown.relaxed is None


def test_rattle_lets_a_symmetric_saddle_relax_and_is_reproducible() -> None:
    """Simple-cubic Cu has zero forces and isotropic stress by symmetry: FIRE keeps it cubic on a saddle
    0.45 eV/atom above close packing. relax.rattle breaks the symmetry, and the same candidate id gets the
    same displacements wherever it is relaxed (a re-issued task repeats its relaxation exactly)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(bulk("Cu", "sc", a=2.4) * (2, 2, 2))
    emt = {"kind": "emt", "model": "", "calculator": None, "calculator_kwargs": {}, "device": "cpu"}
    plain = evaluate(RelaxTask(1, structure), EvaluatorSettings(emt, settings()))
    assert plain.status is Status.RELAXED and plain.spacegroup == "Pm-3m"
    rattled = [evaluate(RelaxTask(1, structure), EvaluatorSettings(emt, settings(), rattle=0.05, seed=3))]
    rattled.append(evaluate(RelaxTask(1, structure), EvaluatorSettings(emt, settings(), rattle=0.05, seed=3)))
    assert rattled[0].status is Status.RELAXED
    assert rattled[0].energy_per_atom < plain.energy_per_atom - 0.3
    assert rattled[0].spacegroup in ("P6_3/mmc", "Fm-3m")  # close packed
    assert rattled[1].energy == rattled[0].energy and rattled[1].n_steps == rattled[0].n_steps
    other = evaluate(RelaxTask(2, structure), EvaluatorSettings(emt, settings(), rattle=0.05, seed=3))
    assert other.n_steps != rattled[0].n_steps or other.energy != rattled[0].energy


def test_the_rattle_never_pushes_a_pair_below_its_limit() -> None:
    """A proposal with a pair just above its minimum distance is relaxed, not recorded as collapsed."""
    from pymatgen.core import Lattice, Structure

    from globopt.evaluator.evaluate import rattle_displacements, rattle_within_limits
    from globopt.geometry import closest_pair_violation

    allowed = float(LIMITS.min_distance[29, 29])
    # atom 3 sits 0.4% beyond its minimum distance from atom 0, well clear of the others
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [1.004 * allowed / 4.4, 0, 0]])
    structure = Structure(Lattice.cubic(4.4), ["Cu"] * 4, frac)
    assert geometry_problem(structure, LIMITS) == ""
    emt = {"kind": "emt", "model": "emt"}
    atoms = bulk("Cu", "fcc", a=4.4, cubic=True)
    atoms.set_scaled_positions(frac)
    cell, numbers, symbols = atoms.cell.array, atoms.numbers, atoms.get_chemical_symbols()
    raw_collapses = 0
    for candidate_id in range(1, 13):
        evaluator = EvaluatorSettings(emt, settings(max_steps=5), rattle=0.05, seed=11)
        raw = (atoms.positions + rattle_displacements(11, candidate_id, 4, 0.05)) @ np.linalg.inv(cell)
        raw_collapses += bool(closest_pair_violation(cell, raw, numbers, symbols, LIMITS))
        kept = (atoms.positions + rattle_within_limits(atoms, evaluator, candidate_id)) @ np.linalg.inv(cell)
        assert closest_pair_violation(cell, kept, numbers, symbols, LIMITS) == ""
        outcome = evaluate(RelaxTask(candidate_id, structure), evaluator)
        assert outcome.status is not Status.COLLAPSED, outcome.reason
    assert raw_collapses >= 2  # the unscaled rattle would have wasted these relaxations


def test_a_promising_relaxation_that_runs_out_of_steps_is_extended_once() -> None:
    """Cut off after 3 steps: extended and converged when nothing better is known or it is within the margin
    of the best; left unconverged when the best known is far below it."""
    limited = settings(max_steps=3, extend_steps=400, extend_margin=0.1)
    fresh = relax(cu_cell(), EMT(), limited)
    assert fresh.converged and fresh.n_steps > 3
    close = relax(cu_cell(), EMT(), limited, best_enthalpy_per_atom=fresh.energy / 4 - 0.05)
    assert close.converged
    hopeless = relax(cu_cell(), EMT(), limited, best_enthalpy_per_atom=fresh.energy / 4 - 1.0)
    assert not hopeless.converged and hopeless.n_steps == 3
    once = relax(cu_cell(), EMT(), settings(max_steps=2, extend_steps=2))
    assert not once.converged and once.n_steps == 4  # extended by 2, then no more


def test_the_exact_state_check_agrees_with_ases_comparison() -> None:
    """The cheap state check of relaxation calculators must recompute exactly when ASE's would."""
    from ase.calculators.calculator import compare_atoms

    from surrogates.potentials import exact_system_changes

    reference = bulk("Cu", "fcc", a=3.6, cubic=True)
    moved = reference.copy()
    moved.positions[1, 0] += 1e-9
    strained = reference.copy()
    strained.set_cell(reference.cell * 1.001, scale_atoms=False)
    open_cell = reference.copy()
    open_cell.pbc = (True, True, False)
    swapped = reference.copy()
    swapped.numbers[0] = 79
    magnetic = reference.copy()
    magnetic.set_initial_magnetic_moments([1.0] * len(reference))
    for atoms in (reference.copy(), moved, strained, open_cell, swapped, magnetic):
        assert sorted(exact_system_changes(reference, atoms)) == sorted(compare_atoms(reference, atoms))
    assert sorted(exact_system_changes(None, reference)) == sorted(compare_atoms(None, reference))

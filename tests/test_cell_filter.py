"""FastFrechetCellFilter must be indistinguishable from ASE's FrechetCellFilter, only faster.

The optimiser sees nothing but ``get_positions``/``get_forces``/``set_positions``, so equality of those
(to ~1e-9 relative, i.e. far below anything that changes a FIRE trajectory) on varied cells and filter
options, plus an end-to-end relaxation, is the contract. The fallback to scipy is checked separately
because realistic deformation gradients never reach it.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from scipy.linalg import expm, expm_frechet, logm

from globopt.evaluator.cell_filter import (
    FastFrechetCellFilter,
    _decompose,
    expm_frechet_log_pullback,
    logm_3x3,
)

RTOL = 1e-9


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Relative to the array's largest entry: near-zero components cannot be compared entrywise."""
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    deviation = float(np.max(np.abs(actual - expected))) / scale
    assert deviation <= RTOL, f"{what}: relative deviation {deviation:.3e}"


def _cu4(seed: int) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def _cu8(seed: int) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=seed)
    return atoms


def _triclinic8(seed: int) -> Atoms:
    """A mixed Cu/Ni/Al cell with no symmetry, so every strain component is active."""
    rng = np.random.default_rng(seed)
    cell = np.array([[4.9, 0.0, 0.0], [1.3, 5.1, 0.0], [0.8, -1.1, 4.7]])
    symbols = ["Cu", "Ni", "Al", "Cu", "Ni", "Cu", "Al", "Cu"]
    return Atoms(symbols, scaled_positions=rng.random((8, 3)), cell=cell, pbc=True)


def _ref_pullback(matrix: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """ASE's definition: nine scipy Frechet derivatives contracted with the weight."""
    log_matrix = logm(matrix)
    out = np.zeros((3, 3))
    for m, n in product(range(3), repeat=2):
        direction = np.zeros((3, 3))
        direction[m, n] = 1.0
        out[m, n] = np.sum(expm_frechet(log_matrix, direction, compute_expm=False) * weight)
    return out


def _compare_filters(atoms: Atoms, strain: np.ndarray, rng: np.random.Generator, **kwargs: object) -> None:
    """Deform the cell away from the reference, compare both filters, then move via set_positions twice."""
    atoms.calc = EMT()
    ref = FrechetCellFilter(atoms, **kwargs)
    fast = FastFrechetCellFilter(atoms, **kwargs)  # same Atoms: both see identical cells and positions
    atoms.set_cell(atoms.cell @ strain, scale_atoms=True)
    natoms = len(atoms)

    for mover in (ref, fast, None):
        deform_grad = fast.deform_grad()
        if np.linalg.norm(deform_grad - np.eye(3)) > 1e-8:
            assert _decompose(deform_grad) is not None, "case meant for the eigen path fell back"
        _assert_close(fast.get_positions(), ref.get_positions(), "positions")
        _assert_close(fast.get_forces(), ref.get_forces(), "forces")
        np.testing.assert_allclose(fast.stress, ref.stress, rtol=RTOL, atol=1e-12)
        if mover is None:
            break
        new = mover.get_positions()
        new[:natoms] += rng.normal(scale=0.02, size=(natoms, 3))
        new[natoms:] += mover.exp_cell_factor * rng.normal(scale=0.03, size=(3, 3))
        mover.set_positions(new)


SHEAR = np.array([[1.0, 0.35, 0.12], [0.04, 1.06, 0.28], [0.02, -0.05, 0.93]])
CASES = {
    "cu4": (_cu4, np.eye(3) + 0.04 * np.array([[1.0, 0.3, -0.2], [0.1, -0.5, 0.2], [0.0, 0.4, 0.8]]), {}),
    "triclinic8": (_triclinic8, np.eye(3) + 0.03 * np.arange(9.0).reshape(3, 3) / 8.0, {}),
    "strong_shear": (_cu8, SHEAR, {}),
    "hydrostatic": (_triclinic8, SHEAR, {"hydrostatic_strain": True}),
    "pressure": (_cu8, np.diag([1.05, 0.97, 1.02]), {"scalar_pressure": 1.0 * units.GPa}),
    "constant_volume_mask": (
        _triclinic8,
        SHEAR,
        {"constant_volume": True, "mask": [1, 1, 0, 1, 1, 1], "exp_cell_factor": 3.0},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_ase_filter(name: str) -> None:
    build, strain, kwargs = CASES[name]
    rng = np.random.default_rng(list(CASES).index(name))  # stable seed per case
    _compare_filters(build(seed=7), strain, rng, **kwargs)


@pytest.mark.parametrize(
    "deform_grad",
    [
        np.array([[1.0, 1e-12, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),  # Jordan-like, near-defective
        np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),  # exact simple shear: defective
    ],
)
def test_fallback_matches_ase_filter(deform_grad: np.ndarray) -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)  # diagonal reference cell: F is reproduced exactly
    atoms.rattle(0.05, seed=3)
    atoms.calc = EMT()
    ref = FrechetCellFilter(atoms)
    fast = FastFrechetCellFilter(atoms)
    atoms.set_cell(atoms.cell @ deform_grad.T, scale_atoms=True)
    assert _decompose(fast.deform_grad()) is None
    _assert_close(fast.get_positions(), ref.get_positions(), "positions")
    _assert_close(fast.get_forces(), ref.get_forces(), "forces")
    assert _decompose(deform_grad) is None
    _assert_close(logm_3x3(deform_grad), logm(deform_grad), "logm")
    weight = np.random.default_rng(0).normal(size=(3, 3))
    _assert_close(expm_frechet_log_pullback(deform_grad, weight), _ref_pullback(deform_grad, weight), "L")


def test_matrix_functions_match_scipy_including_complex_eigenvalues() -> None:
    rng = np.random.default_rng(11)
    rotation_like = expm(np.array([[0.0, -0.4, 0.1], [0.4, 0.0, -0.2], [-0.1, 0.2, 0.0]]))
    matrices = [expm(0.2 * rng.normal(size=(3, 3))) for _ in range(20)] + [
        rotation_like @ np.diag([1.1, 0.9, 1.0]),
        np.eye(3),
        1.07 * np.eye(3),
    ]
    n_complex = 0
    for matrix in matrices:
        assert _decompose(matrix) is not None
        n_complex += bool(np.any(np.linalg.eigvals(matrix).imag != 0))
        scale = max(float(np.abs(logm(matrix)).max()), 1e-3)  # logm(I) = 0: compare absolutely there
        assert np.abs(logm_3x3(matrix) - logm(matrix)).max() <= RTOL * scale
        _assert_close(logm_3x3(matrix, scale=8.0), logm(8.0 * matrix), "scaled logm")
        weight = rng.normal(size=(3, 3))
        _assert_close(expm_frechet_log_pullback(matrix, weight), _ref_pullback(matrix, weight), "pullback")
    assert n_complex >= 3  # the complex-eigenpair branch was exercised


RELAX_STRAIN = np.eye(3) + 0.04 * np.array([[1.0, 0.5, 0.0], [0.2, -1.0, 0.3], [0.0, 0.1, 0.5]])


def test_fire_relaxation_same_as_ase() -> None:
    results = []
    for cls in (FrechetCellFilter, FastFrechetCellFilter):
        atoms = _cu8(seed=1)
        atoms.set_cell(atoms.cell @ RELAX_STRAIN, scale_atoms=True)
        atoms.calc = EMT()
        opt = FIRE(cls(atoms), logfile=None)
        assert opt.run(fmax=0.01, steps=1000)
        results.append((atoms.get_potential_energy(), opt.nsteps))
    (e_ref, n_ref), (e_fast, n_fast) = results
    assert abs(e_fast - e_ref) < 1e-6
    assert abs(n_fast - n_ref) <= 1

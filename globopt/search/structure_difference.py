"""The difference of two crystal structures, and a crystal plus a difference: the space a PSO moves in.

A structure difference ``y - x`` (``structure_step``): both cells are Niggli reduced, y's basis is replaced
by the unimodular combination (entries -1..1) whose shape best matches x's, and the lattice part is the
symmetric log-strain taking x's metric to y's (rotation free, 6 numbers). Atoms of each species are paired
by the Hungarian assignment (scipy ``linear_sum_assignment``) on minimum-image distances. Origin shifts
that put an atom of the rarest species onto each of its counterparts (at most ``MAX_ANCHORS``) are scored
for every near-equivalent basis at once; the best few are refined by alternating assignment and mean
shift. The per-atom displacements (Cartesian, in x's frame and atom order) have their mean removed, since
a rigid translation is no change at all. Only right-handed bases are used, so a full step lands on y
itself, never on its mirror image.

``x + v`` (``apply_step``) strains x's cell by exp(E) and adds the displacements; ``symmetrized`` then
averages the result over the symmetry operations spglib finds at a loose tolerance, which keeps a moved
structure in the symmetric subspace it nearly has without changing the number or order of atoms.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import spglib
from pymatgen.core import Lattice, Structure
from scipy.optimize import linear_sum_assignment

# Velocity clamp: no atom is displaced further than this in one move (Å) ...
MAX_DISPLACEMENT = 2.0
# ... and no principal log-strain of the cell exceeds this (about +-35 % per move).
MAX_STRAIN = 0.3
# spglib tolerance for re-symmetrising x + v (Å): loose enough to restore the symmetry a move nearly keeps.
SYMPREC = 0.1
# Two cell bases count as equally good matches when their relative metric mismatch differs by less.
BASIS_TOLERANCE = 0.05
MAX_BASES = 24
# Origin shifts tried per basis (anchor atoms of the rarest species), and how many of the best
# (basis, shift) pairs get alternating assignment / shift refinement rounds.
MAX_ANCHORS = 12
REFINED_TRIALS = 4
SHIFT_ROUNDS = 2

_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)


def _unimodular_matrices() -> np.ndarray:
    """3x3 integer matrices with entries in {-1, 0, 1} and determinant +1: right-handed basis changes.

    Determinant -1 would also give the same lattice, but laying the target over a left-handed basis
    describes its mirror image, so the step would lead to the enantiomorph instead of the target.
    """
    matrices = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=float).reshape(-1, 3, 3)
    return matrices[np.isclose(np.linalg.det(matrices), 1.0)]


_UNIMODULAR = _unimodular_matrices()


def niggli_reduced(structure: Structure) -> Structure:
    """Niggli-reduced cell with the atom order kept (velocities are indexed by atom) and orientation kept."""
    lattice = structure.lattice.get_niggli_reduced_lattice()
    species = [str(site.specie) for site in structure]
    return Structure(lattice, species, structure.cart_coords, coords_are_cartesian=True, to_unit_cell=True)


# -- the difference space --------------------------------------------------------------------------------
@dataclass
class Step:
    """A difference of two structures of the same content, expressed on the first one.

    ``strain``: symmetric 3x3 log-strain in the reference's Cartesian frame; ``displacement``: (n, 3)
    Cartesian displacements in Å, in the reference's atom order, mean removed. Steps add and scale like
    vectors, which is all the PSO update needs.
    """

    strain: np.ndarray
    displacement: np.ndarray

    def __add__(self, other: Step) -> Step:
        return Step(self.strain + other.strain, self.displacement + other.displacement)

    def __mul__(self, factor: float) -> Step:
        return Step(self.strain * factor, self.displacement * factor)

    __rmul__ = __mul__

    @classmethod
    def zero(cls, n_atoms: int) -> Step:
        return cls(np.zeros((3, 3)), np.zeros((n_atoms, 3)))

    def clamped(self) -> Step:
        """Velocity clamp of classic PSO, applied as a uniform scale so the direction is kept."""
        longest = float(np.linalg.norm(self.displacement, axis=1).max(initial=0.0))
        scale_d = min(1.0, MAX_DISPLACEMENT / longest) if longest > 0 else 1.0
        largest = float(np.abs(np.linalg.eigvalsh(self.strain)).max())
        scale_e = min(1.0, MAX_STRAIN / largest) if largest > 0 else 1.0
        return Step(self.strain * scale_e, self.displacement * scale_d)

    def size(self, volume_per_atom: float) -> float:
        """RMS length in Å: atom displacements plus strain times the typical interatomic length."""
        length = volume_per_atom ** (1.0 / 3.0)
        mean_sq = float((self.displacement**2).sum(axis=1).mean()) if len(self.displacement) else 0.0
        return math.sqrt(mean_sq + (length * float(np.linalg.norm(self.strain))) ** 2)

    def to_state(self) -> dict[str, Any]:
        return {"strain": self.strain.tolist(), "displacement": self.displacement.tolist()}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Step:
        return cls(np.array(data["strain"], dtype=float), np.array(data["displacement"], dtype=float))


def _sym_function(matrix: np.ndarray, func) -> np.ndarray:
    """f(A) of a symmetric matrix through its eigen-decomposition (log, exp, sqrt of metrics)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * func(values)) @ vectors.T


def _log_strain(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Symmetric E with reference @ exp(E) having target's metric (rows are lattice vectors)."""
    b = np.linalg.solve(reference, target)  # reference @ b == target
    return _sym_function(b @ b.T, lambda w: 0.5 * np.log(w))


def _candidate_bases(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Unimodular M for which M @ target is a basis shaped like the reference, best first."""
    g_ref = reference @ reference.T
    g_tgt = target @ target.T
    scale = (abs(np.linalg.det(reference)) / abs(np.linalg.det(target))) ** (2.0 / 3.0)
    mapped = scale * np.einsum("kij,jl,kml->kim", _UNIMODULAR, g_tgt, _UNIMODULAR)
    mismatch = np.linalg.norm(mapped - g_ref, axis=(1, 2)) / np.trace(g_ref)
    order = np.argsort(mismatch, kind="stable")
    close = order[mismatch[order] <= mismatch[order[0]] + BASIS_TOLERANCE][:MAX_BASES]
    return _UNIMODULAR[close]


def _min_image(delta: np.ndarray, lattice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shortest periodic images of fractional differences (..., 3): (fractional vectors, squared Å)."""
    delta = delta - np.round(delta)
    images = delta[..., None, :] + _IMAGES
    squared = ((images @ lattice) ** 2).sum(axis=-1)
    best = squared.argmin(axis=-1)
    chosen = np.take_along_axis(images, best[..., None, None], axis=-2)[..., 0, :]
    return chosen, np.take_along_axis(squared, best[..., None], axis=-1)[..., 0]


def _assign(
    ref: np.ndarray, tgt: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray]], lattice: np.ndarray
) -> tuple[np.ndarray, float]:
    """Pair atoms of each species optimally; (fractional displacements in reference order, cost in Å^2)."""
    delta = np.zeros_like(ref)
    cost = 0.0
    for ref_idx, tgt_idx in groups:
        vectors, squared = _min_image(tgt[tgt_idx][None, :, :] - ref[ref_idx][:, None, :], lattice)
        rows, cols = linear_sum_assignment(squared)
        delta[ref_idx[rows]] = vectors[rows, cols]
        cost += float(squared[rows, cols].sum())
    return delta, cost


def _shift_costs(
    ref: np.ndarray,
    tgt: np.ndarray,
    groups: list[tuple[np.ndarray, np.ndarray]],
    lattice: np.ndarray,
    shifts: np.ndarray,
) -> np.ndarray:
    """Assignment cost (Å^2) for each trial origin shift, with the distances computed for all at once."""
    costs = np.zeros(len(shifts))
    for ref_idx, tgt_idx in groups:
        delta = tgt[tgt_idx][None, None, :, :] - shifts[:, None, None, :] - ref[ref_idx][None, :, None, :]
        _, squared = _min_image(delta, lattice)
        for k, matrix in enumerate(squared):
            rows, cols = linear_sum_assignment(matrix)
            costs[k] += matrix[rows, cols].sum()
    return costs


def _refine(
    ref: np.ndarray,
    tgt: np.ndarray,
    groups: list[tuple[np.ndarray, np.ndarray]],
    lattice: np.ndarray,
    shift: np.ndarray,
) -> tuple[np.ndarray, float]:
    """Alternate assignment and mean-displacement shift; (displacements with mean removed, cost in Å^2)."""
    for _ in range(SHIFT_ROUNDS):
        delta, _ = _assign(ref, tgt - shift, groups, lattice)
        shift = shift + delta.mean(axis=0)
    delta, cost = _assign(ref, tgt - shift, groups, lattice)
    return delta - delta.mean(axis=0), cost


def _strain_cost(reference: Structure, strain: np.ndarray) -> float:
    """Strain in the units of the assignment cost (Å^2): as if every atom moved by strain x bond length."""
    length_sq = (reference.volume / len(reference)) ** (2.0 / 3.0)
    return len(reference) * length_sq * float((strain**2).sum())


@dataclass
class _Trial:
    """One way of laying the target over the reference: cell basis, origin shift and its rough cost."""

    score: float
    strain: np.ndarray
    frac: np.ndarray  # target fractional coordinates in the chosen basis
    shift: np.ndarray


def _trials(reference: Structure, target: Structure, groups) -> list[_Trial]:
    """Every near-equivalent basis combined with anchor shifts (an atom of the rarest species onto each
    of its counterparts), scored by assignment cost plus strain cost, best first."""
    ref_lattice = reference.lattice.matrix
    ref_frac = reference.frac_coords
    ref_anchors, tgt_anchors = min(groups, key=lambda group: len(group[0]))
    trials = []
    for basis in _candidate_bases(ref_lattice, target.lattice.matrix):
        strain = _log_strain(ref_lattice, basis @ target.lattice.matrix)
        tgt_frac = target.frac_coords @ np.linalg.inv(basis)
        shifts = tgt_frac[tgt_anchors[:MAX_ANCHORS]] - ref_frac[ref_anchors[0]]
        strain_cost = _strain_cost(reference, strain)
        costs = _shift_costs(ref_frac, tgt_frac, groups, ref_lattice, shifts)
        trials += [
            _Trial(float(c) + strain_cost, strain, tgt_frac, s) for c, s in zip(costs, shifts, strict=True)
        ]
    trials.sort(key=lambda trial: trial.score)
    return trials


def structure_step(reference: Structure, target: Structure) -> Step:
    """``target - reference`` in the PSO space (see the module docstring); reference should be reduced.

    Raises ValueError when the two cells do not hold the same atoms.
    """
    ref_species = np.array([str(site.specie) for site in reference])
    tgt_species = np.array([str(site.specie) for site in target])
    if sorted(ref_species) != sorted(tgt_species):
        raise ValueError("a step exists only between cells of the same content")
    target = niggli_reduced(target)
    groups = [(np.flatnonzero(ref_species == s), np.flatnonzero(tgt_species == s)) for s in set(ref_species)]
    groups.sort(key=lambda group: (len(group[0]), group[0][0]))
    ref_lattice = reference.lattice.matrix
    best: tuple[float, Step] | None = None
    for trial in _trials(reference, target, groups)[:REFINED_TRIALS]:
        delta, cost = _refine(reference.frac_coords, trial.frac, groups, ref_lattice, trial.shift)
        score = cost + _strain_cost(reference, trial.strain)
        if best is None or score < best[0]:
            best = (score, Step(trial.strain, delta @ ref_lattice))
    assert best is not None
    return best[1]


def apply_step(structure: Structure, step: Step) -> Structure:
    """``structure + step``: strain the cell, then displace the atoms (fractions follow the new cell)."""
    lattice = structure.lattice.matrix
    frac = structure.frac_coords + step.displacement @ np.linalg.inv(lattice)
    new_lattice = lattice @ _sym_function(step.strain, np.exp)
    species = [str(site.specie) for site in structure]
    return Structure(Lattice(new_lattice), species, frac, to_unit_cell=True)


def structure_distance(a: Structure, b: Structure) -> float:
    """RMS size (Å) of the step from a to b: how far apart two structures are in the PSO space."""
    reduced = niggli_reduced(a)
    return structure_step(reduced, b).size(reduced.volume / len(reduced))


# -- symmetry ---------------------------------------------------------------------------------------------
def _operation_permutation(
    frac: np.ndarray,
    numbers: np.ndarray,
    operation: tuple[np.ndarray, np.ndarray],
    lattice: np.ndarray,
    tolerance: float,
) -> np.ndarray | None:
    """Atom j that atom i lands on under one operation, or None when the images do not permute the atoms."""
    rotation, translation = operation
    images = frac @ rotation.T + translation
    _, squared = _min_image(images[:, None, :] - frac[None, :, :], lattice)
    squared = np.where(numbers[:, None] == numbers[None, :], squared, np.inf)
    target = squared.argmin(axis=1)
    if len(set(target.tolist())) != len(frac) or squared.min(axis=1).max() > tolerance**2:
        return None
    return target


def symmetrized(structure: Structure, symprec: float = SYMPREC) -> Structure:
    """Average metric and positions over the operations spglib finds at ``symprec``.

    The average over a group is exactly invariant under it, so the result has (at least) that space group,
    with the same cell, atom count and atom order. Returns the input when no non-trivial symmetry is found.
    """
    lattice = structure.lattice.matrix
    frac = structure.frac_coords
    numbers = np.array(structure.atomic_numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = spglib.get_symmetry((lattice, frac, numbers), symprec=symprec)
    if not found or len(found["rotations"]) <= 1:
        return structure
    rotations = np.asarray(found["rotations"], dtype=float)
    translations = np.asarray(found["translations"], dtype=float)
    metric = lattice @ lattice.T
    averaged_metric = np.einsum("kji,jl,klm->im", rotations, metric, rotations) / len(rotations)
    new_lattice = _sym_function(averaged_metric, np.sqrt) @ _sym_function(metric, lambda w: w**-0.5) @ lattice
    estimate = np.zeros_like(frac)
    for rotation, translation in zip(rotations, translations, strict=True):
        target = _operation_permutation(frac, numbers, (rotation, translation), new_lattice, 3 * symprec)
        if target is None:
            return structure
        images = frac @ rotation.T + translation
        shifts = np.round(images - frac[target])
        estimate += (frac[target] + shifts - translation) @ np.linalg.inv(rotation).T
    species = [str(site.specie) for site in structure]
    return Structure(Lattice(new_lattice), species, estimate / len(rotations), to_unit_cell=True)


def symmetric_move(
    structure: Structure, rng: np.random.Generator, amplitude: float, strain: float, symprec: float
) -> Structure | None:
    """``structure`` idealised to its space group at ``symprec``, then displaced and strained within it.

    A random Cartesian displacement (``amplitude`` Å RMS per atom) and a random symmetric strain
    (``strain`` RMS) are each averaged over the group's operations (displacements of symmetry-equivalent
    atoms follow each other, the metric change keeps the lattice system), so the moved structure has at
    least the same space group. None when the structure has no symmetry beyond the identity.
    """
    ideal = symmetrized(structure, symprec)
    lattice = ideal.lattice.matrix
    frac = ideal.frac_coords
    numbers = np.array(ideal.atomic_numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = spglib.get_symmetry((lattice, frac, numbers), symprec=1e-3)
    if not found or len(found["rotations"]) <= 1:
        return None
    rotations = np.asarray(found["rotations"], dtype=float)
    translations = np.asarray(found["translations"], dtype=float)
    displacement = rng.normal(0.0, amplitude / np.sqrt(3.0), frac.shape) @ np.linalg.inv(lattice)
    averaged = np.zeros_like(displacement)
    for rotation, translation in zip(rotations, translations, strict=True):
        target = _operation_permutation(frac, numbers, (rotation, translation), lattice, 1e-2)
        if target is None:
            return None
        np.add.at(averaged, target, displacement @ rotation.T)
    averaged /= len(rotations)
    metric = lattice @ lattice.T
    upper = np.triu(rng.normal(0.0, strain, (3, 3)))
    deformation = np.eye(3) + upper + np.triu(upper, 1).T
    strained = deformation @ lattice
    change = strained @ strained.T - metric
    change = np.einsum("kji,jl,klm->im", rotations, change, rotations) / len(rotations)
    eigenvalues = np.linalg.eigvalsh(metric + change)
    if eigenvalues.min() <= 0:
        return None
    new_lattice = _sym_function(metric + change, np.sqrt) @ _sym_function(metric, lambda w: w**-0.5) @ lattice
    species = [str(site.specie) for site in ideal]
    return Structure(Lattice(new_lattice), species, frac + averaged, to_unit_cell=True)

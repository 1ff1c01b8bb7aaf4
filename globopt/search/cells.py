"""Working copies of crystal cells for the variation operators: checks, periodic geometry and repair.

The GA builds every offspring on rank 0, so the operators work on small numpy copies of a cell (lattice
rows, fractional coordinates, symbols) and convert to a pymatgen Structure once, at the end. This module
holds what every operator (and the generator seeding) shares: conversion, the validity rule a child must
meet (same content, ``geometry_problem`` empty, a sane lattice), the periodic pair geometry the checks and
repairs need, and the repair that nudges a nearly valid cell into a valid one.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from ase.data import atomic_numbers
from pymatgen.core import Lattice, Structure

from globopt.geometry import GeometryLimits, geometry_problem, periodic_pairs

# The engine's lattice rule. A Niggli cell's angles always lie within about 60..120 degrees, so in practice
# degenerate cells are caught by a failed reduction or a too-short vector; the angle test keeps the rule
# explicit in case the reduction ever returns something else.
MIN_ANGLE, MAX_ANGLE = 20.0, 160.0
# Repair pushes overlapping pairs a little beyond their limit, so rounding in a later distance check
# cannot flip the verdict.
PUSH_TARGET = 1.05
PUSH_ROUNDS = 25
PUSH_JITTER = 0.05  # Å
# The numpy pre-check keeps this much margin so it never passes a pair that geometry_problem rejects.
CHECK_MARGIN = 1.0 + 1e-6
# Beyond this many periodic images the basis is too skewed to search directly; reduce it first. A
# reduced cell that still needs more is a slab, not a crystal, and no operator works on it.
MAX_IMAGES = 729
MAX_IMAGES_REDUCED = 1331


class FlatCellError(ValueError):
    """A cell so thin that listing its periodic images would cost more than the operator is worth."""


@dataclass(frozen=True)
class WorkingCell:
    """A working copy of a structure: cheap to modify, converted to pymatgen only at the end."""

    lattice: np.ndarray  # (3, 3), rows are the lattice vectors, Å
    frac: np.ndarray  # (N, 3) fractional coordinates
    symbols: np.ndarray  # (N,) element symbols

    @property
    def cart(self) -> np.ndarray:
        return self.frac @ self.lattice

    def with_cart(self, cart: np.ndarray) -> WorkingCell:
        return replace(self, frac=(cart @ np.linalg.inv(self.lattice)) % 1.0)


# ----------------------------------------------------------------------------------------------------
# conversions and checks


def cell_of(structure: Structure) -> WorkingCell:
    symbols = np.array([site.specie.symbol for site in structure])
    return WorkingCell(structure.lattice.matrix.copy(), structure.frac_coords % 1.0, symbols)


def structure_of(cell: WorkingCell) -> Structure:
    return Structure(Lattice(cell.lattice), list(cell.symbols), cell.frac % 1.0)


def atomic_numbers_of(symbols: np.ndarray) -> np.ndarray:
    return np.array([atomic_numbers[s] for s in symbols], dtype=int)


def same_content(symbols: np.ndarray, content: dict[str, int]) -> bool:
    wanted = {el: n for el, n in content.items() if n}
    return dict(Counter(str(s) for s in symbols)) == wanted


def _smallest_limit(limits: GeometryLimits) -> float:
    positive = limits.min_distance[limits.min_distance > 0]
    return float(positive.min()) if positive.size else 0.0


def lattice_problem(matrix: np.ndarray, limits: GeometryLimits) -> str:
    """Why a lattice is unusable, or ''; judged on the Niggli cell so the basis choice cannot matter."""
    matrix = np.asarray(matrix, dtype=float)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        return "degenerate lattice"
    try:
        reduced = Lattice(matrix).get_niggli_reduced_lattice()
    except Exception as exc:  # pymatgen raises several kinds on near-degenerate cells
        return f"Niggli reduction failed ({type(exc).__name__})"
    angles = np.array(reduced.angles)
    if np.any(angles < MIN_ANGLE) or np.any(angles > MAX_ANGLE):
        return f"reduced cell angles {np.round(angles, 1).tolist()} outside [{MIN_ANGLE}, {MAX_ANGLE}]"
    shortest = min(reduced.abc)
    if shortest < _smallest_limit(limits):
        return f"lattice vector of {shortest:.2f} Å is shorter than any allowed pair distance"
    return ""


def validity_problem(structure: Structure, content: dict[str, int], limits: GeometryLimits) -> str:
    """Why a child is not acceptable to the engine, or '' when it is (the contract every operator keeps)."""
    if not structure.is_ordered:
        return "structure is disordered"
    symbols = np.array([site.specie.symbol for site in structure])
    if not same_content(symbols, content):
        return f"content {dict(Counter(symbols.tolist()))} differs from {content}"
    problem = lattice_problem(structure.lattice.matrix, limits)
    return problem or geometry_problem(structure, limits)


# ----------------------------------------------------------------------------------------------------
# periodic geometry in numpy


def image_shifts(lattice: np.ndarray, cutoff: float) -> np.ndarray:
    """Integer cell shifts that can hold a neighbour within ``cutoff`` of a minimum-image difference."""
    widths_inverse = np.linalg.norm(np.linalg.inv(lattice), axis=0)  # 1 / plane spacing per axis
    reach = np.ceil(cutoff * widths_inverse + 0.5).astype(int)
    axes = [np.arange(-r, r + 1) for r in reach]
    return np.array(list(itertools.product(*axes)), dtype=float)


def reduced_basis(lattice: np.ndarray, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reduced = Lattice(lattice).get_niggli_reduced_lattice().matrix
    return reduced, (frac @ lattice @ np.linalg.inv(reduced)) % 1.0


def cell_pairs(
    lattice: np.ndarray, frac: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j, image) closer than cutoff: i, j, vector i->j (Å), distance.

    Refuses (FlatCellError) a cell so thin that even its reduced basis has more than MAX_IMAGES_REDUCED
    periodic images within the cutoff: that is a slab, not a crystal, and no operator works on it.
    """
    if len(image_shifts(lattice, cutoff)) > MAX_IMAGES:
        reduced, _ = reduced_basis(lattice, frac)
        shifts = image_shifts(reduced, cutoff)
        if len(shifts) > MAX_IMAGES_REDUCED:
            raise FlatCellError(f"{len(shifts)} periodic images within {cutoff:.2f} Å")
    return periodic_pairs(lattice, frac, cutoff)


def nearest_distances(lattice: np.ndarray, points: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Point-to-atom distances (P, N) over the 27 nearest images: a heuristic for crowding only."""
    diff = frac[None, :, :] - points[:, None, :]
    diff -= np.round(diff)
    shifts = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)))
    vectors = (diff[:, :, None, :] + shifts[None, None, :, :]) @ lattice
    return np.linalg.norm(vectors, axis=-1).min(axis=2)


def limit_pairs(cell: WorkingCell, limits: GeometryLimits, factor: float) -> tuple[np.ndarray, ...]:
    """Pairs closer than ``factor`` times their allowed distance: i, j, vector, distance, allowed."""
    numbers = atomic_numbers_of(cell.symbols)
    allowed_matrix = limits.min_distance[np.ix_(numbers, numbers)]
    cutoff = float(allowed_matrix.max()) * factor
    if cutoff <= 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty, np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    i, j, vectors, distances = cell_pairs(cell.lattice, cell.frac, cutoff)
    allowed = allowed_matrix[i, j]
    close = distances < allowed * factor
    return i[close], j[close], vectors[close], distances[close], allowed[close]


def _volume_ok(cell: WorkingCell, limits: GeometryLimits) -> bool:
    low, high = limits.volume_per_atom_range
    return low <= abs(np.linalg.det(cell.lattice)) / len(cell.frac) <= high


def quick_valid(cell: WorkingCell, limits: GeometryLimits) -> bool:
    """The numpy twin of geometry_problem, so failed tries never pay for the ASE round trip."""
    if not _volume_ok(cell, limits):
        return False
    try:
        return len(limit_pairs(cell, limits, CHECK_MARGIN)[0]) == 0
    except FlatCellError:
        return False


# ----------------------------------------------------------------------------------------------------
# repair


def _clip_volume(cell: WorkingCell, limits: GeometryLimits) -> WorkingCell:
    """Scale the cell into the volume window (with a little room) keeping fractional coordinates."""
    low, high = limits.volume_per_atom_range
    per_atom = abs(np.linalg.det(cell.lattice)) / len(cell.frac)
    target = min(max(per_atom, low * 1.02), high * 0.98)
    if target == per_atom:
        return cell
    return replace(cell, lattice=cell.lattice * (target / per_atom) ** (1.0 / 3.0))


def _push_apart(
    cell: WorkingCell, limits: GeometryLimits, rng: np.random.Generator | None
) -> WorkingCell | None:
    """Separate overlapping pairs along their bond, a few rounds, because small overlaps at a seam or
    after a random move are common and cheap to fix; gives up when an atom overlaps its own image
    (only a bigger cell would help) or the overlaps do not clear. With a generator, overlapping atoms
    also get a small random jitter: an atom squeezed symmetrically between two others (common in
    high-symmetry parents) feels no net push along the bonds and needs a sideways nudge."""
    for _ in range(PUSH_ROUNDS):
        try:
            i, j, vectors, distances, allowed = limit_pairs(cell, limits, CHECK_MARGIN)
        except FlatCellError:
            return None
        if len(i) == 0:
            return cell
        if np.any(i == j):
            return None
        safe = np.maximum(distances, 1e-9)[:, None]
        units = np.where(distances[:, None] > 1e-9, vectors / safe, np.array([1.0, 0.0, 0.0]))
        push = (allowed * PUSH_TARGET - distances)[:, None] * 0.5
        moves = np.zeros_like(cell.frac)
        np.add.at(moves, i, -push * units)
        if rng is not None:
            crowded = np.zeros(len(moves), dtype=bool)
            crowded[i] = True
            moves += rng.normal(0.0, PUSH_JITTER, moves.shape) * crowded[:, None]
        cell = cell.with_cart(cell.cart + moves)
    return cell if quick_valid(cell, limits) else None


def finish(
    cell: WorkingCell,
    content: dict[str, int],
    limits: GeometryLimits,
    repair: bool,
    rng: np.random.Generator | None = None,
) -> Structure | None:
    """Turn a working cell into a checked Structure, optionally repairing volume and overlaps first.

    Without repair the numpy distance check runs before the Niggli-based lattice check, because most
    failed tries fail on distances and it is the cheaper of the two; repair needs a sane lattice first.
    """
    if not same_content(cell.symbols, content) or atomic_numbers_of(cell.symbols).max() >= len(
        limits.min_distance
    ):
        return None
    if repair:
        if lattice_problem(cell.lattice, limits):
            return None
        repaired = _push_apart(_clip_volume(cell, limits), limits, rng)
        if repaired is None:
            return None
        cell = repaired
    elif not quick_valid(cell, limits) or lattice_problem(cell.lattice, limits):
        return None
    structure = structure_of(cell)
    if geometry_problem(structure, limits):
        return None
    return structure


def make_valid(
    structure: Structure,
    content: dict[str, int],
    limits: GeometryLimits,
    rng: np.random.Generator | None = None,
) -> Structure | None:
    """Nudge a nearly valid structure (volume just outside the window, a few overlapping pairs) into a
    valid one; None when that is not enough. Never returns an invalid structure. Deterministic without
    a generator; with one it can also unjam symmetric overlaps."""
    return finish(cell_of(structure), content, limits, repair=True, rng=rng)


def finish_random(structure: Structure, content: dict[str, int], limits: GeometryLimits) -> Structure | None:
    """A pyxtal structure as the GA takes it in: the same validity check as any operator's child."""
    return finish(cell_of(structure), content, limits, repair=False)

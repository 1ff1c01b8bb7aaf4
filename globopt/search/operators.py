"""Variation operators for an evolutionary crystal search (USPEX-style, after Oganov & Glass).

Offspring are made by rank 0, or under MPI by the workers (search/ga_children.py), between other work
in both cases, so these operators work on small numpy copies of the cell (lattice rows, fractional
coordinates, symbols) and convert to a pymatgen Structure once, at the end. Every operator either
returns a child that is valid by the engine's own rules (same cell content, ``geometry_problem`` empty, a
sane lattice) or ``None``: an invalid child would only be rejected by the engine after the search had
spent an offspring slot on it, and a ``None`` tells the caller at once to try another operator.

All randomness comes from the ``numpy.random.Generator`` passed in (pyxtal included), because the search
checkpoints its generator state and a resumed run must propose exactly the same children.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Structure

from globopt.geometry import GeometryLimits
from globopt.search.cells import (
    PUSH_TARGET,
    FlatCellError,
    WorkingCell,
    atomic_numbers_of,
    cell_of,
    cell_pairs,
    finish,
    finish_random,
    nearest_distances,
    reduced_basis,
)
from globopt.search.wyckoff_operators import wyckoff_heredity, wyckoff_mutation

# Internal retries before an operator gives up: a failed try costs about a millisecond (numpy checks,
# no ASE round trip), so several are cheap, but the caller has other operators to fall back on.
ATTEMPTS = 6
HEREDITY_ATTEMPTS = 5
IMMIGRANT_ATTEMPTS = 10
# Soft mutation: bonds within BOND_FACTOR x covalent sum, stiffness exp(-SPRING_DECAY (d/d0 - 1)).
BOND_FACTOR = 1.3
SPRING_DECAY = 3.0
# Pure central springs leave low-coordination cells full of zero-frequency (floppy) modes, which makes
# "the softest mode" arbitrary; a weak transverse stiffness on every bond removes them.
TRANSVERSE_STIFFNESS = 0.2
SOFT_MODE_CHOICES = 3
SOFT_AMPLITUDE_STEPS = (1.0, 0.7, 0.5, 0.35, 0.25)
# Soft mutation's last resort is a full-amplitude move plus overlap repair, accepted only if no atom ends
# farther than amplitude + this from where it started (Å).
SOFT_REPAIR_SLACK = 0.25
# Lattice strain retries shrink sigma by this factor every second attempt.
STRAIN_SHRINK = 0.5
# Heredity: random cut planes tried per child; the one breaking the fewest bonds is used.
CUT_CANDIDATES = 8
# Heredity: surplus atoms near a cut plane are the likeliest to sit badly, so their removal score gets
# this bonus, fading over about an ångström.
PLANE_WEIGHT = 0.5
EMPTY_SPOT_TRIALS = 24

# ----------------------------------------------------------------------------------------------------
# heredity


def _reduced(structure: Structure) -> WorkingCell:
    """The Niggli cell, so two parents' lattices are expressed in comparable bases before blending."""
    cell = cell_of(structure)
    lattice, frac = reduced_basis(cell.lattice, cell.frac)
    return WorkingCell(lattice, frac, cell.symbols)


def _cell_factors(lengths: np.ndarray, ratio: float) -> np.ndarray:
    """Per-axis stretch making a cell hold ``ratio`` times its atoms: double the shortest axis (or halve
    the longest) while that fits, then the remainder on one axis, so the region stays compact."""
    factors = np.ones(3)
    while ratio >= 2.0 - 1e-9:
        axis = int(np.argmin(lengths * factors))
        factors[axis] *= 2.0
        ratio /= 2.0
    while ratio <= 0.5 + 1e-9:
        axis = int(np.argmax(lengths * factors))
        factors[axis] *= 0.5
        ratio *= 2.0
    if abs(ratio - 1.0) > 1e-9:
        axis = int(np.argmin(lengths * factors) if ratio > 1 else np.argmax(lengths * factors))
        factors[axis] *= ratio
    return factors


def _stretch_axis(cell: WorkingCell, axis: int, factor: float, origin: float) -> WorkingCell:
    """Cut the region [origin, origin + factor) along one axis out of the infinite crystal and make it
    the new unit along that axis (a supercell for factor 2, half a cell for 0.5)."""
    start = (cell.frac[:, axis] - origin) % 1.0
    fracs, symbols = [], []
    for image in range(int(np.ceil(factor))):
        along = start + image
        keep = along < factor
        frac = cell.frac[keep].copy()
        frac[:, axis] = along[keep] / factor
        fracs.append(frac)
        symbols.append(cell.symbols[keep])
    lattice = cell.lattice.copy()
    lattice[axis] *= factor
    return WorkingCell(lattice, np.concatenate(fracs), np.concatenate(symbols))


def _resized(cell: WorkingCell, n_target: int, rng: np.random.Generator) -> WorkingCell:
    """A piece of the parent crystal holding about n_target atoms, so parents of a different size than
    the child contribute slabs at the right density instead of being squeezed or diluted."""
    factors = _cell_factors(np.linalg.norm(cell.lattice, axis=1), n_target / len(cell.frac))
    for axis in range(3):
        if abs(factors[axis] - 1.0) > 1e-9:
            cell = _stretch_axis(cell, axis, float(factors[axis]), float(rng.random()))
    return cell


def _shape(lattice: np.ndarray) -> np.ndarray:
    """Metric tensor at unit volume: the orientation-free shape of a cell."""
    metric = lattice @ lattice.T
    return metric / abs(np.linalg.det(lattice)) ** (2.0 / 3.0)


def _aligned(cell: WorkingCell, reference: np.ndarray) -> WorkingCell:
    """Relabel and flip the axes of ``cell`` (same crystal, other basis) to look most like the reference,
    so that averaging lattices blends like with like."""
    target = _shape(reference)
    best, best_cost = cell, np.inf
    for order in itertools.permutations(range(3)):
        for signs in ((1, 1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1)):
            flip = np.array(signs, dtype=float)
            lattice = cell.lattice[list(order)] * flip[:, None]
            cost = float(np.linalg.norm(_shape(lattice) - target))
            if cost < best_cost - 1e-12:
                frac = (cell.frac[:, list(order)] * flip) % 1.0
                best, best_cost = WorkingCell(lattice, frac, cell.symbols), cost
    return best


def _blend(lattice_a: np.ndarray, lattice_b: np.ndarray, weight: float, volume: float) -> np.ndarray:
    """Weighted mean of the two cell shapes at the requested volume. Averaging metric tensors keeps the
    result positive definite (a real lattice) whatever the parents' orientations in space."""
    metric = weight * _shape(lattice_a) + (1.0 - weight) * _shape(lattice_b)
    lattice = np.linalg.cholesky(metric)  # lower triangular: a along x, b in the xy plane
    return lattice * (volume / np.linalg.det(lattice)) ** (1.0 / 3.0)


@dataclass(frozen=True)
class _Cut:
    axis: int
    start: float
    fraction: float

    def in_first(self, frac: np.ndarray) -> np.ndarray:
        return ((frac[:, self.axis] - self.start) % 1.0) < self.fraction

    def plane_distance(self, cell: WorkingCell) -> np.ndarray:
        """Distance (Å) of every atom to the nearer of the two cut planes."""
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(cell.lattice)[:, self.axis])
        along = cell.frac[:, self.axis]
        planes = np.array([self.start, self.start + self.fraction])
        offset = along[:, None] - planes[None, :]
        offset -= np.round(offset)
        return np.abs(offset).min(axis=1) * spacing


def _natural_spacing(symbols_a: np.ndarray, symbols_b: np.ndarray) -> np.ndarray:
    radii_a = covalent_radii[atomic_numbers_of(symbols_a)]
    radii_b = covalent_radii[atomic_numbers_of(symbols_b)]
    return radii_a[:, None] + radii_b[None, :]


def _remove_one(cell: WorkingCell, element: str, cut: _Cut) -> WorkingCell:
    """Drop the atom of ``element`` that sits worst: most squeezed against its neighbours, with a bonus
    near the cut planes where the two parents' halves meet."""
    candidates = np.flatnonzero(cell.symbols == element)
    distances = nearest_distances(cell.lattice, cell.frac[candidates], cell.frac)
    distances[np.arange(len(candidates)), candidates] = np.inf
    squeeze = (_natural_spacing(cell.symbols[candidates], cell.symbols) / distances).max(axis=1)
    score = squeeze + PLANE_WEIGHT * np.exp(-cut.plane_distance(cell)[candidates])
    drop = candidates[int(np.argmax(score))]
    keep = np.arange(len(cell.frac)) != drop
    return WorkingCell(cell.lattice, cell.frac[keep], cell.symbols[keep])


def _add_one(
    cell: WorkingCell, element: str, spares: np.ndarray, limits: GeometryLimits, rng: np.random.Generator
) -> tuple[WorkingCell, np.ndarray]:
    """Add an atom of ``element``: at the roomiest unused parent position of that element if it fits,
    otherwise at the roomiest of those and a few random spots. Returns the cell and remaining spares."""
    randoms = rng.random((EMPTY_SPOT_TRIALS, 3))
    points = np.concatenate([spares, randoms]) if len(spares) else randoms
    if len(cell.frac):
        distances = nearest_distances(cell.lattice, points, cell.frac)
        spacing = _natural_spacing(np.array([element]), cell.symbols)[0]
        room = (distances / spacing[None, :]).min(axis=1)
        allowed = limits.min_distance[atomic_numbers[element], atomic_numbers_of(cell.symbols)]
        fits = np.all(distances >= allowed[None, :] * PUSH_TARGET, axis=1)
    else:
        room = np.ones(len(points))
        fits = np.ones(len(points), dtype=bool)
    n_spare = len(spares)
    spare_fits = fits[:n_spare]
    if spare_fits.any():
        pick = int(np.argmax(np.where(spare_fits, room[:n_spare], -np.inf)))
    else:
        pick = int(np.argmax(room))
    remaining = np.delete(spares, pick, axis=0) if pick < n_spare else spares
    frac = np.concatenate([cell.frac, points[pick][None, :]])
    return WorkingCell(cell.lattice, frac, np.append(cell.symbols, element)), remaining


def _fix_content(
    cell: WorkingCell,
    spares: WorkingCell,
    content: dict[str, int],
    cut: _Cut,
    limits: GeometryLimits,
    rng: np.random.Generator,
) -> WorkingCell:
    """Bring the spliced cell to the required content: surplus out first, then the deficit in, so the
    additions see the final neighbourhood."""
    have = Counter(str(s) for s in cell.symbols)
    for element in sorted(have):
        for _ in range(have[element] - content.get(element, 0)):
            cell = _remove_one(cell, element, cut)
    for element, wanted in content.items():
        pool = spares.frac[spares.symbols == element]
        for _ in range(wanted - int(np.sum(cell.symbols == element))):
            cell, pool = _add_one(cell, element, pool, limits, rng)
    order = {el: k for k, el in enumerate(content)}
    rank = np.argsort([order[str(s)] for s in cell.symbols], kind="stable")
    return WorkingCell(cell.lattice, cell.frac[rank], cell.symbols[rank])


def _bonds_along(cell: WorkingCell) -> tuple[np.ndarray, np.ndarray]:
    """Each bond (pair within BOND_FACTOR x the covalent sum) as the fractional coordinates of its two
    ends, unwrapped so the second is the bonded image of the first: (start, end), each (B, 3)."""
    radii = covalent_radii[atomic_numbers_of(cell.symbols)]
    cutoff = BOND_FACTOR * 2.0 * float(radii.max())
    try:
        i, j, vectors, distances = cell_pairs(cell.lattice, cell.frac, cutoff)
    except FlatCellError:
        return np.zeros((0, 3)), np.zeros((0, 3))
    bonded = distances < BOND_FACTOR * (radii[i] + radii[j])
    start = cell.frac[i[bonded]]
    return start, start + vectors[bonded] @ np.linalg.inv(cell.lattice)


def _crossings(bonds: tuple[np.ndarray, np.ndarray], axis: int, planes: np.ndarray) -> np.ndarray:
    """How many bonds each plane (fractional position along ``axis``, any periodic image) cuts."""
    start, end = bonds
    low = np.minimum(start[:, axis], end[:, axis])[:, None]
    high = np.maximum(start[:, axis], end[:, axis])[:, None]
    # images of the plane strictly between the two ends
    return (np.floor(high - planes[None, :]) - np.ceil(low - planes[None, :]) + 1).clip(min=0).sum(axis=0)


def _motif_preserving_cut(
    piece_a: WorkingCell, piece_b: WorkingCell, rng: np.random.Generator
) -> tuple[_Cut, np.ndarray]:
    """The cut planes and B's shift among CUT_CANDIDATES random ones that break the fewest bonds.

    A plane through the middle of coordination polyhedra (SiO4 tetrahedra, AlO6 octahedra, a layer)
    leaves the child with under-coordinated fragments on both sides of the seam; a plane through the gaps
    between them hands over whole motifs, which is what heredity is meant to pass on. Each bond is
    counted once from each end, for both parents' slabs at the same two planes.
    """
    bonds_a, bonds_b = _bonds_along(piece_a), _bonds_along(piece_b)
    best, best_score = None, np.inf
    for _ in range(CUT_CANDIDATES):
        cut = _Cut(int(rng.integers(3)), float(rng.random()), float(rng.uniform(0.25, 0.75)))
        shift = rng.random(3)
        planes = np.array([cut.start, cut.start + cut.fraction])
        score = _crossings(bonds_a, cut.axis, planes).sum()
        score += _crossings(bonds_b, cut.axis, planes - shift[cut.axis]).sum()
        if score < best_score:
            best, best_score = (cut, shift), score
    return best


@dataclass(frozen=True)
class Splice:
    """Where two parents are cut and joined: the slab of A inside the cut, the rest of B (shifted).

    Heredity at fixed composition and across compositions share this; they differ only in the content the
    child must end with and the volume it gets.
    """

    piece_a: WorkingCell
    piece_b: WorkingCell  # aligned with piece_a's cell and randomly shifted
    cut: _Cut
    from_a: np.ndarray  # atoms of piece_a in the child
    from_b: np.ndarray  # atoms of piece_b in the child

    def held(self) -> Counter:
        """The atoms the two slabs hold, per element."""
        return Counter(str(s) for s in self.piece_a.symbols[self.from_a]) + Counter(
            str(s) for s in self.piece_b.symbols[self.from_b]
        )

    def cells(self, lattice: np.ndarray) -> tuple[WorkingCell, WorkingCell]:
        """(child, spares) on ``lattice``; the spares are the atoms left out, for content fixing to use."""
        a, b = self.piece_a, self.piece_b
        child = WorkingCell(
            lattice,
            np.concatenate([a.frac[self.from_a], b.frac[self.from_b]]),
            np.concatenate([a.symbols[self.from_a], b.symbols[self.from_b]]),
        )
        spares = WorkingCell(
            lattice,
            np.concatenate([a.frac[~self.from_a], b.frac[~self.from_b]]),
            np.concatenate([a.symbols[~self.from_a], b.symbols[~self.from_b]]),
        )
        return child, spares


def plan_splice(
    parent_a: WorkingCell, parent_b: WorkingCell, n_atoms: int, rng: np.random.Generator
) -> Splice | None:
    """Both parents resized towards ``n_atoms``, B aligned with A, a motif-preserving cut and B's shift;
    None when a cut-down piece of a much larger parent missed every atom."""
    piece_a = _resized(parent_a, n_atoms, rng)
    piece_b = _aligned(_resized(parent_b, n_atoms, rng), piece_a.lattice)
    if not len(piece_a.frac) or not len(piece_b.frac):
        return None
    cut, shift = _motif_preserving_cut(piece_a, piece_b, rng)
    piece_b = WorkingCell(piece_b.lattice, (piece_b.frac + shift) % 1.0, piece_b.symbols)
    return Splice(piece_a, piece_b, cut, cut.in_first(piece_a.frac), ~cut.in_first(piece_b.frac))


def _splice(
    parent_a: WorkingCell,
    parent_b: WorkingCell,
    content: dict[str, int],
    volume_per_atom: float,
    limits: GeometryLimits,
    rng: np.random.Generator,
) -> WorkingCell | None:
    """One cut-and-splice child of the parents' content: a slab of A, the complementary slab of B."""
    n_atoms = sum(content.values())
    splice = plan_splice(parent_a, parent_b, n_atoms, rng)
    if splice is None:
        return None
    piece_a, piece_b, cut = splice.piece_a, splice.piece_b, splice.cut
    lattice = _blend(piece_a.lattice, piece_b.lattice, cut.fraction, n_atoms * volume_per_atom)
    child, spares = splice.cells(lattice)
    return _fix_content(child, spares, content, cut, limits, rng)


def heredity(
    parent_a: Structure,
    parent_b: Structure,
    content: dict[str, int],
    limits: GeometryLimits,
    rng: np.random.Generator,
) -> Structure | None:
    """Cut-and-splice crossover: good local motifs of two parents survive into one child, which is why
    heredity carries most of the progress in USPEX-style searches."""
    cell_a, cell_b = _reduced(parent_a), _reduced(parent_b)
    volume_per_atom = 0.5 * (parent_a.volume / len(parent_a) + parent_b.volume / len(parent_b))
    low, high = limits.volume_per_atom_range
    volume_per_atom = min(max(volume_per_atom, low * 1.02), high * 0.98)
    for _ in range(HEREDITY_ATTEMPTS):
        child = _splice(cell_a, cell_b, content, volume_per_atom, limits, rng)
        if child is None:
            continue
        result = finish(child, content, limits, repair=True, rng=rng)
        # Splicing a high-symmetry cell with itself (or with a copy) can give the parent back atom for atom:
        # that is no offspring, and the slot is better spent on another try.
        if result is not None and not any(_same_as_stored(result, p) for p in (parent_a, parent_b)):
            return result
    return None


def _same_as_stored(first: Structure, second: Structure) -> bool:
    """Same lattice, species order and coordinates (a copy, not merely the same crystal in another basis)."""
    if len(first) != len(second) or first.species != second.species:
        return False
    if not np.allclose(first.lattice.matrix, second.lattice.matrix, atol=1e-8):
        return False
    diff = first.frac_coords - second.frac_coords
    return bool(np.allclose(diff - np.round(diff), 0.0, atol=1e-8))


# ----------------------------------------------------------------------------------------------------
# single-parent mutations


def parent_content(structure: Structure) -> dict[str, int]:
    """The cell content of an ordered parent, element -> count (the content its children must keep)."""
    return dict(Counter(site.specie.symbol for site in structure))


def _symmetric_strain(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Six independent Gaussian components, so shear and stretch are sampled with the same width."""
    upper = np.triu(rng.normal(0.0, sigma, (3, 3)))
    return upper + np.triu(upper, 1).T


def lattice_strain(
    parent: Structure, limits: GeometryLimits, rng: np.random.Generator, sigma: float = 0.1
) -> Structure | None:
    """Deform the cell at constant volume and fractional coordinates: explores cell shapes that local
    relaxation reaches only slowly (shear), without touching the atomic arrangement. Retries use smaller
    strains, because a parent with a pair just above its limit survives only gentle deformations."""
    cell = cell_of(parent)
    content = parent_content(parent)
    volume = abs(np.linalg.det(cell.lattice))
    for attempt in range(ATTEMPTS):
        deformation = np.eye(3) + _symmetric_strain(rng, sigma * STRAIN_SHRINK ** (attempt // 2))
        if np.linalg.det(deformation) <= 0.05:
            continue
        lattice = cell.lattice @ deformation
        lattice *= (volume / abs(np.linalg.det(lattice))) ** (1.0 / 3.0)
        result = finish(replace(cell, lattice=lattice), content, limits, repair=False)
        if result is not None:
            return result
    return None


def _swapped(symbols: np.ndarray, swaps: int, rng: np.random.Generator) -> np.ndarray:
    symbols = symbols.copy()
    for _ in range(swaps):
        first = int(rng.integers(len(symbols)))
        unlike = np.flatnonzero(symbols != symbols[first])
        second = int(rng.choice(unlike))
        symbols[first], symbols[second] = symbols[second], symbols[first]
    return symbols


def permutation(
    parent: Structure, limits: GeometryLimits, rng: np.random.Generator, max_swaps: int = 3
) -> Structure | None:
    """Exchange unlike atoms: finds better orderings of a good framework, which heredity and
    coordinate moves rarely do because they would have to pass through high-energy overlaps."""
    cell = cell_of(parent)
    if len(set(cell.symbols.tolist())) < 2:
        return None
    content = parent_content(parent)
    for _ in range(ATTEMPTS):
        symbols = _swapped(cell.symbols, int(rng.integers(1, max(max_swaps, 1) + 1)), rng)
        if np.array_equal(symbols, cell.symbols):
            continue
        result = finish(replace(cell, symbols=symbols), content, limits, repair=True, rng=rng)
        if result is not None:
            return result
    return None


def coordinate_mutation(
    parent: Structure,
    limits: GeometryLimits,
    rng: np.random.Generator,
    sigma: float = 0.4,
    fraction: float = 0.5,
) -> Structure | None:
    """Random Cartesian kicks to part of the atoms: local exploration around a good parent."""
    cell = cell_of(parent)
    content = parent_content(parent)
    n_atoms = len(cell.frac)
    for _ in range(ATTEMPTS):
        moving = rng.random(n_atoms) < fraction
        if not moving.any():
            moving[int(rng.integers(n_atoms))] = True
        kicks = rng.normal(0.0, sigma, (n_atoms, 3)) * moving[:, None]
        result = finish(cell.with_cart(cell.cart + kicks), content, limits, repair=True, rng=rng)
        if result is not None:
            return result
    return None


def _dynamical_matrix(cell: WorkingCell) -> np.ndarray:
    """Gamma-point 3N x 3N stiffness of a bond-spring model (no masses, no potential): springs to
    neighbours within BOND_FACTOR x the covalent sum, plus each atom's nearest neighbour so no atom
    floats free, stiffness decaying exponentially with stretch beyond the covalent sum."""
    n_atoms = len(cell.frac)
    radii = covalent_radii[atomic_numbers_of(cell.symbols)]
    spacing = radii[:, None] + radii[None, :]
    i, j, vectors, distances = cell_pairs(cell.lattice, cell.frac, 2.0 * float(spacing.max()))
    nearest = np.full(n_atoms, np.inf)
    np.minimum.at(nearest, i, distances)
    natural = spacing[i, j]
    bonded = (distances < BOND_FACTOR * natural) | (distances <= nearest[i] * 1.05)
    i, j, vectors, distances, natural = (x[bonded] for x in (i, j, vectors, distances, natural))
    stiffness = np.exp(-SPRING_DECAY * (distances / natural - 1.0))
    units = vectors / distances[:, None]
    along = units[:, :, None] * units[:, None, :]
    blocks = stiffness[:, None, None] * (along + TRANSVERSE_STIFFNESS * (np.eye(3) - along))
    matrix = np.zeros((n_atoms, n_atoms, 3, 3))
    np.add.at(matrix, (i, i), blocks)
    np.add.at(matrix, (i, j), -blocks)
    return matrix.transpose(0, 2, 1, 3).reshape(3 * n_atoms, 3 * n_atoms)


def _soft_modes(cell: WorkingCell, count: int) -> np.ndarray:
    """The ``count`` softest non-translational modes, shape (count, N, 3). Rigid translations are exact
    zero modes of any spring model at Gamma; lifting them to the top of the spectrum skips them."""
    matrix = _dynamical_matrix(cell)
    n_atoms = len(cell.frac)
    translations = np.tile(np.eye(3), (n_atoms, 1)) / np.sqrt(n_atoms)
    lift = 10.0 * (abs(np.trace(matrix)) + 1.0)
    matrix = 0.5 * (matrix + matrix.T) + lift * translations @ translations.T
    _, vectors = np.linalg.eigh(matrix)
    count = min(count, 3 * n_atoms - 3)
    return vectors[:, :count].T.reshape(count, n_atoms, 3)


def soft_mutation(
    parent: Structure, limits: GeometryLimits, rng: np.random.Generator, amplitude: float = 1.0
) -> Structure | None:
    """Displace along a soft normal mode (Lyakhov & Oganov's softmutation with a spring model instead of
    a potential): soft modes point along collective moves toward nearby minima, far more often useful
    than random kicks. Smaller amplitudes are tried before any repair, so atoms move at most
    ``amplitude`` (plus SOFT_REPAIR_SLACK in the rare repaired child)."""
    cell = cell_of(parent)
    if len(cell.frac) < 2:
        return None
    content = parent_content(parent)
    try:
        modes = _soft_modes(cell, SOFT_MODE_CHOICES)
    except (FlatCellError, np.linalg.LinAlgError):
        return None
    for _ in range(ATTEMPTS):
        mode = modes[int(rng.integers(len(modes)))] * (1.0 if rng.random() < 0.5 else -1.0)
        shift = amplitude * mode / np.linalg.norm(mode, axis=1).max()
        for step in SOFT_AMPLITUDE_STEPS:
            result = finish(cell.with_cart(cell.cart + step * shift), content, limits, repair=False)
            if result is not None:
                return result
        result = finish(cell.with_cart(cell.cart + shift), content, limits, repair=True, rng=rng)
        if result is not None and _largest_move(cell, result) <= amplitude + SOFT_REPAIR_SLACK:
            return result
    return None


def _largest_move(cell: WorkingCell, moved: Structure) -> float:
    """Largest minimum-image displacement (Å) of any atom between a cell and its moved copy."""
    diff = moved.frac_coords - cell.frac
    diff -= np.round(diff)
    return float(np.linalg.norm(diff @ cell.lattice, axis=1).max())


def symmetric_mutation(
    parent: Structure,
    limits: GeometryLimits,
    rng: np.random.Generator,
    amplitude: float = 0.4,
    strain: float = 0.08,
    symprec: float = 0.1,
) -> Structure | None:
    """Move the parent within its own space group: a random displacement and cell strain, each averaged
    over the parent's symmetry operations, so every Wyckoff position keeps its site symmetry.

    The symmetric subspace of a structure is small (a few free coordinates and lattice parameters), and the
    ground states of most compounds lie in such subspaces; a move that stays there explores them far more
    efficiently than a move in all 3N+6 dimensions, and the relaxation that follows (rattled) may still
    break the symmetry where that lowers the energy. Parents without symmetry (P1 at ``symprec``) have no
    such subspace: the operator declines them, and the GA draws another operator.
    """
    from globopt.search.structure_difference import symmetric_move

    content = parent_content(parent)
    for attempt in range(ATTEMPTS):
        scale = STRAIN_SHRINK ** (attempt // 2)
        moved = symmetric_move(parent, rng, amplitude * scale, strain * scale, symprec)
        if moved is None:
            return None
        result = finish(cell_of(moved), content, limits, repair=False)
        if result is not None:
            return result
    return None


# ----------------------------------------------------------------------------------------------------
# immigrants


def random_immigrant(
    content: dict[str, int],
    limits: GeometryLimits,
    rng: np.random.Generator,
    spacegroups: list[int] | None = None,
    volume_factor: float = 1.1,
) -> tuple[Structure, int] | None:
    """A fresh random symmetric structure: keeps diversity in a population that heredity would
    otherwise collapse onto one basin. Returns it with its space-group number."""
    from globopt.search.pyxtal_sampling import random_symmetric_structure, symmetry_options

    content = {el: n for el, n in content.items() if n}
    options = symmetry_options(list(content.values()), spacegroups)
    if not options:
        return None
    for _ in range(IMMIGRANT_ATTEMPTS):
        made = random_symmetric_structure(content, options, rng, volume_factor)
        if isinstance(made, str):
            continue
        structure, group = made
        result = finish_random(structure, content, limits)
        if result is not None:
            return result, group
    return None


# ----------------------------------------------------------------------------------------------------
# the registry the GA draws from and the config validates against


@dataclass(frozen=True)
class VariationOperator:
    """One GA operator as the search calls it.

    ``make(parents, content, limits, rng, ga)`` returns a valid child of the given cell content, or None;
    ``ga`` is the run's GA config section (the operators read their step sizes from it). An operator with
    no parents (``immigrant``) has no ``make``: the search takes a fresh structure from its own numbered
    random stream, which workers can build ahead of time.
    """

    name: str
    n_parents: int
    make: (
        Callable[[tuple[Structure, ...], dict[str, int], GeometryLimits, np.random.Generator, Any], Any]
        | None
    )
    # the second parent is drawn among the members of the first's space group (Wyckoff heredity)
    mates_in_group: bool = False


def _registry(*operators: VariationOperator) -> dict[str, VariationOperator]:
    return {op.name: op for op in operators}


VARIATION_OPERATORS: dict[str, VariationOperator] = _registry(
    VariationOperator(
        "heredity", 2, lambda parents, content, limits, rng, ga: heredity(*parents, content, limits, rng)
    ),
    VariationOperator(
        "lattice_strain",
        1,
        lambda parents, content, limits, rng, ga: lattice_strain(
            parents[0], limits, rng, sigma=ga.strain_sigma
        ),
    ),
    VariationOperator(
        "permutation", 1, lambda parents, content, limits, rng, ga: permutation(parents[0], limits, rng)
    ),
    VariationOperator(
        "coordinate",
        1,
        lambda parents, content, limits, rng, ga: coordinate_mutation(
            parents[0], limits, rng, sigma=ga.coordinate_sigma
        ),
    ),
    VariationOperator(
        "soft",
        1,
        lambda parents, content, limits, rng, ga: soft_mutation(
            parents[0], limits, rng, amplitude=ga.soft_amplitude
        ),
    ),
    VariationOperator(
        "symmetric",
        1,
        lambda parents, content, limits, rng, ga: symmetric_mutation(
            parents[0], limits, rng, amplitude=ga.coordinate_sigma, strain=ga.strain_sigma
        ),
    ),
    VariationOperator(
        "wyckoff_heredity",
        2,
        lambda parents, content, limits, rng, ga: wyckoff_heredity(*parents, content, limits, rng),
        mates_in_group=True,
    ),
    VariationOperator(
        "wyckoff_mutation",
        1,
        lambda parents, content, limits, rng, ga: wyckoff_mutation(parents[0], content, limits, rng),
    ),
    VariationOperator("immigrant", 0, None),
)
OPERATORS = tuple(VARIATION_OPERATORS)

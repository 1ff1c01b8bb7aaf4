"""Operators on Wyckoff orbits: children that keep their parents' space group by construction.

Wyckoff heredity: a child made of whole Wyckoff orbits of two parents that share a space group.

Cut-and-splice heredity (operators.heredity) mixes two parents in real space, and almost every such child
relaxes into a P1 minimum, while the ground states searched for are mostly of high symmetry. Here the
mixing happens in the symmetric description instead: both parents are written in the standard setting of
their common space group (spglib), each as a lattice plus a list of orbits (the atoms one Wyckoff
position generates), and the child takes some orbits from each parent, per element as many atoms as the
formula needs, on a lattice blended from the two. Every orbit of the group is an orbit in any lattice of
its crystal system, so the child has at least the parents' space group by construction; what it inherits
is a sublattice (e.g. the cations of one parent with the anions of the other), the symmetric analogue of
a slab.

Parents must share a space group (other than P1) and the size of their standard cell; the GA picks the
second parent among the members of the first's space group (search/ga.py). The operator returns None when
no valid child exists (different groups, no orbit split that keeps the formula, atoms too close), so the
GA falls back to another operator.

Wyckoff mutation: one symmetric parent keeps some of its orbits where they are and draws the others
afresh on their Wyckoff positions (new free coordinates, and between orbits of equal size, new elements),
in the parent's group and cell. A random symmetric structure that inherits part of a good one: random
symmetric draws are what finds most ground states of small cells, and this one starts from a sublattice
that already paid off.
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import spglib
from pymatgen.core import Lattice, Structure

from globopt.geometry import GeometryLimits
from globopt.search.cells import WorkingCell, finish, reduced_basis

# spglib tolerance (Å) for the parents' space group: the engine's default for the reported group, so the
# operator sees the groups the GA pairs its parents by.
SYMPREC = 0.1
# Orbit splits tried per child; a split fails when atoms of the two parents land too close together.
ATTEMPTS = 8
# Subset sums over one parent's orbits of one element are enumerated up to this many orbits.
MAX_ORBITS_ENUMERATED = 12
# Primitive basis vectors (rows, in units of the standard conventional basis) for each lattice centring
# of spglib's standard settings (rhombohedral groups in the hexagonal, obverse setting).
CENTRING_TO_PRIMITIVE = {
    "P": np.eye(3),
    "A": np.array([[1.0, 0.0, 0.0], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5]]),
    "B": np.array([[0.5, 0.0, -0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]),
    "C": np.array([[0.5, 0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]),
    "I": np.array([[-0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.5, 0.5, -0.5]]),
    "F": np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]),
    "R": np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]]),
}
# Fractional distance below which two sites folded into the primitive cell are the same site.
SAME_SITE = 1e-4


@dataclass(frozen=True)
class Orbit:
    """The atoms of one element that one Wyckoff position generates in the standard cell."""

    element: str
    frac: np.ndarray  # (multiplicity, 3), fractional in the standard (conventional) cell

    @property
    def multiplicity(self) -> int:
        return len(self.frac)


@dataclass(frozen=True)
class SymmetricForm:
    """A structure as its space group sees it: standard conventional cell and its orbits."""

    group: int
    centring: str  # lattice centring of the standard cell (first letter of the Hall symbol)
    parameters: np.ndarray  # a, b, c (Å), alpha, beta, gamma (degrees) of the standard cell
    lattice: np.ndarray  # the standard cell's lattice rows (Å)
    orbits: tuple[Orbit, ...]
    n_atoms: int  # atoms in the original cell

    @property
    def standard_size(self) -> int:
        return sum(orbit.multiplicity for orbit in self.orbits)

    def orbits_of(self, element: str) -> list[Orbit]:
        return [orbit for orbit in self.orbits if orbit.element == element]


def symmetric_form(structure: Structure, symprec: float = SYMPREC) -> SymmetricForm | None:
    """The standard-setting orbits of ``structure``, or None for P1 (no orbits to exchange)."""
    numbers = np.array(structure.atomic_numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = spglib.get_symmetry_dataset(
            (structure.lattice.matrix, structure.frac_coords, numbers), symprec=symprec
        )
    if found is None or found.number <= 1 or found.hall.lstrip("-")[0] not in CENTRING_TO_PRIMITIVE:
        return None
    # each atom of the standard cell belongs to the orbit of the input atoms that share its primitive atom
    orbit_of_primitive = {
        int(p): int(orbit)
        for p, orbit in zip(found.mapping_to_primitive, found.crystallographic_orbits, strict=True)
    }
    by_orbit: dict[int, list[int]] = defaultdict(list)
    for index, primitive_atom in enumerate(found.std_mapping_to_primitive):
        by_orbit[orbit_of_primitive[int(primitive_atom)]].append(index)
    symbols = {int(z): site.specie.symbol for z, site in zip(numbers, structure, strict=True)}
    positions = np.asarray(found.std_positions) % 1.0
    orbits = tuple(
        Orbit(symbols[int(found.std_types[members[0]])], positions[members]) for members in by_orbit.values()
    )
    parameters = np.array(Lattice(found.std_lattice).parameters)
    centring = found.hall.lstrip("-")[0]
    return SymmetricForm(
        int(found.number), centring, parameters, np.array(found.std_lattice), orbits, len(structure)
    )


def _subsets_with_sum(orbits: list[Orbit], target: int, rng: np.random.Generator) -> list[Orbit] | None:
    """A random subset of ``orbits`` whose multiplicities add up to ``target``, or None."""
    if target == 0:
        return []
    order = list(rng.permutation(len(orbits)))[:MAX_ORBITS_ENUMERATED]
    sizes = list(range(1, len(order) + 1))
    rng.shuffle(sizes)
    for size in sizes:
        for chosen in itertools.combinations(order, size):
            if sum(orbits[i].multiplicity for i in chosen) == target:
                return [orbits[i] for i in chosen]
    return None


def _orbit_split(
    first: SymmetricForm, second: SymmetricForm, rng: np.random.Generator
) -> tuple[list[Orbit], list[Orbit]] | None:
    """Orbits taken from each parent: per element a random share of the first parent's orbits, the rest
    of that element's atoms from the second's; at least one orbit from each parent overall."""
    elements = sorted({orbit.element for orbit in first.orbits})
    taken_first: list[Orbit] = []
    taken_second: list[Orbit] = []
    for element in elements:
        own, other = first.orbits_of(element), second.orbits_of(element)
        needed = sum(orbit.multiplicity for orbit in own)
        if needed != sum(orbit.multiplicity for orbit in other):
            return None
        for _ in range(4):
            kept = [orbit for orbit in own if rng.random() < 0.5]
            rest = _subsets_with_sum(other, needed - sum(orbit.multiplicity for orbit in kept), rng)
            if rest is not None:
                taken_first += kept
                taken_second += rest
                break
        else:
            taken_first += own
    if not taken_first or not taken_second:
        return None
    return taken_first, taken_second


def _blended_lattice(first: SymmetricForm, second: SymmetricForm, weight: float) -> Lattice:
    """Lattice parameters weighted between the parents (the same crystal system, the same setting), at
    the weighted mean volume per atom."""
    parameters = weight * first.parameters + (1.0 - weight) * second.parameters
    lattice = Lattice.from_parameters(*parameters)
    volume_a = Lattice.from_parameters(*first.parameters).volume
    volume_b = Lattice.from_parameters(*second.parameters).volume
    target = weight * volume_a + (1.0 - weight) * volume_b
    return lattice.scale(target)


def _distinct(points: np.ndarray) -> list[int]:
    """Indices of the first of each group of periodically equal fractional points, in order."""
    kept: list[int] = []
    for index, point in enumerate(points):
        if kept:
            delta = points[kept] - point
            delta -= np.round(delta)
            if np.any(np.abs(delta).max(axis=1) < SAME_SITE):
                continue
        kept.append(index)
    return kept


def _sites(orbits: list[Orbit] | tuple[Orbit, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The orbits' atoms as (element symbols, fractional coordinates), orbit by orbit."""
    symbols = np.array([orbit.element for orbit in orbits for _ in range(orbit.multiplicity)])
    return symbols, np.concatenate([orbit.frac for orbit in orbits])


def _child(
    orbits: list[Orbit],
    lattice: np.ndarray,
    centring: str,
    n_atoms: int,
    content: dict[str, int],
    limits: GeometryLimits,
) -> Structure | None:
    """The structure the orbits make in the standard cell ``lattice``, as a checked cell of ``n_atoms``,
    or None. Without a generator the overlap repair pushes symmetry-equivalent pairs alike: the group
    stays."""
    symbols, frac = _sites(orbits)
    primitive = _primitive(lattice, frac, symbols, centring)
    cell = None if primitive is None else _repeated(primitive, n_atoms)
    if cell is None:
        return None
    return finish(cell, content, limits, repair=False) or finish(cell, content, limits, repair=True)


def _primitive(
    lattice: np.ndarray, frac: np.ndarray, symbols: np.ndarray, centring: str
) -> WorkingCell | None:
    """The standard cell's primitive cell by its centring: the child has its parents' centring
    translations by construction, so no symmetry search is needed. None if the sites do not fold."""
    to_primitive = CENTRING_TO_PRIMITIVE[centring]
    primitive_lattice = to_primitive @ lattice
    folded = (frac @ np.linalg.inv(to_primitive)) % 1.0
    kept = _distinct(folded)
    expected = len(frac) * abs(np.linalg.det(to_primitive))
    if len(kept) != round(expected):
        return None
    return WorkingCell(primitive_lattice, folded[kept], symbols[kept])


def _repeated(cell: WorkingCell, n_atoms: int) -> WorkingCell | None:
    """``cell`` repeated along its shortest axis to ``n_atoms`` (parents that are supercells of their
    primitive cell), in a reduced basis."""
    if n_atoms % len(cell.frac):
        return None
    repeat = n_atoms // len(cell.frac)
    axis = int(np.argmin(np.linalg.norm(cell.lattice, axis=1)))
    lattice, frac, symbols = cell.lattice.copy(), cell.frac, cell.symbols
    if repeat > 1:
        shifts = np.zeros((repeat, 3))
        shifts[:, axis] = np.arange(repeat)
        stretch = np.where(np.arange(3) == axis, repeat, 1)
        frac = ((frac[None, :, :] + shifts[:, None, :]) / stretch).reshape(-1, 3)
        symbols = np.tile(symbols, repeat)
        lattice[axis] *= repeat
    lattice, frac = reduced_basis(lattice, frac)
    return WorkingCell(lattice, frac % 1.0, symbols)


def _operations(form: SymmetricForm) -> tuple[np.ndarray, np.ndarray] | None:
    """The space group's operations in the standard cell (rotations, translations), from its idealised
    atoms; None if spglib finds another group there."""
    symbols, frac = _sites(form.orbits)
    elements = sorted(set(symbols))
    types = [elements.index(symbol) for symbol in symbols]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = spglib.get_symmetry_dataset((form.lattice, frac, types), symprec=1e-3)
    if found is None or found.number != form.group:
        return None
    return np.asarray(found.rotations, dtype=float), np.asarray(found.translations, dtype=float)


def _orbit_points(point: np.ndarray, operations: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The distinct images of ``point`` under the operations, in [0, 1)."""
    rotations, translations = operations
    images = (np.einsum("kij,j->ki", rotations, point) + translations) % 1.0
    return images[_distinct(images)]


def _same_points(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two orbits are the same set of points (periodic, any order)."""
    if len(first) != len(second):
        return False
    delta = first[:, None, :] - second[None, :, :]
    delta -= np.round(delta)
    return bool((np.abs(delta).max(axis=2) < SAME_SITE).any(axis=1).all())


def _redrawn(orbit: Orbit, operations: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The orbit's Wyckoff position with new free coordinates: the representative moved by a uniform
    random vector projected onto the fixed space of its site-symmetry rotations (their average), which
    every operation fixing the representative also fixes. Empty if the new point happens to be more
    special than the old one (a smaller orbit)."""
    rotations, translations = operations
    point = orbit.frac[0]
    images = (np.einsum("kij,j->ki", rotations, point) + translations) - point
    fixing = np.abs(images - np.round(images)).max(axis=1) < SAME_SITE
    projector = rotations[fixing].mean(axis=0)
    moved = _orbit_points((point + projector @ rng.random(3)) % 1.0, operations)
    return moved if len(moved) == orbit.multiplicity else np.empty((0, 3))


def wyckoff_mutation(
    parent: Structure,
    content: dict[str, int],
    limits: GeometryLimits,
    rng: np.random.Generator,
    symprec: float = SYMPREC,
) -> Structure | None:
    """The parent with some orbits kept and the others drawn afresh on their Wyckoff positions, elements
    shuffled among redrawn orbits of equal size; None when no valid child comes (see module doc)."""
    form = symmetric_form(parent, symprec)
    operations = None if form is None else _operations(form)
    if form is None or operations is None:
        return None
    for _ in range(ATTEMPTS):
        redraw = rng.random(len(form.orbits)) < 0.5
        if not redraw.any():
            redraw[rng.integers(len(form.orbits))] = True
        kept = [orbit for orbit, again in zip(form.orbits, redraw, strict=True) if not again]
        fresh = [orbit for orbit, again in zip(form.orbits, redraw, strict=True) if again]
        elements = [orbit.element for orbit in fresh]
        for size in {orbit.multiplicity for orbit in fresh}:
            same_size = [i for i, orbit in enumerate(fresh) if orbit.multiplicity == size]
            shuffled = rng.permutation(same_size)
            elements_before = list(elements)
            for target, source in zip(same_size, shuffled, strict=True):
                elements[target] = elements_before[source]
        points = [_redrawn(orbit, operations, rng) for orbit in fresh]
        if any(len(p) == 0 for p in points):
            continue
        if all(
            any(el == orbit.element and _same_points(p, orbit.frac) for orbit in fresh)
            for el, p in zip(elements, points, strict=True)
        ):
            continue  # only orbits without free coordinates were drawn, with the elements they had
        orbits = kept + [Orbit(el, p) for el, p in zip(elements, points, strict=True)]
        made = _child(orbits, form.lattice, form.centring, form.n_atoms, content, limits)
        if made is not None:
            return made
    return None


def wyckoff_heredity(
    parent_a: Structure,
    parent_b: Structure,
    content: dict[str, int],
    limits: GeometryLimits,
    rng: np.random.Generator,
    symprec: float = SYMPREC,
) -> Structure | None:
    """A child of whole Wyckoff orbits of two parents of one space group, or None (see module doc)."""
    first, second = symmetric_form(parent_a, symprec), symmetric_form(parent_b, symprec)
    if first is None or second is None or first.group != second.group:
        return None
    if first.standard_size != second.standard_size or first.n_atoms != second.n_atoms:
        return None
    for _ in range(ATTEMPTS):
        split = _orbit_split(first, second, rng)
        if split is None:
            return None
        lattice = _blended_lattice(first, second, float(rng.uniform(0.25, 0.75)))
        made = _child(split[0] + split[1], lattice.matrix, first.centring, first.n_atoms, content, limits)
        if made is not None:
            return made
    return None

"""Variation operators that move in composition, for a search over a chemical system (USPEX-style).

* ``heredity`` across compositions: slabs of two parents of any compositions are spliced as in the
  fixed-composition heredity (search/operators.py: same motif-preserving cut, lattice blend and content
  repair), and the child's content is the allowed content closest to what the slabs hold. Children of an
  A-rich and a B-rich parent land in between, which is how the hull's middle gets populated from its ends.
* ``transmutation``: one atom A -> B, the cell rescaled by the change in covalent volume.
* ``add_atom`` / ``remove_atom``: one atom more (placed at the roomiest spot) or less (the most crowded
  atom of its element), the cell rescaled the same way.

Every operator keeps the child inside the composition space (``globopt/hull/space.py``: total atoms,
per-element bounds, allowed compositions) and returns either a child that passes the same validity check as
every GA child (``cells.finish``) under the limits of its own composition, or None. All randomness comes from
the generator passed in, which the search checkpoints.

The registry ``COMPOSITION_OPERATORS`` sits beside the fixed-composition registry (``VARIATION_OPERATORS``);
the config accepts names from both, these only with ``chemical_system``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Structure

from globopt.hull.space import CompositionSpace, Counts
from globopt.search.cells import WorkingCell, cell_of, finish, nearest_distances
from globopt.search.operators import (
    ATTEMPTS,
    HEREDITY_ATTEMPTS,
    _add_one,
    _blend,
    _fix_content,
    _natural_spacing,
    _reduced,
    _same_as_stored,
    _stretch_axis,
    plan_splice,
)


def _sphere(element: str) -> float:
    return 4.0 / 3.0 * np.pi * covalent_radii[atomic_numbers[element]] ** 3


def _rescaled(cell: WorkingCell, old: Counter, new: Counter) -> WorkingCell:
    """The cell scaled by the change in summed covalent-sphere volume, so a child with a bigger or an extra
    atom starts near its natural density instead of squeezed (or rattling in space)."""
    before = sum(n * _sphere(el) for el, n in old.items())
    after = sum(n * _sphere(el) for el, n in new.items())
    return replace(cell, lattice=cell.lattice * (after / before) ** (1.0 / 3.0))


def _counter(space: CompositionSpace, counts: Counts) -> Counter:
    return Counter(space.content_dict(counts))


def _sorted_cell(cell: WorkingCell, space: CompositionSpace) -> WorkingCell:
    """Atoms in the system's element order, as pyxtal structures and the fixed-composition operators have."""
    order = {el: k for k, el in enumerate(space.elements)}
    rank = np.argsort([order[str(s)] for s in cell.symbols], kind="stable")
    return WorkingCell(cell.lattice, cell.frac[rank], cell.symbols[rank])


def _finish(cell: WorkingCell, counts: Counts, space: CompositionSpace, rng: np.random.Generator):
    return finish(
        _sorted_cell(cell, space), space.content_dict(counts), space.limits_for_counts(counts), repair=True,
        rng=rng,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# heredity across compositions


def variable_heredity(
    parent_a: Structure, parent_b: Structure, space: CompositionSpace, rng: np.random.Generator
) -> Structure | None:
    """Cut-and-splice of parents of any compositions; the child takes the allowed content nearest to what
    its two slabs hold, at a size between the parents' sizes."""
    cell_a, cell_b = _reduced(parent_a), _reduced(parent_b)
    small, large = sorted((len(parent_a), len(parent_b)))
    sizes = [n for n in space.sizes if small <= n <= large] or list(space.sizes)
    per_atom_a, per_atom_b = parent_a.volume / len(parent_a), parent_b.volume / len(parent_b)
    for _ in range(HEREDITY_ATTEMPTS):
        n_atoms = int(sizes[int(rng.integers(len(sizes)))])
        splice = plan_splice(cell_a, cell_b, n_atoms, rng)
        if splice is None:
            continue
        held = splice.held()
        total = sum(held.values())
        if total == 0:
            continue
        wanted = [held.get(el, 0) * n_atoms / total for el in space.elements]
        counts = space.nearest(wanted, n_atoms, rng)
        if counts is None:
            continue
        limits = space.limits_for_counts(counts)
        low, high = limits.volume_per_atom_range
        cut = splice.cut
        volume_per_atom = cut.fraction * per_atom_a + (1.0 - cut.fraction) * per_atom_b
        volume_per_atom = min(max(volume_per_atom, low * 1.02), high * 0.98)
        lattice = _blend(
            splice.piece_a.lattice, splice.piece_b.lattice, cut.fraction, n_atoms * volume_per_atom
        )
        child, spares = splice.cells(lattice)
        content = space.content_dict(counts)
        child = _fix_content(child, spares, content, cut, limits, rng)
        result = _finish(child, counts, space, rng)
        if result is not None and not any(_same_as_stored(result, p) for p in (parent_a, parent_b)):
            return result
    return None


# ----------------------------------------------------------------------------------------------------
# single-atom moves in composition


def _moves(space: CompositionSpace, counts: Counts, kind: str) -> list[tuple[int, int, Counts]]:
    """(element removed, element added, new counts) of every allowed one-atom move; -1: none."""
    size = len(counts)
    if kind == "transmute":
        pairs = [(i, j) for i in range(size) for j in range(size) if i != j]
    elif kind == "add":
        pairs = [(-1, j) for j in range(size)]
    else:
        pairs = [(i, -1) for i in range(size)]
    moves = []
    for i, j in pairs:
        new = list(counts)
        if i >= 0:
            new[i] -= 1
        if j >= 0:
            new[j] += 1
        if min(new) >= 0 and space.allows(tuple(new)):
            moves.append((i, j, tuple(new)))
    return moves


def _larger_cells(parent: Structure, space: CompositionSpace, rng: np.random.Generator) -> list[WorkingCell]:
    """The parent's cell, and where the space allows more atoms: its conventional cell and a doubled cell.

    Many compounds are orderings of an element's lattice (L1_2 and L1_0 on fcc, B2 on bcc, D0_19 on hcp)
    whose cells are larger than the element's primitive cell: swapping one atom of fcc Cu's 4-atom
    conventional cell gives L1_2 Cu3Au, one more swap L1_0 CuAu. Transmutation therefore also acts on
    these larger cells of the same crystal.
    """
    cells = [cell_of(parent)]
    n_atoms = len(parent)
    if 2 * n_atoms in space.sizes:
        reduced = _reduced(parent)
        axis = int(np.argmin(np.linalg.norm(reduced.lattice, axis=1)))
        cells.append(_stretch_axis(reduced, axis, 2.0, float(rng.random())))
    try:
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        conventional = SpacegroupAnalyzer(parent, symprec=0.1).get_conventional_standard_structure()
    except Exception:  # spglib gives up on badly distorted cells: no conventional cell then
        conventional = None
    if conventional is not None and n_atoms < len(conventional) and len(conventional) in space.sizes:
        cells.append(cell_of(conventional))
    return cells


def transmutation(parent: Structure, space: CompositionSpace, rng: np.random.Generator) -> Structure | None:
    """One atom of A becomes B, in the parent's cell or a larger cell of the same crystal (_larger_cells):
    the neighbouring composition with the parent's framework."""
    if space.counts_of(parent) is None:
        return None
    cells = _larger_cells(parent, space, rng)
    for _ in range(ATTEMPTS):
        cell = cells[int(rng.integers(len(cells)))]
        counts = tuple(int(np.sum(cell.symbols == el)) for el in space.elements)
        moves = _moves(space, counts, "transmute")
        if not moves:
            continue
        i, j, new = moves[int(rng.integers(len(moves)))]
        source, target = space.elements[i], space.elements[j]
        sites = np.flatnonzero(cell.symbols == source)
        symbols = cell.symbols.astype(object).copy()
        symbols[int(sites[rng.integers(len(sites))])] = target
        changed = _rescaled(
            replace(cell, symbols=symbols.astype(str)), _counter(space, counts), _counter(space, new)
        )
        result = _finish(changed, new, space, rng)
        if result is not None:
            return result
    return None


def add_atom(parent: Structure, space: CompositionSpace, rng: np.random.Generator) -> Structure | None:
    """One atom more, at the roomiest of a few random spots of the expanded cell."""
    counts = space.counts_of(parent)
    if counts is None:
        return None
    moves = _moves(space, counts, "add")
    cell = cell_of(parent)
    for _ in range(ATTEMPTS):
        if not moves:
            return None
        _, j, new = moves[int(rng.integers(len(moves)))]
        element = space.elements[j]
        grown = _rescaled(cell, _counter(space, counts), _counter(space, new))
        grown, _ = _add_one(grown, element, np.zeros((0, 3)), space.limits_for_counts(new), rng)
        result = _finish(grown, new, space, rng)
        if result is not None:
            return result
    return None


def remove_atom(parent: Structure, space: CompositionSpace, rng: np.random.Generator) -> Structure | None:
    """One atom less: of the chosen element, the one most squeezed against its neighbours (the likeliest
    misfit), or a random one every other try so repeated removals do not always pick the same site."""
    counts = space.counts_of(parent)
    if counts is None:
        return None
    moves = _moves(space, counts, "remove")
    cell = cell_of(parent)
    for attempt in range(ATTEMPTS):
        if not moves:
            return None
        i, _, new = moves[int(rng.integers(len(moves)))]
        element = space.elements[i]
        sites = np.flatnonzero(cell.symbols == element)
        if attempt % 2 == 0 and len(cell.frac) > 1:
            distances = nearest_distances(cell.lattice, cell.frac[sites], cell.frac)
            distances[np.arange(len(sites)), sites] = np.inf
            squeeze = (_natural_spacing(cell.symbols[sites], cell.symbols) / distances).max(axis=1)
            drop = int(sites[int(np.argmax(squeeze))])
        else:
            drop = int(sites[rng.integers(len(sites))])
        keep = np.arange(len(cell.frac)) != drop
        smaller = WorkingCell(cell.lattice, cell.frac[keep], cell.symbols[keep])
        smaller = _rescaled(smaller, _counter(space, counts), _counter(space, new))
        result = _finish(smaller, new, space, rng)
        if result is not None:
            return result
    return None


# ----------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class CompositionOperator:
    """``make(parents, space, rng, ga)`` returns a child inside the composition space, or None."""

    name: str
    n_parents: int
    make: Callable[[tuple[Structure, ...], CompositionSpace, np.random.Generator, Any], Structure | None]


COMPOSITION_OPERATORS: dict[str, CompositionOperator] = {
    op.name: op
    for op in (
        CompositionOperator(
            "transmutation", 1, lambda parents, space, rng, ga: transmutation(parents[0], space, rng)
        ),
        CompositionOperator("add_atom", 1, lambda parents, space, rng, ga: add_atom(parents[0], space, rng)),
        CompositionOperator(
            "remove_atom", 1, lambda parents, space, rng, ga: remove_atom(parents[0], space, rng)
        ),
    )
}
# heredity is in both registries: within one composition (operators.py) and, with a chemical system, across
VARIABLE_HEREDITY = CompositionOperator(
    "heredity", 2, lambda parents, space, rng, ga: variable_heredity(parents[0], parents[1], space, rng)
)

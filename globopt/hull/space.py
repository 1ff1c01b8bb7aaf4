"""The cell contents a variable-composition search may build, and their geometry limits.

A content is a tuple of atom counts aligned with the system's elements ((2, 6) is Al2Ni6 in Al-Ni). The
space holds every content whose total lies in ``atoms`` and whose counts respect ``hull.element_counts``
and ``hull.compositions``; a *composition* is what is left after reducing (Al2Ni6 and AlNi3 are one point
of the hull). The searches choose compositions and cell sizes from here, the operators snap their children
onto it, and the screen checks each proposal against the limits of its own composition.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from itertools import product

import numpy as np
from pymatgen.core import Composition, Structure

from globopt.composition import formula_string
from globopt.geometry import GeometryLimits, geometry_limits
from globopt.htvs.limits import MOLECULAR_VOLUME_FACTOR

Counts = tuple[int, ...]
# More cell contents than this and the composition space is a typo (or needs a different method).
MAX_CONTENTS = 20000
MAX_ENUMERATED = 10**6


class SpaceError(ValueError):
    """The configured bounds leave no cell content (or far too many); the message names the key."""


class CompositionSpace:
    def __init__(
        self,
        elements: Sequence[str],
        atoms: tuple[int, int],
        element_counts: dict[str, tuple[int, int]] | None = None,
        compositions: Iterable[dict[str, int]] | None = None,
        min_distance_factor: float = 0.6,
        volume_factor_range: tuple[float, float] = (0.4, 8.0),
    ) -> None:
        self.elements = tuple(elements)
        self.atoms = atoms
        self.min_distance_factor = min_distance_factor
        self.volume_factor_range = volume_factor_range
        bounds = dict(element_counts or {})
        unknown = sorted(set(bounds) - set(self.elements))
        if unknown:
            raise SpaceError(
                f"hull.element_counts: {', '.join(unknown)} not in chemical_system {list(self.elements)}"
            )
        low, high = atoms
        ranges = [bounds.get(el, (0, high)) for el in self.elements]
        wanted = None
        if compositions is not None:
            wanted = set()
            for entry in compositions:
                outside = sorted(set(entry) - set(self.elements))
                if outside:
                    raise SpaceError(
                        f"hull.compositions: {formula_string(entry)} has element(s) "
                        f"{', '.join(outside)} outside chemical_system {list(self.elements)}"
                    )
                wanted.add(Composition(entry).reduced_formula)
        estimate = np.prod([max(min(hi, high) - lo + 1, 0) for lo, hi in ranges], dtype=float)
        if estimate > MAX_ENUMERATED:
            raise SpaceError(f"atoms: {estimate:.0f} cell contents to enumerate; narrow atoms or hull bounds")
        contents = []
        for counts in product(*(range(lo, min(hi, high) + 1) for lo, hi in ranges)):
            total = sum(counts)
            if not low <= total <= high:
                continue
            if wanted is not None and self._reduced(counts) not in wanted:
                continue
            contents.append(counts)
        span = f"{low}" if low == high else f"{low}-{high}"
        if wanted is not None:
            lost = sorted(wanted - {self._reduced(c) for c in contents})
            if lost:
                raise SpaceError(
                    f"hull.compositions: {', '.join(lost)} has no cell of {span} atoms within "
                    f"hull.element_counts"
                )
        if not contents:
            raise SpaceError(
                f"atoms: no cell content of {span} atoms of {'-'.join(self.elements)} satisfies "
                f"hull.element_counts"
            )
        if len(contents) > MAX_CONTENTS:
            raise SpaceError(
                f"atoms: {len(contents)} cell contents (at most {MAX_CONTENTS}); narrow atoms or the "
                f"hull bounds"
            )
        contents.sort(key=lambda c: (sum(c), tuple(-n for n in c)))
        self.contents: tuple[Counts, ...] = tuple(contents)
        self._index = {c: i for i, c in enumerate(self.contents)}
        by_formula: dict[str, list[Counts]] = {}
        for counts in self.contents:
            by_formula.setdefault(self._reduced(counts), []).append(counts)
        self._by_formula = {f: tuple(c) for f, c in by_formula.items()}
        # compositions ordered along the system (by fraction of each element), so outputs read naturally
        self.compositions: tuple[str, ...] = tuple(
            sorted(self._by_formula, key=lambda f: tuple(-x for x in self.fractions(f)))
        )
        self.sizes = tuple(sorted({sum(c) for c in self.contents}))
        self._limits: dict[str, GeometryLimits] = {}

    # -- contents and compositions ------------------------------------------------------------------
    def _reduced(self, counts: Counts) -> str:
        return _reduced_formula(self.elements, counts)

    def formula(self, counts: Counts) -> str:
        """Reduced formula of a content (the composition it is a cell of)."""
        return self._reduced(counts)

    def fractions(self, formula: str) -> tuple[float, ...]:
        composition = Composition(formula)
        return tuple(composition.get_atomic_fraction(el) for el in self.elements)

    def contents_of(self, formula: str) -> tuple[Counts, ...]:
        return self._by_formula.get(formula, ())

    def allows(self, counts: Counts) -> bool:
        return counts in self._index

    def allows_element(self, element: str) -> bool:
        """Whether cells of the pure element are part of the space."""
        return element in self._by_formula

    def index(self, counts: Counts) -> int:
        return self._index[counts]

    def content_dict(self, counts: Counts) -> dict[str, int]:
        """{element: count} without the absent elements, in the system's order (what pyxtal is given)."""
        return {el: n for el, n in zip(self.elements, counts, strict=True) if n}

    def counts_of(self, structure: Structure) -> Counts | None:
        """The structure's content as counts, or None when it holds an element outside the system."""
        amounts = structure.composition.get_el_amt_dict()
        if set(amounts) - set(self.elements):
            return None
        return tuple(round(amounts.get(el, 0)) for el in self.elements)

    def nearest(self, wanted: Sequence[float], total: int, rng: np.random.Generator) -> Counts | None:
        """The content of ``total`` atoms closest (in atom counts) to ``wanted``; ties drawn at random."""
        options = [c for c in self.contents if sum(c) == total]
        if not options:
            return None
        distance = np.array([sum(abs(n - w) for n, w in zip(c, wanted, strict=True)) for c in options])
        best = np.flatnonzero(distance <= distance.min() + 1e-9)
        return options[int(best[rng.integers(len(best))])] if len(best) > 1 else options[int(best[0])]

    # -- geometry limits -------------------------------------------------------------------------------
    def limits_for_counts(self, counts: Counts) -> GeometryLimits:
        """The limits of one composition (cached): covalent radii scaled as for a fixed composition, with
        the molecular-crystal volume window for single-element cells (as a screen's references need)."""
        formula = self._reduced(counts)
        if formula not in self._limits:
            present = [(el, n) for el, n in zip(self.elements, counts, strict=True) if n]
            low, high = self.volume_factor_range
            if len(present) == 1:
                high = max(high, MOLECULAR_VOLUME_FACTOR)
            self._limits[formula] = geometry_limits(
                [el for el, _ in present], [n for _, n in present], self.min_distance_factor, (low, high)
            )
        return self._limits[formula]

    def limits_for(self, structure: Structure) -> GeometryLimits:
        counts = self.counts_of(structure)
        if counts is None:  # cannot happen for the search's own proposals; the envelope still applies
            return self.envelope
        return self.limits_for_counts(counts)

    @functools.cached_property
    def envelope(self) -> GeometryLimits:
        """Pair distances for every pair of the system's elements and a volume window holding every
        composition's window: the relaxation's guards and the random structures use it (workers do not
        know the composition a structure was drawn for)."""
        from globopt.htvs.limits import envelope_limits

        return envelope_limits(self.elements, self.min_distance_factor, self.volume_factor_range)


@functools.lru_cache(maxsize=4096)
def _reduced_formula(elements: tuple[str, ...], counts: Counts) -> str:
    return Composition({el: n for el, n in zip(elements, counts, strict=True) if n}).reduced_formula

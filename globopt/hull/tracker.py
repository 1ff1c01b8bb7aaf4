"""The running convex hull of a variable-composition search: the fitness of every structure it relaxes.

The hull of everything relaxed so far is fixed by the lowest enthalpy found at each composition (plus any
entries the user supplied), so that small table is all the state it needs: it travels in the search state,
stored in the archive with every result, and a resumed search has exactly the hull the killed one had.

A structure's fitness is its enthalpy per atom above the current hull at its composition; it changes as
new structures arrive, so callers ask for it when they need it instead of storing it. Rank 0 pays for a
pymatgen ``PhaseDiagram`` only when a result lands *below* the hull (the only way the hull can change),
and for a hull energy once per composition and hull.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

# Results within this of the hull (eV/atom) do not change it: floating-point noise, not a new phase.
HULL_TOLERANCE = 1e-9


class HullTracker:
    def __init__(self, elements: Sequence[str], given: Iterable[PDEntry] = ()) -> None:
        self.elements = tuple(elements)
        self.given = list(given)  # user-supplied entries (competing_phases JSON), part of every hull
        # reduced formula -> (lowest enthalpy per atom, candidate id) among the run's relaxed structures
        self.minima: dict[str, tuple[float, int]] = {}
        self._diagram: PhaseDiagram | None = None
        self._hull_energy: dict[str, float] = {}
        self.version = 0  # bumped whenever the hull changes, so callers can refresh cached fitness values
        self.rebuilds = 0

    # -- learning ----------------------------------------------------------------------------------
    def add(self, formula: str, enthalpy_per_atom: float, candidate_id: int) -> bool:
        """Record a relaxed structure; True when the hull changed (the structure lies below it)."""
        formula = Composition(formula).reduced_formula
        known = self.minima.get(formula)
        if known is not None and enthalpy_per_atom >= known[0]:
            return False
        below = not self.complete or enthalpy_per_atom < self.hull_energy(formula) - HULL_TOLERANCE
        self.minima[formula] = (enthalpy_per_atom, candidate_id)
        if below:
            self._rebuild()
        return below

    def _rebuild(self) -> None:
        self._hull_energy.clear()
        self._diagram = None
        if self.complete:
            self._diagram = PhaseDiagram(self.entries())
            self.rebuilds += 1
        self.version += 1

    def entries(self) -> list[PDEntry]:
        """The lowest structure of each composition, and the given entries."""
        entries = []
        for formula, (energy, candidate_id) in self.minima.items():
            composition = Composition(formula)
            entries.append(
                PDEntry(composition, energy * composition.num_atoms, name=formula, attribute=candidate_id)
            )
        return entries + self.given

    # -- asking ------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every element has an end point: only then is there a hull (and a formation energy)."""
        compositions = [e.composition for e in self.given] + [Composition(f) for f in self.minima]
        present = {c.elements[0].symbol for c in compositions if len(c.elements) == 1}
        return all(el in present for el in self.elements)

    def hull_energy(self, formula: str) -> float:
        """Enthalpy per atom of the hull at a composition (KeyError-free: any composition of the system)."""
        if self._diagram is None:
            raise ValueError("no hull yet: an element has no relaxed structure")
        if formula not in self._hull_energy:
            self._hull_energy[formula] = float(self._diagram.get_hull_energy_per_atom(Composition(formula)))
        return self._hull_energy[formula]

    def above_hull(self, formula: str, enthalpy_per_atom: float) -> float | None:
        """Enthalpy per atom above the current hull, or None while there is no hull."""
        if self._diagram is None:
            return None
        return enthalpy_per_atom - self.hull_energy(Composition(formula).reduced_formula)

    def formation_energy(self, formula: str, enthalpy_per_atom: float) -> float | None:
        """Formation enthalpy per atom against the lowest elemental structures known (None without a hull)."""
        if self._diagram is None:
            return None
        composition = Composition(formula)
        references = sum(
            composition.get_atomic_fraction(el) * self._diagram.el_refs[el].energy_per_atom
            for el in composition.elements
        )
        return enthalpy_per_atom - references

    def distance(self, formula: str) -> float:
        """How far the best structure of a composition lies above the hull (0 where none is known yet or
        there is no hull): what the composition-spreading rule tilts by."""
        known = self.minima.get(formula)
        if known is None or self._diagram is None:
            return 0.0
        return max(0.0, known[0] - self.hull_energy(formula))

    def stable(self) -> list[tuple[str, float, int | None]]:
        """(formula, enthalpy per atom, candidate id; None: a given entry) on the hull, along the system."""
        if self._diagram is None:
            return []
        rows = []
        for entry in self._diagram.stable_entries:
            candidate = entry.attribute if isinstance(entry.attribute, int) else None
            rows.append((entry.composition.reduced_formula, entry.energy_per_atom, candidate))
        first = self.elements[0]
        return sorted(rows, key=lambda r: (-Composition(r[0]).get_atomic_fraction(first), r[0]))

    # -- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"minima": {f: [e, i] for f, (e, i) in self.minima.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.minima = {f: (float(e), int(i)) for f, (e, i) in state.get("minima", {}).items()}
        self._rebuild()
